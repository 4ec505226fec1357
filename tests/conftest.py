import os
import sys

import pytest

# Test helpers (tests/models.py, tests/dist.py) import as top-level modules, also in
# the processes the multi-rank harness spawns.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session")
def megatron_world():
    import os
    import socket

    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from regate_megatron.cpu_compat import apply_cpu_compat

    apply_cpu_compat()
    owns = not dist.is_initialized()
    if owns:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    ps.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)
    yield
    ps.destroy_model_parallel()
    if owns:
        dist.destroy_process_group()

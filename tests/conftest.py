import os
import sys

import pytest

# Test helpers (tests/models.py, tests/dist.py) import as top-level modules, also in
# the processes the multi-rank harness spawns.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session")
def megatron_world():
    """A one-rank world in the pytest process (TP = PP = 1)."""
    from regate_megatron.training.parallel import destroy_parallel, initialize_parallel

    initialize_parallel()
    yield
    destroy_parallel()


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "gpu: needs a CUDA GPU (benchmarks/gpu_check.sh runs `pytest -m gpu`); "
        "skipped without one")

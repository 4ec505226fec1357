"""Run a patched Megatron-LM training script on CPU (gloo), for the tests only.

    python -m torch.distributed.run --nproc-per-node N tests/megatron_lm_cpu.py \
        /path/to/pretrain_vlm.py <its flags> --distributed-backend gloo

Megatron-Core's CUDA assumptions are bridged by `apply_cpu_compat` (the package's CPU
bridge); the few that Megatron-LM's own training loop (``megatron/training``) adds are
answered here, in this launcher only: device count and selection, the CUDA RNG state in
checkpoints, the side stream around DDP construction, memory statistics, the JIT warm-up,
the dataset helpers' build step, the GPU architecture query. Nothing of Megatron is
replaced: its initialisation, training loop, schedules, checkpointing and the patched
script run as they are. One stock bug, not a CPU answer, is bridged where present:
Megatron-Core 0.19.x's ``build_tokenizer`` gives a ``MultimodalTokenizer`` no path
(`multimodal_tokenizer_path`; patches/README.md, examples/multimodal at core_v0.19.0).
"""

import contextlib
import inspect
import os
import runpy
import sys

import torch

from regate_megatron.core import cpu_compat


def _set(owner, name, value, answered):
    setattr(owner, name, value)
    answered.append(f"{getattr(owner, '__name__', owner)}.{name}")


def multimodal_tokenizer_path(answered: list) -> None:
    """Not a CPU answer: Megatron-Core 0.19.x's ``build_tokenizer`` gives a
    ``MultimodalTokenizer`` no path ("Tokenizer path must be specified.", so the stock
    ``examples/multimodal`` cannot start at ``core_v0.19.0``); later Megatron-LM passes
    ``--tokenizer-model``, as this does. Only where that line is missing."""
    import types

    try:
        import megatron.core.tokenizers.utils.build_tokenizer as bt
    except ImportError:  # Megatron-LM < 0.19 builds its tokenizers elsewhere
        return
    import megatron.training.global_vars as global_vars

    if getattr(global_vars, "build_tokenizer", None) is not bt.build_tokenizer:
        return
    branch = inspect.getsource(bt.build_tokenizer).split("== 'MultimodalTokenizer':")[-1]
    if "tokenizer_path = args.tokenizer_model" in branch.split("elif")[0]:
        return
    original, cls = bt.build_tokenizer, bt.MegatronTokenizer

    def build_tokenizer(args, **kwargs):
        if args.tokenizer_type != "MultimodalTokenizer":
            return original(args, **kwargs)

        def from_pretrained(tokenizer_path=None, **kw):
            return cls.from_pretrained(tokenizer_path=tokenizer_path or args.tokenizer_model, **kw)

        bt.MegatronTokenizer = types.SimpleNamespace(from_pretrained=from_pretrained)
        try:
            return original(args, **kwargs)
        finally:
            bt.MegatronTokenizer = cls

    _set(global_vars, "build_tokenizer", build_tokenizer, answered)


def answer_cuda_on_cpu() -> list:
    """Apply the CPU bridge and the training loop's CUDA answers; returns what was set."""
    import megatron.core.datasets.helpers_cpp  # noqa: F401  (the wheel ships them built)
    import megatron.core.datasets.utils as dataset_utils
    import megatron.training.arguments as arguments
    import megatron.training.initialize as initialize
    import megatron.training.training as training
    import megatron.training.utils as training_utils

    assert cpu_compat.apply_cpu_compat(), "expected a machine without CUDA"
    answered: list = []
    # _initialize_distributed builds the model-parallel groups (and seeds the RNG tracker)
    # only when a device is counted.
    _set(torch.cuda, "device_count", lambda: 1, answered)
    _set(torch.cuda, "set_device", lambda device: None, answered)
    # checkpoints save and restore the CUDA generator's state
    _set(torch.cuda, "get_rng_state", lambda device="cuda": torch.get_rng_state(), answered)
    _set(torch.cuda, "set_rng_state", lambda new_state, device="cuda": None, answered)
    # get_model builds DDP inside a side stream
    _set(torch.cuda, "Stream", lambda *a, **k: cpu_compat._CpuStream(), answered)
    _set(torch.cuda, "stream", lambda stream=None: contextlib.nullcontext(), answered)
    # training_log's memory report
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved",
                 "max_memory_reserved", "device_memory_used"):
        _set(torch.cuda, name, lambda device=None: 0, answered)
    _set(torch.cuda, "memory_stats", lambda device=None: {}, answered)
    _set(torch.cuda, "empty_cache", lambda: None, answered)
    _set(torch.cuda, "reset_peak_memory_stats", lambda device=None: None, answered)
    # _compile_dependencies runs `make` where the wheel has the helpers already built
    _set(dataset_utils, "compile_helpers", lambda: None, answered)
    # the fused-kernel warm-up allocates on "cuda"; nothing to warm up on CPU
    _set(initialize, "_warmup_jit_function", lambda *a, **k: None, answered)  # 0.19: tp_size=
    # validate_args asks the GPU architecture at TP > 1: answer Hopper, like the H200
    _set(training_utils, "get_device_arch_version", lambda: 9, answered)
    if hasattr(arguments, "get_device_arch_version"):
        _set(arguments, "get_device_arch_version", lambda: 9, answered)
    original = initialize.initialize_megatron

    def initialize_megatron(*args, **kwargs):
        return original(*args, **dict(kwargs, allow_no_cuda=True))

    _set(initialize, "initialize_megatron", initialize_megatron, answered)
    _set(training, "initialize_megatron", initialize_megatron, answered)
    return answered


if __name__ == "__main__":
    answered = answer_cuda_on_cpu()
    multimodal_tokenizer_path(answered)
    if int(os.environ.get("RANK", "0")) == 0:
        print("[megatron_lm_cpu] CPU answers for:", ", ".join(answered), flush=True)
    script = os.path.abspath(sys.argv[1])
    sys.argv = [script] + sys.argv[2:]
    sys.path.insert(0, os.path.dirname(script))
    runpy.run_path(script, run_name="__main__")

"""Run Megatron-Core (0.16.1 to 0.19.x) on CPU with the gloo backend.

Two parts:

* :func:`apply_cpu_compat` bridges the CUDA assumptions that Megatron-Core makes
  even when it is told to initialise on CPU. It is
  the only function here that patches anything; importing this module patches
  nothing, and on a machine where ``torch.cuda.is_available()`` it does
  nothing at all. Every patch wraps the original (kept as ``__wrapped__``),
  carries the :data:`PATCH_MARKER` attribute so a second call is a no-op, and
  says in a comment what broke without it.
* :func:`guard_pipeline_p2p`, a guard for a way Megatron-Core on gloo gives
  *silently wrong* results (a plain function, not a patch; the caller decides where
  it runs).

This module is the CPU bridge only. The distributed-optimizer checkpoint fixes, which
apply on GPUs too, live in `regate_megatron.training.optimizer_state`. The functions patched here
have the same signatures in every supported Megatron-Core (0.16.1 to 0.19.x; see
`regate_megatron.core.mcore_compat`), so nothing here depends on the version.
"""

import contextlib
import functools
import logging
from typing import Any, Callable, Iterator, Optional

import torch

__all__ = [
    "PATCH_MARKER",
    "apply_cpu_compat",
    "guard_pipeline_p2p",
]

logger = logging.getLogger(__name__)

# Attribute set (to True) on every function/object this module installs.
PATCH_MARKER = "_regate_cpu_compat"


# --------------------------------------------------------------------------------------
# Patch helpers
# --------------------------------------------------------------------------------------


def _is_patched(owner: Any, name: str) -> bool:
    return getattr(getattr(owner, name, None), PATCH_MARKER, False)


def _install(owner: Any, name: str, make_wrapper: Callable[[Callable], Callable]) -> None:
    """Replace ``owner.name`` with ``make_wrapper(original)`` unless already patched."""
    if _is_patched(owner, name):
        return
    original = getattr(owner, name)
    wrapper = make_wrapper(original)
    if not hasattr(wrapper, "__wrapped__"):
        functools.update_wrapper(wrapper, original)
    setattr(wrapper, PATCH_MARKER, True)
    setattr(owner, name, wrapper)


def _is_cuda_device(device: Any) -> bool:
    """True for "cuda", "cuda:N", torch.device("cuda"[, N]) -- nothing else."""
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device == "cuda" or device.startswith("cuda:")
    return False


def _cpu_if_cuda(device: Any) -> Any:
    return torch.device("cpu") if _is_cuda_device(device) else device


# --------------------------------------------------------------------------------------
# The patches
# --------------------------------------------------------------------------------------


# Where the patches sit. Megatron reaches `torch.cuda.current_device`,
# `torch.cuda.synchronize`, `torch.zeros(device="cuda")`, ... through the one shared
# `torch` module from dozens of functions in ~15 modules, so those are wrapped on
# torch itself. On a CPU-only torch every one of these calls raises, so the wrappers
# change only calls that would otherwise crash. Everything else is patched on the
# specific Megatron class/module attribute.


def _patch_torch_cuda_device_queries() -> None:
    # Megatron uses `torch.cuda.current_device()` as a *device* for new tensors
    # (p2p receive buffers, GlobalMemoryBuffer, DDP grad buffers, optimizer state,
    # rotary inv_freq). On a CPU-only build it raises "Torch not compiled with CUDA
    # enabled". Answer the CPU device instead; the only callers affected are ones
    # that would otherwise crash.
    _install(torch.cuda, "current_device", lambda original: lambda: torch.device("cpu"))

    # `torch.cuda.synchronize()` is called after every batched p2p exchange
    # (batch_p2p_sync) and in dist_checkpointing save; CPU ops are synchronous.
    _install(torch.cuda, "synchronize", lambda original: lambda device=None: None)

    # From Megatron-Core 0.17, DDP's grad sync (`_ParamAndGradBucketGroup.start_grad_sync`,
    # every step with DP > 1) waits on `torch.cuda.current_stream()` for CUDA-graph events;
    # on a CPU-only torch that raises "Found no NVIDIA driver". CPU work has one implicit
    # stream: answer a stand-in whose waits are no-ops (no version branch: 0.16.1 never
    # calls it there, and every caller would otherwise crash).
    _install(torch.cuda, "current_stream", lambda original: lambda device=None: _CPU_STREAM)


class _CpuStream:
    """What `torch.cuda.current_stream()` answers on CPU: CPU ops are synchronous, so
    waiting on an event or another stream is a no-op."""

    def wait_event(self, event: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass


_CPU_STREAM = _CpuStream()


def _patch_tensor_cuda() -> None:
    # `Tensor.cuda()` is called on CLIP ViT position ids (clip_vit_model.__init__) and
    # on the gathered optimizer state when saving a fully_reshardable distributed
    # optimizer; keep the tensor on CPU.
    def make_wrapper(original):
        def cuda(self, device=None, non_blocking=False, memory_format=torch.preserve_format):
            return self.to("cpu", non_blocking=non_blocking, memory_format=memory_format)

        return cuda

    _install(torch.Tensor, "cuda", make_wrapper)


# Factory functions that Megatron calls with device="cuda" on the paths exercised
# (measured): `torch.zeros([], device="cuda")` in every schedule, DDP warm-up and
# clip_grads; `torch.tensor(..., device="cuda")` in the optimizers and the grad-norm
# all-reduce; `torch.ones(..., device="cuda")` in the default causal mask of the
# stock DotProductAttention / fused softmax.
_CUDA_FACTORY_FUNCTIONS = ("zeros", "ones", "tensor")


def _patch_factory_functions() -> None:
    # Map only an explicit CUDA device to CPU; every other call passes through untouched.
    def make_wrapper(original):
        def factory(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _cpu_if_cuda(kwargs["device"])
            return original(*args, **kwargs)

        return factory

    for name in _CUDA_FACTORY_FUNCTIONS:
        _install(torch, name, make_wrapper)


def _patch_rng_tracker() -> None:
    # Megatron's CudaRNGStatesTracker (model_parallel_cuda_manual_seed, the
    # tensor-parallel dropout / init fork, sequence-parallel regions, activation
    # recompute) saves and restores the *CUDA* generator state, which does not exist
    # on CPU. On CPU every op draws from the CPU default generator, so that generator
    # plays the role the CUDA one plays on GPU: the tracker forks it.
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mpu_random

    _install(
        mpu_random,
        "_get_cuda_rng_state",
        lambda original: lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state(),
    )
    _install(
        mpu_random,
        "_set_cuda_rng_state",
        lambda original: lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(
            new_state
        ),
    )

    def make_add(original):
        # Same contract as CudaRNGStatesTracker.add, on the CPU generator. A
        # replacement, not a wrapper: the original calls torch.cuda.get_rng_state()
        # and torch.cuda.manual_seed() directly.
        def add(self, name, seed):
            if getattr(self, "use_cudagraphable_rng", False):
                raise RuntimeError("use_cudagraphable_rng needs CUDA; it is unsupported on CPU.")
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"cuda rng state {name} already exists")
            self._is_initialized = True
            self.seeds_.add(seed)
            orig_rng_state = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig_rng_state)

        return add

    _install(mpu_random.CudaRNGStatesTracker, "add", make_add)

    def make_seed(original):
        # On GPU, model_parallel_cuda_manual_seed seeds the default CUDA generator with
        # the data-parallel seed, so dropout outside tensor-parallel regions draws the
        # same mask on every TP rank (their activations are replicas). Do the same for
        # the CPU generator, which is the default generator here.
        def model_parallel_cuda_manual_seed(seed, *args, **kwargs):
            result = original(seed, *args, **kwargs)
            torch.manual_seed(seed)
            return result

        return model_parallel_cuda_manual_seed

    _install(mpu_random, "model_parallel_cuda_manual_seed", make_seed)
    # The package re-exports it by name; point that name at the same wrapper.
    if not _is_patched(tensor_parallel, "model_parallel_cuda_manual_seed"):
        tensor_parallel.model_parallel_cuda_manual_seed = mpu_random.model_parallel_cuda_manual_seed

    # The tracker's fork() compares the CPU generator before/after the block to warn
    # about CPU randomness inside a "GPU" RNG context; on CPU that is the forked
    # generator itself, so it would warn on every dropout. Drop just that message.
    rng_logger = logging.getLogger(mpu_random.__name__)
    if not any(getattr(f, PATCH_MARKER, False) for f in rng_logger.filters):
        rng_logger.addFilter(_DropCpuRngForkWarning())


class _DropCpuRngForkWarning(logging.Filter):
    """Drops the tracker's "CPU RNG state changed within GPU RNG context" warning."""

    _regate_cpu_compat = True  # PATCH_MARKER

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


@contextlib.contextmanager
def _cpu_tensors_report_cuda_type() -> Iterator[None]:
    """While active, ``t.type()`` of a CPU float tensor answers its CUDA type name.

    Megatron's distributed optimizer and ``clip_grad_by_total_norm_fp32`` accept
    parameters/grads only if ``t.type()`` is ``'torch.cuda.FloatTensor'`` (or the
    Half/BFloat16 variants) and raise TypeError/AssertionError for CPU tensors.
    Swapped in only for the duration of those calls (main thread).
    """
    original = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu":
            name = original(self)  # e.g. 'torch.FloatTensor'
            return name.replace("torch.", "torch.cuda.", 1)
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original


def _report_cuda_type_during(original: Callable) -> Callable:
    def wrapper(*args, **kwargs):
        with _cpu_tensors_report_cuda_type():
            return original(*args, **kwargs)

    return wrapper


def _patch_tensor_type_checks() -> None:
    # `param.type() == 'torch.cuda.FloatTensor'` checks: DistributedOptimizer.__init__,
    # Float16OptimizerWithFloat16Params.__init__
    # (TypeError "Wrapped parameters must be one of torch.cuda.FloatTensor ...") and
    # clip_grad_by_total_norm_fp32 (AssertionError on every step with clip_grad > 0).
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as mcore_optimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    _install(DistributedOptimizer, "__init__", _report_cuda_type_during)
    # --bf16 / --fp16 without the distributed optimizer: the same check on the fp16 params.
    _install(mcore_optimizer.Float16OptimizerWithFloat16Params, "__init__",
             _report_cuda_type_during)
    _install(clip_grads, "clip_grad_by_total_norm_fp32", _report_cuda_type_during)
    # optimizer.py imported the function by name; point that name at the same wrapper.
    mcore_optimizer.clip_grad_by_total_norm_fp32 = clip_grads.clip_grad_by_total_norm_fp32


class _TorchLayerNormForSpec:
    """torch.nn.LayerNorm behind the (config, hidden_size, eps) spec signature.

    A class, not a function: build_module returns plain functions uncalled.
    """

    def __new__(cls, config: Any, hidden_size: int, eps: float = 1e-5, **_unused: Any):
        return torch.nn.LayerNorm(hidden_size, eps=eps)


def _patch_clip_vit_norm() -> None:
    # Without TE, clip_vit_model's default ln_pre_impl / ln_post_impl is
    # torch.nn.LayerNorm, which build_module calls with config=... ->
    # "LayerNorm.__init__() got an unexpected keyword argument 'config'" (every
    # LLaVAModel with a CLIP/SigLIP encoder). The defaults are bound at definition
    # time, so substitute a LayerNorm factory taking the spec signature.
    import inspect

    from megatron.core.models.vision.clip_vit_model import CLIPViTModel

    def make_wrapper(original):
        signature = inspect.signature(original)

        def __init__(self, *args, **kwargs):
            bound = signature.bind(self, *args, **kwargs)
            for name in ("ln_pre_impl", "ln_post_impl"):
                if bound.arguments.get(name, torch.nn.LayerNorm) is torch.nn.LayerNorm:
                    bound.arguments[name] = _TorchLayerNormForSpec
            return original(*bound.args, **bound.kwargs)

        return __init__

    _install(CLIPViTModel, "__init__", make_wrapper)


def apply_cpu_compat() -> bool:
    """Bridge Megatron-Core's CUDA assumptions so it runs on CPU with gloo.

    Patches, each measured to be needed (see the comment at each):

    * ``torch.cuda.current_device`` -> the CPU device; ``torch.cuda.synchronize``
      -> no-op; ``torch.cuda.current_stream`` -> a stream whose waits are no-ops;
      ``Tensor.cuda`` -> stays on CPU; ``torch.zeros/ones/tensor`` map
      ``device="cuda"`` (only that) to CPU.
    * the RNG tracker (``megatron.core.tensor_parallel.random``) on the CPU
      generator: ``_get/_set_cuda_rng_state``, ``CudaRNGStatesTracker.add``,
      ``model_parallel_cuda_manual_seed`` (also seeds the CPU generator, as the
      CUDA one is seeded on GPU), and a log filter for the tracker's
      CPU-RNG-changed warning.
    * the ``'torch.cuda.FloatTensor'`` type checks in ``DistributedOptimizer.__init__``
      and ``clip_grad_by_total_norm_fp32``.
    * ``CLIPViTModel.__init__``: its non-TE default norm, ``torch.nn.LayerNorm``,
      is called with ``config=``.

    Idempotent; call once per process before building models (and before any
    ``from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed``
    whose name should see the patched function). A no-op returning ``False`` when
    ``torch.cuda.is_available()``; returns ``True`` once the patches are in place.
    """
    if torch.cuda.is_available():
        return False
    _patch_torch_cuda_device_queries()
    _patch_tensor_cuda()
    _patch_factory_functions()
    _patch_rng_tracker()
    _patch_tensor_type_checks()
    _patch_clip_vit_norm()
    return True


# --------------------------------------------------------------------------------------
# Guards
# --------------------------------------------------------------------------------------


def guard_pipeline_p2p(
    config: Any,
    backend: str,
    pipeline_model_parallel_size: Optional[int] = None,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
) -> bool:
    """Turn off ``batch_p2p_comm`` where it silently corrupts pipeline traffic.

    With the interleaved schedule (virtual pipeline) at pipeline size 2, the
    previous and next stage are the same rank, and a batched exchange posts two
    same-shaped, same-tag messages to it (activation forward, gradient backward).
    gloo matches them in posting order, so activations and gradients can swap:
    losses and gradients are wrong with no error. Individual isend/irecv
    (``batch_p2p_comm=False``) is exact.

    Sizes default to ``config.pipeline_model_parallel_size`` and
    ``config.virtual_pipeline_model_parallel_size``. ``config`` is the model's
    (Model-Parallel/Transformer) config, the object the schedule reads. Returns
    True if it changed the config.
    """
    pp = pipeline_model_parallel_size
    if pp is None:
        pp = config.pipeline_model_parallel_size
    vpp = virtual_pipeline_model_parallel_size
    if vpp is None:
        vpp = config.virtual_pipeline_model_parallel_size
    interleaved = vpp is not None and vpp > 1
    if backend != "gloo" or pp != 2 or not interleaved or not config.batch_p2p_comm:
        return False
    config.batch_p2p_comm = False
    logger.warning(
        "batch_p2p_comm=True with the interleaved pipeline at pipeline size 2 on gloo "
        "silently swaps activations and gradients between stages; set batch_p2p_comm=False."
    )
    return True

"""Run Megatron-Core 0.16.1 on CPU with the gloo backend.

Two parts:

* :func:`apply_cpu_compat` bridges the CUDA assumptions that Megatron-Core makes
  even when it is told to initialise on CPU. It is
  the only function here that patches anything; importing this module patches
  nothing, and on a machine where ``torch.cuda.is_available()`` it does
  nothing at all. Every patch wraps the original (kept as ``__wrapped__``),
  carries the :data:`PATCH_MARKER` attribute so a second call is a no-op, and
  says in a comment what broke without it.
* Guards for the ways Megatron-Core on gloo gives *silently wrong* results or
  fails late: :func:`guard_pipeline_p2p`, :func:`check_distrib_optim_sharding`,
  :func:`load_distributed_optimizer_state` and
  :func:`fix_optimizer_step_after_load`. These are plain functions, not patches;
  the caller decides where they run.
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
    "check_distrib_optim_sharding",
    "distributed_optimizer_sharded_state_dict",
    "load_distributed_optimizer_state",
    "fix_optimizer_step_after_load",
]

logger = logging.getLogger(__name__)

# Attribute set (to True) on every function/object this module installs.
PATCH_MARKER = "_regate_cpu_compat"

# Distributed-optimizer sharding types that save and resume correctly in 0.16.1.
_WORKING_DISTRIB_OPTIM_SHARDINGS = ("dp_reshardable", "fully_reshardable")


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
    _install(mcore_optimizer.Float16OptimizerWithFloat16Params, "__init__", _report_cuda_type_during)
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
      -> no-op; ``Tensor.cuda`` -> stays on CPU; ``torch.zeros/ones/tensor`` map
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


def check_distrib_optim_sharding(sharding_type: str) -> None:
    """Refuse distributed-optimizer sharding types that cannot be checkpointed in 0.16.1.

    ``fully_sharded_model_space`` (Megatron's default) fails at save time with
    "ShardedTensor.flattened_range is not supported".
    """
    if sharding_type not in _WORKING_DISTRIB_OPTIM_SHARDINGS:
        raise ValueError(
            f"distrib_optim_sharding_type={sharding_type!r} cannot be saved by "
            f"Megatron-Core 0.16.1 dist_checkpointing; use 'dp_reshardable' or "
            f"'fully_reshardable'."
        )


def distributed_optimizer_sharded_state_dict(
    optimizer: Any,
    model_sharded_state_dict: dict,
    sharding_type: str,
    is_loading: bool = False,
) -> dict:
    """``optimizer.sharded_state_dict(...)`` for a distributed optimizer, save or load side.

    Checks ``sharding_type`` (:func:`check_distrib_optim_sharding`) and passes
    it as ``metadata["distrib_optim_sharding_type"]``. For loading into an
    optimizer that has not stepped yet, it first allocates the torch Adam state
    (``step`` = 0 and zero moments, one tensor per parameter): without torch
    Adam state, ``DistributedOptimizer.state_dict()`` fails its ``len(steps) == 1``
    assertion (no TE/Apex FusedAdam, which keeps ``step`` in the param groups).
    The loaded values overwrite this state in :func:`load_distributed_optimizer_state`.
    """
    check_distrib_optim_sharding(sharding_type)
    if is_loading:
        for inner in _inner_torch_optimizers(optimizer):
            _allocate_adam_state(inner)
    return optimizer.sharded_state_dict(
        model_sharded_state_dict,
        is_loading=is_loading,
        metadata={"distrib_optim_sharding_type": sharding_type},
    )


def load_distributed_optimizer_state(optimizer: Any, state_dict: dict) -> None:
    """Load a distributed-optimizer state dict (from ``dist_checkpointing.load``) correctly.

    ``optimizer.load_state_dict(state_dict)`` with three fixes for torch Adam
    (no TE/Apex) in Megatron-Core 0.16.1:

    * ``step`` is restored from the param groups, but the per-parameter copy that
      follows indexes every destination state key: ``fully_reshardable`` has no
      ``step`` there -> ``KeyError: 'step'``; ``dp_reshardable`` has the *load
      side's* stale step (a ``LocalNonpersistentObject``) and would silently
      reset the step to it. The restored ``step`` is kept.
    * ``dp_reshardable``: the copy into the fp32 main parameter (a view of the
      model parameter, a leaf that requires grad) runs with grad enabled ->
      "a view of a leaf Variable that requires grad is being used in an in-place
      operation". The copy runs under ``torch.no_grad()``.
    * both: afterwards every parameter shares one ``step`` tensor, which Adam
      increments once per parameter (silently wrong bias correction);
      :func:`fix_optimizer_step_after_load` gives each its own.

    The first two are fixed by wrapping ``_set_main_param_and_optimizer_states``
    on the optimizer instances for the duration of this call only.
    """
    dist_optimizers = _distributed_optimizers(optimizer)
    for dist_opt in dist_optimizers:
        dist_opt._set_main_param_and_optimizer_states = _set_states_keeping_step(dist_opt)
    try:
        optimizer.load_state_dict(state_dict)
    finally:
        for dist_opt in dist_optimizers:
            del dist_opt._set_main_param_and_optimizer_states  # back to the class method
    fix_optimizer_step_after_load(optimizer)


def fix_optimizer_step_after_load(optimizer: Any) -> int:
    """Give every parameter its own torch Adam ``step`` tensor; returns how many were shared.

    ``DistributedOptimizer.load_state_dict`` assigns one ``step`` tensor to all
    parameters' states. torch Adam increments ``state["step"]`` in place once
    per parameter, so after one update the shared step has advanced by the
    number of parameters and the bias correction is wrong -- with no error.
    Call after any distributed-optimizer load (done by
    :func:`load_distributed_optimizer_state`); a no-op when nothing is shared.
    """
    fixed = 0
    seen: set[int] = set()
    for inner in _inner_torch_optimizers(optimizer):
        for state in inner.state.values():
            step = state.get("step")
            if not isinstance(step, torch.Tensor):
                continue
            if id(step) in seen:
                state["step"] = step.detach().clone()
                fixed += 1
            seen.add(id(state["step"]))
    return fixed


def _set_states_keeping_step(dist_opt: Any) -> Callable:
    """``dist_opt._set_main_param_and_optimizer_states`` without grad and keeping ``step``."""
    original = type(dist_opt)._set_main_param_and_optimizer_states.__get__(dist_opt)

    def set_states(model_param, tensors):
        current = dist_opt._get_main_param_and_optimizer_states(model_param)
        if "step" in current:
            # The step was restored from the param groups just before; the loaded
            # parameter state has none (fully_reshardable) or a stale local one
            # (dp_reshardable keeps `step` as a LocalNonpersistentObject).
            tensors = {**tensors, "step": current["step"]}
        with torch.no_grad():
            original(model_param, tensors)

    return set_states


def _allocate_adam_state(inner: torch.optim.Optimizer) -> None:
    """Allocate torch Adam/AdamW state (step 0, zero moments) where it is missing."""
    if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
        return
    for group in inner.param_groups:
        for param in group["params"]:
            state = inner.state[param]
            if len(state) == 0:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def _distributed_optimizers(optimizer: Any) -> list:
    """The DistributedOptimizer instances inside a Megatron (chained) optimizer."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    return [sub for sub in subs if isinstance(sub, DistributedOptimizer)]


def _inner_torch_optimizers(optimizer: Any) -> list:
    """The torch.optim optimizers inside a Megatron (chained) optimizer."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return [optimizer]
    if hasattr(optimizer, "chained_optimizers"):
        return [
            inner for sub in optimizer.chained_optimizers for inner in _inner_torch_optimizers(sub)
        ]
    inner = getattr(optimizer, "optimizer", None)
    return [inner] if isinstance(inner, torch.optim.Optimizer) else []

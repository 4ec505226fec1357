"""Megatron-Core versions this package supports, and the internal APIs that differ between them.

Supported: 0.16.1 up to 0.19.x (`SUPPORTED`, the range in ``setup.py``). CI tests 0.16.1 on
CPU; ``benchmarks/gpu_check.sh`` runs the GPU tests and the router benchmark on 0.16.1 and
on the newest 0.19.x. Every difference we touch is listed here, with the version where it
changed, and nowhere else in the package branches on the version.

Read in the 0.16.1, 0.17.1, 0.18.2 and 0.19.2 wheels, and exercised by the CPU tests on
0.16.1 (Python 3.11, torch 2.13) and 0.19.2 (Python 3.12, torch 2.14): router, model,
LLaVA, selection, teacher, CPU bridge, TP/PP/SP/DP worlds, distributed-optimizer resume:

==========================  ============================================================
API we use                  difference
==========================  ============================================================
``get_mlp_module_spec``     0.16-0.17: a ``ModuleSpec`` whose ``.submodules`` are the MLP's
                            ``MLPSubmodules``; 0.18+: an ``MlpBuilder``
                            (``functools.partial(MLP.as_mlp_submodule, submodules=...)``).
                            The vision projector takes ``MLPSubmodules`` in every
                            version: `mlp_submodules`.
``LLaVAModel.__init__``     0.19 renamed ``hybrid_override_pattern`` to
                            ``hybrid_layer_pattern`` and added optional sound/video
                            arguments; we pass neither. Same for ``forward``.
``GPTModel._postprocess``   0.19 added ``padding_mask``, ``output_processor(_context)``;
                            `ReGateGPTModel._postprocess` passes ``**kwargs`` through.
``TransformerLayer``        ``__init__`` gained ``is_mtp_layer``, ``add_layer_offset``,
                            ``pp_layer_offset``, ``name`` (0.19); ``forward`` is unchanged.
``get_gpt_layer_*_spec``    0.19 forwards ``*args, **kwargs`` to ``get_gpt_layer_*_submodules``
                            with the same keywords (``normalization``, ``qk_layernorm``).
DDP grad sync               0.17+ calls ``torch.cuda.current_stream()`` in every DP>1 step;
                            the CPU bridge answers a no-op stream (no version branch, and
                            nothing at all on CUDA).
``DistributedOptimizer``    same signatures; 0.19's ``load_state_dict`` and
                            ``_get/_set_main_param_and_optimizer_states`` skip non-tensor
                            state entries; the torch-Adam ``step`` handling the fixes in
                            `regate_megatron.training.optimizer_state` rely on is unchanged.
unchanged                   ``DotProductAttention`` (constructor and forward),
                            ``CLIPViTModel.__init__``, ``get_num_layers_to_build``, the RNG
                            tracker functions the CPU bridge wraps,
                            ``clip_grad_by_total_norm_fp32``, ``Float16Module``,
                            ``OptimizerParamScheduler``, the sequence-parallel mappings,
                            ``initialize_model_parallel`` (only new optional arguments).
==========================  ============================================================

The CPU bridge (`regate_megatron.core.cpu_compat`) needs no version branch: the functions it
wraps have the same signatures in every supported version, and it is a no-op on CUDA.
The range itself is enforced by pip (``setup.py``).
"""

from __future__ import annotations

from packaging.version import Version

__all__ = ["SUPPORTED", "mcore_version", "mlp_submodules"]

SUPPORTED = (Version("0.16.1"), Version("0.20"))  # [lowest, first unsupported)

_MLP_BUILDER = Version("0.18")  # get_mlp_module_spec returns a partial from here on


def mcore_version() -> Version:
    """The installed Megatron-Core's release (0.19's ``package_info`` appends the git commit
    of whatever repository encloses the package, e.g. ``0.19.2+4fbd753``: dropped)."""
    from megatron.core import package_info

    return Version(Version(package_info.__version__).public)


def mlp_submodules(use_te: bool):
    """The ``MLPSubmodules`` of Megatron-Core's dense MLP spec (for the vision projector)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec

    spec = get_mlp_module_spec(use_te=use_te)
    if mcore_version() >= _MLP_BUILDER:
        return spec.keywords["submodules"]  # partial(MLP.as_mlp_submodule, submodules=...)
    return spec.submodules  # ModuleSpec(module=MLP, submodules=...)

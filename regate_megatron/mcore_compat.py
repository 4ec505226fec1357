"""Megatron-Core versions this package supports, and the internal APIs that differ between them.

Supported: 0.16.1 up to 0.19.x (`SUPPORTED`, the range in ``setup.py``). CI tests 0.16.1 on
CPU; ``benchmarks/gpu_check.sh`` runs the GPU tests and the router benchmark on 0.16.1 and
on the newest 0.19.x. Every difference we touch is listed here, with the version where it
changed, and nowhere else in the package branches on the version.

Read in the 0.16.1, 0.17.1, 0.18.2 and 0.19.2 wheels, and exercised by the CPU test suite
on 0.16.1 (Python 3.11) and 0.19.2 (Python 3.12):

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
unchanged                   ``DotProductAttention`` (constructor and forward),
                            ``CLIPViTModel.__init__``, ``get_num_layers_to_build``, the RNG
                            tracker functions the CPU bridge wraps, ``DistributedOptimizer``'s
                            ``sharded_state_dict`` / ``load_state_dict`` /
                            ``_set_main_param_and_optimizer_states`` /
                            ``_get_main_param_and_optimizer_states``,
                            ``clip_grad_by_total_norm_fp32``, ``Float16Module``,
                            ``OptimizerParamScheduler``, the sequence-parallel mappings,
                            ``initialize_model_parallel`` (only new optional arguments).
==========================  ============================================================

The CPU bridge (`regate_megatron.cpu_compat`) needs no version branch: the functions it
wraps have the same signatures in every supported version, and it is a no-op on CUDA.
"""

from __future__ import annotations

from packaging.version import Version

__all__ = ["SUPPORTED", "mcore_version", "check_mcore_version", "mlp_submodules"]

SUPPORTED = (Version("0.16.1"), Version("0.20"))  # [lowest, first unsupported)

_MLP_BUILDER = Version("0.18")  # get_mlp_module_spec returns a partial from here on


def mcore_version() -> Version:
    """The installed Megatron-Core's version."""
    from megatron.core import package_info

    return Version(package_info.__version__)


def check_mcore_version() -> Version:
    """The installed version, or a ValueError naming the supported range."""
    version = mcore_version()
    low, high = SUPPORTED
    if not low <= version < high:
        raise ValueError(
            f"megatron-core {version} is not supported; install a release in [{low}, {high}) "
            f"(pip install 'megatron-core>={low},<{high}')"
        )
    return version


def mlp_submodules(use_te: bool):
    """The ``MLPSubmodules`` of Megatron-Core's dense MLP spec (for the vision projector)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec

    spec = get_mlp_module_spec(use_te=use_te)
    if mcore_version() >= _MLP_BUILDER:
        return spec.keywords["submodules"]  # partial(MLP.as_mlp_submodule, submodules=...)
    return spec.submodules  # ModuleSpec(module=MLP, submodules=...)

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
saved param-group match     0.19 matches a loaded optimizer param group to the current one
                            by ``param_group_identifier_keys``, which now include the
                            group's LR schedule (``max_lr``, ``min_lr``; 0.16-0.18: only
                            ``wd_mult``, ``lr_mult`` and two flags), so a resume with a new
                            ``--lr`` (``--override-opt_param-scheduler``) found no group:
                            `align_saved_lr_schedule` gives the saved groups the current
                            run's values first (a no-op where the keys hold no schedule).
full recomputation         0.16-0.17: the method ``TransformerBlock._checkpointed_forward``;
                            0.18+: the function ``megatron.core.recompute.
                            checkpointed_forward(block, ...)``, which
                            ``transformer_block`` imports under that name. Both are called
                            with the same keywords (0.18+ adds ``extract_layer_indices``,
                            ``layer_offset``): `hook_full_recompute`.
``import megatron.core``     0.19 runs ``git rev-parse`` in a child process (its version
                            string, `mcore_version`); 0.17+ import ``torch.utils.cpp_extension``,
                            which logs "No CUDA runtime is found" for a CUDA torch build on a
                            machine with ``nvcc`` and no GPU. Nothing to adapt.
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

__all__ = ["SUPPORTED", "align_saved_lr_schedule", "hook_full_recompute", "mcore_version",
           "mlp_submodules"]

SUPPORTED = (Version("0.16.1"), Version("0.20"))  # [lowest, first unsupported)

_MLP_BUILDER = Version("0.18")  # get_mlp_module_spec returns a partial from here on
_RECOMPUTE_FUNCTION = Version("0.18")  # full recomputation is a module function from here on
_HOOK = "_regate_full_recompute"  # a block's own full-recompute forward (hook_full_recompute)

# The param-group fields the LR/WD scheduler reads; the run's reconciled flags own them.
_SCHEDULE_KEYS = ("max_lr", "min_lr", "start_wd", "end_wd")


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


def hook_full_recompute(block, forward) -> None:
    """Make ``block``'s full-recompute forward (``--recompute-granularity full``, training)
    call ``forward(stock, **kwargs)`` instead, where ``stock(**kwargs)`` is Megatron-Core's own.
    Other blocks keep Megatron-Core's; calling it twice replaces the hook."""
    if mcore_version() < _RECOMPUTE_FUNCTION:
        stock = type(block)._checkpointed_forward.__get__(block)
        block._checkpointed_forward = lambda **kwargs: forward(stock, **kwargs)
        return
    from megatron.core.transformer import transformer_block

    dispatch = transformer_block.checkpointed_forward
    if not getattr(dispatch, _HOOK, False):
        original = dispatch

        def dispatch(self, **kwargs):
            hook = self.__dict__.get(_HOOK)
            if hook is None:
                return original(self, **kwargs)
            return hook(lambda **again: original(self, **again), **kwargs)

        setattr(dispatch, _HOOK, True)
        transformer_block.checkpointed_forward = dispatch
    block.__dict__[_HOOK] = forward


def align_saved_lr_schedule(optimizer, state_dict: dict) -> int:
    """Give the param groups in a loaded optimizer ``state_dict`` the LR-schedule fields of
    ``optimizer``'s own groups, in place, before ``optimizer.load_state_dict``; returns how
    many saved groups changed.

    0.19 identifies a saved group by ``param_group_identifier_keys``, which include
    ``max_lr``/``min_lr``: a resume with another ``--lr`` or ``--min-lr`` (allowed with
    ``--override-opt_param-scheduler``, `regate_megatron.training.resume`) raised "Could not
    find parameter group". A saved group takes the values of the current group that equals it
    on the other identifier keys; the run sets ``max_lr``/``min_lr`` from its flags after the
    load either way. A no-op before 0.19 (no schedule key identifies a group there).
    """
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    schedule = [k for k in param_group_identifier_keys if k in _SCHEDULE_KEYS]
    if not schedule:
        return 0
    rest = [k for k in param_group_identifier_keys if k not in _SCHEDULE_KEYS]
    current = {}
    for group in optimizer.param_groups:
        current.setdefault(_group_key(group, rest), []).append(group)
    changed = 0
    for saved in _saved_param_groups(state_dict):
        matches = current.get(_group_key(saved, rest), [])
        values = {tuple(_group_value(g, k) for k in schedule) for g in matches}
        if len(values) != 1:
            continue  # none or ambiguous: Megatron-Core's own check names the group
        changed += _copy_schedule(saved, matches[0], schedule)
    return changed


def _group_key(group: dict, keys) -> tuple:
    """A param group's identifier over ``keys``, as Megatron-Core 0.19 builds it."""
    return tuple(_group_value(group, k) for k in keys)


def _group_value(group: dict, key: str):
    """``group[key]``, NeMo's ``pre_<key>`` alias, or None (missing equals None)."""
    return group[key] if key in group else group.get(f"pre_{key}")


def _copy_schedule(saved: dict, group: dict, keys) -> int:
    """Set ``saved``'s ``keys`` to ``group``'s (dropping those ``group`` lacks); 1 if changed."""
    before = {k: saved.get(k) for k in keys}
    for key in keys:
        if key in group:
            saved[key] = group[key]
        else:
            saved.pop(key, None)
    return int(before != {k: saved.get(k) for k in keys})


def _saved_param_groups(state_dict):
    """Every param-group dict under ``"param_groups"`` anywhere in a loaded optimizer state
    (torch, Float16/FP32, distributed or chained optimizers nest it differently)."""
    if not isinstance(state_dict, dict):
        return
    for key, value in state_dict.items():
        if key == "param_groups" and isinstance(value, list):
            yield from (g for g in value if isinstance(g, dict))
        elif isinstance(value, dict):
            yield from _saved_param_groups(value)

"""Distributed-optimizer checkpoint fixes (`regate_megatron.training.optimizer_state`): which are
needed
where, and that a resumed run equals the uninterrupted one.

Megatron-Core uses torch Adam when neither Transformer Engine nor Apex is installed (CPU,
and GPU machines without them), TE/Apex FusedAdam otherwise. The resume world below runs
on a 2-rank gloo world here (DP=2) and, from `tests/test_gpu.py`, on one CUDA device with
NCCL, where it shows the torch-Adam fixes are needed on CUDA too.
"""

import os

import pytest
import torch
from dist import run_world

from regate_megatron.training.optimizer_state import (
    WORKING_DISTRIB_OPTIM_SHARDINGS,
    check_distrib_optim_sharding,
    fix_optimizer_step_after_load,
)

SHARDINGS = WORKING_DISTRIB_OPTIM_SHARDINGS
SEQ, MBS = 8, 2


# ======================================================================================
# A resume world (module level: the spawned ranks import it by name)
# ======================================================================================


def _build(seed: int):
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from models import build_gpt, tiny_config

    from regate_megatron.training.parallel import rank_device

    config = tiny_config()
    config.finalize_model_grads_func = finalize_model_grads
    model = build_gpt(config, routed=False, seed=seed).to(rank_device())
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(use_distributed_optimizer=True), model
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, use_distributed_optimizer=True, clip_grad=1.0),
        [ddp],
    )
    return ddp, optimizer


def _forward_step(data_iterator, model):
    from regate_megatron.training.parallel import rank_device

    tokens, labels = (t.to(rank_device()) for t in next(data_iterator))
    position_ids = torch.arange(SEQ, device=tokens.device).expand(MBS, SEQ)
    per_token_loss = model(tokens, position_ids, None, labels=labels)  # [b, s]

    def loss_func(output):
        loss = output.float().mean()
        return loss, {"loss": loss.detach().clone()}

    return per_token_loss, loss_func


def _batches(seed: int) -> list:
    from models import VOCAB

    gen = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=gen) for _ in range(2)]
    return [(i[:, :-1].contiguous(), i[:, 1:].contiguous()) for i in ids]


def _train_step(ddp, optimizer, step: int) -> None:
    import torch.distributed as dist
    from megatron.core.pipeline_parallel import get_forward_backward_func

    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iter(_batches(100 * step + dist.get_rank())),  # per DP rank
        model=[ddp], num_microbatches=2, seq_length=SEQ, micro_batch_size=MBS,
    )
    update_successful, _, _ = optimizer.step()
    assert update_successful


def _adam_steps(optimizer) -> list:
    from regate_megatron.training.optimizer_state import _inner_torch_optimizers

    return [
        (id(state["step"]), float(state["step"]))
        for inner in _inner_torch_optimizers(optimizer)
        for state in inner.state.values() if "step" in state
    ]


def resume_world(rank: int, ckpt_dir: str) -> dict:
    """Per sharding: 1 step, save, 1 step  vs  load (with the fixes), 1 step; and what the
    plain Megatron-Core load of the same state does."""
    from megatron.core import dist_checkpointing

    from regate_megatron.training.optimizer_state import (
        distributed_optimizer_sharded_state_dict,
        load_distributed_optimizer_state,
    )

    out = {}
    for sharding in SHARDINGS:
        path = os.path.join(ckpt_dir, sharding)
        os.makedirs(path, exist_ok=True)  # dist_checkpointing.save needs the directory
        ddp, optimizer = _build(seed=1)
        fused = not _adam_steps(optimizer) and not any(
            isinstance(o, (torch.optim.Adam, torch.optim.AdamW))
            for o in _inner_optimizers(optimizer))
        _train_step(ddp, optimizer, step=0)
        model_sd = ddp.module.sharded_state_dict()
        dist_checkpointing.save(
            {"model": model_sd,
             "optimizer": distributed_optimizer_sharded_state_dict(optimizer, model_sd, sharding)},
            path,
        )
        _train_step(ddp, optimizer, step=1)
        uninterrupted = {n: p.detach().clone() for n, p in ddp.module.named_parameters()}

        def load_into(seed, sharding=sharding, path=path):
            resumed_ddp, resumed_opt = _build(seed=seed)
            model_sd = resumed_ddp.module.sharded_state_dict()
            loaded = dist_checkpointing.load(
                {"model": model_sd,
                 "optimizer": distributed_optimizer_sharded_state_dict(
                     resumed_opt, model_sd, sharding, is_loading=True)},
                path,
            )
            resumed_ddp.module.load_state_dict(loaded["model"])
            return resumed_ddp, resumed_opt, loaded["optimizer"]

        resumed_ddp, resumed_opt, opt_state = load_into(seed=2)
        load_distributed_optimizer_state(resumed_opt, opt_state)
        steps_after_load = _adam_steps(resumed_opt)
        _train_step(resumed_ddp, resumed_opt, step=1)
        out[sharding] = dict(
            fused_adam=fused,
            param_diff=max(
                (p.detach().float() - uninterrupted[n].float()).abs().max().item()
                for n, p in resumed_ddp.module.named_parameters()
            ),
            distinct_step_tensors=len({i for i, _ in steps_after_load}) == len(steps_after_load),
            steps_after_load=sorted({s for _, s in steps_after_load}),
            steps_after_step=sorted({s for _, s in _adam_steps(resumed_opt)}),
            uninterrupted_steps=sorted({s for _, s in _adam_steps(optimizer)}),
        )

        # What the fixes work around: the plain Megatron-Core load of the same state.
        plain_ddp, plain_opt, opt_state = load_into(seed=3)
        try:
            plain_opt.load_state_dict(opt_state)
            out[sharding]["plain_load_error"] = None
            steps = _adam_steps(plain_opt)
            out[sharding]["plain_shares_step"] = len({i for i, _ in steps}) < len(steps)
        except Exception as exc:  # noqa: BLE001 -- recorded for the test
            out[sharding]["plain_load_error"] = f"{type(exc).__name__}: {exc}"
    return out


def _inner_optimizers(optimizer) -> list:
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    return [getattr(sub, "optimizer", None) for sub in subs]


def check_resume(results: list, fused_adam: bool) -> None:
    """Assertions shared by the CPU and the CUDA run of `resume_world`."""
    for rank_result in results:
        for sharding in SHARDINGS:
            result = rank_result[sharding]
            assert result["fused_adam"] == fused_adam
            assert result["param_diff"] == 0.0, sharding  # bitwise: same kernels, same order
            if fused_adam:  # the step is an int in the param groups: nothing to fix
                assert result["steps_after_load"] == []
                continue
            assert result["distinct_step_tensors"]
            assert result["steps_after_load"] == [1.0]
            assert result["steps_after_step"] == result["uninterrupted_steps"] == [2.0]
    if not fused_adam:  # torch Adam: the plain load fails (fp32 parameters, any device)
        errors = results[0]
        assert "KeyError" in errors["fully_reshardable"]["plain_load_error"]
        assert "leaf Variable" in errors["dp_reshardable"]["plain_load_error"]


# ======================================================================================
# Tests
# ======================================================================================


def test_check_distrib_optim_sharding_refuses_what_cannot_be_saved_on_any_device():
    for ok in SHARDINGS:
        check_distrib_optim_sharding(ok)
    with pytest.raises(ValueError, match="distrib_optim_sharding_type") as info:
        check_distrib_optim_sharding("fully_sharded_model_space")
    assert "dp_reshardable" in str(info.value) and "fully_reshardable" in str(info.value)


def _adam_after_one_resumed_step(params, grads, share_step: bool, fix: bool):
    ps = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = torch.optim.Adam(ps, lr=0.1)
    shared = torch.tensor(1.0)  # "resumed after one step"
    for p in ps:
        opt.state[p] = {
            "step": shared if share_step else torch.tensor(1.0),
            "exp_avg": torch.full((3,), 0.1),
            "exp_avg_sq": torch.full((3,), 0.01),
        }
    if fix:
        assert fix_optimizer_step_after_load(opt) == (len(ps) - 1 if share_step else 0)
    for p, g in zip(ps, grads, strict=True):
        p.grad = g.clone()
    opt.step()
    return torch.stack([p.detach() for p in ps]), [float(opt.state[p]["step"]) for p in ps]


def test_torch_adam_shared_step_after_load_is_split_on_cpu_and_cuda():
    """The shared-step state `DistributedOptimizer.load_state_dict` leaves with torch Adam
    (no TE/Apex: CPU, or CUDA without them), in plain torch."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(4)]
    grads = [torch.randn(3) for _ in params]
    want, want_steps = _adam_after_one_resumed_step(params, grads, share_step=False, fix=False)
    broken, broken_steps = _adam_after_one_resumed_step(params, grads, share_step=True, fix=False)
    fixed, fixed_steps = _adam_after_one_resumed_step(params, grads, share_step=True, fix=True)
    assert want_steps == [2.0] * 4
    assert broken_steps == [5.0] * 4 and not torch.allclose(broken, want)  # the silent bug
    assert fixed_steps == [2.0] * 4 and torch.equal(fixed, want)


def test_step_fix_is_a_noop_for_fused_adam_state():
    """TE/Apex FusedAdam keep the step in the param groups, not per parameter: nothing to
    split (their per-parameter state is the moments only)."""
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(3)]
    opt = torch.optim.SGD(params, lr=0.1)  # any torch optimizer holding fused-Adam-like state
    for p in params:
        opt.state[p] = {"exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}
    opt.param_groups[0]["step"] = 7
    assert fix_optimizer_step_after_load(opt) == 0
    assert opt.param_groups[0]["step"] == 7


@pytest.mark.skipif(torch.cuda.is_available(), reason="gloo world; tests/test_gpu.py on CUDA")
def test_distributed_optimizer_resume_equals_uninterrupted_torch_adam(tmp_path):
    """DP=2, both working shardings: the fixed load resumes bitwise; the plain one fails."""
    check_resume(run_world(resume_world, 2, ckpt_dir=str(tmp_path), timeout=300),
                 fused_adam=False)


# ======================================================================================
# Saved param groups and a new LR schedule (`mcore_compat.align_saved_lr_schedule`)
# ======================================================================================

KEYS_016 = ("wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr")
KEYS_019 = ("end_wd", "max_lr", "min_lr", "optimizer", "start_wd") + KEYS_016[1:]


def _groups(max_lr: float, *, wd_mult=(1.0, 0.0)):
    return [dict(params=[i], wd_mult=w, lr_mult=1.0, is_expert_parallel=False,
                 is_decoupled_lr=False, max_lr=max_lr, min_lr=0.0, weight_decay=0.1 * w)
            for i, w in enumerate(wd_mult)]


@pytest.mark.parametrize("keys", [KEYS_016, KEYS_019], ids=["0.16-0.18", "0.19"])
def test_saved_groups_take_the_runs_lr_schedule_where_it_identifies_them(monkeypatch, keys):
    from types import SimpleNamespace

    from megatron.core.optimizer import optimizer as mcore_optimizer

    from regate_megatron.core.mcore_compat import align_saved_lr_schedule

    monkeypatch.setattr(mcore_optimizer, "param_group_identifier_keys", keys)
    optimizer = SimpleNamespace(param_groups=_groups(5e-2))
    saved = {"optimizer": {"param_groups": _groups(3e-3)[::-1]}, "state": {}}
    changed = align_saved_lr_schedule(optimizer, saved)
    lrs = [g["max_lr"] for g in saved["optimizer"]["param_groups"]]
    if "max_lr" in keys:  # 0.19: matched by the schedule too -> the run's values
        assert changed == 2 and lrs == [5e-2, 5e-2]
    else:  # nothing to align: the checkpoint is left as it is
        assert changed == 0 and lrs == [3e-3, 3e-3]
    # the other fields (and which saved group is which) are untouched
    assert [(g["params"], g["wd_mult"], g["weight_decay"])
            for g in saved["optimizer"]["param_groups"]] == [([1], 0.0, 0.0), ([0], 1.0, 0.1)]


def test_ambiguous_or_unmatched_saved_groups_are_left_to_megatron(monkeypatch):
    from types import SimpleNamespace

    from megatron.core.optimizer import optimizer as mcore_optimizer

    from regate_megatron.core.mcore_compat import align_saved_lr_schedule

    monkeypatch.setattr(mcore_optimizer, "param_group_identifier_keys", KEYS_019)
    two_lrs = _groups(5e-2, wd_mult=(1.0, 1.0))
    two_lrs[1]["max_lr"] = 1e-1  # same other keys, two schedules: no way to tell
    optimizer = SimpleNamespace(param_groups=two_lrs)
    saved = {"param_groups": _groups(3e-3, wd_mult=(1.0, 0.5))}  # 0.5: no current group
    assert align_saved_lr_schedule(optimizer, saved) == 0
    assert [g["max_lr"] for g in saved["param_groups"]] == [3e-3, 3e-3]

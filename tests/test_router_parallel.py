"""Router across real gloo ranks: TP2 + sequence parallel, PP2 (1F1B), both also with full
activation recomputation, and a
TP2 x PP2 x DP2 training step where every model-parallel rank must route with
the indices computed once on its group's first rank."""

import pytest
import torch
from dist import run_world
from models import (
    build_gpt,
    full_grads,
    load_full_weights,
    make_batch,
    run_schedule,
    tiny_config,
)

from regate_megatron.core.selection import broadcast_selections, select_top_targets

KEEP = 0.4
NUM_LAYERS = 4
MICRO_BATCHES = 2


def _batches(offset=0):
    out = []
    for m in range(MICRO_BATCHES):
        tokens, labels, pos, targets, scores = make_batch(100 + offset + m)
        out.append(((tokens, labels, pos, targets), scores))
    return out


def _selections(batches, keep_ratio):
    return [select_top_targets(scores, batch[3], keep_ratio) for batch, scores in batches]


def _shared_selections(batches, keep_ratio):
    """Computed on the model-parallel group's first rank only, then broadcast."""
    from megatron.core import parallel_state as ps

    group = ps.get_model_parallel_group()
    mine = _selections(batches, keep_ratio) if torch.distributed.get_rank(group) == 0 else None
    return broadcast_selections(mine, group=group)


RECOMPUTE = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)


def _parallel_checks(rank, full_state, sequence_parallel):
    """Stock vs routed at ρ=1 (must be identical), routed at ρ<1 (returned) and routed at
    ρ<1 with full recomputation (one checkpoint per layer)."""
    config = tiny_config(num_layers=NUM_LAYERS, sequence_parallel=sequence_parallel)
    batches = _batches()
    plain = [b for b, _ in batches]
    results = {}
    for keep_ratio in (1.0, KEEP):
        routed = build_gpt(config, routed=True)
        load_full_weights(routed, full_state)
        losses = run_schedule(routed, plain, _shared_selections(batches, keep_ratio))
        results[keep_ratio] = ([loss["lm loss"] for loss in losses], full_grads(routed))
    recomputed = build_gpt(tiny_config(num_layers=NUM_LAYERS, sequence_parallel=sequence_parallel,
                                       **RECOMPUTE), routed=True)
    load_full_weights(recomputed, full_state)
    losses = run_schedule(recomputed, plain, _shared_selections(batches, KEEP))
    results["recompute"] = ([loss["lm loss"] for loss in losses], full_grads(recomputed))
    stock = build_gpt(config, routed=False)
    load_full_weights(stock, full_state)
    losses = run_schedule(stock, plain)
    results["stock"] = ([loss["lm loss"] for loss in losses], full_grads(stock))
    return results


def _reference(keep_ratio):
    """Single-rank routed model: losses and grads, and its weights."""
    config = tiny_config(num_layers=NUM_LAYERS)
    model = build_gpt(config, routed=True)
    batches = _batches()
    losses = run_schedule(model, [b for b, _ in batches], _selections(batches, keep_ratio))
    state = {k: v.detach().clone() for k, v in model.named_parameters()}
    return [loss["lm loss"] for loss in losses], full_grads(model), state


def _assert_same(result, reference, exact):
    (losses, grads), (ref_losses, ref_grads) = result, reference
    check = (lambda a, b, what: torch.equal(a, b) or pytest.fail(f"{what} differs")) if exact else (
        lambda a, b, what: torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=what))
    for a, b in zip(losses, ref_losses):
        check(a, b, "loss")
    assert grads.keys() <= ref_grads.keys()
    for name, g in grads.items():
        check(g, ref_grads[name], name)


@pytest.mark.parametrize("tp,pp,sp", [(2, 1, True), (1, 2, False)], ids=["tp2-sp", "pp2"])
def test_parallel_router_matches_stock_and_single_rank(megatron_world, tp, pp, sp):
    ref_losses, ref_grads, state = _reference(KEEP)
    results = run_world(_parallel_checks, tp * pp, tp=tp, pp=pp, full_state=state,
                        sequence_parallel=sp)
    last = results[-1]  # the last pipeline stage holds the losses
    for rank_result in results:
        # ρ = 1: identical to stock Megatron-Core under the same parallelism.
        _assert_same(rank_result[1.0], rank_result["stock"], exact=True)
        # ρ < 1: the same as the routed single-rank model, stage by stage.
        _assert_same(([], rank_result[KEEP][1]), ([], ref_grads), exact=False)
        # ρ < 1 with full recomputation: the same step as without, bit for bit.
        _assert_same(rank_result["recompute"], rank_result[KEEP], exact=True)
    _assert_same((last[KEEP][0], {}), (ref_losses, {}), exact=False)
    assert len(last[KEEP][0]) == MICRO_BATCHES


def _interleaved(rank, full_state):
    """PP2 x VPP2: every rank holds two chunks, each with its own router and span ends."""
    from regate_megatron.core.cpu_compat import guard_pipeline_p2p

    config = tiny_config(num_layers=NUM_LAYERS, virtual_pipeline_model_parallel_size=2)
    assert guard_pipeline_p2p(config, torch.distributed.get_backend())  # batch_p2p_comm off
    chunks = [build_gpt(config, routed=True, vp_stage=v) for v in range(2)]
    for chunk in chunks:
        load_full_weights(chunk, full_state)
    batches = _batches()
    used = []
    losses = run_schedule(chunks, [b for b, _ in batches], _shared_selections(batches, KEEP),
                          record=used)
    grads = {}
    for chunk in chunks:
        grads.update(full_grads(chunk))
    return [loss["lm loss"] for loss in losses], grads, len(used)


def test_interleaved_pipeline_routes_like_single_rank(megatron_world):
    ref_losses, ref_grads, state = _reference(KEEP)
    results = run_world(_interleaved, 2, pp=2, vpp=2, full_state=state)
    for _losses, grads, used in results:
        assert used == 2 * MICRO_BATCHES  # both chunks routed both micro-batches
        _assert_same(([], grads), ([], ref_grads), exact=False)
    assert sum(len(r[1]) for r in results) == len(ref_grads)  # every parameter compared
    _assert_same((results[-1][0], {}), (ref_losses, {}), exact=False)


def _train_step(rank):
    """TP2 x PP2 x DP2: one optimizer step at ρ < 1 with DDP + distributed optimizer."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = tiny_config(num_layers=NUM_LAYERS, sequence_parallel=True)
    module = build_gpt(config, routed=True)
    model = DistributedDataParallel(
        config, DistributedDataParallelConfig(use_distributed_optimizer=True), module
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, use_distributed_optimizer=True,
                        params_dtype=torch.float32, clip_grad=1.0),
        [model],
    )
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = model.no_sync
    before = {k: v.detach().clone() for k, v in module.named_parameters()}

    dp_rank = ps.get_data_parallel_rank()
    batches = _batches(offset=10 * dp_rank)  # each data-parallel replica has its own data
    selections = _shared_selections(batches, KEEP)
    used = []
    model.zero_grad_buffer()
    optimizer.zero_grad()
    losses = run_schedule(model, [b for b, _ in batches], selections, record=used)
    ok, grad_norm, _ = optimizer.step()
    moved = sum(not torch.equal(p, before[k]) for k, p in module.named_parameters())
    return dict(
        dp=dp_rank,
        mp_group=tuple(sorted(
            torch.distributed.get_process_group_ranks(ps.get_model_parallel_group()))),
        used=[u.tolist() for u in used], sent=[s.keep_index.tolist() for s in selections],
        losses=[float(loss["lm loss"]) for loss in losses], ok=ok, grad_norm=float(grad_norm),
        moved=moved, params=len(before),
        weights={k: p.detach().clone() for k, p in module.named_parameters()},
        stage=ps.get_pipeline_model_parallel_rank(), tp_rank=ps.get_tensor_model_parallel_rank(),
    )


def test_tp2_pp2_dp2_training_step_routes_identically(megatron_world):
    results = run_world(_train_step, 8, tp=2, pp=2, timeout=300)
    groups = {}
    for r in results:
        assert r["ok"] and torch.isfinite(torch.tensor(r["grad_norm"])) and r["grad_norm"] > 0
        assert r["moved"] == r["params"]  # every parameter was updated
        assert len(r["used"]) == MICRO_BATCHES  # every stage routed every micro-batch
        assert r["used"] == r["sent"]
        groups.setdefault(r["mp_group"], []).append(r)
    assert len(groups) == 2 and all(len(g) == 4 for g in groups.values())
    for members in groups.values():
        assert all(m["used"] == members[0]["used"] for m in members)  # identical indices
    a, b = groups.values()
    assert a[0]["used"] != b[0]["used"]  # replicas saw different data, so different picks
    losses = [r["losses"] for r in results if r["losses"]]
    assert len(losses) == 4 and all(len(rank_losses) == MICRO_BATCHES for rank_losses in losses)
    # Data-parallel replicas hold identical weights after the step.
    by_coord = {}
    for r in results:
        by_coord.setdefault((r["stage"], r["tp_rank"]), []).append(r["weights"])
    for replicas in by_coord.values():
        assert len(replicas) == 2
        for name, w in replicas[0].items():
            assert torch.equal(w, replicas[1][name]), name

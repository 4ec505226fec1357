"""Scoring: normalisation, fusion, the student-loss EMA (fallbacks, sharded exchange,
checkpoint) and the selections the scorer makes; exact values worked out by hand."""

import os

import numpy as np
import pytest
import torch
from dist import run_world
from hypothesis import given, settings
from hypothesis import strategies as st
from scoring_cases import MemoryRefStore
from scoring_cases import make_cfg as _cfg
from scoring_cases import tensor as _t

from regate_megatron.core.selection import keep_count
from regate_megatron.scoring.ema_table import EmaTable
from regate_megatron.scoring.scorer import ReGateScorer, TargetCounts
from regate_megatron.scoring.scores import difficulty_of, fuse_scores, normalize_scores

NAN = float("nan")


def _same(a, b):
    return torch.equal(torch.nan_to_num(a, nan=-12345.0), torch.nan_to_num(b, nan=-12345.0))


# ======================================================================================
# Normalisation and fusion
# ======================================================================================


def test_rank_normalisation_by_hand():
    # sorted 1, 2, 2, 3, 5 -> ranks 0, (1+2)/2, 3, 4; divided by n-1 = 4
    assert normalize_scores(_t([3, 1, 2, 2, 5]), "rank").tolist() == [0.75, 0.0, 0.375, 0.375, 1.0]
    assert normalize_scores(_t([5, 1]), "rank").tolist() == [1.0, 0.0]
    assert normalize_scores(_t([7]), "rank").tolist() == [0.5]
    assert normalize_scores(_t([7, 7, 7]), "rank").tolist() == [0.5, 0.5, 0.5]
    assert normalize_scores(_t([1, 1, 2, 2]), "rank").tolist() == pytest.approx(
        [1 / 6, 1 / 6, 5 / 6, 5 / 6])
    assert normalize_scores(_t([]), "rank").tolist() == []


def test_zscore_normalisation_by_hand():
    # mean 5, population std sqrt(32/8) = 2
    x = _t([2, 4, 4, 4, 5, 5, 7, 9])
    assert normalize_scores(x, "zscore").tolist() == [-1.5, -0.5, -0.5, -0.5, 0.0, 0.0, 1.0, 2.0]
    assert normalize_scores(_t([1, 3]), "zscore").tolist() == [-1.0, 1.0]
    assert normalize_scores(_t([0.1, 0.1, 0.1]), "zscore").tolist() == [0.0, 0.0, 0.0]
    assert normalize_scores(_t([4]), "zscore").tolist() == [0.0]


def test_none_normalisation_is_identity():
    x = _t([0.3, -2.0, 7.5])
    assert torch.equal(normalize_scores(x, "none"), x)


def test_normalisation_rejects_bad_input():
    with pytest.raises(ValueError, match="--regate-score-norm must be one of rank, zscore, none"):
        normalize_scores(_t([1.0]), "minmax")
    with pytest.raises(ValueError, match="1-D"):
        normalize_scores(torch.zeros(2, 2), "rank")
    with pytest.raises(ValueError, match="NaN"):
        normalize_scores(_t([1.0, NAN]), "zscore")


def test_fusion_by_hand():
    ref, difficulty = _t([4, 1, 2, 3]), _t([1, 1, 5, 2])
    # rank: N(ref) = [1, 0, 1/3, 2/3]; N(d) = [1/6, 1/6, 1, 2/3] (the two 1s share rank 0.5)
    assert fuse_scores(ref, difficulty, 1.0, "rank").tolist() == pytest.approx([1, 0, 1 / 3, 2 / 3])
    assert fuse_scores(ref, difficulty, 0.0, "rank").tolist() == pytest.approx(
        [1 / 6, 1 / 6, 1, 2 / 3])
    assert fuse_scores(ref, difficulty, 0.5, "rank").tolist() == pytest.approx(
        [7 / 12, 1 / 12, 2 / 3, 2 / 3])
    # zscore: [-1, 1] and [1, -1] cancel at lambda = 0.5
    assert fuse_scores(_t([1, 3]), _t([10, 0]), 0.5, "zscore").tolist() == [0.0, 0.0]
    # none: 0.25 * [1, 2] + 0.75 * [4, 8]
    assert fuse_scores(_t([1, 2]), _t([4, 8]), 0.25, "none").tolist() == [3.25, 6.5]
    with pytest.raises(ValueError, match="differ"):
        fuse_scores(_t([1, 2]), _t([1]), 0.5, "rank")


def test_difficulty_falls_back_ema_then_vocab_then_reference():
    ema, vocab, ref = _t([1, NAN, NAN, 2]), _t([5, 6, NAN, NAN]), _t([7, 8, 9, 10])
    assert difficulty_of(ema, vocab, ref).tolist() == [1, 6, 9, 2]


# ======================================================================================
# EMA table, one process
# ======================================================================================


def test_ema_table_first_observation_decay_and_duplicates():
    table = EmaTable(np.array([0, 2, 5, 6]), vocab_size=10, decay=0.5)
    layout = table.layout([1, 0])
    assert layout.num_targets.tolist() == [3, 2]
    assert layout.slot_start.tolist() == [0, 3]
    assert layout.flat_index.tolist() == [2, 3, 4, 0, 1]
    assert torch.isnan(table.lookup(layout)).all()

    # Only computed targets update: slots 1 and 4 carry losses but were not computed.
    table.update(layout, _t([1, 2, 3, 4, 5]), torch.tensor([True, False, True, True, False]),
                 torch.tensor([7, 7, 8, 7, 9]))
    assert _same(table.values, _t([4, NAN, 1, NAN, 3, NAN]))  # first observation: e = loss
    assert _same(table.lookup(layout), _t([1, NAN, 3, 4, NAN]))
    vocab = torch.full((10,), NAN)
    vocab[7], vocab[8] = 2.5, 3.0  # id 7: mean of losses 1 and 4 over the step
    assert _same(table.vocab_ema, vocab)

    # Sample 0 twice in one batch: its two losses (2, 8) are one observation of mean 5.
    twice = table.layout([0, 0])
    assert twice.flat_index.tolist() == [0, 1, 0, 1]
    table.update(twice, _t([2, 100, 8, 100]), torch.tensor([True, False, True, False]),
                 torch.tensor([7, 0, 8, 0]))
    assert _same(table.values, _t([0.5 * 4 + 0.5 * 5, NAN, 1, NAN, 3, NAN]))
    vocab[7], vocab[8] = 0.5 * 2.5 + 0.5 * 2, 0.5 * 3 + 0.5 * 8
    assert _same(table.vocab_ema, vocab)


def test_ema_leaves_out_a_step_with_a_non_finite_computed_loss():
    """A NaN/inf at a computed target leaves the whole step out (both EMAs unchanged); a
    NaN at a target that was not computed is ignored; the step after updates normally."""
    table = EmaTable(np.array([0, 2, 3]), vocab_size=4, decay=0.5)
    layout = table.layout([0, 1])
    labels = torch.tensor([1, 2, 3])
    assert table.update(layout, _t([2, 4, 6]), torch.tensor([True, True, True]), labels)
    before = (table.values.clone(), table.vocab_ema.clone())
    for bad in (float("nan"), float("inf"), -float("inf")):
        assert not table.update(layout, _t([bad, 8, 8]), torch.tensor([True, True, True]),
                                labels)
        assert _same(table.values, before[0]) and _same(table.vocab_ema, before[1])
    assert table.skipped_updates == 3
    assert table.update(layout, _t([NAN, 8, 10]), torch.tensor([False, True, True]), labels)
    assert _same(table.values, _t([2, 6, 8]))
    assert _same(table.vocab_ema, _t([NAN, 2, 6, 8]))
    # The scorer records such a step without raising and reports it from end_step.
    store, ids, labels2, loss_mask = _fallback_batch()
    scorer = ReGateScorer(_cfg(), store, vocab_size=8)
    scorer.begin_step(0, ids)
    losses = torch.full((2, 5), NAN)
    scorer.record(ids, labels2, loss_mask, losses, loss_mask.bool())
    assert scorer.end_step() is False and torch.isnan(scorer.ema.values).all()
    scorer.begin_step(1, ids)
    scorer.record(ids, labels2, loss_mask, torch.ones(2, 5), loss_mask.bool())
    assert scorer.end_step(update=False) is False and torch.isnan(scorer.ema.values).all()
    scorer.begin_step(2, ids)
    scorer.record(ids, labels2, loss_mask, torch.ones(2, 5), loss_mask.bool())
    assert scorer.end_step() is True and bool((scorer.ema.values == 1.0).all())


@pytest.mark.parametrize("decay,expected", [(0.75, 0.75 * 4 + 0.25 * 8), (0.0, 8.0)])
def test_ema_decay_weights_the_old_value(decay, expected):
    table = EmaTable(np.array([0, 1]), vocab_size=2, decay=decay)
    layout = table.layout([0])
    for loss in (4.0, 8.0):
        table.update(layout, _t([loss]), torch.tensor([True]), torch.tensor([1]))
    assert table.values.tolist() == [expected] and table.vocab_ema[1].item() == expected


def test_ema_table_rejects_bad_setup():
    with pytest.raises(ValueError, match="start at 0"):
        EmaTable(np.array([1, 2]), 4, 0.5)
    with pytest.raises(ValueError, match="pass group"):
        EmaTable(np.array([0, 2]), 4, 0.5, dp_rank=1, dp_size=2)
    with pytest.raises(ValueError, match="outside the reference-loss store"):
        EmaTable(np.array([0, 2]), 4, 0.5).layout([1])
    replica = EmaTable(np.array([0, 1]), 4, 0.5, loss_source=False)
    with pytest.raises(ValueError, match="loss_source=False"):
        replica.update(replica.layout([0]), _t([1]), torch.tensor([True]), torch.tensor([0]))


def test_sharded_state_dict_layout():
    store = MemoryRefStore([[1, 2], [3, 4, 5]])
    state = ReGateScorer(_cfg(), store, 7).sharded_state_dict("x.")
    table, vocab = state["ema_table"], state["vocab_ema"]
    assert (table.key, table.global_shape, table.global_offset) == ("x.ema_table", (5,), (0,))
    assert table.replica_id == 0
    assert (vocab.key, vocab.global_shape, vocab.replica_id) == ("x.vocab_ema", (7,), 0)
    replica = ReGateScorer(_cfg(), store, 7, lookup_source=False).sharded_state_dict()
    assert replica["ema_table"].replica_id == 1


# ======================================================================================
# Scorer, one process
# ======================================================================================


def _fallback_batch():
    store = MemoryRefStore([[0.5, 1.0, 1.5], [2.0, 2.5]])
    loss_mask = _t([[0, 1, 1, 1, 0], [1, 0, 0, 1, 0]])
    labels = torch.tensor([[0, 4, 5, 6, 0], [4, 0, 0, 7, 0]])
    return store, torch.tensor([0, 1]), labels, loss_mask


def test_scorer_fallback_order_and_only_computed_tokens_update():
    store, ids, labels, loss_mask = _fallback_batch()
    cfg = _cfg(schedule="cyclic", cycle_steps=2, dense_steps=1, lambda_=0.5, score_norm="rank")
    scorer = ReGateScorer(cfg, store, vocab_size=8)

    assert scorer.begin_step(0, ids) == 1.0 and scorer.keep_ratio == 1.0
    assert scorer.select(ids, labels, loss_mask).is_dense
    # Nothing observed yet: difficulty = reference loss.
    assert ([d.tolist() for d in scorer.difficulty(ids, labels, loss_mask)]
            == [[0.5, 1.0, 1.5], [2.0, 2.5]])
    # Only sample 0's position 1 (label 4) is computed; 99 elsewhere must not leak in.
    losses = torch.full((2, 5), 99.0)
    losses[0, 1] = 3.0
    computed = torch.zeros(2, 5, dtype=torch.bool)
    computed[0, 1] = True
    scorer.record(ids, labels, loss_mask, losses, computed)
    scorer.end_step()

    assert scorer.begin_step(1, ids) == 0.5
    # sample 0: pos 1 own EMA 3.0; pos 2 (label 5) and 3 (label 6) unobserved -> reference.
    # sample 1: pos 0 (label 4) -> vocabulary EMA 3.0; pos 3 (label 7) -> reference 2.5.
    assert ([d.tolist() for d in scorer.difficulty(ids, labels, loss_mask)]
            == [[3.0, 1.0, 1.5], [3.0, 2.5]])
    # sample 0: 0.5*rank(ref [.5, 1, 1.5]) + 0.5*rank(d [3, 1, 1.5]) = [.5, .25, .75]
    #   -> k=2: pos 3, 1
    # sample 1: 0.5*[0, 1] + 0.5*[1, 0] = [.5, .5], a tie -> k=1: lower position 0
    scores = scorer.scores(ids, labels, loss_mask)
    assert scores.tolist() == [[0, 0.5, 0.25, 0.75, 0], [0.5, 0, 0, 0.5, 0]]
    selection = scorer.select(ids, labels, loss_mask)
    assert selection.keep_index.tolist() == [[0, 1, 3, 4], [0, 1, 2, 4]]
    losses = _t([[0, 5, 0, 1, 0], [2, 0, 0, 0, 0]])
    scorer.record(ids, labels, loss_mask, losses, selection.computed_loss_mask())
    scorer.end_step()

    scorer.begin_step(2, ids)
    # sample 0: pos 1 decays 0.5*3 + 0.5*5 = 4, pos 3 first seen 1; pos 2 (label 5) still ref.
    # sample 1: pos 0 first seen 2; pos 3 (label 7) unobserved -> reference 2.5.
    assert ([d.tolist() for d in scorer.difficulty(ids, labels, loss_mask)]
            == [[4.0, 1.0, 1.0], [2.0, 2.5]])
    assert scorer.ema.vocab_ema[4].item() == 0.5 * 3 + 0.5 * (5 + 2) / 2  # id 4: mean(5, 2) = 3.5
    assert scorer.ema.vocab_ema[6].item() == 1.0
    assert bool(torch.isnan(scorer.ema.vocab_ema[[0, 1, 2, 3, 5, 7]]).all())


def test_select_per_sample_ties_and_context():
    # lambda = 1, norm none: the score is the reference loss itself.
    store = MemoryRefStore([[0.125, 0.5, 0.5, 0.875, 0.25], [1.0, 2.0]])
    scorer = ReGateScorer(_cfg(lambda_=1.0, score_norm="none"), store, vocab_size=4)
    ids = torch.tensor([0, 1])
    loss_mask = _t([[0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0]])  # sample 1 ends in padding
    labels = torch.zeros(2, 6, dtype=torch.long)
    scorer.begin_step(0, ids)
    selection = scorer.select(ids, labels, loss_mask)
    # sample 0: k = ceil(2.5) = 3: 0.875 (pos 4), then the 0.5 tie at positions 2 and 3.
    # sample 1: k = 1: pos 3; context 0, 1 and padding 4, 5 are kept.
    assert selection.keep_index.tolist() == [[0, 2, 3, 4, -1], [0, 1, 3, 4, 5]]
    assert selection.computed_loss_mask().sum(dim=1).tolist() == [3, 1]


def _batch_scope_case(ref, loss_mask, ratio, **fields):
    store = MemoryRefStore(ref)
    cfg = _cfg(keep_ratio=ratio, lambda_=1.0,
               **{"score_norm": "none", "select_scope": "batch", **fields})
    scorer = ReGateScorer(cfg, store, vocab_size=4)
    ids = torch.arange(len(ref))
    scorer.begin_step(0, ids)
    selection = scorer.select(ids, torch.zeros(len(ref), 4, dtype=torch.long), _t(loss_mask))
    return selection.keep_index.tolist()


def test_select_batch_scope_by_hand():
    masks = [[0, 1, 1, 0], [1, 1, 1, 1]]
    # 6 targets, k = 3 jointly: 6, 5 (sample 0) and 4 (sample 1, pos 3).
    assert _batch_scope_case([[5, 6], [1, 2, 3, 4]], masks, 0.5) == [[0, 1, 2, 3], [3, -1, -1, -1]]
    # per sample instead: sample 0 keeps 1 of 2, sample 1 keeps 2 of 4.
    per_sample = _batch_scope_case([[5, 6], [1, 2, 3, 4]], masks, 0.5, select_scope="sample")
    assert per_sample == [[0, 2, 3], [2, 3, -1]]
    # k = 2 leaves sample 1 (all targets) empty: it keeps its best target.
    assert _batch_scope_case([[5, 6], [1, 2, 3, 4]], masks, 0.25) == [[0, 1, 2, 3], [3, -1, -1, -1]]
    # all tied: lower sample first, then lower position.
    tied = [[0, 1, 1, 0], [0, 1, 1, 0]]
    assert _batch_scope_case([[3, 3], [3, 3]], tied, 0.5) == [[0, 1, 2, 3], [0, 3, -1, -1]]
    # rank normalisation over the micro-batch: sample 1's targets outrank both of sample 0's.
    assert (_batch_scope_case([[1, 2], [3, 4]], tied, 0.5, score_norm="rank")
            == [[0, 3, -1, -1], [0, 1, 2, 3]])


def test_dense_when_disabled_or_rho_one():
    store, ids, labels, loss_mask = _fallback_batch()
    off = ReGateScorer(_cfg(enabled=False), store, vocab_size=8)
    assert off.begin_step(5, ids) == 1.0
    assert off.select(ids, labels, loss_mask).is_dense
    off.record(ids, labels, loss_mask, torch.zeros(2, 5), torch.zeros(2, 5, dtype=torch.bool))
    off.end_step()
    assert torch.isnan(off.ema.values).all()  # disabled: nothing is tracked
    dense = ReGateScorer(_cfg(keep_ratio=1.0), store, vocab_size=8)
    dense.begin_step(0, ids)
    assert dense.select(ids, labels, loss_mask).is_dense


def test_scorer_errors_name_the_problem():
    store, ids, labels, loss_mask = _fallback_batch()
    scorer = ReGateScorer(_cfg(), store, vocab_size=8)
    with pytest.raises(RuntimeError, match="before begin_step"):
        scorer.select(ids, labels, loss_mask)
    scorer.begin_step(0, ids)
    with pytest.raises(RuntimeError, match="was not finished"):
        scorer.begin_step(1, ids)
    with pytest.raises(ValueError, match="loss_mask has 2 target tokens "
                                         "but the reference-loss store has 3"):
        scorer.select(ids, labels, _t([[0, 1, 1, 0, 0], [1, 0, 0, 1, 0]]))
    short = _t([[0, 1, 1, 0, 0], [1, 0, 0, 1, 0]])
    with pytest.raises(ValueError, match="loss_mask has 2 target tokens "
                                         "but the reference-loss store has 3"):
        scorer.record(ids, labels, short, torch.zeros(2, 5), torch.zeros(2, 5, dtype=torch.bool))
    # without a store (random selector): the counts read at the start name the cause
    counted = ReGateScorer(_cfg(selector="random"), TargetCounts(np.diff(store.offsets)), 8)
    counted.begin_step(0, ids)
    with pytest.raises(ValueError, match="loss_mask has 2 target tokens but 3 were counted "
                                         "at the start of the run.*--decoder-seq-length"):
        counted.select(ids, labels, _t([[0, 1, 1, 0, 0], [1, 0, 0, 1, 0]]))
    other = ReGateScorer(_cfg(), store, 8)
    other.begin_step(0, [0])
    with pytest.raises(ValueError, match="sample 1 is not in this step's global batch"):
        other.select(ids, labels, loss_mask)
    no_loss = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="record local micro-batches in order"):
        scorer.record(ids.flip(0), labels.flip(0), loss_mask.flip(0), no_loss, no_loss.bool())
    with pytest.raises(ValueError, match="not targets"):
        scorer.record(ids, labels, loss_mask, no_loss, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="0 of this rank's 2 samples were recorded"):
        scorer.end_step()
    with pytest.raises(RuntimeError, match="loss_source=False"):
        replica = ReGateScorer(_cfg(), store, 8, loss_source=False)
        replica.record(ids, labels, loss_mask, no_loss, no_loss.bool())


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 4), s=st.integers(2, 12), ratio=st.floats(0.05, 1.0),
    lambda_=st.sampled_from([0.0, 0.3, 0.5, 1.0]), norm=st.sampled_from(["rank", "zscore", "none"]),
    scope=st.sampled_from(["sample", "batch"]), seed=st.integers(0, 10_000),
)
def test_selection_size_and_determinism(b, s, ratio, lambda_, norm, scope, seed):
    g = torch.Generator().manual_seed(seed)
    loss_mask = (torch.rand(b, s, generator=g) < 0.7).float()
    loss_mask[:, 0] = 0  # every sample has a context token
    counts = loss_mask.sum(dim=1).long().tolist()
    # Few distinct values: many ties in reference, EMA and vocabulary EMA.
    store = MemoryRefStore([(torch.randint(0, 3, (n,), generator=g) / 2).tolist() for n in counts])
    labels = torch.randint(0, 5, (b, s), generator=g)
    losses = torch.randint(0, 4, (b, s), generator=g).float()
    computed = (torch.rand(b, s, generator=g) < 0.5) & (loss_mask > 0)
    ids = torch.arange(b)
    cfg = _cfg(keep_ratio=ratio, lambda_=lambda_, score_norm=norm, select_scope=scope)

    def run():
        scorer = ReGateScorer(cfg, store, vocab_size=5)
        scorer.begin_step(0, ids)
        scorer.record(ids, labels, loss_mask, losses, computed)
        scorer.end_step()
        scorer.begin_step(1, ids)
        return scorer.select(ids, labels, loss_mask)

    selection, again = run(), run()
    assert torch.equal(selection.keep_index, again.keep_index)
    kept = selection.computed_loss_mask().sum(dim=1).tolist()
    if scope == "sample":
        assert kept == [keep_count(ratio, n) for n in counts]
    else:
        assert sum(kept) == keep_count(ratio, sum(counts))
    targets = loss_mask > 0
    assert bool(selection.keep_mask()[~targets].all())  # context always kept


# ======================================================================================
# Two ranks (DP = 2) against one process; checkpoint DP 2 -> DP 1
# ======================================================================================

DIST_COUNTS = [3, 1, 4, 2, 5, 3, 2, 4, 1]  # F = 25: the DP=2 owned ranges are uneven (12, 13)
DIST_SEQ, DIST_VOCAB = 8, 6
DIST_STEPS = [  # global batches of 6 sample ids; step 3 repeats sample 2 in one micro-batch
    [0, 1, 2, 3, 4, 5], [6, 7, 8, 0, 2, 4], [1, 3, 5, 6, 8, 0], [2, 2, 7, 4, 1, 3],
]
MICRO_BATCHES = [slice(0, 2), slice(2, 3), slice(3, 5), slice(5, 6)]  # DP rank r: the r-th half


def _dist_store():
    rng = np.random.default_rng(0)
    return MemoryRefStore([rng.integers(0, 8, n) / 4 for n in DIST_COUNTS])


def _dist_sample(sample_id):
    """(labels [s], loss_mask [s]): 2 context positions, the targets, then padding."""
    g = torch.Generator().manual_seed(100 + sample_id)
    loss_mask = torch.zeros(DIST_SEQ)
    loss_mask[2:2 + DIST_COUNTS[sample_id]] = 1
    return torch.randint(0, DIST_VOCAB, (DIST_SEQ,), generator=g), loss_mask


def _dist_scorer(**kwargs):
    cfg = _cfg(schedule="cyclic", cycle_steps=2, dense_steps=1, keep_ratio=0.5, lambda_=0.5)
    return ReGateScorer(cfg, _dist_store(), DIST_VOCAB, **kwargs)


def _dist_steps(scorer, local_micro_batches, record=True):
    """Run every step; return what every rank must agree on."""
    out = []
    for step, global_ids in enumerate(DIST_STEPS):
        ids = torch.tensor(global_ids)
        labels, loss_mask = map(torch.stack, zip(*[_dist_sample(i) for i in global_ids]))
        rho = scorer.begin_step(step, ids)
        difficulty = scorer.difficulty(ids, labels, loss_mask)
        keep = []
        for mb in MICRO_BATCHES:  # any rank can select any micro-batch of the step
            keep.append(scorer.select(ids[mb], labels[mb], loss_mask[mb]).keep_index)
        for mb in local_micro_batches if record else []:
            selection = scorer.select(ids[mb], labels[mb], loss_mask[mb])
            g = torch.Generator().manual_seed(step)
            losses = (torch.rand(len(global_ids), DIST_SEQ, generator=g) * 4)[mb]
            scorer.record(ids[mb], labels[mb], loss_mask[mb], losses,
                          selection.computed_loss_mask())
        scorer.end_step()
        out.append(dict(rho=rho, difficulty=torch.cat(difficulty), keep=keep))
    return out


def _dist_world(rank, ckpt_dir):
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state

    out = {}
    group = parallel_state.get_data_parallel_group()
    # DP = 2: each rank records its half of the global batch.
    scorer = _dist_scorer(group=group, dp_rank=rank, dp_size=2)
    out["steps"] = _dist_steps(scorer, MICRO_BATCHES[2 * rank:2 * rank + 2])
    out["owned_range"] = scorer.ema.owned_range
    out["shard"], out["vocab"] = scorer.ema.values.clone(), scorer.ema.vocab_ema.clone()

    dist_checkpointing.save(scorer.sharded_state_dict(), ckpt_dir)
    # DP 2 -> DP 1 (both ranks now hold the one DP rank, as model-parallel replicas of
    # which rank 0 is the source), and back into DP 2.
    for dp_size in (1, 2):
        if dp_size == 1:
            fresh = _dist_scorer(group=dist.group.WORLD, lookup_source=rank == 0,
                                 loss_source=rank == 0)
        else:
            fresh = _dist_scorer(group=group, dp_rank=rank, dp_size=2)
        fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(), ckpt_dir))
        out[f"loaded_dp{dp_size}"] = (fresh.ema.values.clone(), fresh.ema.vocab_ema.clone())

    # One DP rank held by two ranks (as TP/PP replicas): rank 1 contributes nothing.
    replica = _dist_scorer(group=dist.group.WORLD, lookup_source=rank == 0, loss_source=rank == 0)
    out["replica_steps"] = _dist_steps(replica, MICRO_BATCHES, record=rank == 0)
    out["replica_table"] = replica.ema.values.clone()

    # Misconfigured: both replicas claim lookup_source -> every rank raises, none hangs.
    doubled = _dist_scorer(group=dist.group.WORLD)
    try:
        doubled.begin_step(0, DIST_STEPS[0])
        out["doubled_error"] = None
    except ValueError as exc:
        out["doubled_error"] = str(exc)
    return out


def test_two_rank_exchange_matches_one_process_and_checkpoint_reshards(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    os.makedirs(ckpt_dir)
    ranks = run_world(_dist_world, 2, ckpt_dir=str(ckpt_dir), timeout=150)

    single = _dist_scorer()
    expected = _dist_steps(single, MICRO_BATCHES)
    assert [s["rho"] for s in expected] == [1.0, 0.5, 1.0, 0.5]
    assert not torch.isnan(single.ema.values).all()
    for out in ranks:
        for key in ("steps", "replica_steps"):
            for got, want in zip(out[key], expected):
                assert got["rho"] == want["rho"]
                assert _same(got["difficulty"], want["difficulty"])
                assert all(torch.equal(a, b) for a, b in zip(got["keep"], want["keep"]))
        assert _same(out["vocab"], single.ema.vocab_ema)
        assert _same(out["replica_table"], single.ema.values)
        assert "have [2] owners instead of 1" in out["doubled_error"]
    # The sparse steps really elided targets.
    assert any(k.shape[1] < DIST_SEQ for s in expected if s["rho"] < 1 for k in s["keep"])

    # Uneven owned ranges of F = 25; the shards concatenate to the one-process table.
    assert [out["owned_range"] for out in ranks] == [(0, 12), (12, 25)]
    assert _same(torch.cat([out["shard"] for out in ranks]), single.ema.values)
    for out in ranks:
        table, vocab = out["loaded_dp1"]
        assert _same(table, single.ema.values) and _same(vocab, single.ema.vocab_ema)
        table, vocab = out["loaded_dp2"]
        assert _same(table, out["shard"]) and _same(vocab, out["vocab"])

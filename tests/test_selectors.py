"""The selectors behind --regate-selector: the same schedule and keep ratio, only the kept targets
differ. Expected selections are worked out by hand from the scores written in the comments."""

import numpy as np
import pytest
import torch
from scoring_cases import MemoryRefStore
from scoring_cases import make_cfg as _cfg
from scoring_cases import tensor as _t

from regate_megatron.config import ReGateConfig
from regate_megatron.scoring.scorer import ReGateScorer, TargetCounts, open_reference
from regate_megatron.scoring.scores import (
    excess_scores,
    fuse_scores,
    fuse_segments,
    normalize_scores,
    normalize_segments,
    random_scores,
    random_seed_of,
)


def _observe(scorer, step, ids, labels, loss_mask, losses):
    """One step that computes every target (a dense step) with the given losses."""
    scorer.begin_step(step, ids)
    scorer.record(ids, labels, loss_mask, losses, loss_mask > 0)
    scorer.end_step()


# ======================================================================================
# excess: student EMA minus reference loss (Rho-1's reducible loss)
# ======================================================================================


def test_excess_scores_by_hand():
    assert excess_scores(_t([1.0, 0.5, 2.0]), _t([3.0, 0.5, 1.0])).tolist() == [2.0, 0.0, -1.0]
    with pytest.raises(ValueError, match="differ"):
        excess_scores(_t([1.0]), _t([1.0, 2.0]))


def test_excess_selection_by_hand():
    # One sample: context at 0, targets at 1..4, padding at 5.
    store = MemoryRefStore([[1.0, 0.5, 2.0, 0.25]])
    ids = torch.tensor([0])
    loss_mask = _t([[0, 1, 1, 1, 1, 0]])
    labels = torch.tensor([[0, 1, 2, 3, 4, 0]])
    scorer = ReGateScorer(_cfg(selector="excess", keep_ratio=0.5), store, vocab_size=5)
    # Step 0 observes every target: EMA = [3, 0.5, 2.5, 1.25] (first observation = loss).
    _observe(scorer, 0, ids, labels, loss_mask, _t([[0, 3.0, 0.5, 2.5, 1.25, 0]]))
    scorer.begin_step(1, ids)
    # excess = EMA - ref = [2, 0, 0.5, 1]; k = ceil(0.5 * 4) = 2 -> targets at 1 and 4.
    assert scorer.scores(ids, labels, loss_mask).tolist() == [[0, 2.0, 0.0, 0.5, 1.0, 0]]
    assert scorer.select(ids, labels, loss_mask).keep_index.tolist() == [[0, 1, 4, 5]]


def test_excess_fallbacks_and_ties_by_hand():
    # Sample 0 is observed at position 1 only (label 1, loss 4); sample 1 never.
    store = MemoryRefStore([[1.0, 2.0, 0.5], [0.5, 3.0]])
    ids = torch.tensor([0, 1])
    loss_mask = _t([[0, 1, 1, 1], [1, 1, 0, 0]])
    labels = torch.tensor([[0, 1, 2, 3], [1, 2, 0, 0]])
    scorer = ReGateScorer(_cfg(selector="excess", keep_ratio=0.5), store, vocab_size=4)
    scorer.begin_step(0, ids)
    computed = torch.zeros(2, 4, dtype=torch.bool)
    computed[0, 1] = True
    scorer.record(ids, labels, loss_mask, _t([[0, 4.0, 0, 0], [0, 0, 0, 0]]), computed)
    scorer.end_step()
    scorer.begin_step(1, ids)
    # sample 0: d = [4 (own EMA), 2 (ref: label 2 unseen), 0.5 (ref)] -> excess [3, 0, 0]
    #   k = ceil(1.5) = 2: position 1, then the 0-tie at positions 2 and 3 -> position 2.
    # sample 1: d = [4 (label 1's vocabulary EMA), 3 (ref)] -> excess [3.5, 0]; k = 1: position 0.
    assert scorer.scores(ids, labels, loss_mask).tolist() == [[0, 3.0, 0, 0], [3.5, 0, 0, 0]]
    assert scorer.select(ids, labels, loss_mask).keep_index.tolist() == [[0, 1, 2], [0, 2, 3]]


def test_excess_batch_scope_compares_raw_differences_across_samples():
    store = MemoryRefStore([[1.0, 1.0], [0.5, 0.5]])
    ids = torch.tensor([0, 1])
    loss_mask = _t([[0, 1, 1], [0, 1, 1]])
    labels = torch.tensor([[0, 1, 2], [0, 3, 3]])
    cfg = _cfg(selector="excess", keep_ratio=0.5, select_scope="batch")
    scorer = ReGateScorer(cfg, store, vocab_size=4)
    _observe(scorer, 0, ids, labels, loss_mask, _t([[0, 1.5, 3.0], [0, 2.0, 0.75]]))
    scorer.begin_step(1, ids)
    # excess = [0.5, 2] and [1.5, 0.25]; k = 2 of 4 jointly:
    # 2 (sample 0, position 2) and 1.5 (sample 1, position 1)
    assert scorer.select(ids, labels, loss_mask).keep_index.tolist() == [[0, 2], [0, 1]]


# ======================================================================================
# random: uniform draws seeded by (seed, step, sample id)
# ======================================================================================


def test_random_draws_are_pinned():
    # The generator: torch.Generator seeded by a blake2b hash of (seed, step, sample id).
    assert random_seed_of(7, 3, 1) == 1536028144880519752
    assert random_scores(7, 3, 1, 5).tolist() == pytest.approx(
        [0.00792617, 0.48651743, 0.68646199, 0.27232856, 0.04706079])
    assert random_scores(7, 3, 0, 4).tolist() == pytest.approx(
        [0.72054225, 0.64086729, 0.11336821, 0.29860991])
    assert not torch.equal(random_scores(7, 4, 1, 5), random_scores(7, 3, 1, 5))  # per step
    assert not torch.equal(random_scores(8, 3, 1, 5), random_scores(7, 3, 1, 5))  # per seed
    # a prefix of the same sample's draws does not depend on how many are drawn
    assert torch.equal(random_scores(7, 3, 1, 3), random_scores(7, 3, 1, 5)[:3])


def _random_batch():
    # sample 0: 4 targets at 1..4; sample 1: 5 targets at 0..4 (no context token).
    ids = torch.tensor([0, 1])
    loss_mask = _t([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]])
    labels = torch.zeros(2, 6, dtype=torch.long)
    return TargetCounts([4, 5]), ids, labels, loss_mask


def test_random_selection_by_hand_needs_no_store():
    counts, ids, labels, loss_mask = _random_batch()
    scorer = ReGateScorer(_cfg(selector="random", keep_ratio=0.4), counts, vocab_size=2, seed=7)
    scorer.begin_step(3, ids)
    # k = ceil(0.4 * 4) = 2 and ceil(0.4 * 5) = 2.
    # sample 0 draws [.721, .641, .113, .299] -> targets 0, 1 -> positions 1, 2
    # sample 1 draws [.008, .487, .686, .272, .047] -> targets 2, 1 -> positions 1, 2
    selection = scorer.select(ids, labels, loss_mask)
    assert selection.keep_index.tolist() == [[0, 1, 2, 5], [1, 2, 5, -1]]
    # The EMA still records (harmless), with no reference loss anywhere.
    scorer.record(ids, labels, loss_mask, torch.ones(2, 6), selection.computed_loss_mask())
    scorer.end_step()
    assert int((~torch.isnan(scorer.ema.values)).sum()) == 4


def test_random_is_the_same_on_every_rank_and_micro_batch_split():
    counts, ids, labels, loss_mask = _random_batch()
    cfg = _cfg(selector="random", keep_ratio=0.4)
    whole = ReGateScorer(cfg, counts, vocab_size=2, seed=7)
    whole.begin_step(3, ids)
    both = whole.select(ids, labels, loss_mask).keep_mask()
    # another rank's scorer (a model-parallel replica), selecting sample 1 alone, in another
    # global batch order: the same kept positions.
    other = ReGateScorer(cfg, counts, vocab_size=2, seed=7)
    other.begin_step(3, ids.flip(0))
    alone = other.select(ids[1:], labels[1:], loss_mask[1:]).keep_mask()
    assert torch.equal(alone[0], both[1])
    # another step draws afresh; the keep count stays the same
    whole.record(ids, labels, loss_mask, torch.zeros(2, 6), both & (loss_mask > 0))
    whole.end_step()
    whole.begin_step(4, ids)
    later = whole.select(ids, labels, loss_mask)
    assert not torch.equal(later.keep_mask(), both)
    assert later.computed_loss_mask().sum(dim=1).tolist() == [2, 2]


def test_random_keeps_each_target_equally_often():
    counts = TargetCounts([10])
    ids, loss_mask = torch.tensor([0]), torch.ones(1, 10)
    scorer = ReGateScorer(_cfg(selector="random", keep_ratio=0.3), counts, vocab_size=1, seed=0)
    labels, kept = torch.zeros(1, 10, dtype=torch.long), torch.zeros(10)
    for step in range(400):
        scorer.begin_step(step, ids)
        keep = scorer.select(ids, labels, loss_mask).keep_mask()
        scorer.record(ids, labels, loss_mask, torch.zeros(1, 10), keep)
        scorer.end_step()
        kept += keep[0]
    # 3 of 10 per step: 120 per target on average; binomial std ~9.2
    assert kept.sum() == 1200 and bool(((kept - 120).abs() < 40).all())


def test_open_reference_without_a_store():
    class Data:
        def target_counts(self):
            return np.array([2, 0, 3])

    layout = open_reference(_cfg(selector="random"), Data())
    assert layout.offsets.tolist() == [0, 2, 2, 5]
    with pytest.raises(ValueError, match="--regate-selector excess needs --regate-ref-store"):
        open_reference(_cfg(selector="excess"), Data())
    scorer = ReGateScorer(_cfg(selector="regate"), layout, vocab_size=2)
    scorer.begin_step(0, [0])
    with pytest.raises(ValueError, match="only --regate-selector random runs without one"):
        scorer.select(torch.tensor([0]), torch.zeros(1, 3, dtype=torch.long), _t([[0, 1, 1]]))


def test_selector_flag_is_validated():
    with pytest.raises(ValueError, match="--regate-selector must be one of regate, random, excess"):
        ReGateConfig(selector="loss")


# ======================================================================================
# The batched score maths equals the per-sample definitions
# ======================================================================================


def test_segmented_normalisation_equals_per_sample():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        counts = torch.randint(0, 7, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g)
        x = (torch.randint(0, 4, (int(counts.sum()),), generator=g) / 3).float()
        d = (torch.randint(0, 4, (int(counts.sum()),), generator=g) / 5).float()
        for mode in ("rank", "zscore", "none"):
            parts = x.split(counts.tolist())
            per_sample = torch.cat([normalize_scores(p, mode) for p in parts] + [torch.zeros(0)])
            assert torch.equal(normalize_segments(x, counts, mode), per_sample)
            pairs = zip(parts, d.split(counts.tolist()), strict=True)
            fused = torch.cat([fuse_scores(a, b, 0.3, mode) for a, b in pairs] + [torch.zeros(0)])
            assert torch.equal(fuse_segments(x, d, counts, 0.3, mode), fused)

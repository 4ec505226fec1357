"""TokenSelection: exact top-k with ties to the lower position, validation of kept
indices, and the flat layouts the router gathers with."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from regate_megatron.core.selection import TokenSelection, keep_count, select_top_targets

T, F = True, False


def test_keep_count_is_ceil_with_floor_of_one():
    assert [keep_count(0.3, n) for n in (0, 1, 3, 10, 11)] == [0, 1, 1, 3, 4]
    assert keep_count(0.5, 7) == 4 and keep_count(1.0, 7) == 7 and keep_count(0.01, 7) == 1


def test_top_targets_by_hand():
    scores = torch.tensor([[9.0, 0.1, 0.5, 0.5, 0.9, 0.2], [0.0, 0.0, 3.0, 1.0, 1.0, 1.0]])
    targets = torch.tensor([[F, T, T, T, T, T], [F, F, T, T, T, T]])
    sel = select_top_targets(scores, targets, 0.5)
    # sample 0: 5 targets -> k=3: 0.9 (pos 4), then the 0.5 tie -> positions 2, 3.
    # sample 1: 4 targets -> k=2: 3.0 (pos 2), then the 1.0 tie -> lower position 3.
    assert sel.keep_index.tolist() == [[0, 2, 3, 4], [0, 1, 2, 3]]
    assert sel.computed_loss_mask().tolist() == [[F, F, T, T, T, F], [F, F, T, T, F, F]]
    assert sel.num_targets() == (9, 5)
    assert not sel.is_dense and select_top_targets(scores, targets, 1.0).is_dense


def test_sample_without_targets_keeps_its_context():
    scores = torch.zeros(2, 4)
    targets = torch.tensor([[F, F, F, F], [F, F, T, T]])
    sel = select_top_targets(scores, targets, 0.5)
    assert sel.keep_index.tolist() == [[0, 1, 2, 3], [0, 1, 2, -1]]


def test_gather_layout():
    sel = TokenSelection(torch.tensor([[0, 2, 3], [1, -1, -1]]), torch.ones(2, 4, dtype=torch.bool))
    rows, valid_slots, scatter_rows, positions = sel.gather_layout(multiple=4)
    # flat row of (position p, sample i) is p * b + i; pad slots reread the first kept row.
    assert rows.tolist() == [0, 3, 4, 3, 6, 3, 0, 3]
    assert valid_slots.tolist() == [0, 1, 2, 4]
    assert scatter_rows.tolist() == [0, 3, 4, 6]
    assert positions.tolist() == [[0, 1], [2, 1], [3, 1], [0, 1]]
    assert sel.output_rows(with_labels=False).tolist() == [0, 3, 4, 6]


@pytest.mark.parametrize("keep_index,message", [
    ([[0, 3, 2]], "strictly increasing"),
    ([[0, 2, 2]], "strictly increasing"),
    ([[0, 1, 9]], "out of range"),
    ([[-2, 1, 2]], "out of range"),
    ([[-1, -1, -1]], "keep no token"),
    ([[0, -1, 2]], "padding must follow"),
])
def test_bad_keep_index(keep_index, message):
    with pytest.raises(ValueError, match=f"keep_index.*{message}|{message}"):
        TokenSelection(torch.tensor(keep_index), torch.zeros(1, 4, dtype=torch.bool))


def test_bad_inputs_to_selection():
    with pytest.raises(ValueError, match="keep no token"):
        TokenSelection.from_keep_mask(torch.tensor([[T, F], [F, F]]),
                                      torch.zeros(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="int64"):
        TokenSelection(torch.tensor([[0, 1]], dtype=torch.int32),
                       torch.zeros(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="--regate-keep-ratio"):
        select_top_targets(torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool), 0.0)
    with pytest.raises(ValueError, match="NaN"):
        select_top_targets(torch.tensor([[0.0, float("nan")]]),
                           torch.ones(1, 2, dtype=torch.bool), 0.5)


@settings(max_examples=60, deadline=None)
@given(
    b=st.integers(1, 4), s=st.integers(1, 24), ratio=st.floats(0.01, 1.0),
    seed=st.integers(0, 10_000), levels=st.integers(1, 5),
)
def test_selection_size_and_determinism(b, s, ratio, seed, levels):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (b, s), generator=g).float()  # many ties
    targets = torch.rand(b, s, generator=g) < 0.6
    sel = select_top_targets(scores, targets, ratio)
    again = select_top_targets(scores.clone(), targets.clone(), ratio)
    assert torch.equal(sel.keep_index, again.keep_index)
    kept = sel.computed_loss_mask()
    for i in range(b):
        n = int(targets[i].sum())
        assert int(kept[i].sum()) == keep_count(ratio, n)
        assert bool(sel.keep_mask()[i][~targets[i]].all())  # context always kept
        if n and int(kept[i].sum()) < n:  # every kept target outranks every elided one
            kept_scores, dropped = scores[i][kept[i]], scores[i][targets[i] & ~kept[i]]
            assert kept_scores.min() >= dropped.max()
            # ties at the threshold go to lower positions
            tie = kept_scores.min()
            kept_pos = kept[i].nonzero().flatten()[scores[i][kept[i]] == tie]
            dropped_pos = (targets[i] & ~kept[i]).nonzero().flatten()[dropped == tie]
            if len(dropped_pos):
                assert kept_pos.max() < dropped_pos.min()

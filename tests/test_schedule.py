"""The keep-ratio schedule: exact values per schedule, warmup, mean over a run, disabled."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from regate_megatron.config import ReGateConfig
from regate_megatron.scoring.schedule import keep_ratio_at, mean_keep_ratio


def _cfg(**fields):
    return ReGateConfig(enabled=True, **fields)


def _run(config, steps):
    return [keep_ratio_at(t, config) for t in range(steps)]


def test_cyclic_with_warmup_by_hand():
    cfg = _cfg(schedule="cyclic", keep_ratio=0.25, warmup_steps=2, cycle_steps=4, dense_steps=1)
    # t:    0  1 | 2  3    4    5    | 6  7    8    9    | 10
    assert _run(cfg, 11) == [1, 1, 1, .25, .25, .25, 1, .25, .25, .25, 1]


def test_cyclic_with_two_dense_steps_and_no_warmup():
    cfg = _cfg(schedule="cyclic", keep_ratio=0.5, cycle_steps=3, dense_steps=2)
    assert _run(cfg, 7) == [1, 1, .5, 1, 1, .5, 1]


def test_cyclic_without_dense_steps_is_constant_after_warmup():
    cfg = _cfg(schedule="cyclic", keep_ratio=0.5, warmup_steps=1, cycle_steps=3, dense_steps=0)
    assert _run(cfg, 5) == [1, .5, .5, .5, .5]


def test_constant_ignores_cycles():
    cfg = _cfg(schedule="constant", keep_ratio=0.25, warmup_steps=2, cycle_steps=4, dense_steps=1)
    assert _run(cfg, 7) == [1, 1, .25, .25, .25, .25, .25]


def test_cosine_by_hand():
    cfg = _cfg(schedule="cosine", keep_ratio=0.2, warmup_steps=1, cycle_steps=5, dense_steps=1)
    half_sqrt2 = math.sqrt(2) / 2  # cos(pi/4) = -cos(3pi/4)
    cycle = [
        1.0,                               # c=0 dense
        0.2 + 0.8 * (1 + half_sqrt2) / 2,  # c=1: p=1/4 -> 0.882842712...
        0.2 + 0.8 * (1 + 0) / 2,           # c=2: p=1/2 -> 0.6
        0.2 + 0.8 * (1 - half_sqrt2) / 2,  # c=3: p=3/4 -> 0.317157287...
        0.2,                               # c=4: p=1, the cycle's last step is rho_min exactly
    ]
    values = _run(cfg, 11)
    assert values[0] == 1.0  # warmup
    assert values[1:6] == pytest.approx(cycle, rel=0, abs=1e-12)
    assert values[6:11] == pytest.approx(cycle, rel=0, abs=1e-12)
    assert values[5] == 0.2 and values[10] == 0.2
    assert values[2] == pytest.approx(0.8828427124746190, abs=1e-12)
    assert values[4] == pytest.approx(0.3171572875253810, abs=1e-12)


def test_cosine_with_one_sparse_step_is_rho_min():
    cfg = _cfg(schedule="cosine", keep_ratio=0.3, cycle_steps=2, dense_steps=1)
    assert _run(cfg, 4) == [1, 0.3, 1, 0.3]


def test_disabled_or_dense_is_always_one():
    for schedule in ("constant", "cyclic", "cosine"):
        off = ReGateConfig(enabled=False, schedule=schedule, keep_ratio=0.1)
        assert _run(off, 25) == [1.0] * 25
        assert mean_keep_ratio(off, 25) == 1.0
        dense = _cfg(schedule=schedule, keep_ratio=1.0)
        assert _run(dense, 25) == [1.0] * 25


def test_mean_keep_ratio_by_hand():
    cfg = _cfg(schedule="cyclic", keep_ratio=0.25, warmup_steps=2, cycle_steps=4, dense_steps=1)
    assert mean_keep_ratio(cfg, 10) == 5.5 / 10   # 1+1 | 1+.25*3 | 1+.25*3
    assert mean_keep_ratio(cfg, 7) == 4.75 / 7    # 1+1 | 1+.25*3 | 1
    assert mean_keep_ratio(cfg, 2) == 1.0         # warmup only
    assert mean_keep_ratio(cfg, 1) == 1.0
    const = _cfg(schedule="constant", keep_ratio=0.5, warmup_steps=4)
    assert mean_keep_ratio(const, 8) == 0.75      # 4*1 + 4*.5


@settings(max_examples=40, deadline=None)
@given(
    schedule=st.sampled_from(["constant", "cyclic", "cosine"]),
    rho=st.floats(0.05, 1.0), warmup=st.integers(0, 6), cycle=st.integers(1, 7),
    dense=st.integers(0, 6), iters=st.integers(1, 60),
)
def test_mean_keep_ratio_matches_the_step_by_step_mean(schedule, rho, warmup, cycle, dense, iters):
    cfg = _cfg(schedule=schedule, keep_ratio=rho, warmup_steps=warmup, cycle_steps=cycle,
               dense_steps=min(dense, cycle - 1))
    values = _run(cfg, iters)
    assert mean_keep_ratio(cfg, iters) == pytest.approx(sum(values) / iters, abs=1e-12)
    assert all(rho - 1e-12 <= v <= 1.0 for v in values)


@pytest.mark.parametrize("step", [-1, 1.5, True])
def test_bad_step(step):
    with pytest.raises(ValueError, match="step must be an integer >= 0"):
        keep_ratio_at(step, _cfg())


def test_bad_train_iters():
    with pytest.raises(ValueError, match="train_iters must be an integer >= 1"):
        mean_keep_ratio(_cfg(), 0)

"""The keep-ratio schedule rho_t: a pure function of the optimizer step.

``t`` is the 0-based optimizer step, identical on every rank, so every rank
computes the same rho_t without communicating. With rho_min = ``--regate-keep-ratio``,
W = ``--regate-warmup-steps``, C = ``--regate-cycle-steps`` and
D = ``--regate-dense-steps``:

- ReGATE disabled: rho_t = 1.
- warmup, t < W: rho_t = 1.
- after warmup, with u = t - W and c = u mod C (the step inside its cycle):

  - ``constant``: rho_t = rho_min (cycles and dense steps play no part);
  - ``cyclic``:   rho_t = 1 if c < D else rho_min;
  - ``cosine``:   rho_t = 1 if c < D else
    rho_min + (1 - rho_min) * (1 + cos(pi * p)) / 2 with p = (c - D + 1) / (C - D),
    so rho falls from just below 1 after the dense steps to exactly rho_min at the
    cycle's last step (p = 1).

Dense steps (rho_t = 1) compute every target token, which refreshes the whole
student-loss EMA of the batch. `mean_keep_ratio` is the run's average rho_t,
printed at start as the expected fraction of target tokens computed.
"""

from __future__ import annotations

import math
import numbers

from regate_megatron.config import ReGateConfig

__all__ = ["keep_ratio_at", "mean_keep_ratio"]


def keep_ratio_at(step: int, config: ReGateConfig) -> float:
    """rho_t of optimizer step ``step`` (0-based); 1.0 when ReGATE is disabled."""
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(f"keep_ratio_at: step must be an integer >= 0 (0-based), got {step!r}")
    if not config.enabled or step < config.warmup_steps:
        return 1.0
    rho_min = float(config.keep_ratio)
    if config.schedule == "constant":
        return rho_min
    c = (int(step) - config.warmup_steps) % config.cycle_steps
    if c < config.dense_steps:
        return 1.0
    if config.schedule == "cyclic":
        return rho_min
    if config.schedule == "cosine":
        p = (c - config.dense_steps + 1) / (config.cycle_steps - config.dense_steps)
        return rho_min + (1.0 - rho_min) * 0.5 * (1.0 + math.cos(math.pi * p))
    raise ValueError(f"--regate-schedule {config.schedule!r} is not a known schedule")


def mean_keep_ratio(config: ReGateConfig, train_iters: int) -> float:
    """Mean of `keep_ratio_at` over the steps ``0 .. train_iters - 1``.

    Computed per cycle (warmup + whole cycles + the remainder), so it costs O(C), not
    O(train_iters).
    """
    if (isinstance(train_iters, bool) or not isinstance(train_iters, numbers.Integral)
            or train_iters < 1):
        raise ValueError(
            f"mean_keep_ratio: train_iters must be an integer >= 1, got {train_iters!r}")
    warmup = min(config.warmup_steps, train_iters)
    total = float(warmup)  # warmup steps are dense
    after = train_iters - warmup
    full_cycles, remainder = divmod(after, config.cycle_steps)
    cycle = [keep_ratio_at(config.warmup_steps + c, config) for c in range(config.cycle_steps)]
    total += full_cycles * sum(cycle) + sum(cycle[:remainder])
    return total / train_iters

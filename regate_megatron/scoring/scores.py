"""Score maths of the selectors: normalisation, ReGATE's fusion, student difficulty, and the
random and excess-loss baselines' scores.

For each target token i of a sample (loss_mask = 1, in ascending position order):

- reference loss ``r_i``: the frozen text-only teacher's loss, from the reference-loss store;
- student difficulty ``d_i`` (`difficulty_of`): the student-loss EMA of (sample, target) if it
  was ever observed, else the per-vocabulary-id EMA of the token's label if that was, else
  ``r_i``;
- the selector's score, of which the top ``keep_count(rho_t, |T|)`` targets are kept
  (`regate_megatron.core.selection`; ties to the lower position):

  - ``regate``: ``lambda * N(r)_i + (1 - lambda) * N(d)_i`` (`fuse_scores`), ``N`` taken over
    the selection scope's targets (one sample, or the whole micro-batch);
  - ``excess``: Rho-1's reducible loss ``d_i - r_i`` (`excess_scores`), unnormalised;
  - ``random``: uniform draws from a generator seeded by (seed, step, sample id)
    (`random_scores`), so every rank and a resumed run draw the same values.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from regate_megatron.config import CHOICES

__all__ = [
    "normalize_scores",
    "fuse_scores",
    "normalize_segments",
    "fuse_segments",
    "difficulty_of",
    "excess_scores",
    "random_seed_of",
    "random_scores",
]


def normalize_scores(x: torch.Tensor, mode: str) -> torch.Tensor:
    """Normalise one scope's scores ``x`` [n] (float32 result).

    - ``rank``: the 0-based rank in ascending order, ties get their average rank, divided
      by ``n - 1`` -> [0, 1] (smallest 0, largest 1). A single value, or all values
      equal, map to 0.5.
    - ``zscore``: ``(x - mean) / std`` with the population std; all values equal -> 0.
    - ``none``: ``x`` unchanged.
    """
    if mode not in CHOICES["score_norm"]:
        raise ValueError(
            f"--regate-score-norm must be one of {', '.join(CHOICES['score_norm'])}; got {mode!r}"
        )
    if x.dim() != 1:
        raise ValueError(f"normalize_scores expects a 1-D tensor [n], got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("normalize_scores: scores contain NaN or inf")
    if mode == "none" or x.numel() == 0:
        return x.to(torch.float32)
    x64 = x.to(torch.float64)
    if mode == "rank":
        n = x64.numel()
        if n == 1:
            return torch.full((1,), 0.5)
        ordered = x64.sort().values
        first = torch.searchsorted(ordered, x64, right=False)  # elements strictly below
        past = torch.searchsorted(ordered, x64, right=True)    # elements below or equal
        average_rank = (first + past - 1).to(torch.float64) / 2
        return (average_rank / (n - 1)).to(torch.float32)
    # zscore
    if bool(x64.max() == x64.min()):
        return torch.zeros_like(x, dtype=torch.float32)
    return ((x64 - x64.mean()) / x64.std(unbiased=False)).to(torch.float32)


def _check_fusion_inputs(ref: torch.Tensor, difficulty: torch.Tensor, lambda_: float) -> None:
    if ref.shape != difficulty.shape:
        raise ValueError(
            f"fuse_scores: ref {tuple(ref.shape)} and difficulty {tuple(difficulty.shape)} differ"
        )
    if not 0.0 <= lambda_ <= 1.0:
        raise ValueError(f"--regate-lambda must be in [0, 1], got {lambda_!r}")


def fuse_scores(
    ref: torch.Tensor, difficulty: torch.Tensor, lambda_: float, norm: str
) -> torch.Tensor:
    """Importance ``lambda * N(ref) + (1 - lambda) * N(difficulty)`` of one scope's targets [n]."""
    _check_fusion_inputs(ref, difficulty, lambda_)
    return (lambda_ * normalize_scores(ref, norm)
            + (1.0 - lambda_) * normalize_scores(difficulty, norm))


def normalize_segments(x: torch.Tensor, counts: torch.Tensor, mode: str) -> torch.Tensor:
    """`normalize_scores` of each consecutive segment of ``x`` [n] (segment i has ``counts[i]``
    values), concatenated: bit-identical to the per-segment calls; 'rank' takes one lexsort of
    all segments instead of a Python loop over samples."""
    counts = torch.as_tensor(counts, dtype=torch.long).reshape(-1)
    if x.dim() != 1 or int(counts.sum()) != x.numel():
        raise ValueError(
            f"normalize_segments: x {tuple(x.shape)} must be 1-D with sum(counts) = "
            f"{int(counts.sum())} values"
        )
    if mode != "rank":  # 'none' is elementwise; 'zscore' keeps the per-segment reductions
        return torch.cat([normalize_scores(part, mode) for part in x.split(counts.tolist())]
                         + [torch.zeros(0)])
    if not bool(torch.isfinite(x).all()):
        raise ValueError("normalize_scores: scores contain NaN or inf")
    if x.numel() == 0:
        return torch.zeros(0)
    # NumPy on purpose: these arrays are tiny, and torch's batched sort/searchsorted hand
    # them to the intra-op thread pool, which costs milliseconds on a loaded CPU.
    values = x.detach().cpu().numpy().astype(np.float64)
    sizes = counts.numpy()
    segment = np.repeat(np.arange(sizes.size), sizes)                  # [n]
    order = np.lexsort((values, segment))                               # by segment, then value
    seg_sorted, val_sorted = segment[order], values[order]
    new_run = np.ones(order.size, dtype=bool)                           # a run = equal values
    new_run[1:] = (seg_sorted[1:] != seg_sorted[:-1]) | (val_sorted[1:] != val_sorted[:-1])
    run = np.cumsum(new_run) - 1
    run_first = np.flatnonzero(new_run)                                 # [runs]
    run_last = np.append(run_first[1:], order.size) - 1
    seg_start = np.cumsum(sizes) - sizes
    # average 0-based rank inside the segment: (first + last) / 2 of the run of equal values
    average_rank = np.empty(order.size, dtype=np.float64)
    average_rank[order] = ((run_first[run] + run_last[run]).astype(np.float64)
                           - 2 * seg_start[seg_sorted]) / 2
    n_of = sizes[segment].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (average_rank / (n_of - 1)).astype(np.float32)
    out[n_of == 1] = 0.5
    return torch.from_numpy(out)


def fuse_segments(
    ref: torch.Tensor, difficulty: torch.Tensor, counts: torch.Tensor, lambda_: float, norm: str
) -> torch.Tensor:
    """`fuse_scores` of each consecutive segment (one sample's targets), concatenated [n]."""
    _check_fusion_inputs(ref, difficulty, lambda_)
    return (lambda_ * normalize_segments(ref, counts, norm)
            + (1.0 - lambda_) * normalize_segments(difficulty, counts, norm))


def difficulty_of(
    ema: torch.Tensor, vocab_ema_of_label: torch.Tensor, ref: torch.Tensor
) -> torch.Tensor:
    """Student difficulty per target: its EMA if observed, else its label's vocabulary
    EMA if observed, else the reference loss (NaN = unobserved)."""
    fallback = torch.where(torch.isnan(vocab_ema_of_label), ref, vocab_ema_of_label)
    return torch.where(torch.isnan(ema), fallback, ema)


def excess_scores(ref: torch.Tensor, difficulty: torch.Tensor) -> torch.Tensor:
    """Rho-1's reducible loss ``difficulty - ref`` [n] (float32): high where the student is still
    worse than the teacher. A target whose difficulty fell back to ``ref`` (neither it nor its
    label was ever observed) scores 0."""
    if ref.shape != difficulty.shape:
        raise ValueError(
            f"excess_scores: ref {tuple(ref.shape)} and difficulty {tuple(difficulty.shape)} differ"
        )
    return (difficulty.to(torch.float64) - ref.to(torch.float64)).to(torch.float32)


def random_seed_of(seed: int, step: int, sample_id: int) -> int:
    """A 63-bit generator seed from (seed, step, sample id): a stable hash, identical in every
    process, so the draw depends on nothing else (not the rank, micro-batch or DP split)."""
    key = f"regate-random:{int(seed)}:{int(step)}:{int(sample_id)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def random_scores(seed: int, step: int, sample_id: int, num_targets: int) -> torch.Tensor:
    """Uniform [0, 1) scores [num_targets] (float32) of one sample's targets at ``step``."""
    generator = torch.Generator().manual_seed(random_seed_of(seed, step, sample_id))
    return torch.rand(num_targets, generator=generator)

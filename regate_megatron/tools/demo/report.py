"""Time-to-accuracy of a ReGATE run against a dense baseline, from `--metrics-jsonl` files.

The target is the dense run's peak held-out accuracy (its first evaluation
reaching it). For each run we find the first evaluation at or above that peak and
read two costs there: the cumulative computed (kept) target tokens and the
training wall time (``elapsed``, which excludes evaluation). ReGATE's claim is
that it reaches the dense peak with fewer of both: ratios below 1.
"""

from __future__ import annotations

import math
from typing import List, Optional

from regate_megatron.data.llava import read_json_records

__all__ = [
    "load_metrics",
    "time_to_accuracy",
    "format_table",
    "summary_line",
    "plot_accuracy_vs_tokens",
]


def load_metrics(path: str) -> List[dict]:
    """The per-step records of a ``--metrics-jsonl`` file, in file order."""
    return read_json_records(path, what="a metrics file (regate-train --metrics-jsonl)")


def _evals(run: List[dict]) -> List[dict]:
    return [r for r in run if "eval_accuracy" in r]


def _first_reaching(run: List[dict], accuracy: float) -> Optional[dict]:
    """The first evaluation record of ``run`` with eval_accuracy >= ``accuracy``."""
    return next((r for r in _evals(run) if r["eval_accuracy"] >= accuracy), None)


def _ratio(regate: Optional[float], dense: float) -> float:
    """regate / dense; inf if ReGATE never got there; 1.0 if both got there at zero cost."""
    if regate is None:
        return math.inf
    if dense == 0:
        return 1.0 if regate == 0 else math.inf
    return regate / dense


def time_to_accuracy(dense: List[dict], regate: List[dict]) -> dict:
    """Cost of each run to reach the dense run's peak eval accuracy.

    Returns ``dense_peak``, ``step_dense``/``step_regate`` (the first evaluation step
    at or above the peak), ``tokens_dense``/``tokens_regate`` (``cum_kept_target_tokens``
    there), ``wall_dense``/``wall_regate`` (``elapsed`` there), ``tokens_ratio`` and
    ``wall_ratio`` (regate / dense; ``inf`` when ReGATE never reaches the peak, and then
    its step, tokens and wall are None), ``acc_dense``/``acc_regate`` (final eval
    accuracy) and ``mean_keep`` (mean ``keep_ratio`` of the ReGATE run over its steps).
    """
    dense_evals, regate_evals = _evals(dense), _evals(regate)
    if not dense_evals:
        raise ValueError("the dense run has no evaluation records (eval_accuracy); run it with "
                         "evaluation enabled")
    if not regate_evals:
        raise ValueError("the ReGATE run has no evaluation records (eval_accuracy); run it with "
                         "evaluation enabled")
    peak = max(r["eval_accuracy"] for r in dense_evals)
    at_dense = _first_reaching(dense, peak)
    at_regate = _first_reaching(regate, peak)
    keeps = [r["keep_ratio"] for r in regate if "keep_ratio" in r]
    tokens_regate = None if at_regate is None else at_regate["cum_kept_target_tokens"]
    wall_regate = None if at_regate is None else at_regate["elapsed"]
    return {
        "dense_peak": peak,
        "step_dense": at_dense["step"],
        "step_regate": None if at_regate is None else at_regate["step"],
        "tokens_dense": at_dense["cum_kept_target_tokens"],
        "tokens_regate": tokens_regate,
        "wall_dense": at_dense["elapsed"],
        "wall_regate": wall_regate,
        "tokens_ratio": _ratio(tokens_regate, at_dense["cum_kept_target_tokens"]),
        "wall_ratio": _ratio(wall_regate, at_dense["elapsed"]),
        "acc_dense": dense_evals[-1]["eval_accuracy"],
        "acc_regate": regate_evals[-1]["eval_accuracy"],
        "mean_keep": sum(keeps) / len(keeps) if keeps else math.nan,
    }


def _cell(value, fmt: str) -> str:
    return "not reached" if value is None else format(value, fmt)


def format_table(result: dict) -> str:
    """An aligned text table of a `time_to_accuracy` result."""
    r = result
    rows = [
        ("", "dense", "regate", "regate/dense"),
        (f"target tokens to dense peak ({r['dense_peak']:.4f})",
         _cell(r["tokens_dense"], ",.0f"), _cell(r["tokens_regate"], ",.0f"),
         format(r["tokens_ratio"], ".3f")),
        ("wall seconds to dense peak", _cell(r["wall_dense"], ".1f"),
         _cell(r["wall_regate"], ".1f"), format(r["wall_ratio"], ".3f")),
        ("final eval accuracy", format(r["acc_dense"], ".4f"), format(r["acc_regate"], ".4f"), ""),
        ("mean keep ratio", "-", format(r["mean_keep"], ".3f"), ""),
    ]
    widths = [max(len(row[c]) for row in rows) for c in range(4)]
    lines = [
        "  ".join([row[0].ljust(widths[0])] + [row[c].rjust(widths[c]) for c in (1, 2, 3)]).rstrip()
        for row in rows
    ]
    return "\n".join(lines)


def summary_line(result: dict) -> str:
    """One grep-able line: the two cost ratios, final accuracies and the mean keep ratio."""
    r = result
    # format(inf, ".3f") is "inf".
    return (
        f"tokens_to_dense_peak={r['tokens_ratio']:.3f} wall_to_dense_peak={r['wall_ratio']:.3f} "
        f"acc_dense={r['acc_dense']:.4f} acc_regate={r['acc_regate']:.4f} "
        f"mean_keep={r['mean_keep']:.3f}"
    )


def plot_accuracy_vs_tokens(dense: List[dict], regate: List[dict], path_png: str) -> str:
    """Eval accuracy vs computed target tokens (left) and vs wall time (right); returns the path.

    Both runs are drawn; the dense peak is a dashed horizontal line. Uses the Agg
    canvas directly (no pyplot), so it needs no display and touches no global state.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), tight_layout=True)
    FigureCanvasAgg(fig)
    dense_evals = _evals(dense)
    peak = max((r["eval_accuracy"] for r in dense_evals), default=None)
    panels = (("cum_kept_target_tokens", "computed target tokens (cumulative)"),
              ("elapsed", "training wall time (s)"))
    for k, (key, xlabel) in enumerate(panels):
        ax = fig.add_subplot(1, 2, k + 1)
        for name, run, style in (("dense", dense, "o-"), ("ReGATE", regate, "s-")):
            evals = _evals(run)
            ax.plot([r[key] for r in evals], [r["eval_accuracy"] for r in evals], style,
                    markersize=3, label=name)
        if peak is not None:
            ax.axhline(peak, linestyle="--", color="gray", linewidth=1,
                       label=f"dense peak {peak:.3f}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("eval accuracy (exact match)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.savefig(path_png, dpi=120)
    return path_png

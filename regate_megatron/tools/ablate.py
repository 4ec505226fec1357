"""`regate-ablate`: does the score matter? Dense and selector variants over seeds.

    inputs (digits-VQA, tokenizer, teacher, reference losses: built, or given) ->
    one `regate-train` run per (variant, seed), resumable -> table (mean +- std over
    seeds), ablation.png (accuracy vs computed target tokens, a band per variant) and
    ablation.json.

Every variant runs the same `regate-train` command (the demo's student flags, or yours) with
the same schedule and keep ratio; only the kept targets differ:

    dense       no elision
    regate      --regate-selector regate --regate-lambda 0.5 (the default fused score)
    regate-l0   lambda = 0 (student EMA only)     regate-l1   lambda = 1 (teacher only)
    random      --regate-selector random (no reference-loss store)
    excess      --regate-selector excess (Rho-1's reducible loss)

A seed (``--seed`` of regate-train) changes the initialisation of everything not loaded from
the teacher, and the data order. With ``--teacher-checkpoints A B`` (or, on digits,
``--weak-teacher-steps N``, which trains a second, weaker teacher) the paper's second
ablation runs too: the ``regate`` variant scored by each teacher's reference losses
(``teacher-<name>`` rows; on digits the default teacher's row is ``regate`` itself).

Metrics per (variant, seed), against the dense run of the same seed: target tokens computed
and training wall time (``elapsed``, evaluation excluded) until the first evaluation at or
above the dense run's peak accuracy (runs that never get there are counted in the
"reached" column and left out of the mean); accuracy at equal target tokens (the last
evaluation at or below the smallest final token count of that seed's runs, so every run is
compared at the same computed-token budget); final accuracy. Means and sample standard
deviations (n - 1) are over seeds.

A run is finished when its metrics file ends with an evaluation at the last step (with
``--save-checkpoints``, also when its checkpoint's ``latest_checkpointed_iteration.txt`` names
that step); finished runs are skipped, an unfinished one is started again from scratch.
Each run's output is in ``runs/logs/<run>.log``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

from regate_megatron.data.layout import LAYOUT_FLAGS

__all__ = ["VARIANTS", "RunSpec", "plan_runs", "summarize", "format_table", "plot_bands", "main"]

REGATE_SCHEDULE = ["--regate-schedule", "cyclic", "--regate-cycle-steps", "10",
                   "--regate-dense-steps", "1"]

VARIANTS: Dict[str, Optional[List[str]]] = {
    "dense": None,
    "regate": ["--regate-selector", "regate", "--regate-lambda", "0.5"],
    "regate-l0": ["--regate-selector", "regate", "--regate-lambda", "0"],
    "regate-l1": ["--regate-selector", "regate", "--regate-lambda", "1"],
    "random": ["--regate-selector", "random"],
    "excess": ["--regate-selector", "excess"],
}
"""Variant name -> its regate-train flags (None = dense, no --regate)."""


@dataclass
class RunSpec:
    name: str             # file stem under runs/: <name>.jsonl, <name>_ckpt, <name>.log
    variant: str          # a VARIANTS key, or "teacher-<name>"
    seed: int
    store: Optional[str]  # reference-loss store (None: dense, or random)
    flags: List[str] = field(default_factory=list)


def plan_runs(variants: List[str], seeds: List[int], keep_ratio: float, store: Optional[str],
              teacher_stores: Optional[Dict[str, str]] = None) -> List[RunSpec]:
    """Every (variant, seed) run, dense first within each seed so partial results are usable."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    if "dense" not in variants:
        variants = ["dense", *variants]  # every metric is relative to the dense run
    runs = []
    for seed in seeds:
        for variant in variants:
            extra = VARIANTS[variant]
            if extra is None:
                runs.append(RunSpec(f"{variant}-s{seed}", variant, seed, None, []))
                continue
            run_store = None if variant == "random" else store
            if run_store is None and variant != "random":
                raise ValueError(f"variant {variant} needs a reference-loss store (--ref-store)")
            flags = ["--regate", "--regate-keep-ratio", str(keep_ratio), *REGATE_SCHEDULE, *extra]
            if run_store:
                flags += ["--regate-ref-store", run_store]
            runs.append(RunSpec(f"{variant}-s{seed}", variant, seed, run_store, flags))
        for teacher, teacher_store in (teacher_stores or {}).items():
            flags = ["--regate", "--regate-keep-ratio", str(keep_ratio), *REGATE_SCHEDULE,
                     *VARIANTS["regate"], "--regate-ref-store", teacher_store]
            runs.append(RunSpec(f"teacher-{teacher}-s{seed}", f"teacher-{teacher}", seed,
                                teacher_store, flags))
    return runs


# ======================================================================================
# Running
# ======================================================================================


def _finished(runs_dir: str, name: str, steps: int, checkpoints: bool) -> bool:
    """Its metrics file ends with an evaluation at the last step (and, with ``checkpoints``,
    its checkpoint pointer names that step)."""
    from regate_megatron.tools.demo.report import load_metrics

    metrics = os.path.join(runs_dir, f"{name}.jsonl")
    pointer = os.path.join(runs_dir, f"{name}_ckpt", "latest_checkpointed_iteration.txt")
    if not os.path.exists(metrics):
        return False
    if checkpoints:
        if not os.path.exists(pointer):
            return False
        with open(pointer) as f:
            if f.read().strip() != str(steps):
                return False
    try:
        rows = load_metrics(metrics)
    except ValueError:
        return False
    return bool(rows) and rows[-1]["step"] == steps and "eval_accuracy" in rows[-1]


def _clear(runs_dir: str, name: str) -> None:
    for path in (f"{name}.jsonl", f"{name}_ckpt"):
        path = os.path.join(runs_dir, path)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def run_all(runs: List[RunSpec], command, runs_dir: str, steps: int,
            checkpoints: bool = False) -> Dict[str, float]:
    """Run every unfinished run (one tqdm bar over runs); returns wall seconds per run started."""
    from tqdm import tqdm

    from regate_megatron.tools.demo.run import run_stage

    todo = [r for r in runs if not _finished(runs_dir, r.name, steps, checkpoints)]
    walls = {}
    bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc="ablation", unit="run",
               dynamic_ncols=True)
    for spec in todo:
        bar.set_postfix_str(spec.name)
        _clear(runs_dir, spec.name)
        walls[spec.name] = run_stage(spec.name, command(spec), runs_dir, quiet=True)
        bar.update(1)
    bar.close()
    return walls


# ======================================================================================
# Analysis
# ======================================================================================


def _evals(rows: List[dict]) -> List[dict]:
    return [r for r in rows if "eval_accuracy" in r]


def _accuracy_at_tokens(rows: List[dict], tokens: float) -> float:
    """Accuracy of the last evaluation with cum_kept_target_tokens <= tokens (nan if none)."""
    at = [r["eval_accuracy"] for r in _evals(rows) if r["cum_kept_target_tokens"] <= tokens]
    return at[-1] if at else math.nan


def _mean_std(values: List[Optional[float]]) -> dict:
    xs = [v for v in values if v is not None and math.isfinite(v)]
    mean = sum(xs) / len(xs) if xs else math.nan
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else math.nan
    return {"mean": mean, "std": std, "n": len(xs), "of": len(values)}


def summarize(metrics: Dict[str, List[dict]], runs: List[RunSpec]) -> dict:
    """Per-run numbers against the same seed's dense run, then mean/std per variant."""
    from regate_megatron.tools.demo.report import time_to_accuracy

    per_run = {}
    seeds = sorted({r.seed for r in runs})
    for seed in seeds:
        mine = [r for r in runs if r.seed == seed and r.name in metrics]
        dense = next((metrics[r.name] for r in mine if r.variant == "dense"), None)
        if dense is None:
            continue
        budget = min(_evals(metrics[r.name])[-1]["cum_kept_target_tokens"] for r in mine)
        for spec in mine:
            rows = metrics[spec.name]
            tta = time_to_accuracy(dense, rows)
            per_run[spec.name] = {
                "variant": spec.variant, "seed": seed, "dense_peak": tta["dense_peak"],
                "tokens_to_dense_peak": tta["tokens_regate"],
                "wall_to_dense_peak": tta["wall_regate"],
                "token_budget": budget,
                "accuracy_at_budget": _accuracy_at_tokens(rows, budget),
                "final_accuracy": tta["acc_regate"],
                "mean_keep_ratio": tta["mean_keep"],
                "total_target_tokens": rows[-1]["cum_kept_target_tokens"],
                "train_seconds": rows[-1]["elapsed"],
            }
    variants = list(dict.fromkeys(r.variant for r in runs))
    table = {}
    for variant in variants:
        rows = [v for v in per_run.values() if v["variant"] == variant]
        if not rows:
            continue
        table[variant] = {key: _mean_std([r[key] for r in rows]) for key in (
            "tokens_to_dense_peak", "wall_to_dense_peak", "accuracy_at_budget", "final_accuracy",
            "mean_keep_ratio", "total_target_tokens", "train_seconds")}
    return {"runs": per_run, "variants": table}


def _cell(stat: dict, fmt: str, reached: bool = False) -> str:
    if stat["n"] == 0:
        return "not reached" if reached else "-"
    text = format(stat["mean"], fmt)
    if stat["n"] > 1:
        text += " ± " + format(stat["std"], fmt)
    if reached and stat["n"] < stat["of"]:
        text += f" ({stat['n']}/{stat['of']})"
    return text


def format_table(summary: dict) -> str:
    """A Markdown table of the per-variant means ± std over seeds."""
    header = ("variant", "target tokens to dense peak", "wall s to dense peak",
              "accuracy at equal tokens", "final accuracy", "mean keep")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant, t in summary["variants"].items():
        cells = (variant, _cell(t["tokens_to_dense_peak"], ",.0f", True),
                 _cell(t["wall_to_dense_peak"], ".1f", True), _cell(t["accuracy_at_budget"], ".3f"),
                 _cell(t["final_accuracy"], ".3f"), _cell(t["mean_keep_ratio"], ".2f"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_bands(metrics: Dict[str, List[dict]], runs: List[RunSpec], path_png: str) -> str:
    """Accuracy vs computed target tokens: per variant the mean over seeds (seeds interpolated
    onto a common token grid) and a mean ± std band."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), tight_layout=True)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for variant in dict.fromkeys(r.variant for r in runs):
        curves = []
        for spec in runs:
            if spec.variant == variant and spec.name in metrics:
                evals = _evals(metrics[spec.name])
                curves.append((np.array([r["cum_kept_target_tokens"] for r in evals]),
                               np.array([r["eval_accuracy"] for r in evals])))
        if not curves:
            continue
        grid = np.linspace(max(c[0][0] for c in curves), min(c[0][-1] for c in curves), 60)
        ys = np.stack([np.interp(grid, x, y) for x, y in curves])
        mean, std = ys.mean(axis=0), ys.std(axis=0, ddof=1) if len(ys) > 1 else 0 * grid
        line = ax.plot(grid, mean, label=f"{variant} (n={len(curves)})",
                       linestyle="--" if variant == "dense" else "-")[0]
        ax.fill_between(grid, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("computed target tokens (cumulative)")
    ax.set_ylabel("held-out accuracy (exact match)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.savefig(path_png, dpi=120)
    return path_png


# ======================================================================================
# Command line
# ======================================================================================


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="regate-ablate", description=__doc__.split("\n")[0], allow_abbrev=False,
        epilog="Flags after `--` are passed to every regate-train run (after the ablation's own).",
    )
    p.add_argument("--workdir", default="regate_ablation", help="everything is written here")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   metavar="VARIANT", help=f"from {', '.join(VARIANTS)} (dense always runs)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (1234, 1235, ...)")
    p.add_argument("--first-seed", type=int, default=1234)
    p.add_argument("--steps", type=int, default=400, help="optimizer steps of every run")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-interval", type=int, default=40)
    p.add_argument("--eval-batches", type=int, default=2,
                   help="held-out batches (of --batch-size samples) per evaluation")
    p.add_argument("--keep-ratio", type=float, default=0.3, help="rho_min of every sparse variant")
    p.add_argument("--report-only", action="store_true",
                   help="build and run nothing: table, plot and json of the finished runs "
                        "(e.g. while another invocation is still running)")
    p.add_argument("--save-checkpoints", action="store_true",
                   help="keep every run's final checkpoint (<run>_ckpt; costs a save per run)")
    g = p.add_argument_group("digits-VQA inputs (the default: built under --workdir)")
    g.add_argument("--teacher-steps", type=int, default=200)
    g.add_argument("--weak-teacher-steps", type=int, default=None,
                   help="also train a weaker teacher with this many steps and run the teacher "
                        "ablation (the default teacher vs this one)")
    u = p.add_argument_group("your LLaVA data set (instead of digits-VQA)")
    u.add_argument("--data-path", default=None)
    u.add_argument("--valid-data-path", default=None)
    u.add_argument("--tokenizer-model", default=None)
    u.add_argument("--ref-store", default=None, help="reference-loss store of the teacher")
    u.add_argument("--language-model-checkpoint", default=None,
                   help="initial language-model weights of every student")
    p.add_argument("--teacher-checkpoints", nargs="+", default=None, metavar="CKPT",
                   help="teacher ablation: build a reference-loss store per teacher checkpoint "
                        "(regate-precompute-ref, with the layout flags --seq-length/--img-h/"
                        "--img-w/--patch-dim/--image-root given after --) and run the regate "
                        "variant with each")
    return p


# regate-train flags that regate-precompute-ref shares (the sequence and image layout).
_LAYOUT_FLAGS = (*LAYOUT_FLAGS, "--image-root", "--regate-teacher-visual")


def _layout_flags(extra: List[str]) -> List[str]:
    """The pass-through flags (``--flag value`` or ``--flag=value``) that fix the layout."""
    out = []
    for i, item in enumerate(extra):
        name = item.split("=", 1)[0]
        if name in _LAYOUT_FLAGS:
            out += [item] if "=" in item else extra[i:i + 2]
    return out


def _split_passthrough(argv: List[str]):
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, extra = _split_passthrough(argv)
    args = build_parser().parse_args(own)
    if args.seeds < 1 or args.steps < 1 or args.eval_interval < 1:
        raise SystemExit("regate-ablate: --seeds, --steps and --eval-interval must be >= 1")
    work = os.path.abspath(args.workdir)
    runs_dir = os.path.join(work, "runs")
    os.makedirs(runs_dir, exist_ok=True)
    start = time.perf_counter()

    from regate_megatron.tools.demo import run as demo

    user_data = args.data_path is not None
    if user_data:
        if not (args.valid_data_path and args.tokenizer_model):
            raise SystemExit("regate-ablate: --data-path needs --valid-data-path and "
                             "--tokenizer-model (and --ref-store for the teacher-scored variants)")
        ap = os.path.abspath
        data, valid, tok = ap(args.data_path), ap(args.valid_data_path), ap(args.tokenizer_model)
        store = ap(args.ref_store) if args.ref_store else None
        init = ap(args.language_model_checkpoint) if args.language_model_checkpoint else None
        model = []  # the user's architecture comes in the pass-through flags
    else:
        teacher_done = os.path.join(work, "teacher", "latest_checkpointed_iteration.txt")
        if not args.report_only:
            print(f"regate-ablate: digits-VQA inputs under {work}", flush=True)
            demo.build_inputs(work)
        if not args.report_only and not os.path.exists(teacher_done):
            demo.train_teacher(work, steps=args.teacher_steps, batch_size=args.batch_size,
                               seed=args.first_seed, quiet=True)
        if not args.report_only and not os.path.exists(os.path.join(work, "ref_store",
                                                                    "meta.json")):
            demo.precompute_refs(work, "teacher", "ref_store", quiet=True)
        data, valid, tok = (os.path.join(work, p) for p in
                            ("data/train.json", "data/valid.json", "tokenizer.model"))
        store, init, model = os.path.join(work, "ref_store"), os.path.join(work, "teacher"), None

    teachers = {}
    checkpoints = [os.path.abspath(c) for c in args.teacher_checkpoints or []]
    if args.weak_teacher_steps and not user_data:
        weak = os.path.join(work, "teacher_weak")
        if not args.report_only and not os.path.exists(
                os.path.join(weak, "latest_checkpointed_iteration.txt")):
            demo.train_teacher(work, steps=args.weak_teacher_steps, batch_size=args.batch_size,
                               seed=args.first_seed, out="teacher_weak", quiet=True)
        checkpoints = [weak, *checkpoints]  # the default teacher's row is `regate`
    for checkpoint in checkpoints:
        name = os.path.basename(checkpoint.rstrip("/"))
        out = os.path.join(work, f"ref_store_{name}")
        if not args.report_only and not os.path.exists(os.path.join(out, "meta.json")):
            demo.precompute_refs(work, checkpoint, out, data_path=data, tokenizer=tok,
                                 layout=_layout_flags(extra) if user_data else None, quiet=True)
        teachers[name] = out

    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    runs = plan_runs(args.variants, seeds, args.keep_ratio, store, teachers)

    def command(spec: RunSpec) -> List[str]:
        run_args = argparse.Namespace(batch_size=args.batch_size, steps=args.steps,
                                      eval_interval=args.eval_interval,
                                      eval_batches=args.eval_batches, seed=spec.seed)
        return demo.student_command(spec.name, run_args, [*spec.flags, "--no-progress", *extra],
                                    data_path=data, valid_data_path=valid, tokenizer=tok,
                                    init=init, model=model, save=args.save_checkpoints)

    print(f"regate-ablate: {len(runs)} runs ({len(args.variants)} variants"
          f"{f' + {len(teachers)} teachers' if teachers else ''} x {len(seeds)} seeds) of "
          f"{args.steps} steps under {runs_dir}", flush=True)
    if args.report_only:
        walls = {}
        done = [r for r in runs if _finished(runs_dir, r.name, args.steps, args.save_checkpoints)]
        print(f"regate-ablate: --report-only over the {len(done)} finished of {len(runs)} runs",
              flush=True)
    else:
        walls = run_all(runs, command, runs_dir, args.steps, args.save_checkpoints)
        done = runs

    from regate_megatron.tools.demo.report import load_metrics

    metrics = {r.name: load_metrics(os.path.join(runs_dir, f"{r.name}.jsonl")) for r in done}
    summary = summarize(metrics, done)
    table = format_table(summary)
    png = plot_bands(metrics, done, os.path.join(work, "ablation.png"))
    with open(os.path.join(work, "ablation.json"), "w") as f:
        json.dump({"settings": {k: v for k, v in vars(args).items()}, "extra_flags": extra,
                   "seeds": seeds, "runs_planned": [asdict(r) for r in runs],
                   "run_wall_seconds": walls, **summary}, f, indent=1)
    print("\n" + table)
    print(f"\nplot: {png}\njson: {os.path.join(work, 'ablation.json')}\n"
          f"this invocation: {time.perf_counter() - start:.0f} s "
          f"({len(walls)} runs executed, {len(done) - len(walls)} already finished, "
          f"{len(runs) - len(done)} not run)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

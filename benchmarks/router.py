"""Router benchmark: step time of routed vs stock Megatron-Core, side by side in one run.

    python benchmarks/router.py                    # CPU default: a model whose layers dominate
    python benchmarks/router.py --hidden-size 2048 --num-layers 16 --num-attention-heads 16 \
        --seq-length 4096 --micro-batch-size 1 --vocab-size 32000 --bf16   # 1B-class, GPU

Measures forward+backward+SGD-free step time (median over rounds; variants interleaved
within each round so drift hits all alike) for: stock GPTModel, ReGateGPTModel at
rho = 1 (overhead), and at rho in {0.25, 0.5, 0.75} (speedup vs stock) next to the
FLOP-ideal speedup of the same selection, and each variant's peak GPU memory; with
`--recompute`, every variant under full activation recomputation. The last
line is machine-readable:
overhead_ratio=<routed rho=1 / stock> speedup_0.5=<dense / routed rho=0.5> ideal_0.5=<FLOP-ideal>
(`--json PATH` writes every number). Everything runs on this rank's device
(`regate_megatron.training.parallel.rank_device`). `--profile PATH` then profiles one step of each
variant with torch.profiler and writes the top kernels by device time (CPU time on CPU) per
variant to PATH, printing those of stock and routed rho=0.5: where a speedup below 0.9 x ideal
goes (gather/scatter, padding, attention kernels, host syncs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from regate_megatron.config import ReGateConfig, add_regate_args  # noqa: E402
from regate_megatron.core.selection import select_top_targets  # noqa: E402

RATIOS = (0.25, 0.5, 0.75)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--ffn-hidden-size", type=int, default=None, help="default 4 * hidden")
    p.add_argument("--num-attention-heads", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--target-fraction", type=float, default=0.75,
                   help="share of each sequence that is target (answer) tokens; the rest is "
                        "context")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--recompute", action="store_true",
                   help="full activation recomputation (uniform, one layer a chunk) in every "
                        "variant: routed spans re-run with their selection in the backward")
    p.add_argument("--json", default=None, help="write every number to this JSON file")
    p.add_argument("--profile", default=None,
                   help="profile one step per variant; top kernels per variant to this file")
    p.add_argument("--profile-top", type=int, default=15, help="kernels listed per variant")
    add_regate_args(p)
    return p.parse_args(argv)


def build(args, device, routed: bool, state=None):
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from regate_megatron.core.model import ReGateGPTModel
    from regate_megatron.core.spec import get_regate_decoder_block_spec

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    config = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size or 4 * args.hidden_size,
        num_attention_heads=args.num_attention_heads, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=device.type == "cpu", params_dtype=dtype, bf16=args.bf16,
        **(dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
           if args.recompute else {}),
    )
    spec = get_regate_decoder_block_spec(
        config, **({} if routed else {"layer_module": TransformerLayer})
    )
    kwargs = dict(config=config, transformer_layer_spec=spec, vocab_size=args.vocab_size,
                  max_sequence_length=args.seq_length, position_embedding_type="rope")
    regate = ReGateConfig.from_args(args)
    model = ReGateGPTModel(regate_config=regate, **kwargs) if routed else GPTModel(**kwargs)
    model = model.to(device)  # on GPU it was built there (current device = rank_device)
    if state is not None:
        model.load_state_dict(state)
    return model


def flops(args, keep_per_sample, out_rows) -> float:
    """Forward+backward FLOPs (3x forward; the decoder layers 4x under --recompute) of the
    decoder layers and output layer."""
    h, f = args.hidden_size, args.ffn_hidden_size or 4 * args.hidden_size
    total = 0.0
    for t in keep_per_sample:
        per_layer = 2 * t * (4 * h * h + 2 * h * f) + 4 * t * t * h  # linears + QK^T, AV
        total += args.num_layers * per_layer * (4 if args.recompute else 3)
    return total + 3 * 2 * out_rows * h * args.vocab_size


def profile_variants(variants, step, device, path, top, show=("stock", "routed_0.5")):
    """One profiled step per variant; the top kernels by device (or CPU) time of each go to
    `path`, those of `show` to stdout too."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with open(path, "w") as out:
        for name, (model, selection) in variants.items():
            with profile(activities=activities) as prof:
                step(model, selection)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            table = prof.key_averages().table(sort_by=sort_by, row_limit=top)
            out.write(f"=== {name} (sorted by {sort_by})\n{table}\n")
            if name in show:
                print(f"=== profile {name}: top {top} by {sort_by}\n{table}", flush=True)
    print(f"profile written to {path}")


def main(argv=None):
    args = parse_args(argv)
    from regate_megatron.core.mcore_compat import mcore_version
    from regate_megatron.training.parallel import initialize_parallel, rank_device

    initialize_parallel()
    device = rank_device()
    cuda = device.type == "cuda"
    b, s = args.micro_batch_size, args.seq_length
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (b, s), generator=g).to(device)
    labels = torch.randint(0, args.vocab_size, (b, s), generator=g).to(device)
    pos = torch.arange(s, device=device).expand(b, s)
    context = int(round(s * (1 - args.target_fraction)))
    targets = torch.zeros(b, s, dtype=torch.bool)
    targets[:, context:] = True
    scores = torch.rand(b, s, generator=g)

    stock = build(args, device, routed=False)
    routed = build(args, device, routed=True, state=stock.state_dict())
    selections = {r: select_top_targets(scores, targets, r).to(device) for r in (1.0,) + RATIOS}
    dense_mask = targets.to(device)

    def step(model, selection):
        kw = {} if selection is None else {"token_selection": selection}
        loss = model(tokens, pos, None, labels=labels, **kw)
        mask = dense_mask if selection is None else selection.computed_loss_mask()
        (loss * mask).sum().div(mask.sum()).backward()
        model.zero_grad(set_to_none=True)

    variants = {"stock": (stock, None), "routed_1.0": (routed, selections[1.0])}
    variants.update({f"routed_{r}": (routed, selections[r]) for r in RATIOS})
    times = {name: [] for name in variants}
    peak = {name: 0 for name in variants}
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    for i in range(args.warmup + args.rounds):
        for name, (model, selection) in variants.items():
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            step(model, selection)
            sync()  # sync point: the step is done before the clock stops
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
            if cuda:
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated(device))
    med = {name: statistics.median(t) for name, t in times.items()}

    dense_flops = flops(args, [s] * b, b * s)
    version = str(mcore_version())
    print(f"device={device} dtype={'bf16' if args.bf16 else 'fp32'} mcore={version} "
          f"layers={args.num_layers} hidden={args.hidden_size} seq={s} batch={b} "
          f"targets/seq={args.target_fraction:.2f} span={routed.token_router.span} "
          f"pad={routed.token_router.pad_multiple_for()} rounds={args.rounds}"
          f"{' recompute=full' if args.recompute else ''}")
    print(f"{'variant':<14}{'step ms':>10}{'kept tok':>10}{'speedup':>10}{'ideal':>10}"
          f"{'of ideal':>10}{'peak GiB':>10}")
    ideal, rows = {}, {}
    for name in variants:
        sel = variants[name][1]
        if sel is None or sel.is_dense:  # a dense selection runs the stock model
            kept, ideal[name] = b * s, 1.0
        else:
            kept = int(sel.num_kept.sum())
            ideal[name] = dense_flops / flops(args, sel.num_kept.tolist(), sel.num_targets()[1])
        speed = med["stock"] / med[name]
        mem = f"{peak[name] / 2**30:>10.2f}" if cuda else f"{'-':>10}"
        print(f"{name:<14}{med[name] * 1e3:>10.1f}{kept:>10d}{speed:>10.3f}{ideal[name]:>10.3f}"
              f"{speed / ideal[name]:>10.3f}{mem}")
        rows[name] = dict(step_ms=med[name] * 1e3, kept_tokens=kept, speedup=speed,
                          ideal=ideal[name], of_ideal=speed / ideal[name],
                          peak_gib=peak[name] / 2**30 if cuda else None)
    overhead = med["routed_1.0"] / med["stock"]
    result = dict(device=str(device), mcore=version, bf16=args.bf16, recompute=args.recompute,
                  seq=s, batch=b,
                  layers=args.num_layers, hidden=args.hidden_size, overhead_ratio=overhead,
                  variants=rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.profile:
        profile_variants(variants, step, device, args.profile, args.profile_top)
    print(f"overhead_ratio={overhead:.4f} "
          f"speedup_0.5={med['stock'] / med['routed_0.5']:.4f} ideal_0.5={ideal['routed_0.5']:.4f}")


if __name__ == "__main__":
    main()

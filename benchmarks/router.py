"""Router benchmark: step time of routed vs stock Megatron-Core, side by side in one run.

    python benchmarks/router.py                    # CPU default: a model whose layers dominate
    python benchmarks/router.py --hidden-size 2048 --num-layers 16 --num-attention-heads 16 \
        --seq-length 4096 --micro-batch-size 1 --vocab-size 32000 --bf16   # 1B-class, GPU

Measures forward+backward+SGD-free step time (median over rounds; variants interleaved
within each round so drift hits all alike) for: stock GPTModel, ReGateGPTModel at
rho = 1 (overhead), and at rho in {0.25, 0.5, 0.75} (speedup vs stock) next to the
FLOP-ideal speedup of the same selection. The last line is machine-readable:
overhead_ratio=<routed rho=1 / stock> speedup_0.5=<dense / routed rho=0.5> ideal_0.5=<FLOP-ideal>
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from regate_megatron.config import ReGateConfig, add_regate_args  # noqa: E402
from regate_megatron.selection import select_top_targets  # noqa: E402

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
                   help="share of each sequence that is target (answer) tokens; the rest is context")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--bf16", action="store_true")
    add_regate_args(p)
    return p.parse_args(argv)


def build(args, routed: bool, state=None):
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import TransformerLayer
    from megatron.core.models.gpt.gpt_model import GPTModel

    from regate_megatron.model import ReGateGPTModel
    from regate_megatron.spec import get_regate_decoder_block_spec

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    config = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size or 4 * args.hidden_size,
        num_attention_heads=args.num_attention_heads, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True, params_dtype=dtype, bf16=args.bf16,
    )
    spec = get_regate_decoder_block_spec(
        config, **({} if routed else {"layer_module": TransformerLayer})
    )
    kwargs = dict(config=config, transformer_layer_spec=spec, vocab_size=args.vocab_size,
                  max_sequence_length=args.seq_length, position_embedding_type="rope")
    regate = ReGateConfig.from_args(args)
    model = ReGateGPTModel(regate_config=regate, **kwargs) if routed else GPTModel(**kwargs)
    if state is not None:
        model.load_state_dict(state)
    return model.to("cuda" if torch.cuda.is_available() else "cpu")


def flops(args, keep_per_sample, out_rows) -> float:
    """Forward+backward FLOPs (3x forward) of the decoder layers and output layer."""
    h, f = args.hidden_size, args.ffn_hidden_size or 4 * args.hidden_size
    total = 0.0
    for t in keep_per_sample:
        per_layer = 2 * t * (4 * h * h + 2 * h * f) + 4 * t * t * h  # linears + QK^T, AV
        total += args.num_layers * per_layer
    total += 2 * out_rows * h * args.vocab_size
    return 3 * total


def main(argv=None):
    args = parse_args(argv)
    from regate_megatron.parallel import initialize_parallel

    initialize_parallel()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    b, s = args.micro_batch_size, args.seq_length
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (b, s), generator=g).to(device)
    labels = torch.randint(0, args.vocab_size, (b, s), generator=g).to(device)
    pos = torch.arange(s, device=device).expand(b, s)
    context = int(round(s * (1 - args.target_fraction)))
    targets = torch.zeros(b, s, dtype=torch.bool)
    targets[:, context:] = True
    scores = torch.rand(b, s, generator=g)

    stock = build(args, routed=False)
    routed = build(args, routed=True, state=stock.state_dict())
    selections = {r: select_top_targets(scores, targets, r).to(device) for r in (1.0,) + RATIOS}

    def step(model, selection):
        kw = {} if selection is None else {"token_selection": selection}
        loss = model(tokens, pos, None, labels=labels, **kw)
        mask = targets.to(device) if selection is None else selection.computed_loss_mask()
        (loss * mask).sum().div(mask.sum()).backward()
        model.zero_grad(set_to_none=True)

    variants = {"stock": (stock, None), "routed_1.0": (routed, selections[1.0])}
    variants.update({f"routed_{r}": (routed, selections[r]) for r in RATIOS})
    times = {name: [] for name in variants}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for i in range(args.warmup + args.rounds):
        for name, (model, selection) in variants.items():
            sync()
            start = time.perf_counter()
            step(model, selection)
            sync()  # sync point: the step is done before the clock stops
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}

    dense_flops = flops(args, [s] * b, b * s)
    print(f"device={device} dtype={'bf16' if args.bf16 else 'fp32'} layers={args.num_layers} "
          f"hidden={args.hidden_size} seq={s} batch={b} targets/seq={args.target_fraction:.2f} "
          f"span={routed.token_router.span} rounds={args.rounds}")
    print(f"{'variant':<14}{'step ms':>10}{'kept tok':>10}{'speedup':>10}{'ideal':>10}{'of ideal':>10}")
    ideal = {}
    for name in variants:
        sel = variants[name][1]
        if sel is None or sel.is_dense:  # a dense selection runs the stock model
            kept, ideal[name] = b * s, 1.0
        else:
            kept = int(sel.num_kept.sum())
            ideal[name] = dense_flops / flops(args, sel.num_kept.tolist(), sel.num_targets()[1])
        speed = med["stock"] / med[name]
        print(f"{name:<14}{med[name] * 1e3:>10.1f}{kept:>10d}{speed:>10.3f}{ideal[name]:>10.3f}"
              f"{speed / ideal[name]:>10.3f}")
    print(f"overhead_ratio={med['routed_1.0'] / med['stock']:.4f} "
          f"speedup_0.5={med['stock'] / med['routed_0.5']:.4f} ideal_0.5={ideal['routed_0.5']:.4f}")


if __name__ == "__main__":
    main()

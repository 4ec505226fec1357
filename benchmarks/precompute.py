"""Reference-loss precompute throughput against a plain teacher forward, side by side.

    python benchmarks/precompute.py [--records 1438] [--rounds 3]

Builds digits-VQA and a tokenizer, saves a randomly initialised text-only teacher
(the demo's architecture, hidden 128 x 4 layers) as a checkpoint, then alternates:
(a) `regate-precompute-ref`'s build loop into a fresh store (batching, teacher view,
forward, per-sample loss extraction, shard writes, final merge) and (b) the same
teacher's forward alone over the same pre-collated batches. Prints the teacher
tokens/s of each (median over rounds) and their ratio; the goal is >= 0.9, i.e. the
store costs little besides the teacher forward itself.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from regate_megatron.tools.demo.digits import DIGITS_LAYOUT  # noqa: E402

MODEL = ["--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4",
         "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
         "--hidden-dropout", "0", "--attention-dropout", "0", "--transformer-impl", "local",
         "--text-only", *DIGITS_LAYOUT]


def main() -> None:
    from regate_megatron.data.layout import num_image_tokens
    from regate_megatron.data.llava import ConversationDataset, collate
    from regate_megatron.data.tokenizer import SentencePieceTokenizer
    from regate_megatron.scoring.teacher import teacher_inputs
    from regate_megatron.tools.demo.run import build_inputs
    from regate_megatron.tools.precompute import build_parser, build_store
    from regate_megatron.training.arguments import build_parser as train_parser
    from regate_megatron.training.arguments import fill_model_defaults
    from regate_megatron.training.checkpoint import save_checkpoint
    from regate_megatron.training.model_config import model_args_dict
    from regate_megatron.training.model_provider import build_model
    from regate_megatron.training.parallel import destroy_parallel, initialize_parallel, rank_device

    cli = argparse.ArgumentParser()
    cli.add_argument("--rounds", type=int, default=3)
    cli.add_argument("--micro-batch-size", type=int, default=64)
    opts = cli.parse_args()

    work = tempfile.mkdtemp(prefix="regate-bench-precompute-")
    data = build_inputs(work)
    tok_path = data["tokenizer"]
    tokenizer = SentencePieceTokenizer(tok_path)

    initialize_parallel(1, 1)
    device = rank_device()
    args = train_parser().parse_args(MODEL)
    fill_model_defaults(args)
    args.vocab_size = 256
    torch.manual_seed(0)
    teacher = build_model(args, args.vocab_size, pre_process=True, post_process=True)
    save_checkpoint(os.path.join(work, "teacher"), 0, [teacher],
                    common={"args": model_args_dict(args), "tokenizer_sha256": tokenizer.sha256})
    teacher.eval()

    dataset = ConversationDataset(
        data["train"], tokenizer, seq_length=args.seq_length,
        num_image_tokens=num_image_tokens(args.img_h, args.img_w, args.patch_dim),
        image_size=(args.img_h, args.img_w))
    batches = [collate([dataset[j] for j in range(i, min(i + opts.micro_batch_size, len(dataset)))],
                       seq_length=args.seq_length, pad_id=tokenizer.pad_id)
               for i in range(0, len(dataset), opts.micro_batch_size)]
    tokens = sum(int((b.tokens != tokenizer.pad_id).sum()) for b in batches)

    def plain_forward() -> float:
        views = [teacher_inputs(b.to(device), pad_id=tokenizer.pad_id, mode="pad") for b in batches]
        start = time.perf_counter()
        with torch.no_grad():
            for v in views:
                teacher(input_ids=v["input_ids"], position_ids=v["position_ids"],
                        attention_mask=v["attention_mask"], labels=v["labels"])
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # sync point: the forwards are done
        return tokens / (time.perf_counter() - start)

    def precompute(k: int) -> float:
        argv = ["--data-path", data["train"], "--tokenizer-model", tok_path, "--load",
                os.path.join(work, "teacher"), "--output", os.path.join(work, f"store{k}"),
                *DIGITS_LAYOUT, "--micro-batch-size", str(opts.micro_batch_size), "--no-progress"]
        stats = build_store(build_parser().parse_args(argv))
        return stats["tokens"] / stats["seconds"]

    plain_forward()  # warm-up
    plain, store = [], []
    for k in range(opts.rounds):  # interleaved rounds
        store.append(precompute(k))
        plain.append(plain_forward())
    destroy_parallel()
    p, s = statistics.median(plain), statistics.median(store)
    print(f"records={len(dataset)} teacher_tokens={tokens} micro_batch={opts.micro_batch_size}")
    print(f"plain_forward_tok_s={p:.0f} precompute_tok_s={s:.0f}")
    print(f"precompute_over_plain_ratio={s / p:.4f}")


if __name__ == "__main__":
    main()

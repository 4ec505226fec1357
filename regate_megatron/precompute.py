"""`regate-precompute-ref`: a frozen text-only teacher -> the reference-loss store.

    regate-precompute-ref --data-path train.json --tokenizer-model tok.model \\
        --load TEACHER_CKPT --seq-length 512 --img-h 336 --img-w 336 --patch-dim 14 \\
        --output ref_store/ [--regate-teacher-visual pad|drop]

The data flags describe the *student's* layout (sequence length and tokens per
image), so target positions line up with the trainer's. The teacher is a
Megatron-Core GPT from a `dist_checkpointing` checkpoint (its architecture is read
from the checkpoint); it must use the same tokenizer, which is checked before any
compute. Data-parallel under torchrun (any world size): sample-id shards are dealt
round-robin to ranks; finished shards survive an interruption and are not redone.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, List, Optional

import torch
import torch.distributed as dist

__all__ = ["main", "build_store"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="regate-precompute-ref", description=__doc__.split("\n")[0],
                                allow_abbrev=False)
    p.add_argument("--data-path", required=True)
    p.add_argument("--image-root", default=None)
    p.add_argument("--tokenizer-model", required=True)
    p.add_argument("--load", required=True, help="the teacher's dist_checkpointing checkpoint")
    p.add_argument("--output", required=True, help="directory of the reference-loss store")
    p.add_argument("--seq-length", type=int, required=True, help="the student's --seq-length")
    p.add_argument("--img-h", type=int, default=336)
    p.add_argument("--img-w", type=int, default=336)
    p.add_argument("--patch-dim", type=int, default=14)
    p.add_argument("--regate-teacher-visual", choices=["pad", "drop"], default="pad",
                   help="visual positions become the teacher's pad token, masked from attention "
                        "(pad, the paper's choice) or are removed (drop)")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--shard-size", type=int, default=256, help="samples per resumable shard")
    p.add_argument("--skip-bad-samples", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def teacher_args(load_dir: str, tokenizer) -> argparse.Namespace:
    """The teacher's architecture from its checkpoint, after checking that it shares the
    student's tokenizer (read from the checkpoint alone: no data, no model, no compute)."""
    from regate_megatron.checkpoint import read_common_state

    common = read_common_state(load_dir)
    if "args" not in common:
        raise ValueError(
            f"{load_dir} does not record its architecture (no 'args' in its common state); "
            f"save the teacher with regate-train --text-only"
        )
    teacher_sha = common.get("tokenizer_sha256")
    if teacher_sha is not None and teacher_sha != tokenizer.sha256:
        raise ValueError(
            f"the teacher in {load_dir} was trained with another tokenizer (sha256 "
            f"{teacher_sha[:12]}...) than --tokenizer-model {tokenizer.model_path} "
            f"({tokenizer.sha256[:12]}...); teacher and student must share the tokenizer"
        )
    args = argparse.Namespace(**common["args"])  # the architecture it was saved with
    if tokenizer.vocab_size > args.vocab_size:
        raise ValueError(
            f"--tokenizer-model has {tokenizer.vocab_size} tokens but the teacher's vocabulary is "
            f"{args.vocab_size}; teacher and student must share the tokenizer"
        )
    args.text_only, args.transformer_impl = True, "local"
    args.hidden_dropout = args.attention_dropout = 0.0
    args.tensor_model_parallel_size = args.pipeline_model_parallel_size = 1
    return args


def load_teacher(load_dir: str, args: argparse.Namespace):
    """The frozen teacher GPT (local attention: it honours the pad mask) and its id."""
    from regate_megatron.checkpoint import latest_iteration, load_module_weights
    from regate_megatron.mllm import build_model

    model = build_model(args, args.vocab_size, pre_process=True, post_process=True)
    iteration = load_module_weights(model, load_dir)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    name = f"{os.path.abspath(load_dir)}@iter_{latest_iteration(load_dir) or iteration}"
    return model, name


@torch.no_grad()
def teacher_losses(model, batch, pad_id: int, mode: str) -> List:
    """Per-sample reference losses (float32, target order) of one batch."""
    from regate_megatron.teacher import reference_losses, teacher_inputs

    view = teacher_inputs(batch, pad_id=pad_id, mode=mode)
    loss = model(input_ids=view["input_ids"], position_ids=view["position_ids"],
                 attention_mask=view["attention_mask"], labels=view["labels"])  # [b, s']
    return reference_losses(loss, view, batch)


def _prefetched(items: Iterator):
    """`items`, each produced on a helper thread one step ahead of its consumer."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(next, items, None)
        while True:
            item = pending.result()
            if item is None:
                return
            pending = pool.submit(next, items, None)
            yield item


def build_store(args: argparse.Namespace) -> dict:
    """Build (or finish) the store; returns rank 0's numbers: teacher tokens and seconds of
    the build loop (batching, teacher view, forward, shard writes, final merge)."""
    from regate_megatron.data import ConversationDataset, collate
    from regate_megatron.parallel import initialize_parallel, rank_device
    from regate_megatron.ref_store import StoreBuilder
    from regate_megatron.tokenizer import SentencePieceTokenizer

    tokenizer = SentencePieceTokenizer(args.tokenizer_model)
    architecture = teacher_args(args.load, tokenizer)  # the tokenizer check comes first
    image_tokens = (args.img_h // args.patch_dim) * (args.img_w // args.patch_dim)
    dataset = ConversationDataset(
        args.data_path, tokenizer, seq_length=args.seq_length, num_image_tokens=image_tokens,
        image_size=(args.img_h, args.img_w), image_root=args.image_root,
        skip_bad_samples=args.skip_bad_samples, load_images=False,  # the teacher sees no pixels
    )
    initialize_parallel(1, 1)
    device = rank_device()  # the teacher's; every batch goes there with Batch.to
    rank, world = dist.get_rank(), dist.get_world_size()
    model, teacher_name = load_teacher(args.load, architecture)
    meta = dict(teacher=teacher_name, tokenizer_sha256=tokenizer.sha256,
                dataset_fingerprint=dataset.fingerprint, teacher_visual=args.regate_teacher_visual)
    builder = StoreBuilder(args.output, num_samples=dataset.num_records, rank=rank,
                           world_size=world, shard_size=args.shard_size, meta=meta)
    shards = builder.pending_shards()
    kept = set(dataset.sample_ids)
    todo = sum(1 for shard in shards for i in shard if i in kept)
    bar = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=todo, desc=f"reference losses (rank 0 of {world})", unit="sample",
                   dynamic_ncols=True)
    def batches():  # (shard, batch ids, batch); shard ends are marked by ids=None
        for shard in shards:
            present = [i for i in shard if i in kept]
            for j in range(0, len(present), args.micro_batch_size):
                ids = present[j:j + args.micro_batch_size]
                yield shard, ids, collate([dataset[dataset.index_of(i)] for i in ids],
                                          seq_length=args.seq_length, pad_id=tokenizer.pad_id)
            yield shard, None, None

    tokens, start = 0, time.perf_counter()
    values: dict = {}
    # The next batch is tokenised and collated on a helper thread while the teacher runs
    # (torch releases the GIL), so batching costs little next to the forward itself.
    for shard, ids, batch in _prefetched(batches()):
        if ids is None:  # the shard is complete: write it (skipped records have no targets)
            builder.write_shard(shard, [values.pop(i, []) for i in shard])
            continue
        for i, losses in zip(ids, teacher_losses(model, batch.to(device), tokenizer.pad_id,
                                                 args.regate_teacher_visual)):
            values[i] = losses
        tokens += int((batch.tokens != tokenizer.pad_id).sum())
        if bar is not None:
            bar.update(len(ids))
            bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - start):.0f}", refresh=False)
    if bar is not None:
        bar.close()
    dist.barrier()  # sync point: every rank's shards are written
    if rank == 0:
        builder.finalize(dataset.target_counts())
    seconds = time.perf_counter() - start
    if rank == 0:
        print(f"[regate-precompute-ref] wrote {args.output}: {dataset.num_records} samples "
              f"({dataset.num_skipped} skipped), {tokens} teacher tokens on rank 0 in "
              f"{seconds:.1f} s ({tokens / max(seconds, 1e-9):.0f} tok/s)", flush=True)
    dist.barrier()
    return dict(tokens=tokens, seconds=seconds, samples=todo)


def main(argv: Optional[List[str]] = None) -> int:
    from regate_megatron.parallel import run_tool

    args = build_parser().parse_args(argv)
    return run_tool("regate-precompute-ref", lambda: build_store(args))


if __name__ == "__main__":
    sys.exit(main())

"""`regate-precompute-ref`: a frozen text-only teacher -> the reference-loss store.

    regate-precompute-ref --data-path train.json --tokenizer-model tok.model \\
        --load TEACHER_CKPT --seq-length 512 --img-h 336 --img-w 336 --patch-dim 14 \\
        --output ref_store/ [--regate-teacher-visual pad|drop] \\
        [--tensor-model-parallel-size 2] [--pipeline-model-parallel-size 2]

The data flags describe the *student's* layout (sequence length and tokens per
image), so target positions line up with the trainer's. The teacher is a
Megatron-Core GPT from a `dist_checkpointing` checkpoint saved at any TP/PP (its
architecture is read from the checkpoint; `regate_megatron.scoring.teacher_model`); it must use
the same tokenizer and its heads/layers/vocabulary must divide by the TP/PP asked for,
both checked before any compute. It runs at TP x PP x DP, DP = world / (TP x PP), under
torchrun or srun: sample-id shards are dealt round-robin to the data-parallel replicas;
in each replica the last pipeline stage's TP rank 0 writes them; finished shards survive
an interruption and are not redone. The store does not depend on TP/PP/DP (per token,
within float rounding of the teacher's sums).
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, List, Optional

import torch.distributed as dist

from regate_megatron.config import TEACHER_VISUAL_MODES, ReGateConfig
from regate_megatron.data.layout import add_layout_args, num_image_tokens

__all__ = ["main", "build_store"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="regate-precompute-ref", description=__doc__.split("\n")[0],
                                allow_abbrev=False)
    p.add_argument("--data-path", required=True)
    p.add_argument("--image-root", default=None)
    p.add_argument("--tokenizer-model", required=True)
    p.add_argument("--load", required=True, help="the teacher's dist_checkpointing checkpoint")
    p.add_argument("--output", required=True, help="directory of the reference-loss store")
    add_layout_args(p, required=("--seq-length",), seq_length_help="the student's --seq-length")
    p.add_argument("--regate-teacher-visual", choices=TEACHER_VISUAL_MODES,
                   default=ReGateConfig.teacher_visual,
                   help="visual positions become the teacher's pad token, masked from attention "
                        "(pad, the paper's choice) or are removed (drop)")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="the teacher's TP (any TP it was saved at: the load reshards)")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="the teacher's PP (Megatron-Core's forward-only pipeline schedule)")
    p.add_argument("--shard-size", type=int, default=256, help="samples per resumable shard")
    p.add_argument("--skip-bad-samples", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


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
    from megatron.core import parallel_state as ps

    from regate_megatron.data.llava import ConversationDataset, collate
    from regate_megatron.data.tokenizer import SentencePieceTokenizer
    from regate_megatron.scoring.ref_store import StoreBuilder
    from regate_megatron.scoring.teacher_model import (
        FrozenTeacher,
        check_teacher_parallel,
        micro_batch_groups,
        teacher_architecture,
    )
    from regate_megatron.training.parallel import initialize_parallel, launch_env, rank_device

    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    image_tokens = num_image_tokens(args.img_h, args.img_w, args.patch_dim)  # the student's
    tokenizer = SentencePieceTokenizer(args.tokenizer_model)
    architecture = teacher_architecture(args.load, tokenizer)  # the tokenizer check comes first
    launch_world = dist.get_world_size() if dist.is_initialized() else launch_env().world_size
    check_teacher_parallel(architecture, launch_world, tp, pp)  # before any compute
    dataset = ConversationDataset(
        args.data_path, tokenizer, seq_length=args.seq_length, num_image_tokens=image_tokens,
        image_size=(args.img_h, args.img_w), image_root=args.image_root,
        skip_bad_samples=args.skip_bad_samples, load_images=False,  # the teacher sees no pixels
    )
    initialize_parallel(tp, pp)
    device = rank_device()  # the teacher's; every batch goes there with Batch.to
    rank, world = dist.get_rank(), dist.get_world_size()
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    teacher = FrozenTeacher(args.load, architecture, pad_id=tokenizer.pad_id,
                            mode=args.regate_teacher_visual, device=device)
    meta = dict(teacher=teacher.name, tokenizer_sha256=tokenizer.sha256,
                dataset_fingerprint=dataset.fingerprint, teacher_visual=args.regate_teacher_visual)
    # Shards go round-robin to the data-parallel replicas; every rank of a replica walks them.
    builder = StoreBuilder(args.output, num_samples=dataset.num_records, rank=dp_rank,
                           world_size=dp_size, shard_size=args.shard_size, meta=meta)
    shards = builder.pending_shards()
    dist.barrier()  # sync point: a replica's ranks agree on its pending shards before any write
    kept = set(dataset.sample_ids)
    todo = sum(1 for shard in shards for i in shard if i in kept)
    bar = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=todo, desc=f"reference losses (rank 0 of {world}: TP {tp} x PP {pp} x "
                                    f"DP {dp_size})", unit="sample", dynamic_ncols=True)
    # Micro-batches per schedule call: one without a pipeline; 2 x PP fills the pipeline
    # (drop mode pads a call's micro-batches to its longest).
    per_call = 1 if pp == 1 else 2 * pp

    def batches():  # (shard, ids, micro-batches); shard ends are marked by ids=None
        for shard in shards:
            present = [i for i in shard if i in kept]
            for group in micro_batch_groups(present, args.micro_batch_size, per_call):
                yield shard, sum(group, []), [
                    collate([dataset[dataset.index_of(i)] for i in ids],
                            seq_length=args.seq_length, pad_id=tokenizer.pad_id)
                    for ids in group]
            yield shard, None, None

    tokens, start = 0, time.perf_counter()
    values: dict = {}
    # The next batch is tokenised and collated on a helper thread while the teacher runs
    # (torch releases the GIL), so batching costs little next to the forward itself.
    for shard, ids, micro in _prefetched(batches()):
        if ids is None:  # the shard is complete: its writer writes it (skipped records: no targets)
            if teacher.reports:
                builder.write_shard(shard, [values.pop(i, []) for i in shard])
            continue
        losses = teacher.losses(micro)  # None off the last pipeline stage
        if teacher.reports:
            values.update(zip(ids, losses, strict=True))
        tokens += sum(int((b.tokens != tokenizer.pad_id).sum()) for b in micro)
        if bar is not None:
            bar.update(len(ids))
            bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - start):.0f}", refresh=False)
    if bar is not None:
        bar.close()
    dist.barrier()  # sync point: every replica's shards are written
    if rank == 0:
        builder.finalize(dataset.target_counts())
    seconds = time.perf_counter() - start
    if rank == 0:
        print(f"[regate-precompute-ref] wrote {args.output}: {dataset.num_records} samples "
              f"({dataset.num_skipped} skipped) at TP {tp} x PP {pp} x DP {dp_size}, {tokens} "
              f"teacher tokens on rank 0 in {seconds:.1f} s ({tokens / max(seconds, 1e-9):.0f} "
              f"tok/s)", flush=True)
    dist.barrier()
    return dict(tokens=tokens, seconds=seconds, samples=todo)


def main(argv: Optional[List[str]] = None) -> int:
    from regate_megatron.training.parallel import run_tool

    args = build_parser().parse_args(argv)
    return run_tool("regate-precompute-ref", lambda: build_store(args))


if __name__ == "__main__":
    sys.exit(main())

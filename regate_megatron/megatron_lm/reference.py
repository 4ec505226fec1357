"""The reference-loss store built inside a patched Megatron-LM script, with the script's own
language model, as loaded, as the frozen text-only teacher.

    --regate-ref-store PATH --regate-build-ref-store [--regate-teacher-visual pad|drop]
    [--regate-build-ref-store-exit]

When ``PATH`` holds no store yet, the first training step first builds it
(`build_reference_store`): the language model the script loaded (``--load`` /
``--pretrained-checkpoint``: the LLM the multimodal model starts from, the paper's
capacity-aligned teacher) reads every training sample once as text only, and each target's
loss goes into the store, keyed by the run's own stable sample ids (the dataset index, or the
Energon ids). Then training goes on with ``--regate-selector regate`` on that store, or the
process exits (``--regate-build-ref-store-exit``, e.g. to build at PP 1 and train at PP N).
A store already there is opened and checked against this run's data and tokenizer instead.

The teacher's views (`teacher_view`) are those of ``regate-precompute-ref``
(`regate_megatron.scoring.teacher`), computed without an explicit attention mask, so any
attention backend of the script computes them (Transformer Engine's and Megatron's fused
causal kernels do not read one): ``pad`` (the default) runs the combined sequence with its
image slots holding the pad token and routes only the text slots through every layer (the
ReGATE router: causal among kept tokens at their combined positions, so no text token sees
an image slot, which is what the pad view's mask says); ``drop`` removes the image slots and
numbers the text 0, 1, ... Targets are those of the combined sequence (`expand_targets`), in
position order: exactly what the scorer looks up at each step.

Parallelism: pipeline size 1 (any TP, any DP). Each data-parallel replica reads the share
of the samples its DP rank is dealt, on its TP rank 0, which broadcasts every micro-batch to
the replica's other TP ranks (the vocabulary-parallel loss is whole on each); each replica's
TP rank 0 writes its part, and global rank 0 merges the parts into the store atomically
(`regate_megatron.scoring.ref_store.write_store`). A sample read twice is an error; a sample
no rank read (skipped by the script's error handler) has no targets and is reported.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from types import SimpleNamespace
from typing import Callable, Iterable, List, Optional

import numpy as np
import torch

from regate_megatron.core.selection import TokenSelection
from regate_megatron.megatron_lm.batch import TextBatch, expand_targets, expand_tokens

__all__ = ["BUILT_BY", "build_reference_store", "teacher_view", "fingerprint",
           "tokenizer_fingerprint"]

BUILT_BY = "regate_megatron.megatron_lm"
"""``meta["built_by"]`` of a store built inside a Megatron-LM script."""


def fingerprint(fields: dict) -> str:
    """sha256 of ``fields`` (JSON, sorted keys): what a store built from this data says."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of a Megatron-LM tokenizer's vocabulary (token -> id), or of its class and size
    when it has no vocabulary to list."""
    try:
        vocab = tokenizer.vocab
    except (AttributeError, NotImplementedError):
        vocab = None
    if isinstance(vocab, dict):
        return fingerprint({str(k): int(v) for k, v in vocab.items()})
    return fingerprint({"tokenizer": type(tokenizer).__name__,
                        "vocab_size": int(tokenizer.vocab_size)})


def teacher_view(text: TextBatch, img_seq_len: int, max_length: int, pad_id: int,
                 mode: str):
    """(view, combined) of one micro-batch: the teacher's inputs ``input_ids``, ``labels``,
    ``loss_mask`` and ``keep`` [b, s'] (int64, int64, float, bool) and the combined
    sequence's targets (``labels``, ``loss_mask`` [b, L], `expand_targets`).

    ``drop``: `teacher_inputs`' drop view (s' = the longest text; ``keep`` all True).
    ``pad``: the combined sequence itself (s' = L), image slots holding ``pad_id``; ``keep``
    marks each sample's text slots: routed through every layer with only those kept, no
    text token sees an image slot and each keeps its combined position, which is the pad
    view's explicit mask computed without one."""
    from regate_megatron.data.llava import IMAGE_TOKEN_INDEX
    from regate_megatron.megatron_lm.batch import combined_lengths
    from regate_megatron.scoring.teacher import teacher_inputs

    labels, loss_mask = expand_targets(text, img_seq_len, max_length)
    tokens = expand_tokens(text, img_seq_len, max_length, pad_id)  # [b, L]
    combined = SimpleNamespace(tokens=tokens, labels=labels, loss_mask=loss_mask)
    if mode == "drop":
        view = teacher_inputs(combined, pad_id=pad_id, mode="drop")
        return dict(view, keep=torch.ones_like(view["input_ids"], dtype=torch.bool)), combined
    if mode != "pad":
        raise ValueError(f"teacher view must be pad or drop, got {mode!r}")
    image = tokens == IMAGE_TOKEN_INDEX  # [b, L]
    inside = (torch.arange(tokens.shape[1])[None, :]
              < combined_lengths(text, img_seq_len, max_length)[:, None])  # [b, L]
    return dict(input_ids=tokens.masked_fill(image, pad_id), labels=labels.clone(),
                loss_mask=loss_mask.clone(), keep=~image & inside), combined


def _parts_dir(path: str) -> str:
    path = os.path.abspath(path)
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.parts")


def _write_part(parts: str, dp_rank: int, values: dict) -> None:
    ids = np.asarray(sorted(values), dtype=np.int64)
    counts = np.asarray([values[i].size for i in ids], dtype=np.int64)
    flat = (np.concatenate([values[i] for i in ids]) if ids.size
            else np.zeros(0, np.float32)).astype(np.float32)
    path = os.path.join(parts, f"part-{dp_rank:05d}.npz")
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        np.savez(f, ids=ids, counts=counts, values=flat)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _merge_parts(parts: str, dp_size: int, num_samples: int):
    """(per-sample losses [num_samples], unread sample count) from the replicas' parts."""
    per_sample: List[Optional[np.ndarray]] = [None] * num_samples
    for dp_rank in range(dp_size):
        with np.load(os.path.join(parts, f"part-{dp_rank:05d}.npz")) as part:
            ids, counts, values = part["ids"], part["counts"], part["values"]
        bad = ids[(ids < 0) | (ids >= num_samples)]
        if bad.size:
            raise ValueError(f"the teacher pass read sample ids {bad.tolist()[:8]} outside "
                             f"[0, {num_samples}); the data's ids do not index its samples")
        for sample_id, chunk in zip(ids.tolist(), np.split(values, np.cumsum(counts)[:-1]),
                                    strict=True):
            if per_sample[sample_id] is not None:
                raise RuntimeError(f"the teacher pass read sample {sample_id} more than once "
                                   f"(data-parallel shares overlap)")
            per_sample[sample_id] = chunk
    unread = sum(v is None for v in per_sample)
    return [np.zeros(0, np.float32) if v is None else v for v in per_sample], unread


def _broadcast(tensor: torch.Tensor, src: int, group, size: int) -> torch.Tensor:
    import torch.distributed as dist

    if size > 1:
        dist.broadcast(tensor, src, group=group)
    return tensor


@torch.no_grad()
def build_reference_store(path: str, lm, texts: Callable[[int, int], Iterable[TextBatch]], *,
                          num_samples: int, img_seq_len: int, max_length: int, pad_id: int,
                          meta: dict, mode: str = "pad",
                          log: Callable[[str], None] = print) -> dict:
    """Build the store at ``path`` with ``lm`` (this rank's `ReGateGPTModel`, the whole
    model: pipeline size 1) as the frozen teacher, reading the ``mode`` view (`teacher_view`).
    Collective over the world.

    ``texts(dp_rank, dp_size)``: the replica's share of the training samples, read on its TP
    rank 0 only. ``meta``: the store's ``teacher``, ``tokenizer_sha256`` and
    ``dataset_fingerprint``. Returns rank 0's numbers: samples, teacher tokens, seconds."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from regate_megatron.megatron_lm.energon import random_state_kept
    from regate_megatron.scoring.ref_store import write_store
    from regate_megatron.scoring.teacher import reference_losses

    if ps.get_pipeline_model_parallel_world_size() != 1:
        raise ValueError("--regate-build-ref-store runs the language model whole "
                         "(--pipeline-model-parallel-size 1, any TP): build the store in a run "
                         "at PP 1 with --regate-build-ref-store-exit, then train at this PP "
                         "with --regate-ref-store")
    span = tuple(lm.token_router.span)
    if mode == "pad" and span != (0, lm.config.num_layers):
        raise ValueError(f"--regate-teacher-visual pad: the build routes each sample's text "
                         f"through every decoder layer, but --regate-layers routes layers "
                         f"{span[0]}:{span[1]} of {lm.config.num_layers}; build with "
                         f"--regate-teacher-visual drop, or without --regate-layers")
    tp_group = ps.get_tensor_model_parallel_group()
    tp_size = ps.get_tensor_model_parallel_world_size()
    tp_src = ps.get_tensor_model_parallel_src_rank()
    source = ps.get_tensor_model_parallel_rank() == 0
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    rank = dist.get_rank()
    device = next(lm.parameters()).device
    parts = _parts_dir(path)
    if rank == 0:  # parts of an interrupted build are stale: the pass is redone whole
        shutil.rmtree(parts, ignore_errors=True)
        os.makedirs(parts)
    dist.barrier()  # sync point: the parts folder is fresh before any replica writes
    start, tokens = time.perf_counter(), 0
    values: dict = {}
    was_training = lm.training
    lm.eval()  # no dropout: the teacher is frozen
    try:
        with random_state_kept():  # task encoders draw prompts from the global generators
            share = iter(texts(dp_rank, dp_size)) if source else None
            while True:
                header = torch.zeros(3, dtype=torch.long, device=device)  # [more, b, s']
                failed = None
                try:
                    text = next(share, None) if source else None
                    if text is not None:
                        view, combined = teacher_view(text, img_seq_len, max_length, pad_id,
                                                      mode)
                        header = torch.tensor([1, *view["input_ids"].shape], device=device)
                except Exception as err:  # the replica's other TP ranks must not wait on it
                    failed, header[0] = err, -1
                # sync point: the replica's TP ranks run the same micro-batch, or all stop
                more = int(_broadcast(header, tp_src, tp_group, tp_size)[0])
                if failed is not None:
                    raise failed
                if more < 0:
                    raise RuntimeError("the teacher pass stopped on this replica's TP rank 0 "
                                       "(its error names the cause)")
                if not more:
                    break
                shape = tuple(int(x) for x in header[1:])
                inputs = {}
                for name, dtype in (("input_ids", torch.long), ("labels", torch.long),
                                    ("loss_mask", torch.float32), ("keep", torch.bool)):
                    t = (view[name].to(device, dtype) if source
                         else torch.empty(shape, dtype=dtype, device=device))
                    inputs[name] = _broadcast(t, tp_src, tp_group, tp_size)
                positions = torch.arange(shape[1], device=device).expand(*shape)
                selection = (TokenSelection.from_keep_mask(inputs["keep"], inputs["loss_mask"] > 0)
                             if mode == "pad" else None)
                with lm.selecting(selection):
                    per_token = lm(input_ids=inputs["input_ids"], position_ids=positions,
                                   attention_mask=None, labels=inputs["labels"])  # [b, s']
                if source:
                    losses = reference_losses(per_token, view, combined)
                    values.update(zip(text.sample_ids.tolist(), losses, strict=True))
                    tokens += int((inputs["input_ids"] != pad_id).sum())
    finally:
        lm.train(was_training)
    if source:
        _write_part(parts, dp_rank, values)
    dist.barrier()  # sync point: every replica's part is written
    if rank == 0:
        per_sample, unread = _merge_parts(parts, dp_size, num_samples)
        write_store(path, per_sample, dict(meta, teacher_visual=mode, built_by=BUILT_BY))
        shutil.rmtree(parts, ignore_errors=True)
        seconds = time.perf_counter() - start
        log(f"ReGATE: reference-loss store {os.path.abspath(path)} built by the script's "
            f"language model: {num_samples} samples, {sum(v.size for v in per_sample)} targets, "
            f"read by {dp_size} data-parallel replicas (TP {tp_size}) in {seconds:.1f} s, "
            f"{tokens} teacher tokens on rank 0"
            + (f"; {unread} samples no rank read (the error handler skipped them) have no "
               f"targets" if unread else ""))
    dist.barrier()  # sync point: the store is in place before any rank opens it
    return dict(samples=len(values), tokens=tokens, seconds=time.perf_counter() - start)

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
process exits (``--regate-build-ref-store-exit``, e.g. to build once for several runs).
A store already there is opened and checked against this run's data and tokenizer instead.
A build stopped before the end leaves its chunks of losses (``.<name>.parts/`` beside
``PATH``) and the next one goes on from them (``build_reference_store``).

The teacher's views (`teacher_view`) are those of ``regate-precompute-ref``
(`regate_megatron.scoring.teacher`), computed without an explicit attention mask, so any
attention backend of the script computes them (Transformer Engine's and Megatron's fused
causal kernels do not read one): ``pad`` (the default) runs the combined sequence with its
image slots holding the pad token and routes only the text slots through every layer (the
ReGATE router: causal among kept tokens at their combined positions, so no text token sees
an image slot, which is what the pad view's mask says); ``drop`` removes the image slots and
numbers the text 0, 1, ... Targets are those of the combined sequence (`expand_targets`), in
position order: exactly what the scorer looks up at each step.

Parallelism: any TP, PP and DP. Each data-parallel replica reads the share of the samples
its DP rank is dealt, on its selection source (TP rank 0 of the first pipeline stage), which
sends each group of micro-batches (``--micro-batch-size`` samples each) to its TP x PP
group; Megatron-Core's forward-only schedule runs them through the pipeline stages (at
PP > 1 each view padded to the language model's length, the stages' one shape), and the
replica's loss rank (TP rank 0 of the last stage; the vocabulary-parallel loss is whole on
each TP rank) writes its part. Global rank 0 merges the parts into the store atomically
(`regate_megatron.scoring.ref_store.write_store`). A sample read twice is an error; a sample
no rank read (skipped by the script's error handler) has no targets and is reported.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import threading
import time
import uuid
from types import SimpleNamespace
from typing import Callable, Iterable, List, Optional

import numpy as np
import torch

from regate_megatron.core.selection import TokenSelection
from regate_megatron.megatron_lm.batch import TextBatch, expand_targets, expand_tokens

__all__ = ["BUILT_BY", "build_reference_store", "teacher_view", "fingerprint",
           "tokenizer_fingerprint", "pad_id_of"]

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


def pad_id_of(tokenizer) -> int:
    """The id the teacher's views fill image slots and tails with: the tokenizer's pad, else
    its end-of-document id (``NullTokenizer``, GPT-2's BPE have no pad), else 0. Neither
    view attends to those slots, so the value only has to be a valid token."""
    for name in ("pad", "eod"):
        try:
            value = getattr(tokenizer, name)
        except (AttributeError, NotImplementedError):
            continue
        if value is not None and int(value) >= 0:
            return int(value)
    return 0


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


def _open_parts(parts: str, settings: dict, log: Callable[[str], None]) -> None:
    """Keep the parts of an earlier, stopped build with the same ``settings`` (its
    ``build.json``); discard any other. Rank 0 only."""
    record = os.path.join(parts, "build.json")
    if os.path.isdir(parts):
        try:
            with open(record, encoding="utf-8") as f:
                same = json.load(f) == settings
        except (OSError, ValueError):
            same = False
        if same:
            return
        log(f"ReGATE: discarding the parts in {parts}: an earlier build for another teacher, "
            f"tokenizer, data or view")
        shutil.rmtree(parts)
    os.makedirs(parts)
    tmp = f"{record}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(settings, f, sort_keys=True)
    os.replace(tmp, record)


def _chunks(parts: str) -> List[str]:
    return sorted(os.path.join(parts, name) for name in os.listdir(parts)
                  if name.startswith("chunk-") and name.endswith(".npz"))


def _done(parts: str, num_samples: int) -> np.ndarray:
    """bool [num_samples]: the samples whose losses a chunk in ``parts`` holds."""
    done = np.zeros(num_samples, dtype=bool)
    for path in _chunks(parts):
        with np.load(path) as chunk:
            ids = chunk["ids"]
        done[ids[(ids >= 0) & (ids < num_samples)]] = True
    return done


def _write_chunk(parts: str, dp_rank: int, values: dict) -> None:
    """``values`` ({sample id: losses}) as one more chunk file, written atomically."""
    ids = np.asarray(sorted(values), dtype=np.int64)
    counts = np.asarray([values[i].size for i in ids], dtype=np.int64)
    flat = (np.concatenate([values[i] for i in ids]) if ids.size
            else np.zeros(0, np.float32)).astype(np.float32)
    name = f"chunk-{dp_rank:05d}-{time.time_ns()}-{uuid.uuid4().hex[:8]}.npz"
    path = os.path.join(parts, name)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, ids=ids, counts=counts, values=flat)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _merge_parts(parts: str, num_samples: int):
    """(per-sample losses [num_samples], unread sample count) from every chunk in
    ``parts``, of this run and of the stopped runs before it."""
    per_sample: List[Optional[np.ndarray]] = [None] * num_samples
    for path in _chunks(parts):
        with np.load(path) as chunk:
            ids, counts, values = chunk["ids"], chunk["counts"], chunk["values"]
        bad = ids[(ids < 0) | (ids >= num_samples)]
        if bad.size:
            raise ValueError(f"the teacher pass read sample ids {bad.tolist()[:8]} outside "
                             f"[0, {num_samples}); the data's ids do not index its samples")
        for sample_id, losses in zip(ids.tolist(), np.split(values, np.cumsum(counts)[:-1]),
                                     strict=True):
            if per_sample[sample_id] is not None:
                raise RuntimeError(f"the teacher pass read sample {sample_id} more than once "
                                   f"(data-parallel shares overlap)")
            per_sample[sample_id] = losses
    unread = sum(v is None for v in per_sample)
    return [np.zeros(0, np.float32) if v is None else v for v in per_sample], unread


@contextlib.contextmanager
def _signal_seen(signum: Optional[int]):
    """A dict whose ``seen`` turns True when ``signum`` arrives (None: nothing watched);
    the handler before it (e.g. Megatron-LM's ``--exit-signal-handler``) still runs."""
    state = {"seen": False}
    if signum is None or threading.current_thread() is not threading.main_thread():
        yield state
        return
    previous = signal.getsignal(signum)

    def handler(sig, frame):
        state["seen"] = True
        if callable(previous):
            previous(sig, frame)

    signal.signal(signum, handler)
    try:
        yield state
    finally:
        signal.signal(signum, previous)


def _broadcast(tensor: torch.Tensor, src: int, group, size: int) -> torch.Tensor:
    import torch.distributed as dist

    if size > 1:
        dist.broadcast(tensor, src, group=group)
    return tensor


FIELDS = (("input_ids", torch.long), ("labels", torch.long), ("loss_mask", torch.float32),
          ("keep", torch.bool), ("sample_ids", torch.long))
"""What the selection source sends its model-parallel group per micro-batch group."""


def _teacher_groups(share, *, per_call: int, pad_to: Optional[int], img_seq_len: int,
                    max_length: int, pad_id: int, mode: str):
    """The source's micro-batches as groups of up to ``per_call`` of one shape: each group
    one dict of ``FIELDS`` [n * b, s'] (``sample_ids`` [n * b]) and its micro-batch count.
    At pipeline size > 1 every view is padded to ``pad_to`` (the stages' one shape)."""
    from regate_megatron.scoring.teacher import check_keeps_targets, padded_at_end

    group: List[dict] = []
    fields = tuple(name for name, _ in FIELDS[:-1])
    for text in share:
        view, combined = teacher_view(text, img_seq_len, max_length, pad_id, mode)
        check_keeps_targets(view["loss_mask"], combined.loss_mask)
        view = ({name: view[name] for name in fields} if pad_to is None
                else padded_at_end(view, pad_to, pad_id, keys=fields))
        view["sample_ids"] = text.sample_ids.long().cpu()
        if group and (len(group) == per_call
                      or view["input_ids"].shape != group[0]["input_ids"].shape):
            yield _stacked(group), len(group)
            group = []
        group.append(view)
    if group:
        yield _stacked(group), len(group)


def _stacked(views: List[dict]) -> dict:
    return {name: torch.cat([v[name] for v in views]) for name, _ in FIELDS}


STOP = -2
"""A header's micro-batch count when the source stops on a signal (-1: on an error)."""


@torch.no_grad()
def build_reference_store(path: str, lm, texts: Callable[..., Iterable[TextBatch]], *,
                          num_samples: int, img_seq_len: int, max_length: int, pad_id: int,
                          meta: dict, mode: str = "pad", flush_samples: int = 4096,
                          flush_seconds: float = 60.0, stop_signal: Optional[int] = None,
                          log: Callable[[str], None] = print) -> dict:
    """Build the store at ``path`` with ``lm`` (this rank's `ReGateGPTModel`: its pipeline
    stage of the language model) as the frozen teacher, reading the ``mode`` view
    (`teacher_view`). Collective over the world.

    ``texts(dp_rank, dp_size, done)``: the replica's share of the training samples less
    those ``done`` marks (bool [num_samples]), read on its selection source only (TP rank 0
    of the first stage), which sends each group of micro-batches to its TP x PP group;
    Megatron-Core's forward-only schedule runs the group through the stages (at pipeline
    size > 1 every view padded to ``max_length``), and the loss rank (TP rank 0 of the last
    stage) writes the losses as chunks next to ``path`` every ``flush_samples`` samples or
    ``flush_seconds``. ``meta``: the store's ``teacher``, ``tokenizer_sha256`` and
    ``dataset_fingerprint``.

    Resumable: a build stopped by any means (preemption, a crash, ``stop_signal``) leaves no
    store but its chunks; the next build with the same ``meta``, view and sample count
    reads only the samples no chunk holds, at any TP, PP and DP. With ``stop_signal`` (e.g.
    SIGTERM under Megatron-LM's ``--exit-signal-handler``) every replica's source stops at
    its next group when the signal arrives, the chunks are flushed and no store is written.

    Returns rank 0's numbers: samples read now, already done, teacher tokens, seconds, and
    whether the build stopped on ``stop_signal``."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from regate_megatron.core.roles import is_loss_rank, is_selection_source
    from regate_megatron.megatron_lm.energon import random_state_kept
    from regate_megatron.scoring.ref_store import write_store
    from regate_megatron.scoring.teacher import losses_at_targets
    from regate_megatron.training.parallel import summed

    span = tuple(lm.token_router.span)
    if mode == "pad" and span != (0, lm.config.num_layers):
        raise ValueError(f"--regate-teacher-visual pad: the build routes each sample's text "
                         f"through every decoder layer, but --regate-layers routes layers "
                         f"{span[0]}:{span[1]} of {lm.config.num_layers}; build with "
                         f"--regate-teacher-visual drop, or without --regate-layers")
    mp_group = ps.get_model_parallel_group()
    mp_size, mp_src = dist.get_world_size(mp_group), dist.get_global_rank(mp_group, 0)
    tp_size = ps.get_tensor_model_parallel_world_size()
    pp_size = ps.get_pipeline_model_parallel_world_size()
    source, loss_rank = is_selection_source(), is_loss_rank()
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    rank = dist.get_rank()
    device = next(lm.parameters()).device
    # one micro-batch a call at PP 1 (each its own shape); at PP > 1 enough to fill the pipe
    per_call = 1 if pp_size == 1 else 2 * pp_size
    parts = _parts_dir(path)
    if rank == 0:  # the chunks of a stopped build with these settings are kept
        _open_parts(parts, dict(meta=meta, teacher_visual=mode, num_samples=int(num_samples),
                                max_length=int(max_length)), log)
    dist.barrier()  # sync point: the parts folder is in place before any rank reads it
    done = _done(parts, num_samples) if source else None  # rank 0 is a source
    before = int(done.sum()) if source else 0
    if rank == 0:
        log(f"ReGATE: building the reference-loss store {os.path.abspath(path)} with the "
            f"script's language model ({mode} view): {num_samples} samples over {dp_size} "
            f"data-parallel replicas (TP {tp_size}, PP {pp_size}), {per_call} micro-batches "
            f"a forward-only call")
    if rank == 0 and before:
        log(f"ReGATE: resuming the reference-store build in {parts}: {before} of "
            f"{num_samples} samples done")
    start = last_flush = last_log = time.perf_counter()
    tokens = sent = 0
    values: dict = {}
    stopped = False
    was_training = lm.training
    lm.eval()  # no dropout: the teacher is frozen
    try:
        with random_state_kept(), _signal_seen(stop_signal) as signal_state:
            # task encoders draw prompts from the global generators: the run's state is kept
            groups = (_teacher_groups(texts(dp_rank, dp_size, done), per_call=per_call,
                                      pad_to=None if pp_size == 1 else max_length,
                                      img_seq_len=img_seq_len, max_length=max_length,
                                      pad_id=pad_id, mode=mode) if source else None)
            while True:
                header = torch.zeros(4, dtype=torch.long, device=device)  # [n, n * b, s', b]
                failed = None
                try:
                    group = None
                    if source and signal_state["seen"]:
                        header[0] = STOP
                    elif source:
                        group = next(groups, None)
                    if group is not None:
                        data, n = group
                        rows, width = data["input_ids"].shape
                        header = torch.tensor([n, rows, width, rows // n], device=device)
                except Exception as err:  # the group's other ranks must not wait on it
                    failed, header[0] = err, -1
                # sync point: the model-parallel group runs the same micro-batches, or stops
                n = int(_broadcast(header, mp_src, mp_group, mp_size)[0])
                if failed is not None:
                    raise failed
                if n == -1:
                    raise RuntimeError("the teacher pass stopped on this replica's selection "
                                       "source (its error names the cause)")
                if n in (0, STOP):
                    stopped = n == STOP
                    break
                rows, width, b = (int(x) for x in header[1:])
                inputs = {}
                for name, dtype in FIELDS:
                    shape = (rows,) if name == "sample_ids" else (rows, width)
                    t = (data[name].to(device, dtype) if source
                         else torch.empty(shape, dtype=dtype, device=device))
                    inputs[name] = _broadcast(t, mp_src, mp_group, mp_size)
                micro = [{name: t[k * b:(k + 1) * b] for name, t in inputs.items()}
                         for k in range(n)]
                out = get_forward_backward_func()(
                    forward_step_func=_teacher_forward_step(mode), data_iterator=iter(micro),
                    model=[lm], num_microbatches=n, seq_length=width, micro_batch_size=b,
                    forward_only=True)
                now = time.perf_counter()
                if loss_rank:
                    for item, view in zip(out, micro, strict=True):
                        losses = losses_at_targets(item["per_token_loss"], view["loss_mask"])
                        values.update(zip(view["sample_ids"].tolist(), losses, strict=True))
                    if len(values) >= flush_samples or now - last_flush >= flush_seconds:
                        _write_chunk(parts, dp_rank, values)
                        values, last_flush = {}, now
                if source:
                    tokens += int((inputs["input_ids"] != pad_id).sum())
                    sent += rows
                if rank == 0 and now - last_log >= flush_seconds:
                    log(f"ReGATE: reference-store build: {sent} samples read by replica 0 "
                        f"in {now - start:.0f} s ({before} done before)")
                    last_log = now
    finally:
        lm.train(was_training)
    if loss_rank and values:
        _write_chunk(parts, dp_rank, values)
    # sync point: every replica's chunks are written; did any replica stop on the signal?
    stopped = bool(summed(torch.tensor([int(stopped)]))[0])
    seconds = time.perf_counter() - start
    if rank == 0 and stopped:
        log(f"ReGATE: the reference-store build stopped on signal {stop_signal} after "
            f"{seconds:.1f} s: {int(_done(parts, num_samples).sum())} of {num_samples} "
            f"samples done in {parts}; the next run with --regate-build-ref-store resumes it")
    elif rank == 0:
        per_sample, unread = _merge_parts(parts, num_samples)
        write_store(path, per_sample, dict(meta, teacher_visual=mode, built_by=BUILT_BY))
        shutil.rmtree(parts, ignore_errors=True)
        log(f"ReGATE: reference-loss store {os.path.abspath(path)} built by the script's "
            f"language model: {num_samples} samples, {sum(v.size for v in per_sample)} targets, "
            f"read by {dp_size} data-parallel replicas (TP {tp_size}, PP {pp_size}) in "
            f"{seconds:.1f} s, {tokens} teacher tokens on rank 0"
            + (f", {before} samples from a stopped build before" if before else "")
            + (f"; {unread} samples no rank read (the error handler skipped them) have no "
               f"targets" if unread else ""))
    dist.barrier()  # sync point: the store is in place before any rank opens it
    return dict(samples=sent, done_before=before, tokens=tokens, seconds=seconds,
                stopped=stopped)


def _teacher_forward_step(mode: str):
    """The forward-only schedule's step: one micro-batch of `FIELDS` through this stage,
    routed (``pad``: only the text slots, at their combined positions) or dense (``drop``);
    the last stage's per-token losses [b, s'] are the result."""
    def forward_step(data_iterator, model):
        view = next(data_iterator)
        shape = view["input_ids"].shape
        positions = torch.arange(shape[1], device=view["input_ids"].device).expand(*shape)
        selection = (TokenSelection.from_keep_mask(view["keep"], view["loss_mask"] > 0)
                     if mode == "pad" else None)
        with model.selecting(selection):
            per_token = model(input_ids=view["input_ids"], position_ids=positions,
                              attention_mask=None, labels=view["labels"])  # [b, s']

        def loss_func(per_token_loss):
            return per_token_loss.sum() * 0, {"per_token_loss": per_token_loss}

        return per_token, loss_func

    return forward_step

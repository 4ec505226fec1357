"""Held-out evaluation, always dense: teacher-forced loss and greedy-decode answer accuracy.

Accuracy: for each held-out record the model greedily continues the context of
its last assistant turn (`Sample.prompt_length`) until end-of-sequence or
`--eval-max-new-tokens`; a sample counts when the decoded text equals the
reference answer (whitespace-normalised exact match).

Decoding runs through Megatron-Core's forward-only schedule, so it works under
TP and PP: logits are gathered over TP (`runtime_gather_output`), the last
pipeline stage picks the next tokens and broadcasts them to its pipeline group.
The held-out set is split over data-parallel ranks; counts are summed over the
world at the end (one all-reduce).
"""

from __future__ import annotations

import dataclasses
from typing import List

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from regate_megatron.core.roles import is_loss_rank, is_selection_source
from regate_megatron.data.llava import IGNORE_INDEX, collate
from regate_megatron.training.parallel import collective_device

__all__ = ["evaluate", "answers_match"]


def answers_match(predicted: str, reference: str) -> bool:
    return " ".join(predicted.split()) == " ".join(reference.split())


def _forward_only(run, batch, *, with_labels: bool) -> list:
    """One forward of `batch` through the schedule; returns the last stage's outputs."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model):
        inputs, text_mask = run.model_inputs(next(data_iterator).to(run.device))
        if not with_labels:
            inputs["labels"] = None
            # Decoding needs full-vocabulary logits on every TP rank; the loss path must keep
            # them vocab-parallel (its cross entropy reduces over the TP group itself).
            inputs["runtime_gather_output"] = True
        output = model(**inputs)
        if isinstance(output, tuple):
            output, loss_mask = output
        else:
            loss_mask = text_mask

        def loss_func(output_tensor):
            if with_labels:
                mask = loss_mask.float()
                return output_tensor.sum() * 0, {"loss": torch.stack(
                    [(output_tensor.float() * mask).sum().detach(), mask.sum()])}
            return output_tensor.sum() * 0, {"logits": output_tensor.detach()}

        return output, loss_func

    b = batch.tokens.shape[0]
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([batch]), model=run.model,
        num_microbatches=1, seq_length=run.args.seq_length, micro_batch_size=b, forward_only=True,
    )


def _greedy_decode(run, samples) -> List[List[int]]:
    """Greedy continuations of each sample's last-assistant-turn context."""
    args, tok = run.args, run.tokenizer
    base = collate(samples, seq_length=args.seq_length, pad_id=tok.pad_id)
    tokens = base.tokens.clone()  # [b, s]
    lengths = [s.prompt_length for s in samples]
    for i, n in enumerate(lengths):
        tokens[i, n:] = tok.pad_id
    generated: List[List[int]] = [[] for _ in samples]
    done = [False] * len(samples)
    blank = dict(labels=torch.full_like(base.labels, IGNORE_INDEX),
                 loss_mask=torch.zeros_like(base.loss_mask))
    for _ in range(args.eval_max_new_tokens):
        if all(done) or max(lengths) >= args.seq_length:
            break
        batch = dataclasses.replace(base, tokens=tokens, **blank)
        out = _forward_only(run, batch, with_labels=False)
        nxt = torch.zeros(len(samples), dtype=torch.long, device=collective_device())
        if ps.is_pipeline_last_stage():
            logits = out[0]["logits"]  # [b, s, V]
            for i, n in enumerate(lengths):
                nxt[i] = logits[i, n - 1, : tok.vocab_size].argmax()
        # Sync point: the last stage's choice goes to every stage of this pipeline.
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(nxt, ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
        for i, token in enumerate(nxt.tolist()):
            if done[i] or lengths[i] >= args.seq_length:
                done[i] = True
                continue
            if token == tok.eos_id:
                done[i] = True
                continue
            generated[i].append(token)
            tokens[i, lengths[i]] = token
            lengths[i] += 1
    return generated


@torch.no_grad()
def evaluate(run) -> dict:
    """Dense held-out loss and answer accuracy (identical on every rank)."""
    args, data = run.args, run.valid_data
    for chunk in run.model:
        chunk.eval()
    positions = list(range(run.dp_rank, len(data), run.dp_size))
    eval_batch = max(args.micro_batch_size, 16)
    batches = [positions[i:i + eval_batch] for i in range(0, len(positions), eval_batch)]
    if args.eval_iters is not None:
        batches = batches[: args.eval_iters]
    stats = torch.zeros(4, dtype=torch.float64)  # loss sum, tokens, correct, samples
    loss_rank, source = is_loss_rank(), is_selection_source()
    for chunk_positions in batches:
        samples = [data[p] for p in chunk_positions]
        batch = collate(samples, seq_length=args.seq_length, pad_id=run.tokenizer.pad_id)
        out = _forward_only(run, batch, with_labels=True)
        if loss_rank:
            for item in out:
                stats[:2] += item["loss"].double().cpu()
        generated = _greedy_decode(run, samples)
        if source:  # decoded tokens are whole on the first stage's TP rank 0
            for sample, ids in zip(samples, generated):
                stats[2] += float(answers_match(run.tokenizer.decode(ids), sample.answer))
                stats[3] += 1
    stats = stats.to(collective_device())
    dist.all_reduce(stats)  # sync point
    for chunk in run.model:
        chunk.train()
    loss_sum, tokens, correct, count = stats.tolist()
    return {"eval_loss": loss_sum / max(tokens, 1.0), "eval_accuracy": correct / max(count, 1.0),
            "eval_samples": int(count)}

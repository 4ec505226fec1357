"""The frozen text-only teacher at any TP x PP: built from its checkpoint, run forward-only.

    architecture  the checkpoint's common state (`teacher_architecture`): no data, no compute;
                  the tokenizer and the requested TP/PP are checked against it first
    build         one pipeline stage of a Megatron-Core GPT at this rank's TP/PP, with the
                  checkpoint's padded vocabulary (it must divide by TP: the embedding's
                  global shape is what `dist_checkpointing` reshards)
    load          `load_module_weights` (sharded_state_dict: a checkpoint saved at any TP/PP)
    run           Megatron-Core's forward-only schedule over a group of equal-shaped
                  micro-batches (`FrozenTeacher.losses`); the last pipeline stage holds each
                  sample's per-target losses, identical on every TP rank (vocab-parallel
                  cross entropy reduces over the TP group)

Used by `regate-precompute-ref` (offline) and, later, by teacher ranks streaming reference
losses to the students (online).
"""

from __future__ import annotations

import argparse
import os
from typing import Iterator, List, Optional, Sequence

import numpy as np
import torch

from regate_megatron.core.roles import is_loss_rank
from regate_megatron.data.llava import Batch

__all__ = ["teacher_architecture", "check_teacher_parallel", "FrozenTeacher", "pad_view",
           "micro_batch_groups"]

TP_FLAG, PP_FLAG = "--tensor-model-parallel-size", "--pipeline-model-parallel-size"


def teacher_architecture(load_dir: str, tokenizer) -> argparse.Namespace:
    """The teacher's architecture from its checkpoint, after checking that it shares the
    student's tokenizer (read from the checkpoint alone: no data, no model, no compute)."""
    from regate_megatron.training.checkpoint import read_common_state

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
    if not common["args"].get("text_only", True):
        raise ValueError(
            f"{load_dir} holds a multimodal (LLaVA) run, not a text-only teacher; train the "
            f"teacher with regate-train --text-only"
        )
    args = argparse.Namespace(**common["args"])  # the architecture it was saved with
    if tokenizer.vocab_size > args.vocab_size:
        raise ValueError(
            f"--tokenizer-model has {tokenizer.vocab_size} tokens but the teacher's vocabulary is "
            f"{args.vocab_size}; teacher and student must share the tokenizer"
        )
    args.text_only, args.transformer_impl = True, "local"
    args.hidden_dropout = args.attention_dropout = 0.0
    args.sequence_parallel = False
    args.tensor_model_parallel_size = args.pipeline_model_parallel_size = 1
    return args


def check_teacher_parallel(arch: argparse.Namespace, world_size: int, tp: int, pp: int,
                           flags: Sequence[str] = (TP_FLAG, PP_FLAG)) -> None:
    """TP x PP must divide the teacher's world, TP its heads, query groups and padded
    vocabulary, PP its layers. One error naming the flag, before any compute."""
    tp_flag, pp_flag = flags
    for flag, value in ((tp_flag, tp), (pp_flag, pp)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{flag} must be an integer >= 1, got {value!r}")
    if world_size % (tp * pp):
        raise ValueError(
            f"{tp_flag} {tp} x {pp_flag} {pp} = {tp * pp} does not divide the teacher's "
            f"{world_size} ranks; launch a multiple of {tp * pp} ranks or change the sizes"
        )
    groups = getattr(arch, "num_query_groups", None) or arch.num_attention_heads
    for what, count in (("attention heads", arch.num_attention_heads), ("query groups", groups),
                        ("padded vocabulary entries", arch.vocab_size)):
        if count % tp:
            raise ValueError(f"{tp_flag} {tp} does not divide the teacher's {count} {what}; "
                             f"pick a divisor of {count}")
    if arch.num_layers % pp:
        raise ValueError(f"{pp_flag} {pp} does not divide the teacher's {arch.num_layers} layers; "
                         f"pick a divisor of {arch.num_layers}")


def pad_view(view: dict, length: int, pad_id: int) -> dict:
    """A teacher view (`teacher.teacher_inputs`, plain causal attention) padded at the end to
    `length`: pad tokens, no targets. Causal attention: earlier positions never see them."""
    extra = length - view["input_ids"].shape[1]
    if extra == 0:
        return view
    if extra < 0 or view["attention_mask"] is not None:
        raise ValueError(f"cannot pad a teacher view of length {view['input_ids'].shape[1]} "
                         f"to {length}")
    from regate_megatron.scoring.teacher import padded_at_end

    b = view["input_ids"].shape[0]
    position_ids = torch.arange(length, device=view["input_ids"].device).expand(b, length)
    return dict(padded_at_end(view, length, pad_id), position_ids=position_ids,
                attention_mask=None)


def micro_batch_groups(ids: List[int], micro_batch_size: int,
                       per_call: int) -> Iterator[List[List[int]]]:
    """`ids` cut into micro-batches, then into groups of at most `per_call` micro-batches of
    one size (one forward-only schedule call each)."""
    micro = [ids[j:j + micro_batch_size] for j in range(0, len(ids), micro_batch_size)]
    group: List[List[int]] = []
    for mb in micro:
        if group and (len(group) == per_call or len(mb) != len(group[0])):
            yield group
            group = []
        group.append(mb)
    if group:
        yield group


class FrozenTeacher:
    """One pipeline stage of the frozen teacher GPT on this rank (Megatron's parallel state
    must be initialised at the teacher's TP x PP), and its per-target reference losses."""

    def __init__(self, load_dir: str, arch: argparse.Namespace, *, pad_id: int, mode: str,
                 device: torch.device):
        from megatron.core import parallel_state as ps

        from regate_megatron.training.checkpoint import latest_iteration, load_module_weights
        from regate_megatron.training.model_provider import build_model

        self.tp = ps.get_tensor_model_parallel_world_size()
        self.pp = ps.get_pipeline_model_parallel_world_size()
        arch = argparse.Namespace(**vars(arch))
        arch.tensor_model_parallel_size, arch.pipeline_model_parallel_size = self.tp, self.pp
        self.arch, self.pad_id, self.mode, self.device = arch, pad_id, mode, device
        # local attention: it honours the pad view's explicit mask
        self.model = build_model(arch, arch.vocab_size)  # this rank's stage (pre/post from PP)
        iteration = load_module_weights(self.model, load_dir)  # resharded to this TP/PP
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.name = f"{os.path.abspath(load_dir)}@iter_{latest_iteration(load_dir) or iteration}"
        self.last_stage = ps.is_pipeline_last_stage()
        # The rank that reports losses for its model-parallel group (every TP rank of the last
        # stage holds them; one is enough).
        self.reports = is_loss_rank()

    @torch.no_grad()
    def losses(self, batches: List[Batch]) -> Optional[List[np.ndarray]]:
        """Per-sample reference losses (float32, target order) of `batches`, concatenated in
        order, on the last pipeline stage (None elsewhere). One forward-only schedule call:
        the micro-batches must have equal sizes; in drop mode they are padded to the longest."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from regate_megatron.scoring.teacher import reference_losses, teacher_inputs

        sizes = {b.tokens.shape[0] for b in batches}
        if len(sizes) != 1:
            raise ValueError(f"one teacher call takes micro-batches of one size, got "
                             f"{sorted(sizes)}")
        batches = [b.to(self.device) for b in batches]
        views = [teacher_inputs(b, pad_id=self.pad_id, mode=self.mode) for b in batches]
        length = max(v["input_ids"].shape[1] for v in views)
        views = [pad_view(v, length, self.pad_id) for v in views]

        def forward_step(data_iterator, model):
            view = next(data_iterator)
            loss = model(input_ids=view["input_ids"], position_ids=view["position_ids"],
                         attention_mask=view["attention_mask"], labels=view["labels"])  # [b, s']

            def loss_func(per_token_loss):
                return per_token_loss.sum() * 0, {"per_token_loss": per_token_loss}

            return loss, loss_func

        out = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(views), model=[self.model],
            num_microbatches=len(views), seq_length=length, micro_batch_size=sizes.pop(),
            forward_only=True,
        )
        if not self.last_stage:
            return None
        result: List[np.ndarray] = []
        for item, view, batch in zip(out, views, batches, strict=True):
            result += reference_losses(item["per_token_loss"], view, batch)
        return result

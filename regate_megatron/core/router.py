"""The ReGATE token router: select -> gather -> run span -> scatter.

A `TokenRouter` belongs to one model (one pipeline/virtual stage). It is bound
to the stage's decoder layers; while `route(selection)` is active, the first
routed layer of the stage gathers the kept tokens, the routed layers run on
them, and the last routed layer of the stage scatters them back, so a stage
always hands `[s, b, h]` to the next one. Elided rows pass through unchanged.

Attention inside the span is causal in gathered order, which is the original
order because kept indices are ascending; pad slots sit after each sample's
kept slots, so causality already hides them from every real token. Rotary
embeddings are gathered from the original positions.

Under full activation recomputation the span's layers are re-run in the backward pass,
after `route()` has ended: `regate_megatron.core.recompute` runs the checkpointed chunks
with the route resumed (`TokenRouter.resumed`) and hands the span's pass-through rows
from chunk to chunk as a checkpoint input and output.
"""

from __future__ import annotations

import contextlib
import math
from typing import List, Optional, Sequence

import torch
from megatron.core.tensor_parallel import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)

from regate_megatron.core.selection import TokenSelection

__all__ = ["TokenRouter", "ActiveRoute"]


class ActiveRoute:
    """State of one routed forward on one stage: the selection's flat indices, the
    pre-span hidden states (`pass_through`: `[s, b, h]` from `enter` to `exit`, where the
    elided rows come from) and the gathered rotary table."""

    def __init__(self, router: "TokenRouter", selection: TokenSelection):
        self.router = router
        self.selection = selection
        self.multiple = router.pad_multiple_for()
        self.gather_rows, self.valid_slots, self.scatter_rows, self.positions = (
            selection.gather_layout(self.multiple)
        )
        self.pass_through: Optional[torch.Tensor] = None
        self._rotary: Optional[torch.Tensor] = None
        self._rotary_source = None

    # -- sequence-parallel helpers: whole sequence in, rank's slice out ----------
    def _full(self, hidden: torch.Tensor) -> torch.Tensor:
        """[s/tp, b, h] -> [s, b, h] under SP (backward: this rank's slice)."""
        if not self.router.sequence_parallel:
            return hidden
        return gather_from_sequence_parallel_region(
            hidden, tensor_parallel_output_grad=False, group=self.router.tp_group
        )

    def _local(self, hidden: torch.Tensor) -> torch.Tensor:
        """[s, b, h] -> [s/tp, b, h] under SP (backward: all-gather)."""
        if not self.router.sequence_parallel:
            return hidden
        return scatter_to_sequence_parallel_region(hidden, group=self.router.tp_group)

    def select_rows(self, hidden: torch.Tensor, rows: torch.Tensor, width: int) -> torch.Tensor:
        """Rows of the (possibly SP-sharded) hidden states, laid out `[width, n, h]`."""
        full = self._full(hidden)
        s, b, h = full.shape
        picked = full.reshape(s * b, h).index_select(0, rows)  # [s*b, h] -> [width*n, h]
        return self._local(picked.view(width, -1, h))  # -> [width(/tp), n, h]

    # -- span entry / exit --------------------------------------------------------
    def enter(self, hidden: torch.Tensor) -> torch.Tensor:
        """[s(/tp), b, h] -> [L_pad(/tp), b, h]: the kept tokens, in order."""
        full = self._full(hidden)
        s, b, h = full.shape
        if s != self.selection.seq_length or b != self.selection.batch_size:
            raise ValueError(
                f"token selection is for [seq {self.selection.seq_length}, batch "
                f"{self.selection.batch_size}] but the hidden states are [seq {s}, batch {b}]"
            )
        self.pass_through = full
        self.router.record(self.selection)
        gathered = full.reshape(s * b, h).index_select(0, self.gather_rows)
        return self._local(gathered.view(-1, b, h))  # [L_pad*b, h] -> [L_pad(/tp), b, h]

    def exit(self, hidden: torch.Tensor) -> torch.Tensor:
        """[L_pad(/tp), b, h] -> [s(/tp), b, h]: kept rows replaced, elided rows unchanged."""
        span_out = self._full(hidden)
        width, b, h = span_out.shape
        full = self.pass_through
        if full is None:
            raise RuntimeError("the routed span closes on a layer it never opened on (no "
                               "pass-through rows): the stage's layers ran out of order")
        kept = span_out.reshape(width * b, h).index_select(0, self.valid_slots)  # drop pad slots
        out = full.reshape(-1, h).index_copy(0, self.scatter_rows, kept)
        self.pass_through = None
        return self._local(out.view(full.shape))

    def rotary(self, rotary_pos_emb):
        """Rotary table at the kept tokens' original positions:
        [s, 1|b, 1, d] -> [L_pad, b, 1, d]."""
        if rotary_pos_emb is None:
            return None
        if isinstance(rotary_pos_emb, tuple):
            return tuple(self.rotary(r) for r in rotary_pos_emb)
        if self._rotary_source is not rotary_pos_emb:
            b = self.selection.batch_size
            table = rotary_pos_emb[: self.selection.seq_length]
            s, _, _, d = table.shape
            flat = table.expand(s, b, 1, d).reshape(s * b, d)  # [s, b, 1, d] -> [s*b, d]
            self._rotary = flat.index_select(0, self.gather_rows).view(-1, b, 1, d)
            self._rotary_source = rotary_pos_emb
        return self._rotary

    def attention_mask(self, mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """An explicit [b|1, 1, s, s] mask restricted to the kept tokens: [b, 1, L_pad, L_pad]."""
        if mask is None:
            return None
        b = self.selection.batch_size
        pos = self.positions.t()  # [L_pad, b] -> [b, L_pad]
        mask = mask.expand(b, -1, -1, -1)
        rows = mask.gather(2, pos[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[3]))
        return rows.gather(3, pos[:, None, None, :].expand(-1, mask.shape[1], pos.shape[1], -1))


class TokenRouter:
    """Routes the kept tokens of a selection through a span of decoder layers.

    Args:
        span: routed global layers [a, b), 0-based.
        tp_group: tensor-parallel group (pad to its size under sequence parallelism).
        sequence_parallel: hidden states are sharded along the sequence over tp_group.
        pad_multiple: kept length rounded up to this (0: 16 on GPU, 1 on CPU).
    """

    def __init__(self, span, tp_group=None, sequence_parallel=False, pad_multiple=0):
        self.span = tuple(span)
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel
        self.pad_multiple = pad_multiple
        self.active: Optional[ActiveRoute] = None
        self.last_keep_index: Optional[torch.Tensor] = None
        self.num_layers_bound = 0

    def covers(self, layer_number: int) -> bool:
        """Is global layer `layer_number` (1-based, Megatron's numbering) routed?"""
        return self.span[0] < layer_number <= self.span[1]

    def bind(self, layers: Sequence[torch.nn.Module]) -> None:
        """Attach to one stage's decoder layers (in order); marks where the span opens
        and closes on this stage."""
        routed: List[torch.nn.Module] = [
            layer for layer in layers if self.covers(layer.layer_number)]
        for layer in layers:
            if not hasattr(layer, "token_router"):
                raise TypeError(
                    f"layer {layer.layer_number} is {type(layer).__name__}; build the model "
                    f"from get_regate_layer_spec() so its layers can be routed"
                )
            layer.token_router = self if layer in routed else None
            layer.opens_span = bool(routed) and layer is routed[0]
            layer.closes_span = bool(routed) and layer is routed[-1]
        self.num_layers_bound = len(routed)

    def pad_multiple_for(self) -> int:
        multiple = self.pad_multiple or (16 if torch.cuda.is_available() else 1)
        if self.sequence_parallel:
            tp = torch.distributed.get_world_size(self.tp_group)
            multiple = math.lcm(multiple, tp)
        return multiple

    @contextlib.contextmanager
    def route(self, selection: Optional[TokenSelection]):
        """Route `selection` for the duration of one forward (None or dense: no routing)."""
        if selection is None or selection.is_dense:
            yield None
            return
        if self.active is not None:
            raise RuntimeError("TokenRouter.route is not re-entrant: a forward is already routed")
        self.active = ActiveRoute(self, selection)
        try:
            yield self.active
        finally:
            self.active = None

    @contextlib.contextmanager
    def resumed(self, route: ActiveRoute):
        """Make `route` active again (the recomputation of a checkpointed chunk of a routed
        forward, run in the backward pass), then restore what was active before."""
        previous, self.active = self.active, route
        try:
            yield route
        finally:
            self.active = previous

    def record(self, selection: TokenSelection) -> None:
        """Remember the indices a stage actually routed (for cross-rank agreement checks)."""
        self.last_keep_index = selection.keep_index


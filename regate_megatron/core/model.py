"""`ReGateGPTModel`: Megatron-Core's `GPTModel` whose forward takes a token selection.

With `token_selection=None` or a dense selection it *is* `GPTModel.forward`.
Otherwise the decoder's routed span runs on the kept tokens only and the output
layer and loss run only on kept target tokens (elided positions get loss 0 and
no logits). The returned per-token loss keeps GPTModel's `[b, s]` shape; mask it
with `selection.computed_loss_mask()`.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from megatron.core.models.gpt.gpt_model import GPTModel

from regate_megatron.config import ReGateConfig
from regate_megatron.core.recompute import route_full_recompute
from regate_megatron.core.router import TokenRouter
from regate_megatron.core.selection import TokenSelection

__all__ = ["ReGateGPTModel"]


class ReGateGPTModel(GPTModel):
    """GPTModel with a ReGATE token router over the decoder span of `regate_config`.

    Build it from `get_regate_decoder_block_spec()` (or `get_regate_layer_spec()`);
    every other argument is GPTModel's.
    """

    def __init__(self, *args, regate_config: Optional[ReGateConfig] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._attach_router(regate_config or ReGateConfig())

    @classmethod
    def adopt(cls, model: GPTModel,
              regate_config: Optional[ReGateConfig] = None) -> "ReGateGPTModel":
        """Turn a `GPTModel` built elsewhere (e.g. inside Megatron-Core's `LLaVAModel`,
        which constructs its language model itself) into a `ReGateGPTModel` in place.
        Its decoder must come from the ReGATE spec; no parameter changes."""
        if not isinstance(model, GPTModel):
            raise TypeError(f"ReGateGPTModel.adopt needs a GPTModel, got {type(model).__name__}")
        model.__class__ = cls
        model._attach_router(regate_config or ReGateConfig())
        return model

    def _attach_router(self, regate_config: ReGateConfig) -> None:
        config = self.config
        if config.mtp_num_layers:
            raise ValueError(
                "ReGATE routing does not support multi-token prediction (--mtp-num-layers)")
        if config.apply_rope_fusion:
            raise ValueError(
                "ReGATE routing needs per-token rotary tables; turn off --apply-rope-fusion"
            )
        self.token_router = TokenRouter(
            regate_config.layer_span(config.num_layers),
            tp_group=self.pg_collection.tp,
            sequence_parallel=config.sequence_parallel,
            pad_multiple=regate_config.pad_multiple,
        )
        self.token_router.bind(self.decoder.layers)
        if config.recompute_granularity == "full":
            route_full_recompute(self.decoder, self.token_router)
        self._pending_selection: Optional[TokenSelection] = None

    @contextlib.contextmanager
    def selecting(self, selection: Optional[TokenSelection]):
        """Route the forwards inside this block with `selection`, for callers that invoke
        this model themselves (LLaVA calls its language model with fixed arguments)."""
        self._pending_selection = selection
        try:
            yield
        finally:
            self._pending_selection = None

    def forward(self, *args, token_selection: Optional[TokenSelection] = None, **kwargs):
        if token_selection is None:
            token_selection = self._pending_selection
        if token_selection is None or token_selection.is_dense:
            return super().forward(*args, **kwargs)
        self._check_selection(token_selection, args, kwargs)
        with self.token_router.route(token_selection):
            return super().forward(*args, **kwargs)

    def _check_selection(self, selection: TokenSelection, args, kwargs) -> None:
        """Fail before any compute when the selection does not fit the batch."""
        for name in ("packed_seq_params", "inference_context", "inference_params"):
            if kwargs.get(name) is not None:
                raise ValueError(f"token_selection cannot be combined with {name} (training only)")
        names = ("input_ids", "position_ids", "attention_mask", "decoder_input", "labels")
        given = dict(zip(names, args), **kwargs)
        for name in ("input_ids", "labels"):
            tensor = given.get(name)
            if tensor is not None and tuple(tensor.shape) != tuple(selection.target_mask.shape):
                raise ValueError(
                    f"token_selection is for [batch, seq] {tuple(selection.target_mask.shape)} "
                    f"but {name} is {tuple(tensor.shape)}"
                )

    def _postprocess(self, hidden_states, labels=None, **kwargs):
        route = self.token_router.active
        if route is None or not self.post_process:
            return super()._postprocess(hidden_states=hidden_states, labels=labels, **kwargs)
        selection = route.selection
        b, s = selection.batch_size, selection.seq_length
        rows = selection.output_rows(with_labels=labels is not None)  # flat rows of [s*b]
        n = rows.numel()
        multiple = route.multiple if self.config.sequence_parallel else 1
        width = max(-(-n // multiple) * multiple, multiple)
        padded = torch.cat([rows, rows.new_zeros(width - n)])  # pad rows are discarded below
        # [s(/tp), b, h] -> [width(/tp), 1, h]
        compact = route.select_rows(hidden_states, padded, width)
        if labels is None:
            # [1, width, V]
            logits = super()._postprocess(hidden_states=compact, labels=None, **kwargs)
            vocab = logits.shape[-1]
            out = logits.new_zeros(s * b, vocab).index_copy(0, rows, logits[0, :n])
            return out.view(s, b, vocab).transpose(0, 1)  # [s*b, V] -> [b, s, V]
        # [b, s] -> [1, width]
        compact_labels = labels.t().reshape(-1).index_select(0, padded).view(1, width)
        # [1, width]
        loss = super()._postprocess(hidden_states=compact, labels=compact_labels, **kwargs)
        out = loss.new_zeros(s * b).index_copy(0, rows, loss[0, :n])
        return out.view(s, b).t()  # [s*b] -> [b, s]

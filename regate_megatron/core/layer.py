"""`ReGateTransformerLayer`: a Megatron-Core `TransformerLayer` that can be routed.

Unrouted (no active selection, or a layer outside the span) it is exactly the
stock layer. Routed, the stage's first span layer gathers the kept tokens
before running, every span layer sees the rotary table at the kept tokens'
original positions, and the stage's last span layer scatters back after running.
"""

from __future__ import annotations

from megatron.core.transformer.transformer_layer import TransformerLayer

__all__ = ["ReGateTransformerLayer"]


class ReGateTransformerLayer(TransformerLayer):
    """Transformer layer with a ReGATE token-routing hook (see `TokenRouter.bind`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Set by TokenRouter.bind(); None = this layer is never routed.
        self.token_router = None
        self.opens_span = False
        self.closes_span = False

    def forward(self, hidden_states, **kwargs):
        route = self.token_router.active if self.token_router is not None else None
        if route is None:
            return super().forward(hidden_states=hidden_states, **kwargs)
        if (kwargs.get("packed_seq_params") is not None
                or kwargs.get("inference_context") is not None):
            raise ValueError(
                "ReGATE routing supports training with [s, b, h] batches only: "
                "packed_seq_params and inference_context must be None"
            )
        if self.opens_span:
            hidden_states = route.enter(hidden_states)  # [s, b, h] -> [L, b, h]
        kwargs["rotary_pos_emb"] = route.rotary(kwargs.get("rotary_pos_emb"))
        kwargs["attention_mask"] = route.attention_mask(kwargs.get("attention_mask"))
        output, context = super().forward(hidden_states=hidden_states, **kwargs)
        if self.closes_span:
            output = route.exit(output)  # [L, b, h] -> [s, b, h]
        return output, context

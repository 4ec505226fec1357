"""Full activation recomputation of a routed forward (``--recompute-granularity full``).

Megatron-Core's full recomputation checkpoints chunks of a block's layers and re-runs each
chunk in the backward pass. A routed forward needs two things from that re-run that the
stock chunks cannot give: the route (the re-run happens after `TokenRouter.route` has ended,
possibly while another micro-batch is routed) and the span's pass-through rows (the
pre-span hidden states the closing layer takes the elided rows from, which must reach the
closing layer's chunk as a checkpointed tensor, or their gradient is lost). So while a
forward is routed, a ReGATE block runs its own chunks, laid out as Megatron-Core lays them
out (``uniform``: every ``--recompute-num-layers`` layers one checkpoint; ``block``: the
first ``--recompute-num-layers`` layers of the stage one checkpoint each, the rest not
recomputed), each one a `tensor_parallel.checkpoint` of

    (hidden [s or L_pad (/tp), b, h], pass-through [s, b, h] or None, masks, rotary)
        -> (hidden, pass-through or None)

run with the route resumed. RNG states are saved and restored by Megatron-Core's checkpoint,
so dropout draws the same masks in the re-run. Unrouted forwards (no selection, a dense
one, evaluation) are Megatron-Core's own. Selective recomputation needs none of this: it
re-runs parts of one layer, inside the routed layer.
"""

from __future__ import annotations

from typing import Optional

from megatron.core import tensor_parallel

from regate_megatron.core.mcore_compat import hook_full_recompute
from regate_megatron.core.router import TokenRouter

__all__ = ["check_recompute", "route_full_recompute"]


def check_recompute(config) -> None:
    """Refuse recomputation settings a routed forward does not support, naming the flag
    (`config`: a TransformerConfig, or Megatron-LM's args, which name the fields alike)."""
    if getattr(config, "recompute_granularity", None) != "full":
        return
    if getattr(config, "distribute_saved_activations", False):
        raise ValueError("ReGATE routing does not support --distribute-saved-activations with "
                         "--recompute-granularity full; drop --distribute-saved-activations")
    if getattr(config, "fp8", None) or getattr(config, "fp4", None):
        raise ValueError("ReGATE routing with --recompute-granularity full runs in bf16, fp16 "
                         "or fp32; drop --fp8-format/--fp4-format or the recomputation")


def route_full_recompute(block, router: TokenRouter) -> None:
    """Give `block` (a stage's `TransformerBlock`, bound to `router`) the routed chunks
    above whenever a forward through it is routed."""
    config = block.config
    check_recompute(config)
    if (config.recompute_granularity == "full" and config.recompute_method == "uniform"
            and len(block.layers) % config.recompute_num_layers):
        raise ValueError(
            f"--recompute-method uniform checkpoints every --recompute-num-layers "
            f"({config.recompute_num_layers}) layers, which must divide the "
            f"{len(block.layers)} layers of each pipeline stage; choose a divisor or "
            f"--recompute-method block")

    def forward(stock, **kwargs):
        route = router.active
        if route is None:
            return stock(**kwargs)
        return _routed_chunks(block, router, route, **kwargs)

    hook_full_recompute(block, forward)


def _chunks(config, num_layers: int):
    """``(start, end, checkpointed)`` over a stage's layers, as Megatron-Core recomputes."""
    k = config.recompute_num_layers
    if config.recompute_method == "uniform":
        return [(start, start + k, True) for start in range(0, num_layers, k)]
    if config.recompute_method == "block":
        return [(i, i + 1, i < k) for i in range(num_layers)]
    raise ValueError(f"invalid --recompute-method {config.recompute_method!r} (uniform, block)")


def _routed_chunks(block, router, route, *, hidden_states, attention_mask, context,
                   context_mask, rotary_pos_emb, attention_bias, packed_seq_params,
                   use_inner_quantization_context=False, extract_layer_indices=None,
                   layer_offset=0, **rest):
    """The routed counterpart of Megatron-Core's checkpointed block forward."""
    del use_inner_quantization_context, layer_offset  # no fp8/fp4 (check_recompute)
    if context is not None or packed_seq_params is not None:
        raise ValueError("ReGATE routing recomputes decoder-only [s, b, h] blocks: context "
                         "and packed_seq_params must be None")
    if extract_layer_indices:
        raise ValueError("ReGATE routing with --recompute-granularity full cannot extract "
                         "intermediate layers' hidden states")
    dual = isinstance(rotary_pos_emb, (tuple, list))
    rope = tuple(rotary_pos_emb) if dual else (rotary_pos_emb,)
    layers = block.layers
    # [chunk in] hidden [s or L_pad (/tp), b, h], pass-through [s, b, h] or None
    hidden: object = hidden_states
    pass_through: Optional[object] = None
    for start, end, checkpointed in _chunks(block.config, len(layers)):

        def run(hidden, pass_through, attention_mask, context_mask, *rope_parts,
                start=start, end=end):
            rotary = tuple(rope_parts) if dual else rope_parts[0]
            with router.resumed(route):
                route.pass_through = pass_through
                for layer in layers[start:end]:
                    hidden, _ = layer(hidden_states=hidden, attention_mask=attention_mask,
                                      context=None, context_mask=context_mask,
                                      rotary_pos_emb=rotary, attention_bias=attention_bias,
                                      inference_context=None, packed_seq_params=None,
                                      **rest)
                return hidden, route.pass_through

        args = (hidden, pass_through, attention_mask, context_mask, *rope)
        if checkpointed:
            hidden, pass_through = tensor_parallel.checkpoint(run, False, *args)
        else:
            hidden, pass_through = run(*args)
    route.pass_through = None
    return hidden

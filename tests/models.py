"""Tiny Megatron-Core GPT models and weight/grad plumbing shared by the router tests."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer

from regate_megatron.config import ReGateConfig
from regate_megatron.core.model import ReGateGPTModel
from regate_megatron.core.spec import get_regate_decoder_block_spec

VOCAB = 64
MAX_SEQ = 32


def tiny_config(**overrides) -> TransformerConfig:
    kw = dict(
        num_layers=2, hidden_size=16, ffn_hidden_size=32, num_attention_heads=4,
        use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
        params_dtype=torch.float32,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        pipeline_dtype=torch.float32,
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


def build_gpt(config, routed=True, regate=None, position_embedding_type="rope", vp_stage=None,
              pre_process=None, post_process=None, seed=1):
    """ReGateGPTModel (routed) or the stock GPTModel with identical submodules."""
    torch.manual_seed(seed)
    layer_module = None if routed else TransformerLayer
    spec_kw = {} if layer_module is None else {"layer_module": layer_module}
    spec = get_regate_decoder_block_spec(config, backend="local", vp_stage=vp_stage, **spec_kw)
    kwargs = dict(
        config=config, transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=MAX_SEQ,
        position_embedding_type=position_embedding_type,
        share_embeddings_and_output_weights=False,
        pre_process=(ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
                     if pre_process is None else pre_process),
        post_process=(ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
                      if post_process is None else post_process),
        vp_stage=vp_stage,
    )
    if position_embedding_type == "mrope":
        import dataclasses

        head_half = config.hidden_size // config.num_attention_heads // 2
        kwargs["config"] = dataclasses.replace(config, mrope_section=[head_half - 2, 1, 1])
    if routed:
        return ReGateGPTModel(regate_config=regate or ReGateConfig(enabled=True), **kwargs)
    return GPTModel(**kwargs)


def _layer_offset(model) -> int:
    layers = model.decoder.layers
    return layers[0].layer_number - 1 if len(layers) else 0


def global_name(model, name: str) -> str:
    """Parameter name in the single-stage model (pipeline layer offset applied)."""
    if name.startswith("decoder.layers."):
        parts = name.split(".")
        parts[2] = str(int(parts[2]) + _layer_offset(model))
        return ".".join(parts)
    return name


def load_full_weights(model, full_state: dict) -> None:
    """Load single-rank weights into a TP/PP shard of the same architecture."""
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for name, p in model.named_parameters():
            full = full_state[global_name(model, name)]
            if getattr(p, "tensor_model_parallel", False):
                full = full.chunk(tp, dim=p.partition_dim)[rank]
            p.copy_(full)


def full_grads(model) -> dict:
    """This stage's parameter grads, TP shards gathered, SP-norm grads summed over TP."""
    group = ps.get_tensor_model_parallel_group()
    tp = ps.get_tensor_model_parallel_world_size()
    out = {}
    for name, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        if getattr(p, "sequence_parallel", False) and tp > 1:
            g = g.clone()
            dist.all_reduce(g, group=group)
        if getattr(p, "tensor_model_parallel", False) and tp > 1:
            parts = [torch.empty_like(g) for _ in range(tp)]
            dist.all_gather(parts, g.contiguous(), group=group)
            g = torch.cat(parts, dim=p.partition_dim)
        out[global_name(model, name)] = g.detach().clone()
    return out


def make_batch(seed: int, b: int = 3, s: int = 16, prompt: int = 5):
    """Tokens, labels, position ids and a target mask (answer after a `prompt`-token context)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (b, s), generator=g)
    labels = torch.randint(0, VOCAB, (b, s), generator=g)
    target_mask = torch.zeros(b, s, dtype=torch.bool)
    for i in range(b):
        target_mask[i, prompt + i:] = True  # samples differ in their target count
    scores = torch.rand(b, s, generator=g)
    return tokens, labels, torch.arange(s).expand(b, s), target_mask, scores


def per_token_loss_func(mask, per_token_loss):
    """Megatron loss_func: mean over the computed target tokens of the micro-batch."""
    mask = mask.float()
    loss = (per_token_loss * mask).sum() / mask.sum()
    return loss, {"lm loss": loss.detach()}


def run_schedule(model, batches, selections=None, forward_only=False, record=None):
    """One forward/backward over `batches` (micro-batches) with Megatron's pipeline schedule.

    `model` is one module or the list of virtual-pipeline chunks. `selections` (one per
    micro-batch, or None for stock models) travel with each forward. `record`, a list,
    receives the keep_index each routed chunk actually used.
    """
    from functools import partial

    from megatron.core.pipeline_parallel import get_forward_backward_func

    chunks = model if isinstance(model, list) else [model]
    per_mb = list(zip(batches, selections if selections is not None else [None] * len(batches)))
    iterators = [iter(per_mb) for _ in chunks]  # each chunk walks the micro-batches itself

    def forward_step(data_iterator, chunk):
        (tokens, labels, pos, targets), selection = next(data_iterator)
        if selection is None:
            return chunk(tokens, pos, None, labels=labels), partial(per_token_loss_func, targets)
        out = chunk(tokens, pos, None, labels=labels, token_selection=selection)
        router = getattr(chunk, "module", chunk).token_router
        if record is not None and router.last_keep_index is not None:
            record.append(router.last_keep_index.clone())
        return out, partial(per_token_loss_func, selection.computed_loss_mask())

    tokens = batches[0][0]
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks, num_microbatches=len(batches), seq_length=tokens.shape[1],
        micro_batch_size=tokens.shape[0], forward_only=forward_only,
    )

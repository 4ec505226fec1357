"""Tests for regate_megatron.core.cpu_compat and regate_megatron.core.local_modules on real gloo
worlds.

Importing torch + megatron costs ~3 s per process, so every check that needs
Megatron runs inside ONE spawned 2-rank world (``two_rank_world``, module
scope): it walks through phases (attention, GPT, TP=2, PP=2), re-initialising
Megatron's model-parallel state between them, and returns plain numbers that the
tests below assert on. Checks that need only torch run in the pytest process (whether
or not another test patched it); the import/idempotence check runs in a fresh interpreter.

With CUDA, apply_cpu_compat is a no-op and worlds would use NCCL, so the
CPU/gloo tests skip there. The distributed-optimizer checkpoint fixes, which apply on GPUs
too, are tested in tests/test_optimizer_state.py.
"""

import os
import re
import subprocess
import sys
import textwrap
import types

import pytest
import torch
from dist import WorldError, run_world

from regate_megatron.core.cpu_compat import guard_pipeline_p2p

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SEQ, MBS, VOCAB, HIDDEN, HEADS = 8, 2, 64, 16, 4
SEED = 1234

cpu_gloo_only = pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU/gloo compatibility: a no-op with CUDA"
)


# ======================================================================================
# Model helpers (module level: the spawned ranks import them by name)
# ======================================================================================


def tiny_config(num_layers: int = 2, **overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = dict(
        num_layers=num_layers,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def local_layer_spec(core_attention=None, norm=None):
    """Megatron's local GPT layer spec with TorchSDPACoreAttention (and optionally a norm)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from regate_megatron.core.local_modules import TorchSDPACoreAttention

    spec = get_gpt_layer_local_spec()
    spec.submodules.self_attention.submodules.core_attention = (
        core_attention or TorchSDPACoreAttention
    )
    if norm is not None:
        spec.submodules.input_layernorm = norm
        spec.submodules.pre_mlp_layernorm = norm
    return spec


def sp_block_spec(config, vp_stage=None):
    """Block spec whose every norm (final one included) is SequenceParallelTorchNorm."""
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    from regate_megatron.core.local_modules import SequenceParallelTorchNorm

    layer_spec = local_layer_spec(norm=SequenceParallelTorchNorm)
    return TransformerBlockSubmodules(
        layer_specs=[layer_spec] * get_num_layers_to_build(config, vp_stage),
        layer_norm=SequenceParallelTorchNorm,
    )


def build_gpt(config, spec=None, vp_stage=None, seed=SEED, **kwargs):
    """GPTModel for this rank's pipeline stage; weights drawn from `seed` (CPU init)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    torch.manual_seed(seed)
    return GPTModel(
        config,
        spec if spec is not None else local_layer_spec(),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        vp_stage=vp_stage,
        **kwargs,
    )


def token_batches(num_microbatches: int, seed: int = 0) -> list:
    """[(tokens [b, s], labels [b, s])] * num_microbatches, next-token labels."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_microbatches):
        ids = torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=gen)
        batches.append((ids[:, :-1].contiguous(), ids[:, 1:].contiguous()))
    return batches


def position_ids():
    return torch.arange(SEQ).unsqueeze(0).expand(MBS, SEQ)  # [b, s]


def forward_step(data_iterator, model):
    """Megatron schedule forward step: mean per-token LM loss."""
    tokens, labels = next(data_iterator)
    per_token_loss = model(tokens, position_ids(), None, labels=labels)  # [b, s]

    def loss_func(output):
        loss = output.float().mean()
        return loss, {"loss": loss.detach().clone()}

    return per_token_loss, loss_func


def reinit_parallel(tp: int = 1, pp: int = 1, vpp=None, seed: int = SEED) -> None:
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def max_abs_diff(a, b) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


def _global_layer_name(name: str, layer_offset: int) -> str:
    """Local pipeline-stage parameter name -> name in the unpipelined model."""
    match = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
    if match is None:
        return name
    return f"decoder.layers.{int(match.group(1)) + layer_offset}.{match.group(2)}"


def _tp_shard(full: torch.Tensor, param, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's shard of a full (TP=1) tensor, for a TP-split parameter."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    return full.chunk(tp_size, dim=param.partition_dim)[tp_rank]


def reference_attention(query, key, value, masked_out, scale):
    """softmax(Q K^T * scale, masked) V by hand. q [sq,b,np,hn], k/v [sk,b,ng,hn]."""
    sq, b, np_, hn = query.shape
    group = np_ // key.shape[2]
    key = key.repeat_interleave(group, dim=2)  # [sk, b, ng, hn] -> [sk, b, np, hn]
    value = value.repeat_interleave(group, dim=2)
    scores = torch.einsum("sbnh,tbnh->bnst", query, key) * scale  # [b, np, sq, sk]
    if masked_out is not None:
        scores = scores.masked_fill(masked_out, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    context = torch.einsum("bnst,tbnh->sbnh", probs, value)  # [sq, b, np, hn]
    return context.reshape(sq, b, np_ * hn)


# ======================================================================================
# World phases (each returns plain numbers; the tests assert on them)
# ======================================================================================


def _phase_attention() -> dict:
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from regate_megatron.core.local_modules import TorchSDPACoreAttention

    out = {}
    gen = torch.Generator().manual_seed(3)
    hn = HIDDEN // HEADS
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1)  # True = future key, masked
    pad = torch.zeros(MBS, 1, SEQ, SEQ, dtype=torch.bool)  # [b, 1, sq, sk]
    pad[1, ..., SEQ - 3 :] = True  # sample 1: last 3 keys are padding
    arbitrary = torch.rand(MBS, 1, SEQ, SEQ, generator=gen) > 0.6
    arbitrary[..., 0] = False  # every query keeps at least one key

    for groups in (HEADS, 2):  # MHA, then GQA (2 query heads per key/value head)
        cfg = tiny_config(num_query_groups=groups)
        scale = 1.0 / hn**0.5
        q = torch.randn(SEQ, MBS, HEADS, hn, generator=gen)  # [sq, b, np, hn]
        k = torch.randn(SEQ, MBS, groups, hn, generator=gen)  # [sk, b, ng, hn]
        v = torch.randn(SEQ, MBS, groups, hn, generator=gen)
        sdpa_causal = TorchSDPACoreAttention(cfg, 1, AttnMaskType.causal, "self").eval()
        sdpa_padding = TorchSDPACoreAttention(cfg, 1, AttnMaskType.padding, "self").eval()
        cases = {
            "causal": (sdpa_causal(q, k, v, None), causal),
            "causal+pad": (sdpa_causal(q, k, v, pad), causal | pad),
            "explicit": (sdpa_padding(q, k, v, arbitrary), arbitrary),
            "no_mask": (sdpa_padding(q, k, v, None), None),
        }
        for case, (got, masked_out) in cases.items():
            want = reference_attention(q, k, v, masked_out, scale)
            out[f"ref/{case}/groups{groups}"] = max_abs_diff(got, want)
        out[f"shape/groups{groups}"] = tuple(cases["causal"][0].shape)

        # Megatron's own DotProductAttention runs on CPU once apply_cpu_compat is in.
        for mask_type, mask in ((AttnMaskType.causal, None), (AttnMaskType.padding, arbitrary)):
            stock = DotProductAttention(cfg, 1, mask_type, "self").eval()
            mine = TorchSDPACoreAttention(cfg, 1, mask_type, "self").eval()
            out[f"stock/{mask_type.name}/groups{groups}"] = max_abs_diff(
                stock(q, k, v, mask), mine(q, k, v, mask)
            )

    # Fewer queries than keys: bottom-right causal triangle; one query sees every key.
    cfg = tiny_config()
    k = torch.randn(SEQ, MBS, HEADS, hn, generator=gen)
    v = torch.randn(SEQ, MBS, HEADS, hn, generator=gen)
    for sq, mask_type in ((3, AttnMaskType.causal_bottom_right), (1, AttnMaskType.causal)):
        q = torch.randn(sq, MBS, HEADS, hn, generator=gen)
        attn = TorchSDPACoreAttention(cfg, 1, mask_type, "self").eval()
        future = torch.ones(sq, SEQ, dtype=torch.bool).triu(SEQ - sq + 1)
        out[f"ref/{mask_type.name}/sq{sq}"] = max_abs_diff(
            attn(q, k, v, None), reference_attention(q, k, v, future, 1.0 / hn**0.5)
        )

    # softmax_scale argument and attention dropout (only in training).
    cfg = tiny_config(num_query_groups=2, attention_dropout=0.5)
    q = torch.randn(SEQ, MBS, HEADS, hn, generator=gen)
    k = torch.randn(SEQ, MBS, 2, hn, generator=gen)
    v = torch.randn(SEQ, MBS, 2, hn, generator=gen)
    scaled = TorchSDPACoreAttention(cfg, 1, AttnMaskType.causal, "self", softmax_scale=0.3).eval()
    out["ref/softmax_scale"] = max_abs_diff(
        scaled(q, k, v, None), reference_attention(q, k, v, causal, 0.3)
    )
    dropout = TorchSDPACoreAttention(cfg, 1, AttnMaskType.causal, "self")
    no_dropout_ref = reference_attention(q, k, v, causal, 1.0 / hn**0.5)
    out["dropout/eval_diff"] = max_abs_diff(dropout.eval()(q, k, v, None), no_dropout_ref)
    out["dropout/train_diff"] = max_abs_diff(dropout.train()(q, k, v, None), no_dropout_ref)

    # Refusals.
    errors = {}
    attn = TorchSDPACoreAttention(tiny_config(), 1, AttnMaskType.causal, "self")
    q4 = torch.randn(SEQ, MBS, HEADS, hn)
    for case, call in {
        "packed_seq_params": lambda: attn(q4, q4, q4, None, packed_seq_params=PackedSeqParams()),
        "attention_bias": lambda: attn(q4, q4, q4, None, attention_bias=torch.zeros(1)),
        "context_parallel": lambda: TorchSDPACoreAttention(
            tiny_config(context_parallel_size=2), 1, AttnMaskType.causal, "self"
        ),
        "float_mask": lambda: attn(q4, q4, q4, torch.zeros(MBS, 1, SEQ, SEQ)),
    }.items():
        try:
            call()
            errors[case] = None
        except Exception as exc:  # noqa: BLE001 -- the test inspects type and message
            errors[case] = f"{type(exc).__name__}: {exc}"
    out["errors"] = errors
    return out


def _phase_gpt() -> dict:
    """GPTModel on CPU (TP=1): SDPA vs stock attention, rope, recompute + dropout RNG."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    out = {}
    tokens, labels = token_batches(1, seed=5)[0]

    # Forward + backward with the SDPA spec; equal to the stock local spec.
    sdpa_model = build_gpt(tiny_config())
    loss = sdpa_model(tokens, position_ids(), None, labels=labels)  # [b, s]
    out["loss_shape"] = tuple(loss.shape)
    loss.mean().backward()
    grads = {n: p.grad for n, p in sdpa_model.named_parameters()}
    out["loss"] = loss.mean().item()
    out["params_without_grad"] = [n for n, g in grads.items() if g is None or g.abs().sum() == 0]
    stock_model = build_gpt(tiny_config(), local_layer_spec(core_attention=DotProductAttention))
    out["stock_init_diff"] = max(
        max_abs_diff(p, dict(sdpa_model.named_parameters())[n])
        for n, p in stock_model.named_parameters()
    )
    with torch.no_grad():
        out["stock_logits_diff"] = max_abs_diff(
            sdpa_model(tokens, position_ids(), None), stock_model(tokens, position_ids(), None)
        )

    rope_model = build_gpt(tiny_config(), position_embedding_type="rope")
    rope_loss = rope_model(tokens, position_ids(), None, labels=labels).mean()
    rope_loss.backward()
    out["rope_loss"] = rope_loss.item()

    # Activation recompute replays dropout through the RNG tracker: with dropout on,
    # recomputed and stored activations must give the same loss and grads.
    runs = []
    for recompute in (False, True):
        extra = (
            dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
            if recompute
            else {}
        )
        model = build_gpt(tiny_config(hidden_dropout=0.3, attention_dropout=0.3, **extra))
        reinit_parallel(seed=11)
        model.train()
        train_loss = model(tokens, position_ids(), None, labels=labels).mean()
        train_loss.backward()
        runs.append((train_loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        if not recompute:
            with torch.no_grad():
                out["eval_loss_with_dropout_cfg"] = (
                    model.eval()(tokens, position_ids(), None, labels=labels).mean().item()
                )
    out["recompute_losses"] = (runs[0][0], runs[1][0])
    out["recompute_grad_diff"] = max(max_abs_diff(runs[0][1][n], runs[1][1][n]) for n in runs[0][1])
    return out


def _build_llava(tp: int):
    from megatron.core.models.multimodal.llava_model import LLaVAModel
    from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_local_spec

    from regate_megatron.core.local_modules import TorchSDPACoreAttention
    from regate_megatron.core.mcore_compat import mlp_submodules

    vision_config = tiny_config(tensor_model_parallel_size=tp)
    vision_config.vision_model_type = "clip"
    projection_config = tiny_config(1, tensor_model_parallel_size=tp, ffn_hidden_size=2 * HIDDEN)
    vision_spec = get_vit_layer_with_local_spec()
    vision_spec.submodules.self_attention.submodules.core_attention = TorchSDPACoreAttention
    torch.manual_seed(SEED)
    return LLaVAModel(
        tiny_config(tensor_model_parallel_size=tp),
        local_layer_spec(),
        VOCAB,
        64,
        vision_config,
        vision_spec,
        drop_vision_class_token=False,
        vision_projection_config=projection_config,
        vision_projection_layer_spec=mlp_submodules(use_te=False),
        img_h=16,
        img_w=16,
        patch_dim=8,
    )


def _llava_loss(model) -> tuple:
    gen = torch.Generator().manual_seed(9)
    images = torch.randn(MBS, 3, 16, 16, generator=gen)  # [num_tiles, 3, H, W]
    ids = torch.randint(0, VOCAB, (MBS, SEQ), generator=gen)
    ids[:, 1] = -200  # image token
    labels = torch.randint(0, VOCAB, (MBS, SEQ), generator=gen)
    loss, _ = model(images, ids, position_ids(), None, labels=labels,
                    loss_mask=torch.ones(MBS, SEQ))
    loss.mean().backward()
    return loss.mean().item(), tuple(loss.shape)


def _phase_tensor_parallel() -> dict:
    """TP=2 (+ sequence parallel) against TP=1, RNG tracker semantics, LLaVA, norms."""
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    from regate_megatron.core.local_modules import SequenceParallelTorchNorm

    out = {}
    batches = token_batches(2, seed=7)

    # --- TP=1 references (built from the same seed: CPU init draws full weights).
    reinit_parallel(tp=1)
    ref_config = tiny_config()
    ref_model = build_gpt(ref_config, sp_block_spec(ref_config))
    ref_losses = [ref_model(t, position_ids(), None, labels=labels).mean() for t, labels in batches]
    sum(ref_losses).backward()
    ref_params = {n: p.detach().clone() for n, p in ref_model.named_parameters()}
    ref_grads = {n: p.grad.clone() for n, p in ref_model.named_parameters()}
    out["llava_tp1"] = _llava_loss(_build_llava(tp=1))

    # --- TP=2 + sequence parallel.
    reinit_parallel(tp=2)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    sp_config = tiny_config(tensor_model_parallel_size=2, sequence_parallel=True)
    sp_model = build_gpt(sp_config, sp_block_spec(sp_config))
    out["sp_init_diff"] = max(
        max_abs_diff(p, _tp_shard(ref_params[n], p, tp_rank, 2))
        for n, p in sp_model.named_parameters()
    )
    ddp = DistributedDataParallel(sp_config, DistributedDataParallelConfig(), sp_model)
    sp_losses = [ddp(t, position_ids(), None, labels=labels).mean() for t, labels in batches]
    sum(sp_losses).backward()
    finalize_model_grads([ddp])  # all-reduces the `sequence_parallel` norm grads over TP
    out["sp_losses"] = [x.item() for x in sp_losses]
    out["ref_losses"] = [x.item() for x in ref_losses]
    out["sp_grad_diff"] = max(
        max_abs_diff(p.main_grad, _tp_shard(ref_grads[n], p, tp_rank, 2))
        for n, p in sp_model.named_parameters()
    )
    norm_params = {n: p for n, p in sp_model.named_parameters() if "layernorm" in n}
    out["sp_norm_params"] = sorted(norm_params)
    out["sp_marked_norm_params"] = sorted(
        n for n, p in norm_params.items() if getattr(p, "sequence_parallel", False)
    )
    out["llava_tp2"] = _llava_loss(_build_llava(tp=2))

    # --- RNG: default stream equal across TP ranks, the tracker's TP stream differs,
    # and a fork leaves the default stream where it was.
    torch.manual_seed(1000 + dist.get_rank())  # ranks start from different CPU states
    tensor_parallel.model_parallel_cuda_manual_seed(77)
    default_draw = torch.rand(4)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        tp_draw = torch.rand(4)
    after_fork = torch.rand(4)
    tensor_parallel.model_parallel_cuda_manual_seed(77)
    unforked = torch.rand(8)
    out["rng"] = dict(
        default=default_draw.tolist(),
        tp_stream=tp_draw.tolist(),
        fork_kept_default_stream=bool(torch.equal(torch.cat([default_draw, after_fork]), unforked)),
    )
    # Sequence-parallel dropout (hidden dropout inside the tracker fork) runs.
    dropout_config = tiny_config(
        tensor_model_parallel_size=2, sequence_parallel=True, hidden_dropout=0.2
    )
    dropout_model = build_gpt(dropout_config, sp_block_spec(dropout_config)).train()
    tokens, labels = batches[0]
    out["sp_dropout_loss"] = dropout_model(
        tokens, position_ids(), None, labels=labels).mean().item()

    # --- SequenceParallelTorchNorm unit checks.
    norms = {}
    for normalization in ("LayerNorm", "RMSNorm"):
        for sp in (False, True):
            cfg = tiny_config(
                tensor_model_parallel_size=2, sequence_parallel=sp, normalization=normalization
            )
            norm = SequenceParallelTorchNorm(cfg, HIDDEN, eps=1e-6)
            norms[f"{normalization}/sp={sp}"] = (
                type(norm).__name__,
                norm.eps,
                [getattr(p, "sequence_parallel", False) for p in norm.parameters()],
            )
    try:
        SequenceParallelTorchNorm(tiny_config(layernorm_zero_centered_gamma=True), HIDDEN)
        norms["zero_centered_gamma_error"] = None
    except ValueError as exc:
        norms["zero_centered_gamma_error"] = str(exc)
    out["norms"] = norms
    return out


def _run_pipeline(config, num_microbatches, ref_params, layers, vpp=None) -> tuple:
    """Run get_forward_backward_func on this rank's stage(s); return (losses, grad diff)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    chunks = vpp or 1
    layers_per_chunk = layers // (pp_size * chunks)
    models, offsets = [], []
    for chunk in range(chunks):
        model = build_gpt(config, vp_stage=chunk if vpp else None)
        # Chunk `chunk` of stage `pp_rank` holds global layers starting here.
        offset = (chunk * pp_size + pp_rank) * layers_per_chunk
        state = model.state_dict()
        for name in state:
            if isinstance(state[name], torch.Tensor) and not name.endswith("_extra_state"):
                state[name] = ref_params[_global_layer_name(name, offset)]
        model.load_state_dict(state)
        models.append(model)
        offsets.append(offset)

    batches = token_batches(num_microbatches, seed=1)
    iterators = [iter(batches) for _ in models]
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if vpp else iterators[0],
        model=models if vpp else models[0],
        num_microbatches=num_microbatches,
        seq_length=SEQ,
        micro_batch_size=MBS,
    )
    return losses, models, offsets


def _phase_pipeline() -> dict:
    """PP=2 1F1B and interleaved PP=2 x VPP=2 against one unpipelined model."""
    import torch.distributed as dist

    from regate_megatron.core.cpu_compat import guard_pipeline_p2p

    out = {}
    layers, num_microbatches = 4, 4

    # --- Reference: the whole model on one rank, same microbatches, loss / num_mb.
    reinit_parallel()
    ref_model = build_gpt(tiny_config(layers))
    ref_losses = []
    for tokens, labels in token_batches(num_microbatches, seed=1):
        loss = ref_model(tokens, position_ids(), None, labels=labels).float().mean()
        (loss / num_microbatches).backward()
        ref_losses.append(loss.item())
    ref_params = {n: t for n, t in ref_model.state_dict().items() if isinstance(t, torch.Tensor)}
    ref_grads = {n: p.grad for n, p in ref_model.named_parameters()}
    out["ref_losses"] = ref_losses

    def grad_diff(models, offsets):
        return max(
            max_abs_diff(p.grad, ref_grads[_global_layer_name(n, offset)])
            for model, offset in zip(models, offsets)
            for n, p in model.named_parameters()
        )

    def loss_values(loss_dicts):
        return [d["loss"].item() for d in loss_dicts] if loss_dicts else None

    # --- PP=2, 1F1B (non-interleaved).
    reinit_parallel(pp=2)
    config = tiny_config(layers, pipeline_model_parallel_size=2)
    losses, models, offsets = _run_pipeline(config, num_microbatches, ref_params, layers)
    out["1f1b"] = dict(losses=loss_values(losses), grad_diff=grad_diff(models, offsets))

    # --- Interleaved PP=2 x VPP=2, guarded (batch_p2p_comm turned off) and not.
    reinit_parallel(pp=2, vpp=2)
    for guarded in (True, False):
        config = tiny_config(
            layers, pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2
        )
        flipped = guard_pipeline_p2p(config, dist.get_backend()) if guarded else False
        losses, models, offsets = _run_pipeline(config, num_microbatches, ref_params, layers, 2)
        out["interleaved_guarded" if guarded else "interleaved_unguarded"] = dict(
            losses=loss_values(losses),
            grad_diff=grad_diff(models, offsets),
            flipped=flipped,
            batch_p2p_comm=config.batch_p2p_comm,
        )

    return out


def _two_rank_world(rank: int) -> dict:
    return {
        "attention": _phase_attention(),
        "gpt": _phase_gpt(),
        "tensor_parallel": _phase_tensor_parallel(),
        "pipeline": _phase_pipeline(),
    }


def _fail_on_rank_one(rank: int) -> None:
    import torch.distributed as dist

    if rank == 1:
        raise RuntimeError("deliberate failure on rank one")
    dist.barrier()  # rank 0 would wait here forever: the harness must kill it


def _sleep_forever(rank: int) -> None:
    import time

    time.sleep(3600)


# ======================================================================================
# Fixtures
# ======================================================================================


@pytest.fixture(scope="module")
def two_rank_world() -> list:
    """Results of the 2-rank world, one dict per rank."""
    return run_world(_two_rank_world, 2)


# ======================================================================================
# apply_cpu_compat: import patches nothing, patches installed once, wrap the originals
# ======================================================================================

_PATCH_CHECK = textwrap.dedent(
    """
    import torch
    import regate_megatron.core.cpu_compat as cc
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mpu_random
    from megatron.core.optimizer import clip_grads, optimizer as mcore_optimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.models.vision.clip_vit_model import CLIPViTModel

    targets = {
        "torch.cuda.current_device": (torch.cuda, "current_device"),
        "torch.cuda.synchronize": (torch.cuda, "synchronize"),
        "torch.cuda.current_stream": (torch.cuda, "current_stream"),
        "torch.Tensor.cuda": (torch.Tensor, "cuda"),
        "torch.zeros": (torch, "zeros"),
        "torch.ones": (torch, "ones"),
        "torch.tensor": (torch, "tensor"),
        "random._get_cuda_rng_state": (mpu_random, "_get_cuda_rng_state"),
        "random._set_cuda_rng_state": (mpu_random, "_set_cuda_rng_state"),
        "CudaRNGStatesTracker.add": (mpu_random.CudaRNGStatesTracker, "add"),
        "random.model_parallel_cuda_manual_seed": (mpu_random, "model_parallel_cuda_manual_seed"),
        "tensor_parallel.model_parallel_cuda_manual_seed":
            (tensor_parallel, "model_parallel_cuda_manual_seed"),
        "DistributedOptimizer.__init__": (DistributedOptimizer, "__init__"),
        "clip_grads.clip_grad_by_total_norm_fp32": (clip_grads, "clip_grad_by_total_norm_fp32"),
        "optimizer.clip_grad_by_total_norm_fp32":
            (mcore_optimizer, "clip_grad_by_total_norm_fp32"),
        "CLIPViTModel.__init__": (CLIPViTModel, "__init__"),
    }
    marked = lambda f: getattr(f, cc.PATCH_MARKER, False)
    originals = {k: getattr(o, n) for k, (o, n) in targets.items()}
    assert not [k for k, f in originals.items() if marked(f)], "patched at import"
    assert not hasattr(torch.cuda.current_device, "__wrapped__")

    assert cc.apply_cpu_compat() is True
    patched = {k: getattr(o, n) for k, (o, n) in targets.items()}
    assert not [k for k, f in patched.items() if not marked(f)], "not patched"
    unwrapped = [k for k, f in patched.items() if f.__wrapped__ is not originals[k]]
    assert not unwrapped, ("originals not kept as __wrapped__", unwrapped)

    assert cc.apply_cpu_compat() is True
    again = {k: getattr(o, n) for k, (o, n) in targets.items()}
    assert all(again[k] is patched[k] for k in targets), "second call re-patched"
    rng_logger = __import__("logging").getLogger(mpu_random.__name__)
    assert sum(marked(f) for f in rng_logger.filters) == 1

    # Only CUDA devices are mapped; everything else passes through.
    assert torch.cuda.current_device() == torch.device("cpu")
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.ones(2, device="cuda:0").device.type == "cpu"
    assert torch.tensor([1.0], device=torch.device("cuda", 0)).device.type == "cpu"
    assert torch.zeros(2, device="meta").is_meta
    assert torch.zeros(2).cuda().device.type == "cpu"
    torch.cuda.synchronize()
    torch.cuda.current_stream().wait_stream(torch.cuda.current_stream())  # Megatron >= 0.17 DDP
    print("PATCH-CHECK-OK")
    """
)


@cpu_gloo_only
def test_import_patches_nothing_and_apply_is_idempotent():
    env = dict(os.environ,
               PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-c", _PATCH_CHECK],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "PATCH-CHECK-OK" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_apply_is_noop_with_cuda():
    from regate_megatron.core.cpu_compat import PATCH_MARKER, apply_cpu_compat

    assert apply_cpu_compat() is False
    assert not getattr(torch.cuda.current_device, PATCH_MARKER, False)
    assert not getattr(torch.zeros, PATCH_MARKER, False)


# ======================================================================================
# Guards that need only torch (run in the pytest process)
# ======================================================================================


def _p2p_config(pp, vpp, batch_p2p_comm=True):
    # guard_pipeline_p2p reads and writes only these three fields of the config.
    return types.SimpleNamespace(
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        batch_p2p_comm=batch_p2p_comm,
    )


def test_guard_pipeline_p2p_only_fires_for_interleaved_pp2_on_gloo():
    config = _p2p_config(2, 2)
    assert guard_pipeline_p2p(config, "gloo") is True and config.batch_p2p_comm is False
    assert guard_pipeline_p2p(config, "gloo") is False  # already off
    for config, backend in [
        (_p2p_config(2, 2), "nccl"),
        (_p2p_config(2, None), "gloo"),
        (_p2p_config(4, 2), "gloo"),
        (_p2p_config(1, None), "gloo"),
    ]:
        assert guard_pipeline_p2p(config, backend) is False and config.batch_p2p_comm is True
    # Sizes passed explicitly win over the config's.
    config = _p2p_config(None, None)
    assert guard_pipeline_p2p(config, "gloo", 2, 2) is True and config.batch_p2p_comm is False


# ======================================================================================
# tests/dist.py harness
# ======================================================================================


@cpu_gloo_only
def test_run_world_surfaces_rank_traceback_and_kills_waiting_ranks():
    with pytest.raises(WorldError) as info:
        run_world(_fail_on_rank_one, 2, timeout=120)
    message = str(info.value)
    assert "rank 1 of 2" in message
    assert "deliberate failure on rank one" in message and "Traceback" in message


@cpu_gloo_only
def test_run_world_timeout_kills_ranks():
    with pytest.raises(WorldError, match="timed out"):
        run_world(_sleep_forever, 1, timeout=8)


# ======================================================================================
# TorchSDPACoreAttention
# ======================================================================================


@cpu_gloo_only
def test_sdpa_core_attention_matches_hand_written_reference(two_rank_world):
    attention = two_rank_world[0]["attention"]
    for key, diff in attention.items():
        if key.startswith("ref/"):
            assert diff < 1e-5, (key, diff)
    assert attention["shape/groups4"] == (SEQ, MBS, HIDDEN)
    assert attention["shape/groups2"] == (SEQ, MBS, HIDDEN)


@cpu_gloo_only
def test_sdpa_core_attention_matches_megatron_dot_product_attention(two_rank_world):
    for key, diff in two_rank_world[0]["attention"].items():
        if key.startswith("stock/"):
            assert diff < 1e-5, (key, diff)


@cpu_gloo_only
def test_sdpa_core_attention_dropout_only_in_training(two_rank_world):
    attention = two_rank_world[0]["attention"]
    assert attention["dropout/eval_diff"] < 1e-5
    assert attention["dropout/train_diff"] > 1e-2


@cpu_gloo_only
def test_sdpa_core_attention_refuses_unsupported_inputs(two_rank_world):
    errors = two_rank_world[0]["attention"]["errors"]
    assert errors["packed_seq_params"].startswith("NotImplementedError")
    assert "packed_seq_params" in errors["packed_seq_params"]
    assert errors["attention_bias"].startswith("NotImplementedError")
    assert errors["context_parallel"].startswith("ValueError")
    assert "context_parallel_size" in errors["context_parallel"]
    assert errors["float_mask"].startswith("TypeError")


# ======================================================================================
# GPTModel on CPU
# ======================================================================================


@cpu_gloo_only
def test_gpt_forward_backward_on_cpu(two_rank_world):
    gpt = two_rank_world[0]["gpt"]
    assert gpt["loss_shape"] == (MBS, SEQ)
    assert 3.0 < gpt["loss"] < 5.5  # ~ln(VOCAB) at init
    assert gpt["params_without_grad"] == []
    assert gpt["stock_init_diff"] == 0.0
    assert gpt["stock_logits_diff"] < 1e-5
    assert 3.0 < gpt["rope_loss"] < 5.5


@cpu_gloo_only
def test_activation_recompute_replays_dropout_rng(two_rank_world):
    gpt = two_rank_world[0]["gpt"]
    stored, recomputed = gpt["recompute_losses"]
    assert stored == recomputed
    assert gpt["recompute_grad_diff"] == 0.0
    assert abs(stored - gpt["eval_loss_with_dropout_cfg"]) > 1e-4  # dropout was active


# ======================================================================================
# Tensor parallel + sequence parallel, RNG, LLaVA, norms
# ======================================================================================


@cpu_gloo_only
def test_tp2_sequence_parallel_matches_tp1(two_rank_world):
    for rank_result in two_rank_world:
        tp = rank_result["tensor_parallel"]
        assert tp["sp_init_diff"] == 0.0
        assert tp["sp_losses"] == pytest.approx(tp["ref_losses"], abs=1e-6)
        assert tp["sp_grad_diff"] < 1e-6
        # Every norm weight and bias (2 layers x 2 norms + final norm) is marked (as are
        # the row-parallel biases, by Megatron itself).
        assert tp["sp_marked_norm_params"] == tp["sp_norm_params"]
        assert len(tp["sp_norm_params"]) == 10
        assert 3.0 < tp["sp_dropout_loss"] < 5.5


@cpu_gloo_only
def test_rng_tracker_streams_on_cpu(two_rank_world):
    rng = [r["tensor_parallel"]["rng"] for r in two_rank_world]
    assert rng[0]["default"] == rng[1]["default"]  # seeded like the CUDA default generator
    assert rng[0]["tp_stream"] != rng[1]["tp_stream"]  # TP ranks differ in TP regions
    assert rng[0]["fork_kept_default_stream"] and rng[1]["fork_kept_default_stream"]


@cpu_gloo_only
def test_llava_forward_backward_tp1_tp2(two_rank_world):
    for rank_result in two_rank_world:
        tp = rank_result["tensor_parallel"]
        (loss1, shape1), (loss2, shape2) = tp["llava_tp1"], tp["llava_tp2"]
        # 1 image token -> 4 patches + class token: 8 - 1 + 5 positions.
        assert shape1 == shape2 == (MBS, SEQ - 1 + 5)
        assert loss1 == pytest.approx(loss2, abs=1e-5)


@cpu_gloo_only
def test_sequence_parallel_torch_norm(two_rank_world):
    norms = two_rank_world[0]["tensor_parallel"]["norms"]
    assert norms["LayerNorm/sp=False"] == ("LayerNorm", 1e-6, [False, False])
    assert norms["LayerNorm/sp=True"] == ("LayerNorm", 1e-6, [True, True])
    assert norms["RMSNorm/sp=False"] == ("RMSNorm", 1e-6, [False])
    assert norms["RMSNorm/sp=True"] == ("RMSNorm", 1e-6, [True])
    assert "layernorm_zero_centered_gamma" in norms["zero_centered_gamma_error"]


# ======================================================================================
# Pipeline parallel
# ======================================================================================


def _last_stage(world, key):
    """The pipeline result of the rank that holds the losses (the last stage)."""
    results = [r["pipeline"][key] for r in world if r["pipeline"][key]["losses"] is not None]
    assert len(results) == 1
    return results[0]


@cpu_gloo_only
def test_pp2_1f1b_matches_unpipelined(two_rank_world):
    ref_losses = two_rank_world[0]["pipeline"]["ref_losses"]
    assert _last_stage(two_rank_world, "1f1b")["losses"] == pytest.approx(ref_losses, abs=1e-6)
    for rank_result in two_rank_world:
        assert rank_result["pipeline"]["1f1b"]["grad_diff"] < 1e-6


@cpu_gloo_only
def test_interleaved_pp2_vpp2_guard(two_rank_world):
    ref_losses = two_rank_world[0]["pipeline"]["ref_losses"]
    guarded = _last_stage(two_rank_world, "interleaved_guarded")
    assert guarded["flipped"] and guarded["batch_p2p_comm"] is False
    assert guarded["losses"] == pytest.approx(ref_losses, abs=1e-6)
    for rank_result in two_rank_world:
        assert rank_result["pipeline"]["interleaved_guarded"]["grad_diff"] < 1e-6

    # Why the guard exists (Megatron-Core 0.16.1 + gloo): unguarded, activations and
    # gradients of the two directions swap with no error. If this starts to match,
    # upstream fixed it and the guard can be relaxed.
    unguarded_grad_diff = max(
        r["pipeline"]["interleaved_unguarded"]["grad_diff"] for r in two_rank_world)
    unguarded = _last_stage(two_rank_world, "interleaved_unguarded")
    assert unguarded["batch_p2p_comm"] is True
    assert unguarded_grad_diff > 1e-3 or unguarded["losses"] != pytest.approx(ref_losses, abs=1e-6)

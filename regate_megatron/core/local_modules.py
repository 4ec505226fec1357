"""Modules for Megatron-Core layer specs that run on CPU as well as GPU.

Megatron-Core's "local" backend has two modules that do not fit a CPU/gloo run
or the routed span:

* ``DotProductAttention`` draws its score buffer from a CUDA global memory
  buffer and uses the fused-softmax path; :class:`TorchSDPACoreAttention` is a
  drop-in core attention built on ``torch.nn.functional.scaled_dot_product_attention``
  (flash / memory-efficient kernels on GPU, the math kernel on CPU), so CPU
  tests exercise the same code path, shape for shape, as a GPU run without TE.
* ``WrappedTorchNorm`` refuses ``sequence_parallel=True``;
  :class:`SequenceParallelTorchNorm` accepts it and marks its parameters so
  that ``finalize_model_grads`` all-reduces their gradients over the
  tensor-parallel group.

Both are used by swapping them into a spec, e.g.
``spec.submodules.self_attention.submodules.core_attention = TorchSDPACoreAttention``.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import divide
from torch import Tensor

__all__ = ["TorchSDPACoreAttention", "SequenceParallelTorchNorm"]

# Mask types for which a query may only attend to keys at or before its own position.
_CAUSAL_MASK_TYPES = (
    AttnMaskType.causal,
    AttnMaskType.padding_causal,
    AttnMaskType.causal_bottom_right,
)


class TorchSDPACoreAttention(MegatronModule):
    """Core attention ``softmax(Q K^T * scale + mask) V`` via torch SDPA.

    Same constructor and ``forward`` signature as Megatron-Core's
    ``DotProductAttention``: query ``[sq, b, np, hn]``, key/value
    ``[sk, b, ng, hn]`` (``ng`` query groups per partition, GQA when
    ``ng < np``) -> context ``[sq, b, np * hn]``.

    Masking:

    * ``attention_mask`` is boolean with Megatron's convention, ``True`` = masked
      out, broadcastable to ``[b, np, sq, sk]``.
    * For the causal mask types (``causal``, ``padding_causal``,
      ``causal_bottom_right``) the causal constraint is always applied and an
      explicit mask is combined with it (logical or). Megatron's
      ``DotProductAttention`` instead lets an explicit mask replace the causal
      one; both agree whenever the given mask is itself causal, which is what
      Megatron's data pipeline produces.
    * ``causal`` aligns the triangle top-left and needs ``sq == sk`` (or
      ``sq == 1``, a decode step, which sees every key); ``causal_bottom_right``
      aligns it bottom-right for ``sq != sk``.
    * A query row whose keys are all masked gets a zero context vector (torch
      SDPA behaviour), where ``DotProductAttention`` would average all values.

    Not supported (refused with an error): packed sequences
    (``packed_seq_params``), context parallelism, ``attention_bias``, sliding
    window attention and non-vanilla ``softmax_type``.

    ``apply_query_key_layer_scaling`` is accepted and has no effect: in
    ``DotProductAttention`` it divides the scores by the layer number and the
    fp32 softmax multiplies them back (a range trick for fp16 score matrices),
    so the result is the same softmax.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        self.config: TransformerConfig = config

        if config.context_parallel_size != 1:
            raise ValueError(
                f"TorchSDPACoreAttention does not support context parallelism "
                f"(context_parallel_size={config.context_parallel_size}); "
                f"set context_parallel_size=1 or use TEDotProductAttention."
            )
        if config.softmax_type != "vanilla":
            raise ValueError(
                f"TorchSDPACoreAttention supports only softmax_type='vanilla', "
                f"got softmax_type={config.softmax_type!r}; use DotProductAttention or TE."
            )
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq,
                                     layer_number):
            raise ValueError(
                f"TorchSDPACoreAttention does not support sliding window attention "
                f"(window_size={config.window_size}); unset window_size or use "
                f"DotProductAttention / TE."
            )

        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type

        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        elif not hasattr(pg_collection, "tp"):
            raise ValueError("TorchSDPACoreAttention needs pg_collection.tp (the TP group).")
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        tp_size = self.tp_group.size()

        # Heads are split over TP ranks; each rank attends with its own heads.
        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection_size, tp_size)
        self.hidden_size_per_attention_head = divide(projection_size, config.num_attention_heads)
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.num_query_groups_per_partition = divide(config.num_query_groups, tp_size)
        # Query heads sharing one key/value head (1 = plain multi-head attention).
        self.heads_per_group = divide(
            self.num_attention_heads_per_partition, self.num_query_groups_per_partition
        )

        if softmax_scale is None:
            softmax_scale = 1.0 / math.sqrt(self.hidden_size_per_attention_head)
        self.softmax_scale = softmax_scale
        self.attention_dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )

    def _attend_mask(
        self,
        attention_mask: Optional[Tensor],
        attn_mask_type: AttnMaskType,
        sq: int,
        sk: int,
        device: torch.device,
    ) -> tuple[Optional[Tensor], bool]:
        """Build SDPA's mask: ``(attn_mask with True = attend, is_causal)``."""
        causal = attn_mask_type in _CAUSAL_MASK_TYPES
        if causal and attn_mask_type != AttnMaskType.causal_bottom_right and sq != sk:
            if sq != 1:
                raise ValueError(
                    f"attn_mask_type={attn_mask_type.name} needs sq == sk, got sq={sq}, sk={sk}; "
                    f"use AttnMaskType.causal_bottom_right for queries aligned to the last keys."
                )
            causal = False  # one query (a decode step) sees every key, as in DotProductAttention

        if attention_mask is None:
            if causal and sq == sk:
                return None, True
            if causal:
                # [sq, sk]: query i sees keys up to (sk - sq + i), the bottom-right triangle.
                keep = torch.ones(sq, sk, dtype=torch.bool, device=device)
                return keep.tril(diagonal=sk - sq), False
            return None, False

        if attention_mask.dtype != torch.bool:
            raise TypeError(
                f"attention_mask must be boolean (True = masked out), got {attention_mask.dtype}."
            )
        masked_out = attention_mask
        if causal:
            # [sq, sk] True above the (bottom-right aligned) diagonal = future keys.
            future = torch.ones(sq, sk, dtype=torch.bool, device=device).triu(
                diagonal=sk - sq + 1
            )
            masked_out = masked_out | future  # broadcasts to [b or 1, np or 1, sq, sk]
        return ~masked_out, False

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> Tensor:
        """Attend. query ``[sq, b, np, hn]``, key/value ``[sk, b, ng, hn]``
        -> ``[sq, b, np*hn]``."""
        if packed_seq_params is not None:
            raise NotImplementedError(
                "TorchSDPACoreAttention does not support packed sequences (packed_seq_params); "
                "pass unpacked [s, b] batches or use TEDotProductAttention."
            )
        if attention_bias is not None:
            raise NotImplementedError(
                "TorchSDPACoreAttention does not support attention_bias; fold it into the model "
                "or use TEDotProductAttention."
            )
        if attn_mask_type is None:
            attn_mask_type = self.attn_mask_type
        sq, b, np_, hn = query.shape
        sk = key.shape[0]

        if self.heads_per_group > 1:
            # GQA: query head j uses key/value group j // heads_per_group.
            # [sk, b, ng, hn] -> [sk, b, np, hn]
            key = key.repeat_interleave(self.heads_per_group, dim=2)
            value = value.repeat_interleave(self.heads_per_group, dim=2)

        # [sq, b, np, hn] -> [b, np, sq, hn]
        q = query.permute(1, 2, 0, 3)
        # [sk, b, np, hn] -> [b, np, sk, hn]
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)

        attn_mask, is_causal = self._attend_mask(
            attention_mask, attn_mask_type, sq, sk, query.device
        )
        dropout_p = self.attention_dropout_p if self.training else 0.0

        if dropout_p > 0.0 and not self.config.sequence_parallel:
            # Heads differ per TP rank, so dropout draws from the TP-rank RNG stream
            # (as DotProductAttention does); under sequence parallelism the caller's
            # RNG context already applies.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                    is_causal=is_causal, scale=self.softmax_scale,
                )
        else:
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                is_causal=is_causal, scale=self.softmax_scale,
            )

        # [b, np, sq, hn] -> [sq, b, np, hn]
        context = context.permute(2, 0, 1, 3).contiguous()
        # [sq, b, np, hn] -> [sq, b, np * hn]
        return context.view(sq, b, np_ * hn)


class SequenceParallelTorchNorm:
    """``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm`` for layer specs, sequence-parallel aware.

    Called like Megatron-Core's ``WrappedTorchNorm`` (and usable wherever a spec
    takes it), returning a plain torch norm chosen by ``config.normalization``.
    Unlike ``WrappedTorchNorm`` it accepts ``config.sequence_parallel=True``:
    each rank then normalises its own sequence shard, so the weight/bias
    gradients are partial sums, and the parameters are marked
    ``sequence_parallel`` for ``finalize_model_grads`` to all-reduce them over
    the tensor-parallel group (the same mark Megatron's fused norms set).
    """

    def __new__(
        cls,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ) -> torch.nn.Module:
        if config.layernorm_zero_centered_gamma:
            raise ValueError(
                "SequenceParallelTorchNorm does not support layernorm_zero_centered_gamma=True; "
                "unset it or use TENorm."
            )
        if config.persist_layer_norm:
            raise ValueError(
                "SequenceParallelTorchNorm does not support persist_layer_norm=True; unset it."
            )
        if config.memory_efficient_layer_norm:
            raise ValueError(
                "SequenceParallelTorchNorm does not support memory_efficient_layer_norm=True; "
                "unset it."
            )

        # Like WrappedTorchNorm, the config decides (the `normalization` argument is
        # kept for signature compatibility).
        if config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(normalized_shape=hidden_size, eps=eps)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(normalized_shape=hidden_size, eps=eps)
        else:
            raise ValueError(
                f"SequenceParallelTorchNorm supports normalization 'LayerNorm' or 'RMSNorm', "
                f"got config.normalization={config.normalization!r}."
            )

        if config.sequence_parallel:
            for param in norm.parameters():
                param.sequence_parallel = True
        return norm

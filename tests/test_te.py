"""Transformer Engine backend: the same router invariants with TE layers. Runs only
where Transformer Engine and a GPU are present; skips cleanly elsewhere."""

import pytest
import torch

from regate_megatron.core.spec import have_transformer_engine

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and have_transformer_engine()),
    reason="needs Transformer Engine on a CUDA GPU",
)


def test_te_backend_rho_one_is_stock_and_routed_logits_match_compacted(megatron_world):
    import dataclasses

    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_layer import TransformerLayer
    from models import MAX_SEQ, VOCAB, make_batch, tiny_config

    from regate_megatron.config import ReGateConfig
    from regate_megatron.core.model import ReGateGPTModel
    from regate_megatron.core.selection import select_top_targets
    from regate_megatron.core.spec import get_regate_decoder_block_spec
    from regate_megatron.training.parallel import rank_device

    device = rank_device()
    config = tiny_config(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                         init_method_std=0.3)

    def build(layer_module, cls, cfg=config, embedding="rope", **kw):
        torch.manual_seed(1)
        spec = get_regate_decoder_block_spec(cfg, backend="te", layer_module=layer_module)
        return cls(config=cfg, transformer_layer_spec=spec, vocab_size=VOCAB,
                   max_sequence_length=MAX_SEQ, position_embedding_type=embedding, **kw).to(device)

    from regate_megatron.core.layer import ReGateTransformerLayer

    stock = build(TransformerLayer, GPTModel)
    routed = build(ReGateTransformerLayer, ReGateGPTModel, regate_config=ReGateConfig(enabled=True))
    routed.load_state_dict(stock.state_dict())
    # Stock mrope honours per-sample position ids: the independent reference.
    mrope_cfg = dataclasses.replace(config, mrope_section=[6, 1, 1])  # head_dim 16 / 2
    reference = build(TransformerLayer, GPTModel, cfg=mrope_cfg, embedding="mrope")
    reference.load_state_dict(stock.state_dict())
    tokens, labels, pos, targets, scores = (t.to(device) for t in make_batch(0))
    dense = select_top_targets(scores, targets, 1.0)
    assert torch.equal(routed(tokens, pos, None, labels=labels, token_selection=dense),
                       stock(tokens, pos, None, labels=labels))
    sel = select_top_targets(scores, targets, 0.5)
    with torch.no_grad():
        logits = routed(tokens, pos, None, token_selection=sel)
        for i in range(tokens.shape[0]):
            keep = sel.keep_index[i][sel.keep_index[i] >= 0]
            ref = reference(tokens[i:i + 1, keep], keep[None].expand(3, 1, -1), None)[0]
            torch.testing.assert_close(logits[i, keep], ref, rtol=1e-4, atol=1e-4)

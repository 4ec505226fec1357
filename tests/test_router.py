"""Router on one rank: ρ=1 equals stock Megatron-Core, kept-token logits equal a dense
run on the compacted sequence (original positions), elided rows pass through the span,
and every bad input fails before compute."""

import pytest
import torch
from models import build_gpt, make_batch, tiny_config

from regate_megatron.config import ReGateConfig
from regate_megatron.core.selection import select_top_targets


def _stock_and_routed(config, **regate):
    stock = build_gpt(config, routed=False)
    routed = build_gpt(config, routed=True, regate=ReGateConfig(enabled=True, **regate))
    routed.load_state_dict(stock.state_dict())
    return stock, routed


def test_keep_ratio_one_is_stock_megatron(megatron_world):
    config = tiny_config(num_layers=3)
    stock, routed = _stock_and_routed(config)
    tokens, labels, pos, targets, scores = make_batch(0)
    selection = select_top_targets(scores, targets, 1.0)
    assert selection.is_dense
    loss_ref = stock(tokens, pos, None, labels=labels)
    loss = routed(tokens, pos, None, labels=labels, token_selection=selection)
    assert torch.equal(loss, loss_ref)
    (loss_ref * targets).sum().backward()
    (loss * targets).sum().backward()
    for (name, p_ref), (_, p) in zip(stock.named_parameters(), routed.named_parameters()):
        assert torch.equal(p.grad, p_ref.grad), name
    with torch.no_grad():
        logits_ref = stock(tokens, pos, None)
        logits = routed(tokens, pos, None, token_selection=selection)
    assert torch.equal(logits[targets], logits_ref[targets])


def test_kept_logits_equal_dense_run_on_compacted_sequence(megatron_world):
    """Span = all layers, ρ < 1, RoPE: stock mrope honours per-sample position ids."""
    config = tiny_config(num_layers=3, init_method_std=0.3)  # sharp attention: positions matter
    routed = build_gpt(config, routed=True)
    dense = build_gpt(config, routed=False, position_embedding_type="mrope")
    dense.load_state_dict(routed.state_dict())
    tokens, labels, pos, targets, scores = make_batch(1)
    selection = select_top_targets(scores, targets, 0.4)
    kept_total, kept = selection.num_targets()
    assert kept < kept_total
    with torch.no_grad():
        logits = routed(tokens, pos, None, token_selection=selection)
        for i in range(tokens.shape[0]):
            keep = selection.keep_index[i][selection.keep_index[i] >= 0]
            ids = keep[None, :]
            ref = dense(tokens[i:i + 1, keep], ids.expand(3, 1, -1), None)[0]
            torch.testing.assert_close(logits[i, keep], ref, rtol=1e-5, atol=1e-5)
            # Renumbering positions 0..k-1 changes the logits: the check sees positions.
            shifted = dense(tokens[i:i + 1, keep],
                            torch.arange(keep.numel())[None].expand(3, 1, -1), None)[0]
            assert (logits[i, keep] - shifted).abs().max() > 1e-2
            # Elided positions get no logits at all.
            elided = torch.ones(tokens.shape[1], dtype=torch.bool)
            elided[keep] = False
            assert torch.count_nonzero(logits[i, elided]) == 0


def test_partial_span_passes_elided_rows_through(megatron_world):
    config = tiny_config(num_layers=4)
    model = build_gpt(config, routed=True, regate=ReGateConfig(enabled=True, layers=(1, 3)))
    tokens, labels, pos, targets, scores = make_batch(2)
    selection = select_top_targets(scores, targets, 0.5)
    seen, rows = {}, []
    layers = model.decoder.layers

    def span_in(_, args, kwargs):
        seen["in"] = kwargs["hidden_states"]
        seen["in"].retain_grad()

    def span_out(_, args, kwargs, output):
        seen["out"] = output[0]
        seen["out"].retain_grad()

    layers[1].register_forward_pre_hook(span_in, with_kwargs=True)
    layers[2].register_forward_hook(span_out, with_kwargs=True)
    for layer in layers:
        layer.mlp.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    loss = model(tokens, pos, None, labels=labels, token_selection=selection)
    (loss * selection.computed_loss_mask()).sum().backward()

    s, width = tokens.shape[1], selection.keep_index.shape[1]
    assert rows == [s, width, width, s]  # layers 1, 2 computed only the kept tokens
    keep = selection.keep_mask().t()  # [b, s] -> [s, b]
    x, y = seen["in"], seen["out"]
    assert torch.equal(y[~keep], x[~keep])  # elided rows unchanged across the span
    assert not torch.allclose(y[keep], x[keep])
    assert torch.equal(x.grad[~keep], y.grad[~keep])  # and get no gradient from it
    # Loss only on kept targets.
    assert torch.count_nonzero(loss[~selection.computed_loss_mask()]) == 0
    assert bool((loss[selection.computed_loss_mask()] > 0).all())


def test_selection_must_fit_the_batch(megatron_world):
    model = build_gpt(tiny_config(), routed=True)
    tokens, labels, pos, targets, scores = make_batch(3)
    selection = select_top_targets(scores[:, :-1], targets[:, :-1], 0.5)
    with pytest.raises(ValueError, match="token_selection is for"):
        model(tokens, pos, None, labels=labels, token_selection=selection)


def test_span_outside_model_is_rejected(megatron_world):
    with pytest.raises(ValueError, match="--regate-layers 1:5 is outside"):
        build_gpt(tiny_config(num_layers=4), regate=ReGateConfig(enabled=True, layers=(1, 5)))


def test_routing_needs_routable_layers(megatron_world):
    from regate_megatron.core.router import TokenRouter

    stock = build_gpt(tiny_config(), routed=False)
    with pytest.raises(TypeError, match="get_regate_layer_spec"):
        TokenRouter((0, 2)).bind(stock.decoder.layers)

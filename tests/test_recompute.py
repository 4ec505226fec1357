"""Activation recomputation of routed forwards, one rank: every `--recompute-granularity`
/ `--recompute-method` / `--recompute-num-layers` layout gives exactly the loss and the
gradients of the same routed model without recomputation (fp32), also with several
micro-batches whose backward passes run after later forwards (the 1F1B order); ρ=1 with
recomputation is stock Megatron-Core with recomputation. Dropout is on: both runs of a
comparison start from the same CPU and RNG-tracker seeds. Selective recomputation is tested
on ``core_attn``: stock 0.16.1 on CPU recurses without end recomputing ``mlp`` and needs TE
for ``layernorm``."""

import dataclasses

import pytest
import torch
from megatron.core import tensor_parallel
from models import build_gpt, make_batch, run_schedule, tiny_config

from regate_megatron.config import ReGateConfig
from regate_megatron.core.selection import select_top_targets

LAYOUTS = [
    dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
    dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=2),
    dict(recompute_granularity="selective", recompute_modules=["core_attn"]),
]
SPANS = [None, (1, 3)]  # all layers; layers 2-3 of 4, so chunks open and close mid-span


def _name(layout):
    return "-".join(str(v) for v in layout.values()).replace("[", "").replace("]", "")


def _models(layout, span, **overrides):
    base = tiny_config(num_layers=4, hidden_dropout=0.2, attention_dropout=0.2, **overrides)
    regate = ReGateConfig(enabled=True, **({} if span is None else {"layers": span}))
    plain = build_gpt(base, routed=True, regate=regate)
    recomputed = build_gpt(dataclasses.replace(base, **layout), routed=True, regate=regate)
    recomputed.load_state_dict(plain.state_dict())
    return plain, recomputed


def _seed(seed):
    """The same dropout masks in both models: the CPU generator and the RNG tracker's."""
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _step(model, batches, selections, seed=7):
    """Loss and grads of one forward/backward of every micro-batch (Megatron's schedule)."""
    model.zero_grad(set_to_none=True)
    _seed(seed)
    losses = run_schedule(model, batches, selections)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return torch.stack([d["lm loss"] for d in losses]), grads


def _batches(n):
    out, selections = [], []
    for i in range(n):
        tokens, labels, pos, targets, scores = make_batch(10 + i)
        out.append((tokens, labels, pos, targets))
        selections.append(select_top_targets(scores, targets, 0.4))
    return out, selections


@pytest.mark.parametrize("span", SPANS, ids=["all-layers", "layers-2-3"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=[_name(x) for x in LAYOUTS])
def test_recomputed_routed_step_equals_the_step_without_recomputation(megatron_world,
                                                                      layout, span):
    plain, recomputed = _models(layout, span)
    batches, selections = _batches(3)
    assert not any(s.is_dense for s in selections)
    loss_ref, grads_ref = _step(plain, batches, selections)
    loss, grads = _step(recomputed, batches, selections)
    assert torch.equal(loss, loss_ref)
    assert not torch.equal(_step(plain, batches, selections, seed=8)[0], loss_ref)  # dropout on
    assert grads.keys() == grads_ref.keys() and len(grads) == len(list(plain.parameters()))
    for name, g in grads.items():
        assert torch.equal(g, grads_ref[name]), name


def test_backward_after_later_forwards_recomputes_each_micro_batch_with_its_own_route(
        megatron_world):
    """Forward 1, forward 2, backward 1, backward 2 (1F1B's warm-up order), each micro-batch
    with another selection: the re-run of micro-batch 1 must not use micro-batch 2's route."""
    plain, recomputed = _models(LAYOUTS[0], (1, 3))
    batches, selections = _batches(2)
    assert not torch.equal(selections[0].keep_index, selections[1].keep_index)
    results = []
    for model in (plain, recomputed):
        model.zero_grad(set_to_none=True)
        _seed(3)
        losses = [model(tokens, pos, None, labels=labels, token_selection=selection)
                  for (tokens, labels, pos, _), selection in zip(batches, selections)]
        assert model.token_router.active is None
        for loss, selection in zip(losses, selections):
            (loss * selection.computed_loss_mask()).sum().backward()
        results.append(({n: p.grad.clone() for n, p in model.named_parameters()},
                        torch.stack([loss.detach() for loss in losses])))
    (grads_ref, loss_ref), (grads, loss) = results
    assert torch.equal(loss, loss_ref)
    for name, g in grads.items():
        assert torch.equal(g, grads_ref[name]), name


def test_keep_ratio_one_with_recomputation_is_stock_megatron(megatron_world):
    layout = LAYOUTS[1]
    config = dataclasses.replace(
        tiny_config(num_layers=4, hidden_dropout=0.2, attention_dropout=0.2), **layout)
    stock = build_gpt(config, routed=False)
    routed = build_gpt(config, routed=True)
    routed.load_state_dict(stock.state_dict())
    batches, selections = _batches(2)
    dense = [select_top_targets(torch.rand_like(t, dtype=torch.float), t, 1.0)
             for (_, _, _, t) in batches]
    assert all(s.is_dense for s in dense)
    loss_ref, grads_ref = _step(stock, batches, None)
    loss, grads = _step(routed, batches, dense)
    assert torch.equal(loss, loss_ref)
    for name, g in grads.items():
        assert torch.equal(g, grads_ref[name]), name


def test_unsupported_recomputation_is_refused_by_name(megatron_world):
    full = dict(recompute_granularity="full", recompute_method="uniform")
    config = tiny_config(num_layers=2, recompute_num_layers=1, distribute_saved_activations=True,
                         **full)
    with pytest.raises(ValueError, match="--distribute-saved-activations"):
        build_gpt(config, routed=True)
    # stock Megatron-Core fails at the first forward with an IndexError; ReGATE says why
    with pytest.raises(ValueError, match="--recompute-num-layers .3. .* the 4 layers"):
        build_gpt(tiny_config(num_layers=4, recompute_num_layers=3, **full), routed=True)

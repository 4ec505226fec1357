"""The router's invariants and a ReGATE LLaVA training step on a CUDA GPU (`pytest -m gpu`,
run by `benchmarks/gpu_check.sh`); every test skips cleanly without CUDA.

- rho = 1 is stock Megatron-Core: bitwise in fp32 (the same kernels run: a dense selection
  takes `GPTModel.forward` itself), within bf16 tolerance in bf16;
- kept tokens' logits equal a dense run on the compacted sequence with the original
  positions (stock mrope honours per-sample position ids), with the GPU's padding of the
  kept length to a multiple of 16;
- full activation recomputation of a routed span gives the step without it (the same
  kernels re-run; within fp32 / bf16 tolerance, since attention backward kernels may
  accumulate in another order);
- selections come back from a broadcast on the GPU on the source rank too;
- a `regate-train` LLaVA student step with ReGATE (routed, bf16), its evaluation and greedy
  decoding receive every tensor on the rank's device;
- the distributed optimizer resumes exactly with torch Adam on CUDA (the fixes of
  `regate_megatron.training.optimizer_state` are needed there too, not only on CPU).

``REGATE_GPU_TESTS_ON_CPU=1`` runs them on the CPU instead (gloo, no padding to 16): how
``benchmarks/gpu_check.sh --dry-run`` checks its plumbing on a machine without a GPU.
"""

import dataclasses
import os

import pytest
import torch
from dist import run_world

ON_CPU = os.environ.get("REGATE_GPU_TESTS_ON_CPU") == "1"  # plumbing check without a GPU

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() or ON_CPU), reason="needs a CUDA GPU"),
]


def _device():
    from regate_megatron.training.parallel import rank_device

    return rank_device()


def _models(dtype, num_layers=3, **config):
    """Stock GPT, the routed one with the same weights and an mrope reference, on the GPU."""
    from models import build_gpt, tiny_config

    from regate_megatron.config import ReGateConfig

    bf16 = dtype == torch.bfloat16
    cfg = tiny_config(num_layers=num_layers, hidden_size=64, num_attention_heads=4,
                      ffn_hidden_size=128, params_dtype=dtype, pipeline_dtype=dtype, bf16=bf16,
                      **config)
    stock = build_gpt(cfg, routed=False).to(_device())
    routed = build_gpt(cfg, routed=True, regate=ReGateConfig(enabled=True)).to(_device())
    routed.load_state_dict(stock.state_dict())
    reference = build_gpt(cfg, routed=False, position_embedding_type="mrope").to(_device())
    reference.load_state_dict(stock.state_dict())
    return stock, routed, reference


def _batch(seed=0):
    from models import make_batch

    return [t.to(_device()) for t in make_batch(seed, b=3, s=32, prompt=6)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rho_one_equals_stock_megatron(megatron_world, dtype):
    from regate_megatron.core.selection import select_top_targets

    stock, routed, _ = _models(dtype)
    tokens, labels, pos, targets, scores = _batch()
    selection = select_top_targets(scores, targets, 1.0).to(_device())
    assert selection.is_dense
    loss_ref = stock(tokens, pos, None, labels=labels)
    loss = routed(tokens, pos, None, labels=labels, token_selection=selection)
    (loss_ref.float() * targets).sum().backward()
    (loss.float() * targets).sum().backward()
    grads = [(n, p.grad, q.grad) for (n, p), (_, q)
             in zip(stock.named_parameters(), routed.named_parameters(), strict=True)]
    if dtype == torch.float32:
        assert torch.equal(loss, loss_ref), (loss - loss_ref).abs().max()
        for name, g_ref, g in grads:
            assert torch.equal(g, g_ref), (name, (g - g_ref).abs().max())
    else:
        torch.testing.assert_close(loss, loss_ref)  # bf16 defaults: rtol 1.6e-2, atol 1e-5
        for name, g_ref, g in grads:
            torch.testing.assert_close(g, g_ref, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_routed_logits_equal_compacted_dense_run(megatron_world, dtype):
    from regate_megatron.core.selection import select_top_targets

    _, routed, reference = _models(dtype, init_method_std=0.3)
    cuda = _device().type == "cuda"
    assert routed.token_router.pad_multiple_for() == (16 if cuda else 1)  # tensor-core widths
    tokens, labels, pos, targets, scores = _batch(1)
    selection = select_top_targets(scores, targets, 0.4).to(_device())
    with torch.no_grad():
        logits = routed(tokens, pos, None, token_selection=selection).float()
        for i in range(tokens.shape[0]):
            keep = selection.keep_index[i][selection.keep_index[i] >= 0]
            ref = reference(tokens[i:i + 1, keep], keep[None].expand(3, 1, -1), None)[0].float()
            if dtype == torch.float32:
                torch.testing.assert_close(logits[i, keep], ref, rtol=1e-4, atol=1e-4)
            else:  # other sequence lengths pick other bf16 kernels: bf16 rounding, not more
                err = (logits[i, keep] - ref).abs().max().item()
                assert err <= 0.05 * ref.abs().max().item() + 0.05, err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_full_recomputation_of_a_routed_span_equals_the_stored_step(megatron_world, dtype):
    from regate_megatron.core.selection import select_top_targets

    _, routed, _ = _models(dtype)
    _, recomputed, _ = _models(dtype, recompute_granularity="full", recompute_method="uniform",
                               recompute_num_layers=1)
    recomputed.load_state_dict(routed.state_dict())
    tokens, labels, pos, targets, scores = _batch(2)
    selection = select_top_targets(scores, targets, 0.4).to(_device())
    assert not selection.is_dense
    out = []
    for model in (routed, recomputed):
        loss = model(tokens, pos, None, labels=labels, token_selection=selection)
        (loss.float() * selection.computed_loss_mask()).sum().backward()
        out.append((loss, {n: p.grad for n, p in model.named_parameters()}))
    (loss_ref, grads_ref), (loss, grads) = out
    rtol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(loss, loss_ref, rtol=rtol, atol=rtol)
    assert grads.keys() == grads_ref.keys()
    for name, g in grads.items():
        ref = grads_ref[name]
        atol = rtol * ref.abs().max().item() + 1e-6
        torch.testing.assert_close(g, ref, rtol=rtol, atol=atol, msg=name)


def test_broadcast_selections_on_the_gpu_on_the_source_rank(megatron_world):
    import torch.distributed as dist

    from regate_megatron.core.selection import broadcast_selections, select_top_targets

    assert dist.get_backend() == ("nccl" if _device().type == "cuda" else "gloo")
    tokens, labels, pos, targets, scores = (t.cpu() for t in _batch())
    source = [select_top_targets(scores, targets, 0.5)]  # scored on the CPU
    (got,) = broadcast_selections(source, dist.group.WORLD)
    assert got.keep_index.device == _device() and got.target_mask.device == _device()
    assert torch.equal(got.keep_index.cpu(), source[0].keep_index)


def test_llava_student_step_with_regate_bf16_on_the_rank_device(tmp_path):
    from test_device import inputs_on_rank_device_world

    (result,) = run_world(inputs_on_rank_device_world, 1, root=str(tmp_path), extra=["--bf16"],
                          timeout=300)
    assert result["device"] == str(_device()) and result["routed"]
    assert result["calls"] >= 3 and result["misplaced"] == []
    assert result["loss"] == result["loss"] and result["loss"] > 0  # finite, positive


def test_distributed_optimizer_resume_on_cuda_needs_the_torch_adam_fixes(tmp_path):
    from test_optimizer_state import check_resume, resume_world

    from regate_megatron.core.spec import have_transformer_engine

    results = run_world(resume_world, 1, ckpt_dir=str(tmp_path), timeout=300)
    fused = have_transformer_engine() or _have_apex()
    check_resume(results, fused_adam=fused)


def _have_apex() -> bool:
    try:
        import apex.optimizers  # noqa: F401
    except Exception:
        return False
    return True


def test_dataclass_replace_keeps_batch_on_device():
    """Greedy decoding rebuilds its batch with dataclasses.replace before `Batch.to`."""
    from regate_megatron.data.llava import Batch

    batch = Batch(*(torch.zeros(2, 3, dtype=torch.long) for _ in range(6))).to(_device())
    moved = dataclasses.replace(batch, tokens=torch.ones(2, 3, dtype=torch.long)).to(_device())
    assert all(getattr(moved, f.name).device == _device() for f in dataclasses.fields(Batch))

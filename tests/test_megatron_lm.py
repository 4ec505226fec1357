"""The Megatron-LM integration (`regate_megatron.megatron_lm`): targets in the combined
sequence, the step wrapper around Megatron-Core's real schedule at PP2 x DP2 against a
hand-built regate-train step, and the EMA state inside the model's checkpoint state."""

import contextlib
import io
from functools import partial

import numpy as np
import pytest
import torch
from dist import run_world
from fixtures_data import mixed_records, spm_model_path, spm_tokenizer, write_records  # noqa: F401

from regate_megatron.config import ReGateConfig
from regate_megatron.megatron_lm import (
    KEPT_KEY,
    ReGateForwardBackward,
    ReGateState,
    SampleIdDataset,
    TextBatch,
    carry_regate_state,
    expand_targets,
    expanded_view,
    extra_args_provider,
    pretrain_vlm_view,
    regate_layer_spec,
    target_counts,
)

SEQ, LOCAL_MB, MBS = 12, 2, 2
N_SAMPLES = 16


# ---------------------------------------------------------------- combined-sequence targets
def test_expand_targets_inverts_llava_inputs(megatron_world, tmp_path, spm_tokenizer):
    """LLaVA inputs (one placeholder per image) -> the expanded labels and loss mask the data
    had, which LLaVA itself also builds (its returned loss mask)."""
    from test_mllm import mixed_batch, tiny_args

    from regate_megatron.core.mllm import llava_inputs
    from regate_megatron.data.layout import num_image_tokens
    from regate_megatron.training.model_provider import build_model

    args = tiny_args()
    batch = mixed_batch(tmp_path, spm_tokenizer, args)
    image_tokens = num_image_tokens(args.img_h, args.img_w, args.patch_dim)
    inputs = llava_inputs(batch, image_tokens)
    text = TextBatch(batch.sample_ids, inputs["input_ids"], inputs["labels"],
                     inputs["loss_mask"])
    labels, mask = expand_targets(text, image_tokens, SEQ * 4)
    assert torch.equal(mask, batch.loss_mask)
    targets = batch.loss_mask.bool()
    assert torch.equal(labels[targets], batch.labels[targets])
    torch.manual_seed(0)
    model = build_model(args, 128)
    with torch.no_grad():
        _, llava_mask = model(**inputs)
    assert torch.equal(llava_mask, mask[:, :llava_mask.shape[1]])
    # regate-train's batches are already expanded: its view's targets are the batch's
    labels, mask = expand_targets(expanded_view(batch), image_tokens, SEQ * 4)
    assert torch.equal(labels, batch.labels) and torch.equal(mask, batch.loss_mask)
    # tiles: an image of 2 tiles takes 2 * img_seq_len slots
    one = TextBatch(torch.tensor([0]), torch.tensor([[5, -200, 6, 7]]),
                    torch.tensor([[9, 6, 7, 8]]), torch.tensor([[0.0, 0.0, 1.0, 1.0]]),
                    torch.tensor([2]))
    labels, mask = expand_targets(one, 3, 64)
    assert mask.tolist() == [[0.0] * 7 + [1.0, 1.0]]
    assert labels[0, 6:].tolist() == [6, 7, 8]
    assert labels[0, 0].item() == -100  # LLaVA drops the label before an image (never trained)


def test_flags_and_spec_and_sample_ids():
    import argparse

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from regate_megatron.core.layer import ReGateTransformerLayer

    def script(parser):
        parser.add_argument("--freeze-LM", action="store_true")
        return parser

    provider = extra_args_provider(script)
    assert extra_args_provider(provider) is provider
    args = provider(argparse.ArgumentParser()).parse_args(["--regate", "--freeze-LM"])
    assert args.regate and args.freeze_LM
    spec = regate_layer_spec(get_gpt_layer_local_spec())
    assert spec.module is ReGateTransformerLayer
    with pytest.raises(ValueError, match="TransformerLayer"):
        regate_layer_spec(spec.submodules.mlp)
    from regate_megatron.megatron_lm.flags import check_args

    bad = argparse.Namespace(**dict(vars(args), context_parallel_size=2,
                                    regate_selector="random"))
    with pytest.raises(ValueError, match="--context-parallel-size"):
        check_args(bad)
    packed = argparse.Namespace(**dict(vars(args), packing_buffer_size=64,
                                       regate_selector="random"))
    with pytest.raises(ValueError, match="--regate cannot be combined with "
                                         "--packing-buffer-size: examples/multimodal packs"):
        check_args(packed)
    assert check_args(argparse.Namespace(**dict(vars(packed), packing_buffer_size=0))).enabled
    full = dict(vars(args), regate_selector="random", recompute_granularity="full")
    assert check_args(argparse.Namespace(**full)).enabled  # routed spans recompute
    with pytest.raises(ValueError, match="--distribute-saved-activations"):
        check_args(argparse.Namespace(**full, distribute_saved_activations=True))
    data = SampleIdDataset([_item(i) for i in range(4)])
    assert data[3]["sample_ids"] == 3
    counts = target_counts(data, pretrain_vlm_view, 1, SEQ)
    assert counts.tolist() == [int(_item(i)["loss_mask"].sum()) for i in range(4)]


# ---------------------------------------------------------------- the step wrapper
def _item(sample_id: int) -> dict:
    g = torch.Generator().manual_seed(1000 + sample_id)
    from models import VOCAB

    tokens = torch.randint(0, VOCAB, (SEQ,), generator=g)
    labels = torch.randint(0, VOCAB, (SEQ,), generator=g)
    loss_mask = torch.zeros(SEQ)
    loss_mask[3 + sample_id % 4:] = 1.0
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask}


class _MemStore:
    """A reference-loss store in memory (offsets + flat values), as the scorer reads one."""

    def __init__(self):
        counts = [int(_item(i)["loss_mask"].sum()) for i in range(N_SAMPLES)]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.values = np.random.RandomState(0).rand(int(self.offsets[-1])).astype(np.float32)


def _step_batches(step: int, dp_rank: int, dp_size: int):
    """This DP rank's micro-batches of step `step` (dicts, as Megatron-LM's collate makes)."""
    per_step = LOCAL_MB * MBS * dp_size
    ids = [(step * per_step + dp_rank * LOCAL_MB * MBS + k) % N_SAMPLES
           for k in range(LOCAL_MB * MBS)]
    data = SampleIdDataset([_item(i) for i in range(N_SAMPLES)])
    from torch.utils.data import default_collate

    return [default_collate([data[i] for i in ids[m * MBS:(m + 1) * MBS]])
            for m in range(LOCAL_MB)], ids


def _script_forward_step(data_iterator, model):
    """What a Megatron-LM script's forward_step does: next batch, forward, its own loss."""
    batch = next(data_iterator)
    pos = torch.arange(SEQ).expand(batch["tokens"].shape[0], SEQ)
    out = model(batch["tokens"], pos, None, labels=batch["labels"])
    return out, partial(lambda mask, t: ((t * mask).sum(), mask.sum().int(), {}),
                        batch["loss_mask"])


def _scorer(config):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from models import VOCAB

    from regate_megatron.core.roles import is_loss_rank, is_selection_source
    from regate_megatron.scoring.scorer import ReGateScorer

    return ReGateScorer(config, _MemStore(), VOCAB, group=dist.group.WORLD,
                        dp_rank=ps.get_data_parallel_rank(),
                        dp_size=ps.get_data_parallel_world_size(),
                        lookup_source=is_selection_source(), loss_source=is_loss_rank())


def _reference_step(model, scorer, step, batches, global_ids):
    """regate-train's step by hand: select on the source, broadcast, schedule, record, update."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from regate_megatron.core.roles import is_loss_rank, is_selection_source
    from regate_megatron.core.selection import broadcast_selections

    scorer.begin_step(step, global_ids)
    mine = None
    if is_selection_source():
        mine = [scorer.select(b["sample_ids"], b["labels"], b["loss_mask"]) for b in batches]
    selections = broadcast_selections(mine, ps.get_model_parallel_group())
    records = []

    def forward_step(data_iterator, chunk):
        batch, sel = next(data_iterator)
        pos = torch.arange(SEQ).expand(batch["tokens"].shape[0], SEQ)
        out = chunk(batch["tokens"], pos, None, labels=batch["labels"], token_selection=sel)

        def loss_func(t):
            computed = sel.computed_loss_mask()
            total = (t.float() * computed).sum()
            records.append((t.detach().float(), computed))
            return total, computed.sum().int(), {"lm loss": torch.stack(
                [total.detach(), computed.sum().float()])}
        return out, loss_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(list(zip(batches, selections))),
        model=[model], num_microbatches=LOCAL_MB, seq_length=SEQ, micro_batch_size=MBS,
        forward_only=False)
    if is_loss_rank():
        for b, (loss, computed) in zip(batches, records):
            scorer.record(b["sample_ids"], b["labels"], b["loss_mask"], loss, computed)
    scorer.end_step()
    return losses, selections


def _step_checks(rank):
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from models import build_gpt, full_grads, tiny_config

    config = tiny_config(num_layers=4)
    regate = ReGateConfig(enabled=True, keep_ratio=0.5, schedule="constant", ema_decay=0.5)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    wrapped_model, ref_model = (build_gpt(config, regate=regate, seed=5) for _ in range(2))
    state = ReGateState(replicated=False)
    wrapper = ReGateForwardBackward(get_forward_backward_func(), state, pretrain_vlm_view,
                                    img_seq_len=1, max_length=SEQ,
                                    build_scorer=lambda: _scorer(regate))
    ref_scorer = _scorer(regate)
    out = {"losses": [], "ref_losses": [], "keep": [], "ref_keep": [], "grads_equal": [],
           "kept": [], "ref_kept": []}
    for step in range(3):
        batches, _ = _step_batches(step, dp_rank, dp_size)
        global_ids = sum((_step_batches(step, r, dp_size)[1] for r in range(dp_size)), [])
        for m in (wrapped_model, ref_model):
            m.zero_grad()
        losses = wrapper(forward_step_func=_script_forward_step, data_iterator=iter(batches),
                         model=[wrapped_model], num_microbatches=LOCAL_MB, seq_length=SEQ,
                         micro_batch_size=MBS, decoder_seq_length=SEQ, forward_only=False)
        ref_losses, ref_sel = _reference_step(ref_model, ref_scorer, step, batches, global_ids)
        out["losses"].append([x["lm loss"] for x in losses])
        # the kept fraction Megatron-LM logs: [computed targets, targets] per micro-batch
        out["kept"].append([x[KEPT_KEY] for x in losses])
        out["ref_kept"].append([torch.stack([s.computed_loss_mask().sum().float(),
                                             s.target_mask.sum().float()]) for s in ref_sel]
                               if losses else [])
        out["ref_losses"].append([x["lm loss"] for x in ref_losses])
        out["keep"].append([s.keep_index for s in wrapper.last_selections])
        out["ref_keep"].append([s.keep_index for s in ref_sel])
        a, b = full_grads(wrapped_model), full_grads(ref_model)
        out["grads_equal"].append(all(torch.equal(a[k], b[k]) for k in a))
        # The EMA drives the next step's selection (regate selector with lambda 0.5).
    out["ema"] = (state.scorer.ema.values.clone(), ref_scorer.ema.values.clone())
    out["dense_eval"] = len(wrapper(forward_step_func=_script_forward_step,
                                    data_iterator=iter(_step_batches(0, dp_rank, dp_size)[0]),
                                    model=[wrapped_model], num_microbatches=LOCAL_MB,
                                    seq_length=SEQ, micro_batch_size=MBS, forward_only=True))
    out["dp_rank"], out["first_stage"] = dp_rank, ps.is_pipeline_first_stage()
    return out


def test_step_wrapper_matches_regate_train_step_pp2_dp2():
    results = run_world(_step_checks, 4, pp=2)
    for r in results:
        for x, y in zip(r["losses"], r["ref_losses"], strict=True):
            assert len(x) == len(y) and all(torch.equal(a, b) for a, b in zip(x, y))
        assert all(r["grads_equal"])
        for keep, ref in zip(r["keep"], r["ref_keep"]):
            assert all(torch.equal(k, k2) for k, k2 in zip(keep, ref))
        assert torch.equal(*[torch.nan_to_num(t, nan=-1.0) for t in r["ema"]])
        assert not torch.isnan(r["ema"][0]).all()
    last = [r for r in results if not r["first_stage"]]
    assert all(len(r["losses"][0]) == LOCAL_MB for r in last)
    for r in last:  # the kept fraction's pair, and half the targets kept (keep ratio 0.5)
        for kept, ref in zip(r["kept"], r["ref_kept"], strict=True):
            assert all(torch.equal(a, b) for a, b in zip(kept, ref, strict=True))
            computed, targets = torch.stack(kept).sum(0)
            assert 0.45 < float(computed / targets) < 0.6
    # every model-parallel rank (both stages of a DP replica) routed the same tokens
    for dp in (0, 1):
        group = [r for r in results if r["dp_rank"] == dp]
        assert len(group) == 2
        for step in range(3):
            assert all(torch.equal(a, b) for a, b in zip(group[0]["keep"][step],
                                                          group[1]["keep"][step]))
    # some targets were elided (keep ratio 0.5)
    assert all(bool(((k != -1).sum(1) < SEQ).all()) for k in results[0]["keep"][0])


def _tp_forward_step(poison, data_iterator, model):
    """A script's forward step at TP2 as ``get_batch`` does it: TP rank 0 reads its iterator,
    the other TP ranks (no iterator) receive the batch. ``poison`` makes the output NaN."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    box = [next(data_iterator) if data_iterator is not None else None]
    dist.broadcast_object_list(box, src=ps.get_tensor_model_parallel_src_rank(),
                               group=ps.get_tensor_model_parallel_group())
    batch = box[0]
    pos = torch.arange(SEQ).expand(batch["tokens"].shape[0], SEQ)
    out = model(batch["tokens"], pos, None, labels=batch["labels"])
    if poison:
        out = out * float("nan")
    return out, None


def _tp_checks(rank):
    """TP2 x DP2: TP rank 1 holds no data iterator; then a NaN step and a re-run step."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from models import build_gpt, full_grads, tiny_config

    config = tiny_config(num_layers=2)
    regate = ReGateConfig(enabled=True, keep_ratio=0.5, schedule="constant", ema_decay=0.5)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    tp_rank = ps.get_tensor_model_parallel_rank()
    wrapped_model, ref_model = (build_gpt(config, regate=regate, seed=5) for _ in range(2))
    state, steps = ReGateState(replicated=False), iter([0, 1, 2, 3, 3])
    checked = []
    wrapper = ReGateForwardBackward(get_forward_backward_func(), state, pretrain_vlm_view,
                                    img_seq_len=1, max_length=SEQ,
                                    step_of=lambda: next(steps),
                                    build_scorer=lambda: _scorer(regate),
                                    check_loss=checked.append)
    ref_scorer = _scorer(regate)
    out = {"same": [], "updated": [], "tp_rank": tp_rank, "dp_rank": dp_rank}

    def run(step_batches, poison=False):
        return wrapper(forward_step_func=partial(_tp_forward_step, poison),
                       data_iterator=iter(step_batches) if tp_rank == 0 else None,
                       model=[wrapped_model], num_microbatches=LOCAL_MB, seq_length=SEQ,
                       micro_batch_size=MBS, forward_only=False)

    for step in range(2):
        batches, _ = _step_batches(step, dp_rank, dp_size)
        global_ids = sum((_step_batches(step, r, dp_size)[1] for r in range(dp_size)), [])
        for m in (wrapped_model, ref_model):
            m.zero_grad()
        losses = run(batches)
        ref_losses, ref_sel = _reference_step(ref_model, ref_scorer, step, batches, global_ids)
        a, b = full_grads(wrapped_model), full_grads(ref_model)
        out["same"].append(
            all(torch.equal(x["lm loss"], y["lm loss"]) for x, y in zip(losses, ref_losses))
            and all(torch.equal(a[k], b[k]) for k in a)
            and all(torch.equal(s.keep_index, r.keep_index)
                    for s, r in zip(wrapper.last_selections, ref_sel, strict=True)))
        out["updated"].append(wrapper.last.ema_updated)
    out["ema_equal"] = torch.equal(*[torch.nan_to_num(t, nan=-1.0)
                                     for t in (state.scorer.ema.values, ref_scorer.ema.values)])
    out["checked"] = len(checked)
    ema = state.scorer.ema
    before = (ema.values.clone(), ema.vocab_ema.clone())
    # step 2: DP rank 1's losses are NaN -> no rank folds the step in
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        run(_step_batches(2, dp_rank, dp_size)[0], poison=dp_rank == 1)
    out["nan_log"] = log.getvalue()
    out["updated"].append(wrapper.last.ema_updated)
    out["nan_step_unchanged"] = all(torch.equal(torch.nan_to_num(x, nan=-1.0),
                                                torch.nan_to_num(y, nan=-1.0))
                                    for x, y in zip(before, (ema.values, ema.vocab_ema)))
    # step 3, then step 3 again (Megatron-LM's rerun of a step): folded in once
    for _ in range(2):
        run(_step_batches(3, dp_rank, dp_size)[0])
        out["updated"].append(wrapper.last.ema_updated)
    out["skipped"] = ema.skipped_updates
    return out


def test_step_wrapper_at_tp2_without_iterator_nan_step_and_rerun():
    results = run_world(_tp_checks, 4, tp=2)
    assert sorted((r["tp_rank"], r["dp_rank"]) for r in results) == [(0, 0), (0, 1), (1, 0),
                                                                      (1, 1)]
    for r in results:
        assert r["same"] == [True, True] and r["ema_equal"]
        # the ReGATE loss of every micro-batch went through check_loss (every TP rank
        # computes the loss at PP1)
        assert r["checked"] == 2 * LOCAL_MB
        assert r["updated"] == [True, True, False, True, False]
        assert r["nan_step_unchanged"] and r["skipped"] == 1
    # the left-out step is said once, by the logging rank
    said = [r["nan_log"] for r in results if "step 2 was left out of the EMA" in r["nan_log"]]
    assert len(said) == 1 and "(1 steps left out so far)" in said[0]


def test_loss_checks_follow_megatron_lm_flags(megatron_world):
    """The checks the script's loss function made, for the ReGATE loss: NaN/inf raise
    (the rerun state machine, mode disabled), a finite loss passes, both flags off -> None."""
    import argparse

    from regate_megatron.megatron_lm.hooks import loss_checks

    assert loss_checks(argparse.Namespace(check_for_nan_in_loss_and_grad=False,
                                          check_for_spiky_loss=False)) is None
    check = loss_checks(argparse.Namespace(check_for_nan_in_loss_and_grad=True,
                                           check_for_spiky_loss=False))
    check(torch.tensor(3.0))
    for bad, what in ((float("nan"), "NaN"), (float("inf"), "Inf")):
        with pytest.raises(RuntimeError, match=f"found {what} in local forward loss"):
            check(torch.tensor(bad))


def test_image_geometry_of_the_scripts_flags():
    """The slots per image tile, combined length and padding the hook reads off Megatron-LM's
    args (the call pretrain_vlm.py and examples/multimodal make), for both class-token
    settings, with and without a decoder length, under PP."""
    import argparse

    from regate_megatron.data.layout import num_image_tokens
    from regate_megatron.megatron_lm.hooks import _image_geometry

    args = argparse.Namespace(img_h=32, img_w=48, patch_dim=16, vision_model_type="clip",
                              disable_vision_class_token=True, seq_length=64,
                              decoder_seq_length=None, pipeline_model_parallel_size=1)
    assert _image_geometry(args) == (num_image_tokens(32, 48, 16), 64, False)
    args.disable_vision_class_token = False  # the class token stays: one more slot
    args.decoder_seq_length, args.pipeline_model_parallel_size = 96, 2
    assert _image_geometry(args) == (num_image_tokens(32, 48, 16) + 1, 96, True)


def _shared_counts_checks(rank):
    import argparse

    from regate_megatron.megatron_lm.hooks import _Run, _shared_counts

    args = argparse.Namespace(img_h=16, img_w=16, patch_dim=16, vision_model_type="clip",
                              disable_vision_class_token=True, seq_length=SEQ,
                              decoder_seq_length=None, pipeline_model_parallel_size=1)
    errors = []
    run = _Run(pretrain_vlm_view)  # no rank holds a dataset: every rank says so
    with pytest.raises(RuntimeError, match="wrap it with") as err:
        _shared_counts(args, run)
    errors.append(str(err.value))
    run.train_dataset = SampleIdDataset([_item(i) for i in range(N_SAMPLES - rank)])
    with pytest.raises(RuntimeError, match="differ in length") as err:
        _shared_counts(args, run)
    errors.append(str(err.value))
    run = _Run(pretrain_vlm_view)
    if rank != 1:  # rank 1 builds no dataset (a TP rank > 0 under a TP-rank-0 provider)
        run.train_dataset = SampleIdDataset([_item(i) for i in range(N_SAMPLES)])
    return _shared_counts(args, run).tolist(), errors


def test_random_selector_target_counts_are_read_in_shares():
    """--regate-selector random without a store: the ranks holding the dataset read it in
    strided shares; every rank ends with every sample's count. No dataset anywhere, or
    datasets of different lengths, are errors on every rank."""
    whole = target_counts(SampleIdDataset([_item(i) for i in range(N_SAMPLES)]),
                          pretrain_vlm_view, 1, SEQ).tolist()
    assert len(set(whole)) > 1  # the items differ in their number of targets
    results = run_world(_shared_counts_checks, 3)
    assert [counts for counts, _ in results] == [whole] * 3
    # bad setups fail on every rank alike (no rank left waiting in a collective)
    assert all(errors == results[0][1] for _, errors in results)
    assert "[14, 15, 16]" in results[0][1][1]  # the lengths it saw


# ---------------------------------------------------------------- EMA in the checkpoint
def _state_model(replicated: bool, fill: bool):
    from megatron.core import parallel_state as ps
    from models import build_gpt, tiny_config

    regate = ReGateConfig(enabled=True)
    scorer = _scorer(regate)
    if replicated:
        import torch.distributed as dist
        from models import VOCAB

        from regate_megatron.scoring.scorer import ReGateScorer

        scorer = ReGateScorer(regate, _MemStore(), VOCAB, group=dist.group.WORLD,
                              lookup_source=ps.get_data_parallel_rank() == 0)
    if fill:
        lo, hi = scorer.ema.owned_range
        scorer.ema.values.copy_(torch.arange(lo, hi, dtype=torch.float32) * 0.5)
        scorer.ema.vocab_ema.copy_(torch.arange(scorer.ema.vocab_size, dtype=torch.float32))
    state = ReGateState(replicated=replicated)
    state.attach(scorer)
    model = carry_regate_state(build_gpt(tiny_config(), regate=regate), state)
    return model, scorer


def _save_sharded(rank, path):
    from megatron.core import dist_checkpointing

    model, _ = _state_model(False, fill=True)
    sd = model.sharded_state_dict()
    assert {"regate.vocab_ema", "regate.ema_table"} <= set(sd)
    dist_checkpointing.save(sd, path)
    return True


def _load_sharded(rank, path):
    from megatron.core import dist_checkpointing

    model, scorer = _state_model(False, fill=False)
    loaded = dist_checkpointing.load(model.sharded_state_dict(), path)
    model.load_state_dict(loaded, strict=True)
    lo, hi = scorer.ema.owned_range
    return (torch.equal(scorer.ema.values, torch.arange(lo, hi, dtype=torch.float32) * 0.5)
            and torch.equal(scorer.ema.vocab_ema,
                            torch.arange(scorer.ema.vocab_size, dtype=torch.float32)))


def _legacy_roundtrip(rank):
    """--ckpt-format torch: the whole (replicated) table in the model's state dict; a load
    before the scorer exists is applied when it is attached."""
    model, scorer = _state_model(True, fill=True)
    sd = model.state_dict_for_save_checkpoint()
    assert sd["regate.ema_table"].numel() == scorer.ema.num_values
    from models import build_gpt, tiny_config

    state = ReGateState(replicated=True)
    fresh = carry_regate_state(build_gpt(tiny_config(), regate=ReGateConfig(enabled=True)), state)
    fresh.load_state_dict(sd, strict=True)  # no scorer yet: kept until attach
    _, empty = _state_model(True, fill=False)
    state.attach(empty)
    return torch.equal(empty.ema.values, scorer.ema.values)


def test_ema_state_rides_in_the_models_checkpoint(tmp_path):
    dp2, dp1 = str(tmp_path / "dp2"), str(tmp_path / "dp1")
    import os

    os.makedirs(dp2)
    os.makedirs(dp1)
    assert run_world(_save_sharded, 2, path=dp2) == [True, True]
    assert run_world(_load_sharded, 1, path=dp2) == [True]          # DP2 -> DP1
    assert run_world(_save_sharded, 1, path=dp1) == [True]
    assert run_world(_load_sharded, 2, path=dp1) == [True, True]    # DP1 -> DP2
    assert run_world(_legacy_roundtrip, 2) == [True, True]

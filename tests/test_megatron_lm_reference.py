"""The reference-loss store built inside a Megatron-LM script (``--regate-build-ref-store``):
the combined sequence's tokens, the teacher's views, the build at TP2 x DP2 through the
hooks, at PP2 x DP2 and TP2 x PP2 through the forward-only schedule, each against a
per-sample forward written out here, a stopped build resumed from its chunks in each layout,
the store reopened and checked, and the flags refused before any compute."""

import argparse
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from dist import run_world
from torch.utils.data import default_collate

from regate_megatron.config import ReGateConfig
from regate_megatron.data.llava import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from regate_megatron.megatron_lm import (
    SampleIdDataset,
    TextBatch,
    check_args,
    expand_targets,
    expand_tokens,
    extra_args_provider,
    pretrain_vlm_view,
    target_counts,
)
from regate_megatron.megatron_lm.sample_ids import text_batches

SEQ, IMG_SEQ_LEN, MAX_LENGTH, N_SAMPLES, MBS = 12, 3, 20, 10, 2
PAD = 0


def _item(sample_id: int) -> dict:
    """A pretrain_vlm-style item: ``sample_id % 6`` image placeholders (5 of them make the
    combined sequence 22 > MAX_LENGTH long: its tail is cut), random text and labels."""
    from models import VOCAB

    g = torch.Generator().manual_seed(500 + sample_id)
    tokens = torch.randint(1, VOCAB, (SEQ,), generator=g)
    labels = torch.randint(1, VOCAB, (SEQ,), generator=g)
    images = torch.randperm(SEQ - 1, generator=g)[:sample_id % 6] + 1
    tokens[images] = IMAGE_TOKEN_INDEX
    loss_mask = (torch.rand(SEQ, generator=g) < 0.7).float()
    loss_mask[tokens == IMAGE_TOKEN_INDEX] = 0.0
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask}


def _dataset(n: int = N_SAMPLES) -> SampleIdDataset:
    return SampleIdDataset([_item(i) for i in range(n)])


def _tokenizer(shift: int = 0):
    from models import VOCAB

    return SimpleNamespace(pad=PAD, vocab_size=VOCAB,
                           vocab={f"t{i}": (i + shift) % VOCAB for i in range(VOCAB)})


def test_expand_tokens_lays_out_the_combined_sequence_like_its_targets():
    """Each image placeholder takes tiles x img_seq_len slots of IMAGE_TOKEN_INDEX, text at
    its slot, pad after the end; with labels that are the next text token, every target's
    label is the combined token right after it."""
    one = TextBatch(torch.tensor([0]), torch.tensor([[5, IMAGE_TOKEN_INDEX, 6, 7]]),
                    torch.tensor([[9, 6, 7, 8]]), torch.tensor([[0.0, 0.0, 1.0, 1.0]]),
                    torch.tensor([2]))
    assert expand_tokens(one, 3, 64, pad_id=0).tolist() == [[5] + [IMAGE_TOKEN_INDEX] * 6
                                                             + [6, 7]]
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(1, 50, (3, 10), generator=g)
    tokens[0, [2, 6]] = IMAGE_TOKEN_INDEX
    tokens[1, 4] = IMAGE_TOKEN_INDEX
    labels = torch.cat([tokens[:, 1:], torch.randint(1, 50, (3, 1), generator=g)], dim=1)
    text = TextBatch(torch.arange(3), tokens, labels, torch.ones(3, 10), torch.tensor([1, 2, 1]))
    combined = expand_tokens(text, 4, 64, pad_id=0)
    out_labels, mask = expand_targets(text, 4, 64)
    assert combined.shape == out_labels.shape == (3, 10 + 3 + 7)
    targets = mask.bool()
    assert int(targets.sum()) > 20
    rows, cols = targets.nonzero(as_tuple=True)
    lengths = (combined != 0).sum(1)  # text tokens are >= 1: 0 is the pad after the end
    inside = cols + 1 < lengths[rows]  # a sample's last label is past its last token
    assert int((~inside).sum()) == 3
    assert torch.equal(out_labels[rows[inside], cols[inside]],
                       combined[rows[inside], cols[inside] + 1])
    assert (combined[2, 10:] == 0).all() and (combined[1, 10 + 7:] == 0).all()  # pad at the end
    assert torch.equal(expand_tokens(text, 4, 12, pad_id=0), combined[:, :12])


def test_rows_of_a_text_batch_keep_their_images_tiles():
    """`TextBatch.rows`: the kept samples with their own images' tile counts, so their
    combined targets are the full batch's rows (a resumed build reads only some rows)."""
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(1, 50, (3, 9), generator=g)
    tokens[0, [1, 5]] = IMAGE_TOKEN_INDEX
    tokens[1, 2] = IMAGE_TOKEN_INDEX
    tokens[2, [3, 6]] = IMAGE_TOKEN_INDEX
    tiles = torch.tensor([1, 3, 2, 4, 1])  # row 0: 1, 3; row 1: 2; row 2: 4, 1
    text = TextBatch(torch.tensor([7, 8, 9]), tokens, torch.randint(1, 50, (3, 9), generator=g),
                     (torch.rand(3, 9, generator=g) < 0.8).float(), tiles)
    part = text.rows(torch.tensor([True, False, True]))
    assert part.sample_ids.tolist() == [7, 9] and part.num_image_tiles.tolist() == [1, 3, 4, 1]
    labels, mask = expand_targets(text, 2, 64)
    part_labels, part_mask = expand_targets(part, 2, 64)
    width = part_labels.shape[1]
    assert torch.equal(part_labels, labels[[0, 2], :width])
    assert torch.equal(part_mask, mask[[0, 2], :width])
    assert text.rows(torch.tensor([False, True, False])).num_image_tiles.tolist() == [2]


def _manual_reference(model, item: dict) -> np.ndarray:
    """One sample's teacher losses, written out: the text positions whose combined slot
    fits MAX_LENGTH, read alone (image placeholders removed, positions 0, 1, ...); a text
    position is a target when its loss mask is set and the next position is not an image."""
    tokens, labels, mask = item["tokens"], item["labels"], item["loss_mask"]
    image = tokens == IMAGE_TOKEN_INDEX
    width = torch.where(image, IMG_SEQ_LEN, 1)
    last_slot = width.cumsum(0) - 1
    text = (~image & (last_slot < MAX_LENGTH)).nonzero().flatten()
    next_is_image = torch.cat([image[1:], torch.tensor([False])])
    target = (mask > 0) & ~next_is_image
    with torch.no_grad():
        loss = model(input_ids=tokens[text][None], position_ids=torch.arange(text.numel())[None],
                     attention_mask=None, labels=labels[text][None])[0]
    return loss[target[text]].float().numpy()


def _pad_reference(model, item: dict) -> np.ndarray:
    """One sample's teacher losses in ``regate-precompute-ref``'s pad view: the combined
    sequence, image slots as pad tokens masked from attention by an explicit mask, dense."""
    from regate_megatron.megatron_lm.reference import teacher_view
    from regate_megatron.scoring.teacher import reference_losses, teacher_inputs

    _, combined = teacher_view(pretrain_vlm_view(default_collate([item])), IMG_SEQ_LEN,
                               MAX_LENGTH, PAD, "drop")
    view = teacher_inputs(combined, pad_id=PAD, mode="pad")
    with torch.no_grad():
        loss = model(input_ids=view["input_ids"], position_ids=view["position_ids"],
                     attention_mask=view["attention_mask"], labels=view["labels"])
    return reference_losses(loss, view, combined)[0]


def _hook_args(path, **more):
    args = argparse.Namespace(
        regate_ref_store=str(path), regate_build_ref_store=True, regate_teacher_visual="pad",
        regate_build_ref_store_exit=False, micro_batch_size=MBS, seq_length=MAX_LENGTH,
        decoder_seq_length=None, pipeline_model_parallel_size=1, load="/ckpt/lm",
        pretrained_checkpoint=None, iteration=0)
    vars(args).update(more)
    return args


def _run(model, n: int = N_SAMPLES):
    from regate_megatron.megatron_lm.hooks import _Run

    run = _Run(pretrain_vlm_view)
    run.llava = dict(img_seq_len=IMG_SEQ_LEN, image_token=None)
    run.model, run.train_dataset = model, _dataset(n)
    return run


def _hooks_build_checks(rank, full_state, path):
    """TP2 x DP2: the hooks build the store at the first call, reopen it after, and refuse
    another tokenizer or other data; --regate-build-ref-store-exit ends every rank with 0;
    a stopped build resumes (`_resume`)."""
    from models import build_gpt, load_full_weights, tiny_config

    from regate_megatron.megatron_lm.hooks import _reference_store

    model = build_gpt(tiny_config())
    load_full_weights(model, full_state)
    model.train()
    before = torch.get_rng_state()
    store = _reference_store(_hook_args(path), _run(model), _tokenizer())
    out = dict(offsets=np.asarray(store.offsets).copy(), values=np.asarray(store.values).copy(),
               meta=dict(store.meta), training=model.training,
               rng_kept=torch.equal(before, torch.get_rng_state()),
               parts_left=os.path.exists(os.path.join(os.path.dirname(path),
                                                      f".{os.path.basename(path)}.parts")))
    built = os.stat(os.path.join(path, "meta.json")).st_mtime_ns
    again = _reference_store(_hook_args(path), _run(model), _tokenizer())
    out["reopened"] = (os.stat(os.path.join(path, "meta.json")).st_mtime_ns == built
                       and np.array_equal(np.asarray(again.values), out["values"]))
    errors = []
    for run, tokenizer in ((_run(model), _tokenizer(shift=1)), (_run(model, N_SAMPLES - 2),
                                                                _tokenizer())):
        with pytest.raises(ValueError) as err:
            _reference_store(_hook_args(path), run, tokenizer)
        errors.append(str(err.value))
    with pytest.raises(SystemExit) as ended:
        _reference_store(_hook_args(path, regate_build_ref_store_exit=True), _run(model),
                         _tokenizer())
    out["exit_code"] = ended.value.code
    out["errors"] = errors
    drop = _reference_store(_hook_args(f"{path}-drop", regate_teacher_visual="drop"),
                            _run(model), _tokenizer())
    out["drop"] = (np.asarray(drop.offsets).copy(), np.asarray(drop.values).copy(),
                   drop.meta["teacher_visual"])
    out["resume"] = _resume(model, f"{path}-resume")
    return out


def _sharp_teacher():
    """(the one-rank teacher, its weights, every sample's written-out losses in each view):
    a tiny GPT with sharp attention, where a text token sits (pad vs drop) shows."""
    from models import build_gpt, tiny_config

    model = build_gpt(tiny_config())
    model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "linear_qkv.weight" in name:
                p.mul_(16)
    full_state = {k: v.detach().clone() for k, v in model.state_dict().items()
                  if not k.endswith("_extra_state")}
    data = _dataset()
    expected = {"drop": [_manual_reference(model, data[i]) for i in range(N_SAMPLES)],
                "pad": [_pad_reference(model, data[i]) for i in range(N_SAMPLES)]}
    return model, full_state, expected


def test_store_built_in_the_script_at_tp2_dp2_equals_the_written_out_teacher(
        megatron_world, tmp_path):
    """The hooks' build at TP2 x DP2 (TP rank 0 reads and broadcasts, each DP replica writes
    its part, rank 0 merges) gives every sample's written-out teacher losses, the one-rank
    build's store, and the target counts the scorer expects of the data."""
    from models import build_gpt, tiny_config

    from regate_megatron.megatron_lm.reference import build_reference_store
    from regate_megatron.scoring.ref_store import RefLossStore

    model, full_state, expected = _sharp_teacher()
    data = _dataset()
    counts = target_counts(data, pretrain_vlm_view, IMG_SEQ_LEN, MAX_LENGTH)
    assert [e.size for e in expected["drop"]] == counts.tolist()
    assert len(set(counts.tolist())) > 3  # the samples differ (images, cut, mask)
    assert any(_item(i)["tokens"].eq(IMAGE_TOKEN_INDEX).sum() == 5 for i in range(N_SAMPLES))

    def build_alone(path, lm):  # the same build on one rank (TP1 x DP1)
        build_reference_store(
            str(path), lm,
            lambda r, w, done: text_batches(data, pretrain_vlm_view, range(r, N_SAMPLES, w), 3),
            num_samples=N_SAMPLES, img_seq_len=IMG_SEQ_LEN, max_length=MAX_LENGTH, pad_id=PAD,
            meta=dict(teacher="t", tokenizer_sha256="s", dataset_fingerprint="d"),
            log=lambda m: None)
        return RefLossStore.open(str(path))

    one = build_alone(tmp_path / "single", model)
    partial = build_gpt(tiny_config(), regate=ReGateConfig(enabled=True, layers=(0, 1)))
    with pytest.raises(ValueError, match="routes layers 0:1 of 2; build with "
                                         "--regate-teacher-visual drop"):
        build_alone(tmp_path / "partial", partial)
    assert not os.path.exists(tmp_path / "partial")

    path = tmp_path / "store"
    results = run_world(_hooks_build_checks, 4, tp=2, full_state=full_state, path=str(path))
    first = results[0]
    for r in results:  # every rank opened the same store
        assert np.array_equal(r["offsets"], first["offsets"])
        assert np.array_equal(r["values"], first["values"])
        assert r["training"] and r["rng_kept"] and r["reopened"] and not r["parts_left"]
        assert r["exit_code"] == 0
        assert r["errors"] == first["errors"]
    drop_offsets, drop_values, drop_mode = first["drop"]
    assert drop_mode == "drop" and all(np.array_equal(r["drop"][1], drop_values)
                                       for r in results)
    stores = {"pad": (first["offsets"], first["values"]), "drop": (drop_offsets, drop_values)}
    for mode, (offsets, values) in stores.items():
        assert np.diff(offsets).tolist() == counts.tolist()
        for i in range(N_SAMPLES):
            got = values[offsets[i]:offsets[i + 1]].astype(np.float32)
            np.testing.assert_allclose(got, expected[mode][i], rtol=2e-3, atol=1e-3)
            if mode == "pad":
                np.testing.assert_allclose(got, one[i].astype(np.float32), rtol=2e-3, atol=1e-3)
    for i in range(N_SAMPLES):  # the views differ where a target follows an image, only there
        tokens, mask = data[i]["tokens"], data[i]["loss_mask"]
        image = (tokens == IMAGE_TOKEN_INDEX).nonzero().flatten()
        after_image = bool(image.numel()) and bool((mask[int(image[0]):] > 0).any())
        same = np.allclose(expected["pad"][i], expected["drop"][i], rtol=2e-3, atol=1e-3)
        assert same != after_image, i
    assert sum(np.allclose(expected["pad"][i], expected["drop"][i], rtol=2e-3, atol=1e-3)
               for i in range(N_SAMPLES)) < N_SAMPLES - 4
    meta = first["meta"]
    assert meta["built_by"] == "regate_megatron.megatron_lm" and meta["teacher_visual"] == "pad"
    assert meta["num_samples"] == N_SAMPLES and "--load /ckpt/lm" in meta["teacher"]
    tokenizer_error, data_error = first["errors"]
    assert "built with another tokenizer" in tokenizer_error
    assert "other training data" in data_error and "--regate-build-ref-store" in data_error
    _check_resume(results, expected)


def _pipeline_build_checks(rank, full_state, path):
    """One build of each view at this world's TP x PP x DP, through
    `build_reference_store` with the samples dealt to the DP replicas: the stores as opened
    on every rank, and which ranks wrote a part (the loss ranks) and read the data (the
    selection sources); a stopped build resumes (`_resume`)."""
    from megatron.core import parallel_state as ps
    from models import build_gpt, load_full_weights, tiny_config

    from regate_megatron.core.roles import is_loss_rank, is_selection_source
    from regate_megatron.megatron_lm.reference import build_reference_store
    from regate_megatron.scoring.ref_store import RefLossStore

    model = build_gpt(tiny_config())
    load_full_weights(model, full_state)
    data, read = _dataset(), []

    def texts(dp_rank, dp_size, done):
        read.append(dp_rank)
        return text_batches(data, pretrain_vlm_view, range(dp_rank, N_SAMPLES, dp_size), MBS)

    out = dict(source=is_selection_source(), loss_rank=is_loss_rank(),
               stage=ps.get_pipeline_model_parallel_rank())
    for mode in ("pad", "drop"):
        build_reference_store(
            f"{path}-{mode}", model, texts, num_samples=N_SAMPLES, img_seq_len=IMG_SEQ_LEN,
            max_length=MAX_LENGTH, pad_id=PAD, mode=mode, log=lambda m: None,
            meta=dict(teacher="t", tokenizer_sha256="s", dataset_fingerprint="d"))
        store = RefLossStore.open(f"{path}-{mode}")
        out[mode] = (np.asarray(store.offsets).copy(), np.asarray(store.values).copy())
    out["read"], out["training"] = read, model.training
    out["resume"] = _resume(model, f"{path}-resume")
    return out


@pytest.mark.parametrize("tp,pp", [(1, 2), (2, 2)])
def test_store_built_at_pipeline_size_2_equals_the_written_out_teacher(
        megatron_world, tmp_path, tp, pp):
    """At PP2 (x DP2, x TP2) the selection source of each replica reads its share and sends
    it to the stages; the forward-only schedule runs the views, padded to the language
    model's length, through both stages; the loss rank writes the part: every sample's
    written-out teacher losses in both views. A stopped build resumes (`_check_resume`)."""

    _, full_state, expected = _sharp_teacher()
    data = _dataset()
    counts = target_counts(data, pretrain_vlm_view, IMG_SEQ_LEN, MAX_LENGTH)
    results = run_world(_pipeline_build_checks, 4, tp=tp, pp=pp, full_state=full_state,
                        path=str(tmp_path / "store"))
    dp = 4 // (tp * pp)
    assert sorted(r for res in results for r in res["read"] if res["source"]) == \
        sorted(list(range(dp)) * 2)  # each replica's source read its share, once per view
    assert all(not res["read"] for res in results if not res["source"])
    assert sum(res["loss_rank"] for res in results) == dp
    assert all(res["stage"] == pp - 1 for res in results if res["loss_rank"])
    for mode in ("pad", "drop"):
        offsets, values = results[0][mode]
        assert all(np.array_equal(res[mode][1], values) for res in results)
        assert np.diff(offsets).tolist() == counts.tolist()
        for i in range(N_SAMPLES):
            np.testing.assert_allclose(values[offsets[i]:offsets[i + 1]].astype(np.float32),
                                       expected[mode][i], rtol=2e-3, atol=1e-3,
                                       err_msg=f"{mode} sample {i}")
    assert all(res["training"] for res in results)
    _check_resume(results, expected)


def _resume(model, path, stop_after=1):
    """Preemption of the in-script build at this world's layout: stopped by a signal after
    ``stop_after`` micro-batches of replica 0 (os.kill to itself, as SLURM's SIGTERM before
    a time limit), then run again with the same settings, whose pass reads only what no
    chunk holds. Then a stopped build whose rerun has another teacher starts over."""
    import signal

    from regate_megatron.core.roles import is_selection_source
    from regate_megatron.megatron_lm.reference import build_reference_store
    from regate_megatron.scoring.ref_store import RefLossStore

    data, read = _dataset(), []

    def texts(stop):
        def share(dp_rank, dp_size, done):
            indices = [i for i in range(dp_rank, N_SAMPLES, dp_size) if not done[i]]
            for k, text in enumerate(text_batches(data, pretrain_vlm_view, indices, MBS)):
                if stop and dp_rank == 0 and k == stop_after:
                    os.kill(os.getpid(), signal.SIGUSR1)  # arrives before the next group
                read.extend(text.sample_ids.tolist())
                yield text
        return share

    def build(store, stop, teacher="t"):
        read.clear()
        return build_reference_store(
            store, model, texts(stop), num_samples=N_SAMPLES, img_seq_len=IMG_SEQ_LEN,
            max_length=MAX_LENGTH, pad_id=PAD, flush_samples=1, stop_signal=signal.SIGUSR1,
            log=lambda m: None,
            meta=dict(teacher=teacher, tokenizer_sha256="s", dataset_fingerprint="d"))

    out = dict(source=is_selection_source())
    first = build(path, stop=True)
    out["first"] = dict(first, read=list(read), store=os.path.exists(path),
                        handler=signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL)
    second = build(path, stop=False)
    store = RefLossStore.open(path)
    out["second"] = dict(second, read=list(read))
    out["store"] = (np.asarray(store.offsets).copy(), np.asarray(store.values).copy())
    build(f"{path}-other", stop=True)
    other = build(f"{path}-other", stop=False, teacher="another")
    out["other"] = dict(other, read=list(read))
    out["parts_left"] = os.path.exists(os.path.join(os.path.dirname(path),
                                                    f".{os.path.basename(path)}.parts"))
    return out


def _check_resume(results, expected):
    """`_resume` on every rank: on the signal every replica's source stopped at its next
    group, the loss ranks flushed their chunks, no store was written and the signal's
    handler was put back; the second build read only the samples no chunk held, each once,
    and its store holds every sample's written-out teacher losses; another teacher's rerun
    read everything again."""
    runs = [r["resume"] for r in results]
    sources = [r for r in runs if r["source"]]
    first_read = sorted(i for r in sources for i in r["first"]["read"])
    second_read = sorted(i for r in sources for i in r["second"]["read"])
    assert all(r["first"]["stopped"] and not r["first"]["store"] and r["first"]["handler"]
               for r in runs)
    done = runs[0]["second"]["done_before"]  # what the stopped build's chunks hold
    assert 0 < done < N_SAMPLES and done <= len(first_read)  # stopped part-way (read ahead)
    assert len(second_read) == len(set(second_read)) == N_SAMPLES - done  # only the rest
    assert set(first_read) | set(second_read) == set(range(N_SAMPLES))
    assert not any(r["second"]["stopped"] for r in runs)
    offsets, values = runs[0]["store"]
    assert all(np.array_equal(r["store"][1], values) for r in runs)
    for i in range(N_SAMPLES):
        np.testing.assert_allclose(values[offsets[i]:offsets[i + 1]].astype(np.float32),
                                   expected["pad"][i], rtol=2e-3, atol=1e-3, err_msg=str(i))
    other = sorted(i for r in sources for i in r["other"]["read"])
    assert other == list(range(N_SAMPLES)) and runs[0]["other"]["done_before"] == 0
    assert not any(r["parts_left"] for r in runs)


def test_build_flags_are_checked_before_any_compute():
    parse = extra_args_provider()(argparse.ArgumentParser()).parse_args
    ok = parse(["--regate", "--regate-ref-store", "/s", "--regate-build-ref-store",
                "--regate-build-ref-store-exit"])
    assert check_args(ok).ref_store == "/s"
    for flags, message in (
            (["--regate-build-ref-store"],
             "--regate-build-ref-store needs --regate-ref-store PATH"),
            (["--regate-ref-store", "/s", "--regate-build-ref-store-exit"],
             "--regate-build-ref-store-exit needs --regate-build-ref-store"),
            (["--regate-selector", "regate"], "build it with --regate-build-ref-store")):
        with pytest.raises(ValueError, match=message):
            check_args(parse(["--regate", *flags]))
    assert not parse([]).regate_build_ref_store  # off unless asked


def test_teacher_view_drops_image_slots_and_keeps_the_combined_targets():
    from regate_megatron.megatron_lm.reference import teacher_view

    text = pretrain_vlm_view(default_collate([_dataset()[i] for i in (4, 5)]))
    view, combined = teacher_view(text, IMG_SEQ_LEN, MAX_LENGTH, PAD, "drop")
    assert not (view["input_ids"] == IMAGE_TOKEN_INDEX).any()
    assert torch.equal((view["loss_mask"] > 0).sum(1), (combined.loss_mask > 0).sum(1))
    assert torch.equal(view["labels"][view["loss_mask"] > 0],
                       combined.labels[combined.loss_mask > 0])
    # the sample with 5 images is cut: its text after MAX_LENGTH is not in the view
    assert int((view["input_ids"][1] != PAD).sum()) < SEQ - 5
    assert (view["labels"][view["loss_mask"] == 0] == IGNORE_INDEX).any()  # the end's padding

"""Tokenizer and LLaVA-format data: prompt layout, labels, images, validation, collate."""

import os
import re

import numpy as np
import pytest
import sentencepiece as spm
import torch
from fixtures_data import (  # noqa: F401 -- fixtures
    conv,
    mixed_records,
    spm_model_path,
    spm_tokenizer,
    synthetic_corpus,
    write_png,
    write_records,
)

from regate_megatron.data.llava import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    ConversationDataset,
    collate,
    load_image,
)
from regate_megatron.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

K = 4  # image tokens per image
HW = (8, 8)


def make_dataset(path, tok, **kw):
    args = dict(seq_length=64, num_image_tokens=K, image_size=HW)
    args.update(kw)
    return ConversationDataset(str(path), tok, **args)


# -- tokenizer -------------------------------------------------------------------------


def test_train_sentencepiece_is_deterministic(tmp_path, spm_model_path):
    again = train_sentencepiece(synthetic_corpus(), str(tmp_path / "again"), vocab_size=128)
    with open(spm_model_path, "rb") as a, open(again, "rb") as b:
        assert a.read() == b.read()
    assert SentencePieceTokenizer(again).sha256 == SentencePieceTokenizer(spm_model_path).sha256


def test_tokenizer_special_ids_and_roundtrip(spm_tokenizer):
    tok = spm_tokenizer
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    assert 30 < tok.vocab_size <= 128
    ids = tok.encode("a red cat sits on the mat")
    assert tok.decode(ids) == "a red cat sits on the mat"
    assert tok.decode(ids + [IMAGE_TOKEN_INDEX]) == "a red cat sits on the mat"  # slots dropped
    assert tok.id_to_piece(tok.eos_id) == "</s>"
    assert len(tok.sha256) == 64


def test_tokenizer_without_pad_falls_back_to_unk(tmp_path):
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(synthetic_corpus(50)), model_prefix=str(tmp_path / "nopad"),
        vocab_size=60, hard_vocab_limit=False, minloglevel=2, num_threads=1,
    )
    tok = SentencePieceTokenizer(str(tmp_path / "nopad.model"))
    assert tok.pad_id == tok._sp.unk_id() and tok.pad_id >= 0


def test_tokenizer_errors_name_the_path(tmp_path):
    missing = str(tmp_path / "missing.model")
    with pytest.raises(FileNotFoundError,
                       match="missing.model.*--tokenizer-model|--tokenizer-model.*missing.model"):
        SentencePieceTokenizer(missing)
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.model"):
        SentencePieceTokenizer(str(junk))


# -- prompt layout and labels ----------------------------------------------------------


def test_exact_token_layout(tmp_path, spm_tokenizer):
    tok = spm_tokenizer
    write_png(tmp_path / "x.png")
    record = {"id": "r0", "image": "x.png",
              "conversations": conv("<image>\nwhat color is it?", "red", "how many?", "one cat")}
    ds = make_dataset(write_records(tmp_path / "d.json", [record]), tok)
    sample = ds[0]

    ctx1 = [tok.bos_id] + tok.encode("USER: ") + [IMAGE_TOKEN_INDEX] * K \
        + tok.encode("\nwhat color is it?") + tok.encode("\n") + tok.encode("ASSISTANT: ")
    ans1 = tok.encode("red") + [tok.eos_id]
    ctx2 = tok.encode("USER: how many?") + tok.encode("\n") + tok.encode("ASSISTANT: ")
    ans2 = tok.encode("one cat") + [tok.eos_id]
    expected = ctx1 + ans1 + ctx2 + ans2
    assert sample.tokens.tolist() == expected
    assert sample.tokens.dtype == torch.long and sample.loss_mask.dtype == torch.float32

    # labels[i] = tokens[i+1]; IGNORE at the end and before an image slot.
    n = len(expected)
    want_labels = ([t if t != IMAGE_TOKEN_INDEX else IGNORE_INDEX for t in expected[1:]]
                   + [IGNORE_INDEX])
    assert sample.labels.tolist() == want_labels
    # loss_mask[i] = 1 iff tokens[i+1] is an answer token or its eos.
    is_target = [0] * len(ctx1) + [1] * len(ans1) + [0] * len(ctx2) + [1] * len(ans2)
    assert sample.loss_mask.tolist() == [float(x) for x in is_target[1:]] + [0.0]
    targets = sample.loss_mask.nonzero().flatten()
    assert sample.labels[targets].tolist() == ans1 + ans2
    assert ds.target_counts().tolist() == [len(ans1) + len(ans2)]

    # The last assistant turn's context and reference answer.
    assert sample.prompt_length == len(ctx1) + len(ans1) + len(ctx2)
    assert sample.tokens[: sample.prompt_length].tolist() == ctx1 + ans1 + ctx2
    assert sample.answer == "one cat"
    assert sample.images.shape == (1, 3, *HW)
    assert n <= ds.seq_length


def test_text_only_record_has_no_images(tmp_path, spm_tokenizer):
    ds = make_dataset(write_records(tmp_path / "d.json", [{"conversations": conv("hi", "a dog")}]),
                      spm_tokenizer)
    assert ds[0].images.shape == (0, 3, *HW)
    assert IMAGE_TOKEN_INDEX not in ds[0].tokens.tolist()


def test_json_list_and_jsonl_agree(tmp_path, spm_tokenizer):
    records = mixed_records(tmp_path)
    a = make_dataset(write_records(tmp_path / "d.json", records), spm_tokenizer)
    b = make_dataset(write_records(tmp_path / "d.jsonl", records, jsonl=True), spm_tokenizer)
    assert a.num_records == b.num_records == 4
    for i in range(4):
        assert torch.equal(a[i].tokens, b[i].tokens)
        assert torch.equal(a[i].images, b[i].images)
    assert (a.target_counts() == b.target_counts()).all()


def test_fingerprint(tmp_path, spm_tokenizer):
    records = mixed_records(tmp_path)
    path = write_records(tmp_path / "d.json", records)
    base = make_dataset(path, spm_tokenizer).fingerprint
    assert make_dataset(path, spm_tokenizer).fingerprint == base  # stable
    assert make_dataset(path, spm_tokenizer, seq_length=65).fingerprint != base
    assert make_dataset(path, spm_tokenizer, num_image_tokens=K + 1).fingerprint != base
    records[1]["conversations"][1]["value"] = "three dogs"
    assert make_dataset(write_records(path, records), spm_tokenizer).fingerprint != base


# -- images ----------------------------------------------------------------------------


def test_png_jpeg_npy_images(tmp_path):
    red = load_image(write_png(tmp_path / "r.png", (255, 0, 0), size=(10, 12)), (8, 6))
    assert red.shape == (3, 8, 6) and red.dtype == torch.float32
    assert torch.allclose(red[0], torch.ones(8, 6))
    assert torch.allclose(red[1:], -torch.ones(2, 8, 6))

    jpg = load_image(write_png(tmp_path / "g.jpg", (0, 255, 0), fmt="JPEG"), 8)
    assert jpg.shape == (3, 8, 8)
    assert torch.allclose(jpg, torch.tensor([-1.0, 1.0, -1.0])[:, None, None], atol=0.05)

    gray = np.linspace(0, 1, 30, dtype=np.float32).reshape(5, 6)
    np.save(tmp_path / "gray.npy", gray)
    g = load_image(str(tmp_path / "gray.npy"), (5, 6))  # no resize: exact
    assert torch.allclose(g, (torch.from_numpy(gray) - 0.5).div(0.5).expand(3, 5, 6))

    rgb_hwc = np.random.default_rng(0).random((7, 9, 3), dtype=np.float32)
    np.save(tmp_path / "hwc.npy", rgb_hwc)
    np.save(tmp_path / "chw.npy", rgb_hwc.transpose(2, 0, 1))
    np.save(tmp_path / "u8.npy", (rgb_hwc * 255).astype(np.uint8))
    hwc = load_image(str(tmp_path / "hwc.npy"), (4, 4))
    chw = load_image(str(tmp_path / "chw.npy"), (4, 4))
    assert hwc.shape == (3, 4, 4) and torch.equal(hwc, chw)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(rgb_hwc).permute(2, 0, 1)[None], size=(4, 4), mode="bilinear",
        align_corners=False, antialias=True)[0]
    assert torch.allclose(hwc, (ref - 0.5) / 0.5, atol=1e-6)
    u8 = load_image(str(tmp_path / "u8.npy"), (4, 4))
    assert torch.allclose(u8, hwc, atol=0.02)


def test_dataset_loads_images_in_order(tmp_path, spm_tokenizer):
    ds = make_dataset(write_records(tmp_path / "d.json", mixed_records(tmp_path)), spm_tokenizer)
    s = ds[ds.index_of(2)]
    assert s.images.shape == (2, 3, *HW)
    assert torch.allclose(s.images[0, 0], torch.ones(HW))  # red.png
    assert torch.allclose(s.images[1], torch.full((3, *HW), -0.5))  # gray.npy (0.25)
    assert (s.tokens == IMAGE_TOKEN_INDEX).sum() == 2 * K


# -- validation ------------------------------------------------------------------------


def _bad_cases(root):
    write_png(os.path.join(root, "ok.png"))
    with open(os.path.join(root, "junk.png"), "wb") as f:
        f.write(b"\x00not an image")
    with open(os.path.join(root, "junk.npy"), "wb") as f:
        f.write(b"not npy")
    np.save(os.path.join(root, "cube.npy"), np.zeros((2, 5, 5, 5)))
    long_q = " ".join(["cat"] * 80)
    return {
        "missing image": ({"image": "nope.png", "conversations": conv("<image> what?", "a cat")},
                          "does not exist"),
        "unreadable png": ({"image": "junk.png", "conversations": conv("<image> what?", "a cat")},
                           "cannot be opened"),
        "unreadable npy": ({"image": "junk.npy", "conversations": conv("<image> what?", "a cat")},
                           "not a readable .npy"),
        "bad npy shape": ({"image": "cube.npy", "conversations": conv("<image> what?", "a cat")},
                          "not an image"),
        "no assistant": ({"conversations": [{"from": "human", "value": "what?"}]},
                         "no assistant"),
        "too few images": ({"image": "ok.png",
                            "conversations": conv("<image><image> what?", "two")},
                           "2 '<image>' placeholder.*1 image"),
        "too many images": ({"image": ["ok.png", "ok.png"],
                             "conversations": conv("<image> what?", "a")},
                            "1 '<image>' placeholder.*2 image"),
        "image without placeholder": ({"image": "ok.png", "conversations": conv("what?", "a")},
                                      "0 '<image>' placeholder"),
        "empty conversations": ({"conversations": []}, "missing or empty"),
        "no conversations": ({"image": "ok.png"}, "missing or empty"),
        "bad role": ({"conversations": [{"from": "user", "value": "hi"},
                                        {"from": "gpt", "value": "a"}]}, "role 'user'"),
        "image in answer": ({"image": "ok.png", "conversations": conv("what?", "<image>")},
                            "images belong in human turns"),
        "too long": ({"conversations": conv(long_q, "a cat")}, "exceed seq_length 64"),
        "not an object": (["just", "a", "list"], "JSON object"),
    }


def test_every_bad_record_is_reported(tmp_path, spm_tokenizer):
    good = {"id": "good", "conversations": conv("what?", "a cat")}
    for name, (record, reason) in _bad_cases(tmp_path).items():
        if isinstance(record, dict):
            record = dict(record, id=f"bad-{name}")
        path = write_records(tmp_path / "d.json", [good, record])
        with pytest.raises(ValueError) as err:
            make_dataset(path, spm_tokenizer)
        msg = str(err.value)
        assert "record 1" in msg, (name, msg)
        if isinstance(record, dict):
            assert f"bad-{name}" in msg, (name, msg)
        assert "fix the record or pass --skip-bad-samples" in msg, (name, msg)
        assert re.search(reason, msg), (name, reason, msg)


def test_skip_bad_samples_keeps_sample_ids(tmp_path, spm_tokenizer):
    cases = _bad_cases(tmp_path)
    good = [{"id": f"g{i}", "conversations": conv("what is it?", "a" + " cat" * i)}
            for i in range(3)]
    records = [good[0], cases["missing image"][0], good[1], cases["bad role"][0],
               cases["too long"][0], good[2]]
    path = write_records(tmp_path / "d.json", records)
    with pytest.raises(ValueError, match="3 bad record"):
        make_dataset(path, spm_tokenizer)
    ds = make_dataset(path, spm_tokenizer, skip_bad_samples=True)
    assert ds.num_records == 6 and len(ds) == 3
    assert ds.sample_ids == [0, 2, 5]
    assert ds.num_skipped == 3 and [sid for sid, _ in ds.skipped] == [1, 3, 4]
    assert "does not exist" in ds.skipped[0][1]
    assert [ds[i].sample_id for i in range(3)] == [0, 2, 5]
    assert ds.index_of(5) == 2
    with pytest.raises(KeyError, match="skipped"):
        ds.index_of(3)
    counts = ds.target_counts()
    assert counts.dtype == np.int64 and counts.shape == (6,)
    assert (counts[[1, 3, 4]] == 0).all() and (counts[[0, 2, 5]] > 0).all()
    assert counts[5] == int(ds[2].loss_mask.sum())


def test_image_root(tmp_path, spm_tokenizer):
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    write_png(img_dir / "x.png")
    rec = [{"image": "x.png", "conversations": conv("<image>", "red")}]
    path = write_records(tmp_path / "d.json", rec)
    with pytest.raises(ValueError, match="does not exist"):
        make_dataset(path, spm_tokenizer)
    assert make_dataset(path, spm_tokenizer, image_root=str(img_dir))[0].images.shape[0] == 1


def test_text_consumers_skip_pixels_but_not_checks(tmp_path, spm_tokenizer):
    """load_images=False (the teacher): same tokens, no pixels; missing images still fail."""
    path = write_records(tmp_path / "d.json", mixed_records(tmp_path))
    full = make_dataset(path, spm_tokenizer)
    text = make_dataset(path, spm_tokenizer, load_images=False)
    for i in range(len(full)):
        assert torch.equal(full[i].tokens, text[i].tokens)
        assert torch.equal(full[i].loss_mask, text[i].loss_mask)
        assert text[i].images.shape[0] == 0
    assert full[0].images.shape[0] == 1
    os.remove(tmp_path / "red.png")
    with pytest.raises(ValueError, match="red.png"):
        make_dataset(path, spm_tokenizer, load_images=False)


# -- collate ---------------------------------------------------------------------------


def test_collate_pads_to_seq_length(tmp_path, spm_tokenizer):
    ds = make_dataset(write_records(tmp_path / "d.json", mixed_records(tmp_path)), spm_tokenizer)
    samples = [ds[i] for i in range(len(ds))]
    batch = collate(samples, seq_length=64, pad_id=spm_tokenizer.pad_id)
    assert batch.tokens.shape == batch.labels.shape == batch.loss_mask.shape == (4, 64)
    assert batch.sample_ids.tolist() == [0, 1, 2, 3]
    assert batch.num_images.tolist() == [1, 0, 2, 0]
    assert batch.images.shape == (3, 3, *HW)
    assert torch.equal(batch.images[1:], samples[2].images)
    for row, s in enumerate(samples):
        n = s.tokens.numel()
        assert torch.equal(batch.tokens[row, :n], s.tokens)
        assert (batch.tokens[row, n:] == spm_tokenizer.pad_id).all()
        assert (batch.labels[row, n:] == IGNORE_INDEX).all()
        assert (batch.loss_mask[row, n:] == 0).all()
        assert torch.equal(batch.loss_mask[row, :n], s.loss_mask)
    text_only = collate([samples[1], samples[3]], seq_length=64, pad_id=0)
    assert text_only.images.shape == (0, 3, *HW)
    with pytest.raises(ValueError, match="more than seq_length"):
        collate(samples, seq_length=8, pad_id=0)

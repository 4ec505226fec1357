"""The digits-VQA builder, the time-to-accuracy report and regate-inspect."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from fixtures_data import (  # noqa: F401 -- spm_* are fixtures
    conv,
    spm_model_path,
    spm_tokenizer,
    write_png,
    write_records,
)

from regate_megatron.data.llava import ConversationDataset
from regate_megatron.data.tokenizer import SentencePieceTokenizer, train_sentencepiece
from regate_megatron.scoring.ref_store import RefLossStore, write_store
from regate_megatron.tools.demo.digits import (
    TEMPLATES,
    answer_text,
    build_digits_vqa,
    question_text,
)
from regate_megatron.tools.demo.report import (
    format_table,
    load_metrics,
    plot_accuracy_vs_tokens,
    summary_line,
    time_to_accuracy,
)
from regate_megatron.tools.inspect_refs import main as inspect_main
from regate_megatron.tools.inspect_refs import render

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# ----------------------------------------------------------------------------- digits-VQA


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("digits"))
    return out, build_digits_vqa(out, seed=0)


def _load(path):
    with open(path) as f:
        return json.load(f)


def _index(record) -> int:
    return int(record["id"].split("-")[1])


def test_digits_build_is_deterministic(digits, tmp_path):
    out, built = digits
    again = build_digits_vqa(str(tmp_path), seed=0)
    for split in ("train", "valid"):
        with open(built[split], "rb") as a, open(again[split], "rb") as b:
            assert a.read() == b.read()
    assert again["corpus"] == built["corpus"]
    for i in (0, 17, 1796):
        np.testing.assert_array_equal(np.load(os.path.join(out, "images", f"{i}.npy")),
                                      np.load(tmp_path / "images" / f"{i}.npy"))
    other = build_digits_vqa(str(tmp_path / "seed1"), seed=1)
    assert [r["id"] for r in _load(other["valid"])] != [r["id"] for r in _load(built["valid"])]


def test_digits_split_is_disjoint_and_stratified(digits):
    from sklearn.datasets import load_digits

    _, built = digits
    train, valid = _load(built["train"]), _load(built["valid"])
    train_ids, valid_ids = {_index(r) for r in train}, {_index(r) for r in valid}
    assert not train_ids & valid_ids
    assert train_ids | valid_ids == set(range(1797))
    target = load_digits().target
    for digit in range(10):
        held = sum(target[i] == digit for i in valid_ids)
        assert held == round(0.2 * (target == digit).sum())


def test_digits_answers_are_determined_by_digit_and_template(digits):
    from sklearn.datasets import load_digits

    _, built = digits
    assert answer_text(7, 0) == ("The handwritten digit in this picture is seven. Seven is an "
                                 "odd number, and it is greater than five.")
    assert answer_text(5, 0).endswith("Five is an odd number, and it is not greater than five.")
    assert answer_text(0, 1).endswith("It is an even number, and it is less than five.")
    assert answer_text(5, 2).endswith("The digit five is odd, and it is equal to five.")
    assert answer_text(9, 3).endswith("the number that comes right after nine is ten.")
    by_question = {f"<image>\n{question_text(t)}": t for t in range(len(TEMPLATES))}
    assert len(by_question) == len(TEMPLATES)  # the question identifies the template
    target = load_digits().target
    records = _load(built["train"]) + _load(built["valid"])
    used = set()
    for record in records:
        human, gpt = record["conversations"]
        template = by_question[human["value"]]
        used.add(template)
        assert gpt["value"] == answer_text(int(target[_index(record)]), template)
        assert record["image"] == f"images/{_index(record)}.npy"
    assert used == set(range(len(TEMPLATES)))
    assert question_text(template) in built["corpus"]
    assert gpt["value"] in built["corpus"]


def test_digits_images_and_records_load(digits, tmp_path):
    from sklearn.datasets import load_digits

    out, built = digits
    image = np.load(os.path.join(out, "images", "3.npy"))
    assert image.dtype == np.float32 and image.shape == (8, 8)
    assert 0.0 <= image.min() and image.max() <= 1.0
    np.testing.assert_allclose(image, load_digits().images[3] / 16.0, rtol=0, atol=1e-7)

    tokenizer = SentencePieceTokenizer(
        train_sentencepiece(built["corpus"], str(tmp_path / "spm"), vocab_size=200))
    for split in ("train", "valid"):
        dataset = ConversationDataset(built[split], tokenizer, seq_length=96, num_image_tokens=4,
                                      image_size=(8, 8))
        assert dataset.num_skipped == 0 and len(dataset) == dataset.num_records
    sample = dataset[0]
    assert tuple(sample.images.shape) == (1, 3, 8, 8)
    n_targets = int(sample.loss_mask.sum())
    assert 20 <= n_targets <= 40  # long answers...
    assert sample.prompt_length - 4 < n_targets  # ...after a short prompt
    answer_ids = sample.labels[sample.loss_mask == 1][:-1].tolist()  # drop eos
    assert tokenizer.decode(answer_ids) == sample.answer


def test_digits_rejects_bad_fraction(tmp_path):
    with pytest.raises(ValueError, match="heldout_fraction"):
        build_digits_vqa(str(tmp_path), heldout_fraction=1.0)


# ----------------------------------------------------------------------------- report


def _step(step, cum, elapsed, keep=1.0, acc=None):
    record = {"step": step, "lm_loss": 1.0, "keep_ratio": keep, "target_tokens": 100,
              "kept_target_tokens": 100 * keep, "cum_kept_target_tokens": cum,
              "cum_target_tokens": 100 * step, "elapsed": elapsed}
    if acc is not None:
        record.update(eval_accuracy=acc, eval_loss=0.5)
    return record


DENSE = [_step(1, 100, 1.0), _step(2, 200, 2.0, acc=0.5), _step(3, 300, 3.0),
         _step(4, 400, 4.0, acc=0.75), _step(6, 600, 6.0, acc=0.75), _step(8, 800, 8.0, acc=0.625)]
REGATE = [_step(1, 50, 0.5, keep=0.5), _step(2, 100, 1.0, keep=0.5, acc=0.5),
          _step(3, 125, 1.5, keep=0.25), _step(4, 150, 2.0, keep=0.25, acc=0.875),
          _step(8, 250, 4.0, keep=0.5, acc=0.8125)]


def test_time_to_accuracy_ratios():
    r = time_to_accuracy(DENSE, REGATE)
    assert r["dense_peak"] == 0.75
    assert (r["step_dense"], r["tokens_dense"], r["wall_dense"]) == (4, 400, 4.0)
    assert (r["step_regate"], r["tokens_regate"], r["wall_regate"]) == (4, 150, 2.0)
    assert r["tokens_ratio"] == 0.375 and r["wall_ratio"] == 0.5
    assert r["acc_dense"] == 0.625 and r["acc_regate"] == 0.8125
    assert r["mean_keep"] == 0.4
    assert summary_line(r) == ("tokens_to_dense_peak=0.375 wall_to_dense_peak=0.500 "
                               "acc_dense=0.6250 acc_regate=0.8125 mean_keep=0.400")
    table = format_table(r)
    assert "400" in table and "150" in table and "0.375" in table and "0.8125" in table


def test_time_to_accuracy_never_reached_is_inf():
    never = [_step(2, 100, 1.0, keep=0.5, acc=0.5), _step(4, 200, 2.0, keep=0.5, acc=0.625)]
    r = time_to_accuracy(DENSE, never)
    assert math.isinf(r["tokens_ratio"]) and math.isinf(r["wall_ratio"])
    assert r["tokens_regate"] is None and r["wall_regate"] is None
    assert summary_line(r) == ("tokens_to_dense_peak=inf wall_to_dense_peak=inf "
                               "acc_dense=0.6250 acc_regate=0.6250 mean_keep=0.500")
    assert "not reached" in format_table(r)
    with pytest.raises(ValueError, match="no evaluation"):
        time_to_accuracy([_step(1, 100, 1.0)], never)


def test_load_metrics_and_plot(tmp_path):
    path = tmp_path / "dense.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in DENSE) + "\n")
    assert load_metrics(str(path)) == DENSE
    png = plot_accuracy_vs_tokens(DENSE, REGATE, str(tmp_path / "acc.png"))
    with open(png, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    (tmp_path / "bad.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_metrics(str(tmp_path / "bad.jsonl"))


# ----------------------------------------------------------------------------- regate-inspect


def _records(root):
    write_png(os.path.join(root, "red.png"), (255, 0, 0))
    return [
        {"id": "a", "image": "red.png", "conversations": conv("<image>\nwhat color is the cat?",
                                                              "a red cat")},
        {"id": "b", "conversations": conv("how many dogs are there?", "two dogs sit on a mat")},
        {"id": "c", "conversations": conv("describe it", "a box", "what color", "blue")},
    ]


def _dataset(path, tokenizer):
    return ConversationDataset(str(path), tokenizer, seq_length=64, num_image_tokens=4,
                               image_size=(8, 8))


def _store(path, dataset, tokenizer):
    """Losses 0.25 * k + sample_id for the k-th target (exact in float16)."""
    counts = dataset.target_counts()
    values = [0.25 * np.arange(n) + i for i, n in enumerate(counts)]
    write_store(str(path), values, {"teacher": "test-teacher", "tokenizer_sha256": tokenizer.sha256,
                                    "dataset_fingerprint": dataset.fingerprint,
                                    "teacher_visual": "pad"})
    return values


def test_render_shows_pieces_and_values(tmp_path, spm_tokenizer):  # noqa: F811
    data = write_records(tmp_path / "data.json", _records(tmp_path))
    dataset = _dataset(data, spm_tokenizer)
    values = _store(tmp_path / "store", dataset, spm_tokenizer)
    store = RefLossStore.open(str(tmp_path / "store"), dataset=dataset, tokenizer=spm_tokenizer)
    paths = render(dataset, spm_tokenizer, store, [0, 2], str(tmp_path / "out"))
    with open(paths["html"], encoding="utf-8") as f:
        page = f.read()
    for sample_id in (0, 2):
        sample = dataset[dataset.index_of(sample_id)]
        targets = sample.labels[sample.loss_mask == 1].tolist()
        assert len(targets) == len(values[sample_id])
        for token, value in zip(targets, values[sample_id]):
            piece = spm_tokenizer.id_to_piece(token)
            assert f'title="{piece.replace("<", "&lt;").replace(">", "&gt;")} {value:.3f}"' in page
    assert "what color is the cat?" in page and "&lt;image&gt;" in page
    assert "sample 1" not in page
    with open(paths["png"], "rb") as f:
        assert f.read(8) == PNG_MAGIC


def test_inspect_cli(tmp_path, spm_model_path, spm_tokenizer, capsys):  # noqa: F811
    data = write_records(tmp_path / "data.json", _records(tmp_path))
    dataset = _dataset(data, spm_tokenizer)
    _store(tmp_path / "store", dataset, spm_tokenizer)
    common = ["--data-path", data, "--tokenizer-model", spm_model_path, "--seq-length", "64",
              "--img-h", "8", "--img-w", "8", "--patch-dim", "4"]
    out = tmp_path / "out"
    assert inspect_main(common + ["--store", str(tmp_path / "store"), "--output", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / "ref_loss.html"), str(out / "ref_loss.png")]
    assert all(os.path.isfile(p) for p in printed)
    assert inspect_main(common + ["--store", str(tmp_path / "store"), "--sample-ids", "1",
                                  "--output", str(out)]) == 0
    capsys.readouterr()

    # A store built for another data file is refused with the reason.
    other = write_records(tmp_path / "other.json", _records(tmp_path)[:2])
    _store(tmp_path / "other_store", _dataset(other, spm_tokenizer), spm_tokenizer)
    assert inspect_main(common + ["--store", str(tmp_path / "other_store"),
                                  "--output", str(out)]) == 2
    assert "mismatch" in capsys.readouterr().err
    # Same record count, different content: the fingerprint catches it.
    changed = _records(tmp_path)
    changed[1]["conversations"][1]["value"] = "three dogs"
    write_records(tmp_path / "changed.json", changed)
    _store(tmp_path / "changed_store", _dataset(tmp_path / "changed.json", spm_tokenizer),
           spm_tokenizer)
    assert inspect_main(common + ["--store", str(tmp_path / "changed_store"),
                                  "--output", str(out)]) == 2
    assert "fingerprint mismatch" in capsys.readouterr().err
    # An unknown sample id and a patch size that does not divide the image are errors too.
    assert inspect_main(common + ["--store", str(tmp_path / "store"), "--sample-ids", "7",
                                  "--output", str(out)]) == 2
    assert "sample_id 7" in capsys.readouterr().err
    bad = [a if a != "4" else "3" for a in common]
    assert inspect_main(bad + ["--store", str(tmp_path / "store"), "--output", str(out)]) == 2
    assert "--patch-dim" in capsys.readouterr().err


def test_render_refuses_misaligned_store(tmp_path, spm_tokenizer):  # noqa: F811
    data = write_records(tmp_path / "data.json", _records(tmp_path))
    dataset = _dataset(data, spm_tokenizer)
    write_store(str(tmp_path / "store"), [np.zeros(2), np.zeros(3), np.zeros(1)],
                {"teacher": "t", "tokenizer_sha256": spm_tokenizer.sha256,
                 "dataset_fingerprint": dataset.fingerprint, "teacher_visual": "pad"})
    with pytest.raises(ValueError, match="target count mismatch"):
        RefLossStore.open(str(tmp_path / "store"), dataset=dataset, tokenizer=spm_tokenizer)
    unchecked = RefLossStore.open(str(tmp_path / "store"))
    with pytest.raises(ValueError, match="sample 0 has"):
        render(dataset, spm_tokenizer, unchecked, [0], str(tmp_path / "out"))

"""Reference-loss store: round trip, validation errors, atomic writes, resumable sharded build."""

import json
import os

import numpy as np
import pytest
from fixtures_data import mixed_records, spm_model_path, spm_tokenizer, write_records  # noqa: F401

from regate_megatron.data.llava import ConversationDataset
from regate_megatron.data.tokenizer import SentencePieceTokenizer, train_sentencepiece
from regate_megatron.scoring import ref_store as ref_store_mod
from regate_megatron.scoring.ref_store import (
    FORMAT_VERSION,
    RefLossStore,
    StoreBuilder,
    write_store,
)


def _meta(**kw):
    meta = dict(teacher="tiny-teacher@step100", tokenizer_sha256="0" * 64,
                dataset_fingerprint="f" * 64, teacher_visual="pad")
    meta.update(kw)
    return meta


def _losses(counts, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.random(int(n), dtype=np.float32) * 5 for n in counts]


@pytest.fixture
def dataset(tmp_path, spm_tokenizer):
    path = write_records(tmp_path / "d.json", mixed_records(tmp_path))
    return ConversationDataset(path, spm_tokenizer, seq_length=64, num_image_tokens=4,
                               image_size=(8, 8))


def _dataset_store(path, dataset, tokenizer, counts=None, **meta_kw):
    counts = dataset.target_counts() if counts is None else counts
    values = _losses(counts)
    meta = _meta(tokenizer_sha256=tokenizer.sha256, dataset_fingerprint=dataset.fingerprint)
    meta.update(meta_kw)
    write_store(str(path), values, meta)
    return values


def test_round_trip(tmp_path):
    values = _losses([3, 0, 5, 1])
    write_store(str(tmp_path / "store"), values, _meta())
    store = RefLossStore.open(str(tmp_path / "store"))
    assert len(store) == 4
    assert isinstance(store.values, np.memmap) and isinstance(store.offsets, np.memmap)
    assert store.offsets.tolist() == [0, 3, 3, 8, 9]
    for i, v in enumerate(values):
        assert store[i].dtype == np.float16 and store[i].shape == v.shape
        np.testing.assert_array_equal(store[i], v.astype(np.float16))
    assert store.meta["num_samples"] == 4 and store.meta["format_version"] == FORMAT_VERSION
    assert store.meta["teacher"] == "tiny-teacher@step100" and store.meta["teacher_visual"] == "pad"
    with pytest.raises(IndexError):
        store[4]
    # Overwriting an existing store replaces it.
    write_store(str(tmp_path / "store"), _losses([2]), _meta())
    assert len(RefLossStore.open(str(tmp_path / "store"))) == 1
    assert sorted(os.listdir(tmp_path)) == ["store"]


def test_open_validates_against_dataset_and_tokenizer(tmp_path, dataset, spm_tokenizer):
    path = tmp_path / "store"
    values = _dataset_store(path, dataset, spm_tokenizer)
    store = RefLossStore.open(str(path), dataset=dataset, tokenizer=spm_tokenizer)
    for sid in range(dataset.num_records):
        assert store[sid].shape == (dataset.target_counts()[sid],)
        np.testing.assert_array_equal(store[sid], values[sid].astype(np.float16))

    # sample count
    write_store(str(path), _losses(dataset.target_counts()[:3]),
                _meta(tokenizer_sha256=spm_tokenizer.sha256,
                      dataset_fingerprint=dataset.fingerprint))
    with pytest.raises(ValueError, match=r"sample count mismatch.*3 samples.*4 records"
                                         r".*regate-precompute-ref"):
        RefLossStore.open(str(path), dataset=dataset)

    # dataset fingerprint
    write_store(str(path), _losses(dataset.target_counts()),
                _meta(tokenizer_sha256=spm_tokenizer.sha256, dataset_fingerprint="e" * 64))
    with pytest.raises(ValueError, match=r"dataset fingerprint mismatch.*regate-precompute-ref"):
        RefLossStore.open(str(path), dataset=dataset)

    # tokenizer
    other = SentencePieceTokenizer(train_sentencepiece(["a b c d e"] * 40, str(tmp_path / "o"), 40))
    _dataset_store(path, dataset, spm_tokenizer)
    with pytest.raises(ValueError, match=r"tokenizer mismatch.*o\.model.*regate-precompute-ref"):
        RefLossStore.open(str(path), dataset=dataset, tokenizer=other)

    # per-sample target count: sample 2 has one loss too many
    counts = dataset.target_counts()
    counts[2] += 1
    _dataset_store(path, dataset, spm_tokenizer, counts=counts)
    with pytest.raises(ValueError,
                       match=r"per-sample target count mismatch: sample 2 .*regate-precompute-ref"):
        RefLossStore.open(str(path), dataset=dataset, tokenizer=spm_tokenizer)


def test_open_missing_and_corrupt(tmp_path):
    with pytest.raises(FileNotFoundError, match="regate-precompute-ref"):
        RefLossStore.open(str(tmp_path / "none"))
    write_store(str(tmp_path / "s"), _losses([2, 2]), _meta())
    np.save(tmp_path / "s" / "offsets.npy", np.array([0, 2, 5], dtype=np.int64))
    with pytest.raises(ValueError, match="corrupt"):
        RefLossStore.open(str(tmp_path / "s"))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e6])  # 1e6 overflows float16
def test_non_finite_losses_refused(tmp_path, bad):
    values = _losses([2, 3, 2])
    values[1][2] = bad
    with pytest.raises(ValueError, match="sample 1"):
        write_store(str(tmp_path / "store"), values, _meta())
    assert os.listdir(tmp_path) == []


def test_write_is_atomic(tmp_path, monkeypatch):
    write_store(str(tmp_path / "store"), _losses([1, 1]), _meta(teacher="old"))
    real_write_json = ref_store_mod._write_json

    def crash(path, obj):
        raise OSError("disk full")

    monkeypatch.setattr(ref_store_mod, "_write_json", crash)
    with pytest.raises(OSError, match="disk full"):
        write_store(str(tmp_path / "store"), _losses([4, 4, 4]), _meta(teacher="new"))
    with pytest.raises(OSError, match="disk full"):
        write_store(str(tmp_path / "fresh"), _losses([4]), _meta())
    monkeypatch.setattr(ref_store_mod, "_write_json", real_write_json)
    # The old store is intact, no partial store or temp dir is left.
    assert sorted(os.listdir(tmp_path)) == ["store"]
    store = RefLossStore.open(str(tmp_path / "store"))
    assert store.meta["teacher"] == "old" and len(store) == 2


def test_write_store_refuses_foreign_dir_and_bad_meta(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a reference-loss store"):
        write_store(str(tmp_path / "mine"), _losses([1]), _meta())
    assert (tmp_path / "mine" / "notes.txt").exists()
    with pytest.raises(ValueError, match="teacher_visual"):
        write_store(str(tmp_path / "x"), _losses([1]), _meta(teacher_visual="blur"))
    with pytest.raises(ValueError, match="missing"):
        write_store(str(tmp_path / "x"), _losses([1]), {"teacher": "t"})


# -- StoreBuilder ----------------------------------------------------------------------

COUNTS = np.array([3, 0, 2, 5, 1, 4, 2, 0, 1, 3, 2], dtype=np.int64)  # 11 samples
ALL = _losses(COUNTS, seed=3)


def _run_rank(out, rank, world, shard_size=3, meta=None, stop_after=None):
    builder = StoreBuilder(str(out), num_samples=len(COUNTS), rank=rank, world_size=world,
                           shard_size=shard_size, meta=meta or _meta())
    done = 0
    for ids in builder.pending_shards():
        if stop_after is not None and done == stop_after:
            return builder
        builder.write_shard(ids, [ALL[i] for i in ids])
        done += 1
    return builder


def _read(path):
    store = RefLossStore.open(str(path))
    return np.asarray(store.offsets).copy(), np.asarray(store.values).copy(), store.meta


def test_two_rank_build_equals_one_rank_build(tmp_path):
    b0 = _run_rank(tmp_path / "two", 0, 2)
    _run_rank(tmp_path / "two", 1, 2)
    assert [ids[0] for ids in b0.pending_shards()] == []
    b0.finalize(COUNTS)  # rank 0, after a barrier
    _run_rank(tmp_path / "one", 0, 1).finalize(COUNTS)
    off2, val2, meta2 = _read(tmp_path / "two")
    off1, val1, meta1 = _read(tmp_path / "one")
    np.testing.assert_array_equal(off1, off2)
    np.testing.assert_array_equal(val1, val2)
    assert meta1 == meta2
    np.testing.assert_array_equal(np.diff(off1), COUNTS)
    np.testing.assert_array_equal(val1, np.concatenate(ALL).astype(np.float16))
    assert not (tmp_path / "two" / "shards").exists()
    assert sorted(os.listdir(tmp_path / "two")) == ["meta.json", "offsets.npy", "values.npy"]


def test_shards_are_round_robin(tmp_path):
    b0 = StoreBuilder(str(tmp_path), num_samples=11, rank=0, world_size=2, shard_size=3,
                      meta=_meta())
    b1 = StoreBuilder(str(tmp_path), num_samples=11, rank=1, world_size=2, shard_size=3,
                      meta=_meta())
    assert b0.pending_shards() == [[0, 1, 2], [6, 7, 8]]
    assert b1.pending_shards() == [[3, 4, 5], [9, 10]]
    with pytest.raises(ValueError, match="not one shard"):
        b0.write_shard([1, 2, 3], [ALL[1], ALL[2], ALL[3]])
    with pytest.raises(ValueError, match="sample 7"):
        b0.write_shard([6, 7, 8], [ALL[6], np.array([np.nan], np.float32), ALL[8]])
    assert b0.pending_shards() == [[0, 1, 2], [6, 7, 8]]  # nothing written
    assert not any(n.startswith("shard-") for n in os.listdir(tmp_path / "shards"))


def test_interrupted_build_resumes(tmp_path, monkeypatch):
    out = tmp_path / "store"
    first = _run_rank(out, 0, 1, stop_after=2)  # "crash" after two of four shards
    assert len(first.pending_shards()) == 2
    with pytest.raises(ValueError, match="not finished"):
        first.finalize(COUNTS)
    shard_files = sorted((out / "shards").glob("shard-*.npz"))
    mtimes = {p.name: p.stat().st_mtime_ns for p in shard_files}

    written = []
    real = StoreBuilder.write_shard

    def counting(self, ids, values):
        written.append(list(ids))
        return real(self, ids, values)

    monkeypatch.setattr(StoreBuilder, "write_shard", counting)
    # Resume with another world size: only the unfinished shards are computed.
    second = _run_rank(out, 0, 2)
    _run_rank(out, 1, 2)
    assert written == [[6, 7, 8], [9, 10]]
    assert {p.name: p.stat().st_mtime_ns for p in shard_files} == mtimes
    second.finalize(COUNTS)
    np.testing.assert_array_equal(_read(out)[1], np.concatenate(ALL).astype(np.float16))

    # A rerun on the finished store has nothing to do.
    again = _run_rank(out, 0, 1)
    assert again.pending_shards() == [] and written == [[6, 7, 8], [9, 10]]
    again.finalize(COUNTS)


def test_different_meta_is_an_error(tmp_path):
    out = tmp_path / "store"
    _run_rank(out, 0, 1, stop_after=1)
    with pytest.raises(ValueError,
                       match=r"meta\.teacher differ.*remove the directory or use a new one"):
        _run_rank(out, 0, 1, meta=_meta(teacher="another-teacher"))
    with pytest.raises(ValueError, match=r"shard_size differ"):
        _run_rank(out, 0, 1, shard_size=4)
    _run_rank(out, 0, 1).finalize(COUNTS)
    with pytest.raises(ValueError, match=r"finished store.*meta\.teacher_visual differ"):
        _run_rank(out, 0, 1, meta=_meta(teacher_visual="drop"))


def test_finalize_checks_counts(tmp_path):
    builder = _run_rank(tmp_path / "store", 0, 1)
    wrong = COUNTS.copy()
    wrong[4] = 2
    with pytest.raises(ValueError, match="sample 4 has 1 reference losses but 2 target tokens"):
        builder.finalize(wrong)
    assert not (tmp_path / "store" / "meta.json").exists()
    builder.finalize(COUNTS)
    assert json.loads((tmp_path / "store" / "meta.json").read_text())["num_samples"] == 11

"""Stable ids and target counts on real Megatron-Energon webdatasets (examples/multimodal's
data): the ids follow every sample through blended, shuffled training loaders (with and
without loader workers, across epochs and a savable loader's restore), the target counts of
a three-rank pass equal what each caption says, and bad keys are named."""

import dataclasses
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch

energon = pytest.importorskip("megatron.energon", reason="megatron-energon is not installed")

from dist import run_world  # noqa: E402
from multimodal_cpu_data import captioning_webdataset  # noqa: E402

from regate_megatron.data.llava import IGNORE_INDEX, IMAGE_TOKEN_INDEX  # noqa: E402
from regate_megatron.megatron_lm.energon import (  # noqa: E402
    EnergonIds,
    EnergonView,
    shared_target_counts,
)
from regate_megatron.megatron_lm.sample_ids import targets_per_sample  # noqa: E402

PAD, BOS, EOS = 0, 1, 2
IMG_SEQ_LEN, MAX_LENGTH = 3, 64
DATASETS = {"dsA": (2, 5), "dsB": (1, 4)}  # name: (shards, samples per shard)


def _caption(name: str, k: int) -> str:
    return f"{name} caption {k} " + "word " * (k % 4)


def _build(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for name, (shards, per) in DATASETS.items():
        captioning_webdataset(root / name, [_caption(name, k) for k in range(shards * per)],
                              per, lambda: rng.integers(0, 255, (4, 4, 3), dtype=np.uint8),
                              [("train", f"shard_{{0..{shards - 1}}}.tar")])
    (root / "epochized.yaml").write_text(  # repetitions instead of weights
        "__module__: megatron.energon\n__class__: MetadatasetV2\nsplits:\n  train:\n"
        "    blend_epochized:\n" + "".join(f"      - repetitions: {2 - i}\n        path: {name}\n"
                                           for i, name in enumerate(DATASETS)))
    (root / "blend.yaml").write_text(
        "__module__: megatron.energon\n__class__: MetadatasetV2\nsplits:\n  train:\n"
        "    blend:\n" + "".join(f"      - weight: 1\n        path: {name}\n"
                                 for name in DATASETS))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("energon"))


def _expected(key: str):
    """(stable id, target count) of a sample, from its name alone."""
    name, k = key.split("_")
    offset = sum(per * shards for n, (shards, per) in DATASETS.items() if n < name)
    return offset + int(k), len(_caption(name, int(k)).split()) + 1  # + EOS


@dataclasses.dataclass
class _Sample(energon.Sample):
    tokens: torch.Tensor
    labels: torch.Tensor


@dataclasses.dataclass
class _Batch(energon.Batch):
    tokens: torch.Tensor
    labels: torch.Tensor
    num_tiles: torch.Tensor


class CaptionEncoder(energon.DefaultTaskEncoder):
    """examples/multimodal's layout: BOS, one image placeholder, a prompt drawn from the
    global NumPy generator (as the script's prompt lists), the caption, EOS; ``labels`` one
    longer than ``tokens`` and padded with the pad token."""

    def encode_sample(self, sample) -> _Sample:
        words = sample.caption.split()
        prompt = [3] * int(np.random.randint(1, 4))
        answer = [10 + len(w) for w in words] + [EOS]
        tokens = torch.tensor([BOS, IMAGE_TOKEN_INDEX] + prompt + answer[:-1])
        labels = torch.tensor([BOS] + [IGNORE_INDEX] * (1 + len(prompt)) + answer)
        return _Sample(__key__=sample.__key__, __restore_key__=sample.__restore_key__,
                       __subflavors__=sample.__subflavors__, tokens=tokens, labels=labels)

    def batch(self, samples: List[_Sample]) -> _Batch:
        width = max(len(s.tokens) for s in samples)
        tokens = torch.full((len(samples), width), PAD, dtype=torch.long)
        labels = torch.full((len(samples), width + 1), PAD, dtype=torch.long)
        for i, s in enumerate(samples):
            tokens[i, :len(s.tokens)] = s.tokens
            labels[i, :len(s.labels)] = s.labels
        return _Batch(__key__=[s.__key__ for s in samples],
                      __restore_key__=[s.__restore_key__ for s in samples],
                      __subflavors__=samples[0].__subflavors__, tokens=tokens, labels=labels,
                      num_tiles=torch.ones(len(samples), dtype=torch.int32))

    def encode_batch(self, batch: _Batch) -> dict:
        raw = dataclasses.asdict(batch)
        del raw["__subflavors__"]
        return raw


def _view(path) -> EnergonView:
    return EnergonView(CaptionEncoder, data_path=lambda: [str(path)], pad_token=PAD)


def _train_loader(path, num_workers: int):
    wc = energon.WorkerConfig(rank=0, world_size=1, num_workers=num_workers)
    # examples/multimodal's training settings (dataloader_provider.datasets_provider)
    ds = energon.get_train_dataset(
        str(path), batch_size=2, task_encoder=CaptionEncoder(), worker_config=wc,
        virtual_epoch_length=1000, max_samples_per_sequence=100, shuffle_buffer_size=100)
    return energon.get_savable_loader(ds, worker_config=wc)


def _check_rows(view, batch) -> int:
    text = view(batch)
    for key, sample_id in zip(batch["__key__"], text.sample_ids.tolist()):
        assert sample_id == _expected(key)[0], (key, sample_id)
    return len(batch["__key__"])


@pytest.mark.parametrize("num_workers", [0, 1])
def test_ids_follow_samples_through_blended_shuffled_training_loaders(data, num_workers):
    view = _view(data / "blend.yaml")
    assert view.ids.lengths.tolist() == [10, 4] and view.ids.num_samples == 14
    loader = _train_loader(data / "blend.yaml", num_workers)
    seen = 0
    for i, batch in enumerate(loader):  # 3 epochs of the blend, shuffled and resampled
        seen += _check_rows(view, batch)
        if i == 3:
            state = loader.save_state_rank()
        if i == 20:
            break
    assert seen == 42
    # a restored loader (what a resume does) gives the same ids for the same samples
    restored = _train_loader(data / "blend.yaml", num_workers)
    restored.restore_state_rank(state)
    assert sum(_check_rows(view, b) for _, b in zip(range(5), restored)) == 10
    # an epochized blend (repetitions): the same ids
    epochized = _view(data / "epochized.yaml")
    assert epochized.ids.lengths.tolist() == [10, 4]
    assert sum(_check_rows(epochized, b) for _, b in
               zip(range(8), _train_loader(data / "epochized.yaml", num_workers))) == 16
    # a single dataset path: no blend marker, dataset 0
    single = _view(data / "dsB")
    assert single.ids.lengths.tolist() == [4]
    for _, batch in zip(range(4), _train_loader(data / "dsB", num_workers)):
        for key, sample_id in zip(batch["__key__"], single(batch).sample_ids.tolist()):
            assert sample_id == int(key.split("_")[1])


def test_view_masks_padding_as_the_script_does(data):
    view = _view(data / "blend.yaml")
    padded = 0
    for _, batch in zip(range(6), _train_loader(data / "blend.yaml", 0)):
        labels = batch["labels"][:, 1:batch["tokens"].shape[1] + 1]
        # examples/multimodal's get_ltor_masks_and_position_ids: pad and IGNORE_INDEX untrained
        assert torch.equal(view(batch).loss_mask,
                           ((labels != PAD) & (labels != IGNORE_INDEX)).float())
        padded += int((labels == PAD).sum())
        # a tokenizer's own <image> id (examples/multimodal: the model's image_token_index)
        # is the image placeholder when the view is told so
        own = dict(batch, tokens=batch["tokens"].masked_fill(
            batch["tokens"] == IMAGE_TOKEN_INDEX, 7))
        told = EnergonView(CaptionEncoder, data_path=str(data / "blend.yaml"), pad_token=PAD,
                           image_token=lambda: 7)
        assert torch.equal(told(own).input_ids, view(batch).input_ids)
        assert not bool((view(own).input_ids == IMAGE_TOKEN_INDEX).any())
    assert padded > 0  # the batches did pad


def _counts_on_ranks(rank, path):
    view = _view(path)
    before = np.random.get_state()[1].copy()
    counts = shared_target_counts(view, IMG_SEQ_LEN, MAX_LENGTH, log=lambda _: None)
    kept = bool((np.random.get_state()[1] == before).all())
    # the pass with 2 loader workers per rank, and a single process's (rank 0 only)
    workers = shared_target_counts(view, IMG_SEQ_LEN, MAX_LENGTH, log=lambda _: None,
                                   num_workers=2)
    alone = view.count_targets(IMG_SEQ_LEN, MAX_LENGTH)[0] if rank == 0 else None
    return counts, kept, alone, workers


def test_target_counts_of_a_three_rank_pass_equal_the_captions(data):
    results = run_world(_counts_on_ranks, 3, path=str(data / "blend.yaml"))
    expected = np.zeros(14, dtype=np.int64)
    for name, (shards, per) in DATASETS.items():
        for k in range(shards * per):
            sample_id, count = _expected(f"{name}_{k:04d}")
            expected[sample_id] = count
    for counts, kept, _, workers in results:
        assert counts.tolist() == expected.tolist() and workers.tolist() == expected.tolist()
        assert kept  # the prompt draws did not move the run's NumPy generator
    assert results[0][2].tolist() == expected.tolist()


def test_bad_keys_are_named(data):
    ids = EnergonIds([10, 4], source="blend.yaml")
    assert ids.sample_id(("MapDataset", 3, "BlendDataset", 1, "MapDataset", 0,
                          "Webdataset", 2)) == 12
    assert ids.sample_id(("MapDataset", 3, "ConcatDataset", 0, "Webdataset", 9)) == 9
    with pytest.raises(ValueError, match="outside blend.yaml: dataset 1 of 2, index 4"):
        ids.sample_id(("BlendDataset", 1, "Webdataset", 4))
    with pytest.raises(ValueError, match="nested blends and packed samples"):
        ids.sample_id(("MapDataset", 3, "MapDataset", 0))
    with pytest.raises(ValueError, match="nested blends"):
        ids.sample_id(("BlendDataset", 0, "BlendDataset", 1, "Webdataset", 0))
    with pytest.raises(ValueError, match="holds 1 sample keys for 2 rows"):
        ids.batch_ids({"__restore_key__": ("BatchDataset", 0, ("Webdataset", 1))}, rows=2)
    with pytest.raises(ValueError, match="holds 0 sample keys"):
        ids.batch_ids({"tokens": torch.zeros(1, 2)}, rows=1)


def test_a_resumed_build_pass_leaves_out_the_samples_already_done(data):
    """``text_batches(skip=...)``: the in-script store build's second pass after a stop
    yields exactly the samples no chunk holds, each row with its own image and targets (the
    prompt is drawn anew)."""
    view = _view(data / "blend.yaml")
    whole = [int(i) for text in view.text_batches(batch_size=3)
             for i in text.sample_ids.tolist()]
    assert sorted(whole) == list(range(14))
    skip = np.zeros(14, dtype=bool)
    skip[[0, 2, 3, 7, 8, 13]] = True
    rest = list(view.text_batches(batch_size=3, skip=skip))
    ids = [int(i) for text in rest for i in text.sample_ids.tolist()]
    assert sorted(ids) == np.flatnonzero(~skip).tolist() and len(ids) == len(set(ids))
    assert any(len(text.sample_ids) < 3 for text in rest)  # some batches lost rows
    for text in rest:
        assert text.num_image_tiles.numel() == len(text.sample_ids)  # one image a sample
        for sample_id, count in targets_per_sample(text, IMG_SEQ_LEN, MAX_LENGTH):
            name = ("dsA", sample_id) if sample_id < 10 else ("dsB", sample_id - 10)
            assert count == _expected(f"{name[0]}_{name[1]:04d}")[1]

"""The reference-loss store: the frozen teacher's per-target-token losses.

A store is a directory::

    offsets.npy   int64 [N + 1]     sample i's losses are values[offsets[i]:offsets[i + 1]]
    values.npy    float16 [total]   one loss per target token, in position order, samples by id
    meta.json     {"teacher", "tokenizer_sha256", "dataset_fingerprint", "num_samples",
                   "teacher_visual", "format_version"}

indexed by ``sample_id`` (the record's index in the data file; skipped records
have 0 targets). It is opened memory-mapped, so every data-parallel rank can
open it without copying it into memory. ``meta.json`` is written last: a
directory without it is not a store.

`write_store` writes a store atomically. `StoreBuilder` builds one in
resumable, data-parallel shards (the engine of ``regate-precompute-ref``).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import List, Sequence

import numpy as np

from regate_megatron.config import TEACHER_VISUAL_MODES

__all__ = ["FORMAT_VERSION", "RefLossStore", "StoreBuilder", "write_store"]

FORMAT_VERSION = 1
_REQUIRED_META = ("teacher", "tokenizer_sha256", "dataset_fingerprint", "teacher_visual")
_REBUILD = (
    "rebuild it with `regate-precompute-ref --data-path ... --tokenizer-model ... --load TEACHER "
    "--seq-length ...` using this run's data, tokenizer and sequence layout, with --output a new "
    "directory (or remove {path} first)"
)


def _complete_meta(meta: dict, num_samples: int) -> dict:
    """Validate the caller's metadata and add num_samples / format_version."""
    missing = [k for k in _REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"store metadata is missing {missing}; required: {list(_REQUIRED_META)}")
    if meta["teacher_visual"] not in TEACHER_VISUAL_MODES:
        raise ValueError(
            f"store metadata teacher_visual must be one of {TEACHER_VISUAL_MODES}, "
            f"got {meta['teacher_visual']!r}"
        )
    if "num_samples" in meta and int(meta["num_samples"]) != num_samples:
        raise ValueError(
            f"store metadata says num_samples={meta['num_samples']} but {num_samples} "
            f"samples were given"
        )
    if "format_version" in meta and int(meta["format_version"]) != FORMAT_VERSION:
        raise ValueError(
            f"store metadata format_version={meta['format_version']} is not this code's "
            f"{FORMAT_VERSION}"
        )
    out = dict(meta)
    out["num_samples"] = int(num_samples)
    out["format_version"] = FORMAT_VERSION
    return out


def _as_losses(values, sample_id: int) -> np.ndarray:
    """One sample's losses as float16 [n]; ValueError naming the sample if not finite."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(
            f"sample {sample_id}: reference losses must be 1-D [n_targets], got shape {arr.shape}"
        )
    if not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise ValueError(
            f"sample {sample_id}: reference loss at target {bad} is {arr[bad]} (not finite); "
            f"check the teacher checkpoint and its inputs"
        )
    with np.errstate(over="ignore"):
        half = arr.astype(np.float16)
    if not np.isfinite(half).all():
        bad = int(np.flatnonzero(~np.isfinite(half))[0])
        raise ValueError(
            f"sample {sample_id}: reference loss at target {bad} is {arr[bad]}, which overflows "
            f"float16"
        )
    return half


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _first_count_mismatch(counts: np.ndarray, expected: np.ndarray):
    """(first differing sample id, how many differ) of two per-sample loss counts, or None."""
    differ = np.flatnonzero(counts != expected)
    return (int(differ[0]), int(differ.size)) if differ.size else None


def _is_store(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "meta.json"))


def _pack(halves: List[np.ndarray]):
    """(offsets int64 [N + 1], values float16 [total]) of per-sample arrays."""
    offsets = np.zeros(len(halves) + 1, dtype=np.int64)
    np.cumsum([h.size for h in halves], out=offsets[1:])
    values = np.concatenate(halves) if halves else np.zeros(0, dtype=np.float16)
    return offsets, values.astype(np.float16, copy=False)


def _write_store_files(directory: str, offsets: np.ndarray, values: np.ndarray, meta: dict) -> None:
    _save_npy(os.path.join(directory, "offsets.npy"), offsets)
    _save_npy(os.path.join(directory, "values.npy"), values)
    _write_json(os.path.join(directory, "meta.json"), meta)  # last: marks the store complete


def write_store(path: str, values_per_sample: Sequence[np.ndarray], meta: dict) -> None:
    """Write a store at ``path`` atomically (``values_per_sample[i]`` = sample i's losses).

    The store is written into a temporary directory next to ``path`` and renamed into
    place, so ``path`` never holds a partial store. An existing store at ``path`` is
    replaced; any other existing file or directory is refused. Non-finite losses (or ones
    that overflow float16) are refused with an error naming the sample id.
    """
    path = os.path.abspath(path)
    meta = _complete_meta(meta, len(values_per_sample))
    halves = [_as_losses(v, i) for i, v in enumerate(values_per_sample)]
    offsets, values = _pack(halves)
    if os.path.exists(path) and not _is_store(path):
        raise ValueError(
            f"{path} exists and is not a reference-loss store; refusing to overwrite it "
            f"(choose another path or remove it)"
        )
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{tag}")
    os.makedirs(tmp)
    try:
        _write_store_files(tmp, offsets, values, meta)
        if os.path.exists(path):
            # A directory cannot be renamed over a non-empty one: move the old store aside.
            old = os.path.join(parent, f".{os.path.basename(path)}.old-{tag}")
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _open_array(store: str, name: str, rebuild: str) -> np.ndarray:
    """One of the store's arrays, memory-mapped; a truncated or unreadable file is named."""
    try:
        return np.load(os.path.join(store, name), mmap_mode="r")
    except (ValueError, OSError, EOFError) as err:  # e.g. "mmap length is greater than file size"
        raise ValueError(f"reference-loss store {store}: {name} is truncated or unreadable "
                         f"({err}); {rebuild}") from None


class RefLossStore:
    """A store opened memory-mapped. ``store[sample_id]`` -> float16 [n_targets]."""

    def __init__(self, path: str, offsets: np.ndarray, values: np.ndarray, meta: dict):
        self.path = path
        self.offsets = offsets
        self.values = values
        self.meta = meta

    @classmethod
    def open(cls, path: str, *, dataset=None, tokenizer=None) -> "RefLossStore":
        """Open the store at ``path``; check it against ``dataset`` / ``tokenizer`` if given.

        Checked, in order: the sample count (``dataset.num_records``), the dataset
        fingerprint, the tokenizer fingerprint, and every sample's target count
        (``dataset.target_counts()``). Each mismatch is a ValueError saying which and how
        to rebuild.
        """
        path = os.path.abspath(path)
        rebuild = _REBUILD.format(path=path)
        if not _is_store(path):
            raise FileNotFoundError(
                f"no reference-loss store at {path} (no meta.json); build it with "
                f"`regate-precompute-ref`"
            )
        try:
            with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
                meta = json.load(f)
            if not isinstance(meta, dict) or not isinstance(meta.get("num_samples"), int):
                raise ValueError("not an object with an integer num_samples")
        except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
            raise ValueError(f"reference-loss store {path}: meta.json is truncated or corrupt "
                             f"({err}); {rebuild}") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"reference-loss store {path} has format_version {meta.get('format_version')!r}, "
                f"this code reads {FORMAT_VERSION}; {rebuild}"
            )
        offsets = _open_array(path, "offsets.npy", rebuild)
        values = _open_array(path, "values.npy", rebuild)
        n = int(meta["num_samples"])
        if (
            offsets.dtype != np.int64 or offsets.shape != (n + 1,) or values.dtype != np.float16
            or values.ndim != 1 or int(offsets[0]) != 0 or int(offsets[-1]) != values.shape[0]
            or bool((np.diff(offsets) < 0).any())
        ):
            raise ValueError(f"reference-loss store {path} is corrupt (offsets/values do not "
                             f"match meta.json); {rebuild}")
        store = cls(path, offsets, values, meta)
        if dataset is not None:
            if n != dataset.num_records:
                raise ValueError(
                    f"sample count mismatch: reference-loss store {path} has {n} samples but "
                    f"the dataset {dataset.data_path} has {dataset.num_records} records; {rebuild}"
                )
            if meta["dataset_fingerprint"] != dataset.fingerprint:
                raise ValueError(
                    f"dataset fingerprint mismatch: reference-loss store {path} was built for "
                    f"dataset fingerprint {meta['dataset_fingerprint'][:16]}..., this dataset "
                    f"({dataset.data_path}, seq_length {dataset.seq_length}, "
                    f"{dataset.num_image_tokens} image tokens) is {dataset.fingerprint[:16]}... "
                    f"(the data file or the sequence layout changed); {rebuild}"
                )
        if tokenizer is not None and meta["tokenizer_sha256"] != tokenizer.sha256:
            raise ValueError(
                f"tokenizer mismatch: reference-loss store {path} was built with tokenizer "
                f"sha256 {meta['tokenizer_sha256'][:16]}..., --tokenizer-model "
                f"{tokenizer.model_path} is {tokenizer.sha256[:16]}...; teacher and student must "
                f"share the vocabulary; {rebuild}"
            )
        if dataset is not None:
            expected = np.asarray(dataset.target_counts(), dtype=np.int64)
            stored = np.diff(np.asarray(offsets))
            mismatch = _first_count_mismatch(stored, expected)
            if mismatch:
                first, n = mismatch
                raise ValueError(
                    f"per-sample target count mismatch: sample {first} has {int(stored[first])} "
                    f"reference losses in {path} but {int(expected[first])} target tokens in the "
                    f"dataset ({n} sample(s) differ); {rebuild}"
                )
        return store

    def __len__(self) -> int:
        return int(self.offsets.shape[0]) - 1

    def __getitem__(self, sample_id: int) -> np.ndarray:
        i = int(sample_id)
        if not 0 <= i < len(self):
            raise IndexError(f"sample_id {sample_id} is outside the store's [0, {len(self)})")
        return self.values[int(self.offsets[i]) : int(self.offsets[i + 1])]


class StoreBuilder:
    """Builds a store in ``out_dir`` in resumable shards, split over data-parallel ranks.

    Sample ids ``[0, num_samples)`` are cut into contiguous shards of ``shard_size``; shard
    ``k`` belongs to rank ``k % world_size``. Each finished shard is a file under
    ``out_dir/shards/`` written atomically, so an interrupted build resumes where it
    stopped: `pending_shards` lists only this rank's unfinished shards. The build's
    settings (meta, num_samples, shard_size) are recorded in ``out_dir/shards/build.json``;
    resuming with different settings (e.g. another teacher) is an error. Once every rank is
    done, rank 0 calls `finalize` (after a barrier) to merge the shards into the store in
    ``out_dir`` and remove them. The world size may change between runs.
    """

    def __init__(self, out_dir: str, *, num_samples: int, rank: int, world_size: int,
                 shard_size: int, meta: dict):
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        if shard_size <= 0:
            raise ValueError(f"shard_size must be positive, got {shard_size}")
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.out_dir = os.path.abspath(out_dir)
        self.shard_dir = os.path.join(self.out_dir, "shards")
        self.num_samples = int(num_samples)
        self.rank, self.world_size, self.shard_size = int(rank), int(world_size), int(shard_size)
        self.meta = _complete_meta(meta, self.num_samples)
        self.num_shards = -(-self.num_samples // self.shard_size)
        self._settings = {"meta": self.meta, "num_samples": self.num_samples,
                          "shard_size": self.shard_size}

        if _is_store(self.out_dir) and not os.path.isdir(self.shard_dir):
            with open(os.path.join(self.out_dir, "meta.json")) as f:
                existing = json.load(f)
            if existing != self.meta:
                raise ValueError(self._conflict("holds a finished store built with", existing))
            self.finished = True  # nothing to do: the store is already built
            return
        # One listing: another rank may create shards/ (and out_dir) at any moment, so the
        # checks must not read the directory twice.
        entries = os.listdir(self.out_dir) if os.path.isdir(self.out_dir) else []
        if entries and os.path.basename(self.shard_dir) not in entries:
            raise ValueError(
                f"{self.out_dir} is not empty and holds no reference-loss build; "
                f"use an empty or new directory"
            )
        self.finished = False
        os.makedirs(self.shard_dir, exist_ok=True)
        settings_path = os.path.join(self.shard_dir, "build.json")
        if os.path.isfile(settings_path):
            with open(settings_path) as f:
                existing = json.load(f)
            if existing != self._settings:
                raise ValueError(self._conflict("holds a partial build with", existing))
        else:
            # Every rank may get here at once; each writes identical content atomically.
            tmp = f"{settings_path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            _write_json(tmp, self._settings)
            os.replace(tmp, settings_path)

    def _conflict(self, what: str, existing: dict) -> str:
        """Error text for a directory built with other settings, naming the fields that differ."""
        ours = self._settings if "meta" in existing else self.meta
        prefix = "" if "meta" in existing else "meta."
        diff = []
        for key in sorted(set(existing) | set(ours)):
            theirs, mine = existing.get(key), ours.get(key)
            if key == "meta" and isinstance(theirs, dict):
                diff += [f"meta.{k}" for k in sorted(set(theirs) | set(mine))
                         if theirs.get(k) != mine.get(k)]
            elif theirs != mine:
                diff.append(prefix + key)
        return (
            f"{self.out_dir} {what} different settings ({', '.join(diff)} differ); remove the "
            f"directory or use a new one for this build"
        )

    def _shard_path(self, k: int) -> str:
        return os.path.join(self.shard_dir, f"shard-{k:07d}.npz")

    def _shard_ids(self, k: int) -> List[int]:
        return list(range(k * self.shard_size, min((k + 1) * self.shard_size, self.num_samples)))

    def pending_shards(self) -> List[List[int]]:
        """This rank's unfinished shards, each a list of consecutive sample ids."""
        if self.finished:
            return []
        return [
            self._shard_ids(k) for k in range(self.rank, self.num_shards, self.world_size)
            if not os.path.isfile(self._shard_path(k))
        ]

    def write_shard(self, shard_sample_ids: Sequence[int],
                    values_per_sample: Sequence[np.ndarray]) -> None:
        """Record one shard's losses (``values_per_sample[j]`` for ``shard_sample_ids[j]``)."""
        ids = [int(i) for i in shard_sample_ids]
        k = ids[0] // self.shard_size if ids else -1
        if not ids or not 0 <= k < self.num_shards or ids != self._shard_ids(k):
            raise ValueError(
                f"write_shard: sample ids {ids[:3]}...{ids[-1:] if ids else ''} are not one shard "
                f"(consecutive ids of a {self.shard_size}-sample chunk from pending_shards())"
            )
        if len(values_per_sample) != len(ids):
            raise ValueError(
                f"write_shard: {len(ids)} sample ids but {len(values_per_sample)} loss arrays"
            )
        halves = [_as_losses(v, sid) for sid, v in zip(ids, values_per_sample)]
        offsets, values = _pack(halves)
        path = self._shard_path(k)
        tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                np.savez(f, offsets=offsets, values=values)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    def finalize(self, target_counts) -> None:
        """Merge every shard into the store in ``out_dir`` and remove the shards (rank 0).

        ``target_counts`` (int [num_samples], e.g. ``dataset.target_counts()``) must equal
        the per-sample loss counts; a missing shard or a count mismatch is an error.
        """
        expected = np.asarray(target_counts, dtype=np.int64)
        if expected.shape != (self.num_samples,):
            raise ValueError(
                f"finalize: target_counts has shape {expected.shape}, "
                f"expected ({self.num_samples},)"
            )
        if self.finished:
            store = RefLossStore.open(self.out_dir)
            self._check_counts(np.diff(np.asarray(store.offsets)), expected)
            return
        missing = [k for k in range(self.num_shards) if not os.path.isfile(self._shard_path(k))]
        if missing:
            raise ValueError(
                f"finalize: {len(missing)} shard(s) of {self.num_shards} are not finished "
                f"(first: shard {missing[0]}, rank {missing[0] % self.world_size}); run the build "
                f"again to finish them before finalizing"
            )
        counts, parts = [], []
        for k in range(self.num_shards):
            with np.load(self._shard_path(k)) as shard:
                counts.append(np.diff(shard["offsets"]))
                parts.append(shard["values"])
        counts = np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64)
        self._check_counts(counts, expected)
        offsets = np.zeros(self.num_samples + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        values = np.concatenate(parts).astype(np.float16) if parts else np.zeros(0, np.float16)

        # Write next to out_dir, then move the files in; meta.json last marks the store complete.
        tmp = os.path.join(self.out_dir, f".finalize-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.makedirs(tmp)
        try:
            _write_store_files(tmp, offsets, values, self.meta)
            for name in ("offsets.npy", "values.npy", "meta.json"):
                os.replace(os.path.join(tmp, name), os.path.join(self.out_dir, name))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(self.shard_dir)
        self.finished = True

    def _check_counts(self, counts: np.ndarray, expected: np.ndarray) -> None:
        mismatch = _first_count_mismatch(counts, expected)
        if mismatch:
            first, n = mismatch
            raise ValueError(
                f"finalize: sample {first} has {int(counts[first])} reference losses but "
                f"{int(expected[first])} target tokens ({n} sample(s) differ); the "
                f"shards do not match the dataset: remove {self.out_dir} and rebuild"
            )

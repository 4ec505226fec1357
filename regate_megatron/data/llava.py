"""LLaVA-format supervised fine-tuning data: conversations with images.

Records (a JSON list, or JSON Lines, one record per line)::

    {"id": "...", "image": "a.png" | ["a.png", "b.npy"],   # optional
     "conversations": [{"from": "human", "value": "<image>\\nWhat is shown?"},
                       {"from": "gpt",   "value": "A red cat."}, ...]}

Image paths are relative to ``image_root`` (default: the data file's directory).
Each ``<image>`` in a human turn takes the next image of the record, in order.

Prompt format (``PROMPT_FORMAT_VERSION`` 1). Text segments are encoded
separately and concatenated::

    [bos]                                       (omitted if the tokenizer has none)
    human turn:  encode("USER: " + text before the first <image>)
                 + num_image_tokens x IMAGE_TOKEN_INDEX      for each <image>,
                 + encode(text after it)                     ... in order,
                 + encode("\\n")
    gpt turn:    encode("ASSISTANT: ")                        context
                 + encode(answer) + [eos]                     targets

Image slots use the "expanded" layout: each image occupies ``num_image_tokens``
positions holding ``IMAGE_TOKEN_INDEX``, i.e. the student's combined sequence
after the vision encoder, so positions line up with the LLaVA model's combined
sequence and with the teacher's view (`regate_megatron.scoring.teacher`).

Labels: ``labels[i] = tokens[i + 1]`` (next-token prediction); ``IGNORE_INDEX``
at the last position and where ``tokens[i + 1]`` is an image slot (an image
slot is not a vocabulary id). ``loss_mask[i] = 1`` iff ``tokens[i + 1]`` is an
assistant target (answer text or its eos), so the target positions T of a
sample are ``loss_mask == 1``.

Images: PNG/JPEG (anything Pillow opens) are converted to RGB and scaled to
[0, 1]; ``.npy`` arrays may be ``[H, W]`` (gray, copied to 3 channels),
``[H, W, C]`` or ``[C, H, W]`` with ``C`` in {1, 3} (channels-last is assumed
when the last dimension is 1 or 3); integer arrays are divided by 255, float
arrays are taken to be in [0, 1]. All are resized with torch bilinear
interpolation (antialiased) to ``image_size`` and normalised to
``(x - 0.5) / 0.5``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "IMAGE_TOKEN_INDEX",
    "IGNORE_INDEX",
    "IMAGE_PLACEHOLDER",
    "PROMPT_FORMAT_VERSION",
    "Sample",
    "Batch",
    "ConversationDataset",
    "collate",
    "load_image",
    "read_json_records",
]

IMAGE_TOKEN_INDEX = -200  # Megatron LLaVA's image token index
IGNORE_INDEX = -100  # label of positions that are never trained
IMAGE_PLACEHOLDER = "<image>"
PROMPT_FORMAT_VERSION = 1

_USER_PREFIX = "USER: "
_ASSISTANT_PREFIX = "ASSISTANT: "
_TURN_END = "\n"
_ROLES = ("human", "gpt")
_SKIP_HINT = "fix the record or pass --skip-bad-samples"


@dataclass
class Sample:
    """One tokenized conversation.

    sample_id:     the record's index in the data file, stable across runs (skipping bad
                   records does not renumber the others).
    tokens:        [n] int64, expanded layout; image slots hold IMAGE_TOKEN_INDEX; n <= seq_length.
    labels:        [n] int64, tokens shifted left (see the module docstring).
    loss_mask:     [n] float32, 1 where labels[i] is an assistant target.
    images:        [num_images, 3, H, W] float32, normalised ([0, 3, H, W] when none).
    prompt_length: tokens[:prompt_length] is the context of the last assistant turn (it ends
                   with encode("ASSISTANT: ")), for greedy-decode evaluation.
    answer:        the last assistant turn's reference text.
    """

    sample_id: int
    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    images: torch.Tensor
    prompt_length: int
    answer: str


@dataclass
class Batch:
    """A padded micro-batch.

    sample_ids: [b] int64.
    tokens:     [b, s] int64, padded with the tokenizer's pad id to s = seq_length.
    labels:     [b, s] int64, IGNORE_INDEX in padding.
    loss_mask:  [b, s] float32, 0 in padding.
    images:     [sum(num_images), 3, H, W] float32, the samples' images in order.
    num_images: [b] int64, images per sample.
    """

    sample_ids: torch.Tensor
    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    images: torch.Tensor
    num_images: torch.Tensor

    def to(self, device, non_blocking: bool = False) -> "Batch":
        """The same batch with every tensor on ``device``: the one way a batch reaches the
        model's device (`regate_megatron.training.parallel.rank_device`)."""
        return Batch(**{
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in dataclasses.fields(self)
        })


def _image_size(image_size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    h, w = (int(x) for x in image_size)
    if h <= 0 or w <= 0:
        raise ValueError(f"image_size must be positive (H, W), got {image_size!r}")
    return h, w


def _npy_layout(shape: Tuple[int, ...]) -> str:
    """'hw', 'hwc' or 'chw' for an image array shape; ValueError otherwise."""
    if len(shape) == 2 and min(shape) > 0:
        return "hw"
    if len(shape) == 3 and min(shape) > 0:
        if shape[-1] in (1, 3):
            return "hwc"
        if shape[0] in (1, 3):
            return "chw"
    raise ValueError(
        f"array of shape {tuple(shape)} is not an image; expected [H, W], [H, W, C] or "
        f"[C, H, W] with C in (1, 3)"
    )


def _check_image(path: str) -> None:
    """Raise ValueError if ``path`` is missing or cannot be read as an image (headers only)."""
    if not os.path.isfile(path):
        raise ValueError(f"image {path!r} does not exist")
    if path.lower().endswith(".npy"):
        try:
            arr = np.load(path, mmap_mode="r")
        except Exception as exc:
            raise ValueError(f"image {path!r} is not a readable .npy array ({exc})") from None
        try:
            _npy_layout(arr.shape)
        except ValueError as exc:
            raise ValueError(f"image {path!r}: {exc}") from None
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
            raise ValueError(f"image {path!r} has non-numeric dtype {arr.dtype}")
        _check_finite_pixels(path, arr)
        return
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.size  # noqa: B018 -- the header is parsed on open
    except Exception as exc:
        raise ValueError(f"image {path!r} cannot be opened by Pillow ({exc})") from None


def _check_finite_pixels(path: str, arr: np.ndarray) -> None:
    """A float image with NaN/inf pixels would make the loss non-finite: a data error."""
    if np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.complexfloating):
        finite = np.isfinite(arr)
        if not finite.all():
            where = tuple(int(i) for i in np.argwhere(~finite)[0])
            raise ValueError(
                f"image {path!r} holds {int((~finite).sum())} non-finite pixel value(s) (first "
                f"at index {where}); fix or drop the image"
            )


def load_image(path: str, image_size: Union[int, Sequence[int]]) -> torch.Tensor:
    """Load one image as a normalised float32 tensor [3, H, W] (see the module docstring)."""
    h, w = _image_size(image_size)
    if path.lower().endswith(".npy"):
        arr = np.load(path)
        layout = _npy_layout(arr.shape)
        _check_finite_pixels(path, arr)
        scale = 255.0 if np.issubdtype(arr.dtype, np.integer) else 1.0
        x = torch.from_numpy(np.asarray(arr, dtype=np.float32)) / scale
        if layout == "hw":
            x = x.unsqueeze(0)  # [H, W] -> [1, H, W]
        elif layout == "hwc":
            x = x.permute(2, 0, 1)  # [H, W, C] -> [C, H, W]
    else:
        from PIL import Image

        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.float32)  # [H, W, 3]
        x = torch.from_numpy(rgb).permute(2, 0, 1) / 255.0  # [H, W, 3] -> [3, H, W]
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)  # gray: [1, H, W] -> [3, H, W]
    if tuple(x.shape[1:]) != (h, w):
        # [3, H0, W0] -> [1, 3, H0, W0] -> [1, 3, H, W] -> [3, H, W]
        x = F.interpolate(
            x.unsqueeze(0), size=(h, w), mode="bilinear", align_corners=False, antialias=True
        ).squeeze(0)
    return ((x - 0.5) / 0.5).contiguous()


def read_json_records(path: str, what: str = "the data file") -> list:
    """Objects of a JSON list or a JSON Lines file (one object per line); a bad line is an
    error naming ``path:line`` and what the file should be."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ValueError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            f"{what} must be UTF-8 JSON or JSON Lines: re-encode it (e.g. iconv -t UTF-8)"
        ) from None
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        parsed = None
    if isinstance(parsed, list):
        return parsed
    if isinstance(parsed, dict):
        return [parsed]  # a one-line JSON Lines file
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{path}:{lineno}: not valid JSON ({exc.msg}); {what} must be a JSON list "
                f"or JSON Lines (one object per line)"
            ) from None
    return records


def _file_sha256(path: str):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h


class ConversationDataset(torch.utils.data.Dataset):
    """LLaVA-format conversations tokenized in the expanded layout (see the module docstring).

    Every record is validated at construction, so bad data fails before training: a
    missing or unreadable image, no assistant turn, a ``<image>`` count different from the
    number of images, empty conversations, unknown roles, or a sequence longer than
    ``seq_length`` after expansion raise a ValueError naming the record. With
    ``skip_bad_samples`` those records are skipped instead (``num_skipped``, ``skipped``);
    the others keep their ``sample_id`` (the record's index in the file).

    Attributes:
        data_path, image_root, seq_length, num_image_tokens, image_size: as given.
        num_records: records in the file (the reference-loss store's N).
        sample_ids: indices of the kept records, ascending.
        skipped: (sample_id, reason) of each skipped record; ``num_skipped`` its length.
        fingerprint: sha256 over the data file bytes, seq_length, num_image_tokens and the
            prompt format version.
    """

    def __init__(
        self,
        data_path: str,
        tokenizer,
        *,
        seq_length: int,
        num_image_tokens: int,
        image_size: Union[int, Sequence[int]] = (224, 224),
        image_root: Optional[str] = None,
        skip_bad_samples: bool = False,
        load_images: bool = True,
    ):
        if seq_length <= 0:
            raise ValueError(f"seq_length must be positive, got {seq_length}")
        if num_image_tokens <= 0:
            raise ValueError(f"num_image_tokens must be positive, got {num_image_tokens}")
        if not os.path.isfile(data_path):
            raise FileNotFoundError(f"data file {data_path!r} does not exist")
        self.data_path = str(data_path)
        self.tokenizer = tokenizer
        self.seq_length = int(seq_length)
        # False for consumers that never look at pixels (the text-only teacher): images are
        # still checked at construction, but items carry none (Sample.images is [0, 3, H, W]).
        self.load_images = bool(load_images)
        self.num_image_tokens = int(num_image_tokens)
        self.image_size = _image_size(image_size)
        self.image_root = (
            str(image_root) if image_root is not None
            else os.path.dirname(os.path.abspath(self.data_path))
        )
        self.skip_bad_samples = bool(skip_bad_samples)

        # Pieces shared by every record.
        self._user_prefix_ids = tokenizer.encode(_USER_PREFIX)
        self._assistant_ids = tokenizer.encode(_ASSISTANT_PREFIX)
        self._turn_end_ids = tokenizer.encode(_TURN_END)
        if not self._assistant_ids:
            raise ValueError(
                f"tokenizer {getattr(tokenizer, 'model_path', tokenizer)!r} encodes "
                f"{_ASSISTANT_PREFIX!r} to no tokens; every answer needs text context before it"
            )

        fingerprint = _file_sha256(self.data_path)
        fingerprint.update(
            f"|seq_length={self.seq_length}|num_image_tokens={self.num_image_tokens}"
            f"|prompt_format={PROMPT_FORMAT_VERSION}".encode()
        )
        self.fingerprint = fingerprint.hexdigest()

        self._records = read_json_records(self.data_path)
        self.num_records = len(self._records)
        self._target_counts = np.zeros(self.num_records, dtype=np.int64)
        self.sample_ids: List[int] = []
        self.skipped: List[Tuple[int, str]] = []
        problems = []
        for index, record in enumerate(self._records):
            try:
                self._target_counts[index] = self._validate(record)
            except ValueError as exc:
                self.skipped.append((index, str(exc)))
                problems.append(f"record {index} (id {self._record_id(record, index)!r}): {exc}")
                continue
            self.sample_ids.append(index)
        if problems and not self.skip_bad_samples:
            shown = "\n  ".join(problems[:5])
            more = f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else ""
            raise ValueError(
                f"{self.data_path}: {len(problems)} bad record(s):\n  {shown}{more}\n"
                f"{_SKIP_HINT}"
            )
        self._position = {sid: i for i, sid in enumerate(self.sample_ids)}

    @property
    def num_skipped(self) -> int:
        """Records skipped as bad (with ``skip_bad_samples``)."""
        return len(self.skipped)

    # -- validation and tokenization ------------------------------------------------

    @staticmethod
    def _record_id(record, index: int):
        return record.get("id", index) if isinstance(record, dict) else index

    def _image_paths(self, record: dict) -> List[str]:
        image = record.get("image")
        if image is None:
            return []
        paths = [image] if isinstance(image, str) else image
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise ValueError(f"'image' must be a path or a list of paths, got {image!r}")
        return [p if os.path.isabs(p) else os.path.join(self.image_root, p) for p in paths]

    def _validate(self, record) -> int:
        """Check one record; return its number of target tokens. ValueError says what is wrong."""
        if not isinstance(record, dict):
            raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
        conversations = record.get("conversations")
        if not isinstance(conversations, list) or not conversations:
            raise ValueError("'conversations' is missing or empty")
        num_placeholders = 0
        has_answer = False
        for t, turn in enumerate(conversations):
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
                raise ValueError(f"turn {t} must be an object with a string 'value'")
            role = turn.get("from")
            if role not in _ROLES:
                raise ValueError(f"turn {t} has role {role!r}; expected one of {list(_ROLES)}")
            count = turn["value"].count(IMAGE_PLACEHOLDER)
            if role == "gpt":
                has_answer = True
                if count:
                    raise ValueError(f"turn {t} (gpt) contains {IMAGE_PLACEHOLDER!r}; "
                                     f"images belong in human turns")
            num_placeholders += count
        if not has_answer:
            raise ValueError("no assistant ('gpt') turn, so no target tokens")
        paths = self._image_paths(record)
        if num_placeholders != len(paths):
            raise ValueError(
                f"{num_placeholders} {IMAGE_PLACEHOLDER!r} placeholder(s) but {len(paths)} image(s)"
            )
        for path in paths:
            _check_image(path)
        tokens, is_target, _ = self._tokenize(conversations)
        if len(tokens) > self.seq_length:
            raise ValueError(
                f"{len(tokens)} tokens after image expansion ({len(paths)} image(s) x "
                f"{self.num_image_tokens}) exceed seq_length {self.seq_length}"
            )
        return int(sum(is_target))

    def _tokenize(self, conversations: list) -> Tuple[List[int], List[bool], int]:
        """(tokens, is_target per token, start of the last answer) in the prompt format."""
        tok = self.tokenizer
        tokens: List[int] = [tok.bos_id] if tok.bos_id >= 0 else []
        is_target: List[bool] = [False] * len(tokens)
        answer_start = 0

        def add(ids, target=False):
            tokens.extend(ids)
            is_target.extend([target] * len(ids))

        for turn in conversations:
            if turn["from"] == "human":
                segments = turn["value"].split(IMAGE_PLACEHOLDER)
                add(self._user_prefix_ids if not segments[0]
                    else tok.encode(_USER_PREFIX + segments[0]))
                for segment in segments[1:]:
                    add([IMAGE_TOKEN_INDEX] * self.num_image_tokens)
                    if segment:
                        add(tok.encode(segment))
                add(self._turn_end_ids)
            else:
                add(self._assistant_ids)
                answer_start = len(tokens)
                add(tok.encode(turn["value"]) + [tok.eos_id], target=True)
        return tokens, is_target, answer_start

    # -- dataset API -----------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.sample_ids)

    def index_of(self, sample_id: int) -> int:
        """Position among the kept samples of record ``sample_id``."""
        try:
            return self._position[int(sample_id)]
        except KeyError:
            why = ("was skipped" if any(s == sample_id for s, _ in self.skipped)
                   else f"is not in [0, {self.num_records})")
            raise KeyError(f"sample_id {sample_id} {why}") from None

    def target_counts(self) -> np.ndarray:
        """int64 [num_records]: target tokens per record (0 for skipped records)."""
        return self._target_counts.copy()

    def __getitem__(self, i: int) -> Sample:
        sample_id = self.sample_ids[i]
        record = self._records[sample_id]
        tokens, is_target, answer_start = self._tokenize(record["conversations"])
        n = len(tokens)
        tokens_t = torch.tensor(tokens, dtype=torch.long)  # [n]
        target_t = torch.tensor(is_target, dtype=torch.bool)  # [n]
        labels = torch.full((n,), IGNORE_INDEX, dtype=torch.long)
        labels[:-1] = tokens_t[1:]
        labels[:-1][tokens_t[1:] == IMAGE_TOKEN_INDEX] = IGNORE_INDEX
        loss_mask = torch.zeros(n, dtype=torch.float32)
        loss_mask[:-1] = target_t[1:].float()
        paths = self._image_paths(record)
        h, w = self.image_size
        images = (
            torch.stack([load_image(p, self.image_size) for p in paths])
            if paths and self.load_images else torch.zeros(0, 3, h, w)
        )
        answer = [t["value"] for t in record["conversations"] if t["from"] == "gpt"][-1]
        return Sample(
            sample_id=sample_id, tokens=tokens_t, labels=labels, loss_mask=loss_mask,
            images=images, prompt_length=answer_start, answer=answer,
        )


def collate(samples: Sequence[Sample], *, seq_length: int, pad_id: int) -> Batch:
    """Pad ``samples`` to ``seq_length`` and stack them into a `Batch`."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    b = len(samples)
    tokens = torch.full((b, seq_length), pad_id, dtype=torch.long)
    labels = torch.full((b, seq_length), IGNORE_INDEX, dtype=torch.long)
    loss_mask = torch.zeros(b, seq_length, dtype=torch.float32)
    for row, sample in enumerate(samples):
        n = sample.tokens.numel()
        if n > seq_length:
            raise ValueError(
                f"sample {sample.sample_id} has {n} tokens, more than seq_length {seq_length}"
            )
        tokens[row, :n] = sample.tokens
        labels[row, :n] = sample.labels
        loss_mask[row, :n] = sample.loss_mask
    return Batch(
        sample_ids=torch.tensor([s.sample_id for s in samples], dtype=torch.long),
        tokens=tokens,
        labels=labels,
        loss_mask=loss_mask,
        images=torch.cat([s.images for s in samples], dim=0),
        num_images=torch.tensor([s.images.shape[0] for s in samples], dtype=torch.long),
    )

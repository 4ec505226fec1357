"""digits-VQA: visual question answering on scikit-learn's handwritten digits.

The images are the 1,797 real 8x8 grey-scale digits bundled with scikit-learn
(`sklearn.datasets.load_digits`, no download). Each image ``i`` becomes one
LLaVA-format record (`regate_megatron.data.llava`)::

    {"id": "digit-<i>", "image": "images/<i>.npy",
     "conversations": [{"from": "human", "value": "<image>\\n<question>"},
                       {"from": "gpt",   "value": "<answer>"}]}

with ``images/<i>.npy`` the digit as float32 ``[8, 8]`` in [0, 1] (the 0..16 pixel
values divided by 16).

Each record uses one of four question/answer templates (`TEMPLATES`), drawn by a
seeded RNG. Every template has its own question wording, and the answer is fully
determined by the digit and the template (`answer_text`), so greedy-decode exact
match is well defined. The answers are long (about 20 words) and short prompts
ask for them, mixing two kinds of words:

* predictable from the text alone, once the template is known: the template's
  wording ("The handwritten digit in this picture is ..."), and a repeated digit
  name (its second occurrence follows from the first);
* visually grounded: the digit's name, odd/even, the comparison with five and,
  in one template, the name of the next number.

Example (template 0, digit 7)::

    Q: <image>\\nWhat digit is written here? Is it odd or even, and is it greater than five?
    A: The handwritten digit in this picture is seven. Seven is an odd number, and it is
       greater than five.

This is the mix ReGATE is built for: a text-only teacher predicts the template
words well (low reference loss), so the student can skip them, while the visual
words stay hard for the teacher and are kept.

The split into ``train.json`` and ``valid.json`` is stratified by digit: for each
digit, ``round(heldout_fraction * count)`` of its images, drawn with the seed,
are held out. Everything is a pure function of ``seed`` and ``heldout_fraction``.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List

import numpy as np

from regate_megatron.data.llava import IMAGE_PLACEHOLDER

__all__ = ["DIGIT_NAMES", "DIGITS_LAYOUT", "TEMPLATES", "question_text", "answer_text",
           "build_digits_vqa"]

DIGITS_LAYOUT = ["--seq-length", "80", "--img-h", "8", "--img-w", "8", "--patch-dim", "2"]
"""The layout flags (`regate_megatron.data.layout`) of every digits-VQA run: 8 x 8 images in
2-pixel patches (16 image tokens) in 80-token sequences. The demo, the ablation and the
benchmarks pass these to regate-train, regate-precompute-ref and regate-inspect alike."""

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
               "ten")  # "ten" only as the number after nine

# (question, answer) pairs. Answer fields: {name}, {Name} (capitalised), {parity}
# ("odd"/"even"), {gt_five} ("greater than five"/"not greater than five"),
# {vs_five} ("greater than"/"less than"/"equal to"), {next_name} (the next number).
TEMPLATES = (
    ("What digit is written here? Is it odd or even, and is it greater than five?",
     "The handwritten digit in this picture is {name}. {Name} is an {parity} number, "
     "and it is {gt_five}."),
    ("Which number does this image show? Compare it with five.",
     "This image shows the number {name}, written by hand in dark ink. It is an {parity} "
     "number, and it is {vs_five} five."),
    ("Read the handwritten digit and describe it.",
     "I can see a handwritten {name} in this small image. The digit {name} is {parity}, "
     "and it is {vs_five} five."),
    ("What number is drawn, and what is one more than it?",
     "The number drawn in the image is {name}. It is an {parity} digit, and the number "
     "that comes right after {name} is {next_name}."),
)

# The prompt format's role prefixes (`regate_megatron.data.llava`): the tokenizer sees them too.
_ROLE_PREFIXES = ("USER:", "ASSISTANT:")


def question_text(template: int) -> str:
    """The question of ``template`` (without the ``<image>`` placeholder)."""
    return TEMPLATES[template][0]


def answer_text(digit: int, template: int) -> str:
    """The reference answer for an image of ``digit`` asked with ``template``."""
    if not 0 <= digit <= 9:
        raise ValueError(f"digit must be in 0..9, got {digit}")
    name = DIGIT_NAMES[digit]
    vs_five = "greater than" if digit > 5 else "less than" if digit < 5 else "equal to"
    return TEMPLATES[template][1].format(
        name=name,
        Name=name.capitalize(),
        parity="odd" if digit % 2 else "even",
        gt_five="greater than five" if digit > 5 else "not greater than five",
        vs_five=vs_five,
        next_name=DIGIT_NAMES[digit + 1],
    )


def _split(targets: np.ndarray, rng: np.random.Generator, heldout_fraction: float):
    """(train indices, valid indices), ascending, stratified by digit."""
    valid: List[int] = []
    for digit in range(10):
        members = np.flatnonzero(targets == digit)
        held = int(round(heldout_fraction * members.size))
        valid.extend(rng.permutation(members)[:held].tolist())
    is_valid = np.zeros(targets.size, dtype=bool)
    is_valid[valid] = True
    return np.flatnonzero(~is_valid), np.flatnonzero(is_valid)


def _write_json(path: str, records: list) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(records, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def build_digits_vqa(out_dir: str, *, seed: int = 0, heldout_fraction: float = 0.2) -> Dict:
    """Write the digits-VQA data set under ``out_dir`` (see the module docstring).

    Writes ``images/<i>.npy`` for every digit, ``train.json`` and ``valid.json``
    (JSON lists of records, ascending by image index). Returns ``{"train": path,
    "valid": path, "corpus": texts}`` where ``corpus`` holds every question (without
    the placeholder) and answer, plus the prompt format's role prefixes once per
    record: the texts to train the SentencePiece tokenizer on. Deterministic given
    ``seed`` and ``heldout_fraction``; files already in ``out_dir`` are overwritten.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)  # [N, 8, 8], 0..16 -> [0, 1]
    targets = np.asarray(digits.target, dtype=np.int64)  # [N]

    rng = np.random.default_rng(seed)
    templates = rng.integers(0, len(TEMPLATES), size=targets.size)  # one draw per record
    train_idx, valid_idx = _split(targets, rng, heldout_fraction)

    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    records, corpus = [], []
    for i, (image, digit, template) in enumerate(zip(images, targets, templates)):
        np.save(os.path.join(out_dir, "images", f"{i}.npy"), image)
        question, answer = question_text(int(template)), answer_text(int(digit), int(template))
        records.append({
            "id": f"digit-{i}",
            "image": f"images/{i}.npy",
            "conversations": [
                {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{question}"},
                {"from": "gpt", "value": answer},
            ],
        })
        corpus.extend([*_ROLE_PREFIXES, question, answer])

    paths = {"train": os.path.join(out_dir, "train.json"),
             "valid": os.path.join(out_dir, "valid.json")}
    _write_json(paths["train"], [records[i] for i in train_idx])
    _write_json(paths["valid"], [records[i] for i in valid_idx])
    return {**paths, "corpus": corpus}

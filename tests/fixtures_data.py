"""Tiny SentencePiece model, LLaVA-format records and images for the data/store/teacher tests.

Test modules import the fixtures they use (``from fixtures_data import spm_tokenizer``).
"""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest

from regate_megatron.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

WORDS = (
    "what is in the image a red green blue cat dog sits on mat picture shows number seven "
    "three color of this how many are there two one describe it small big animal box"
).split()


def synthetic_corpus(n: int = 300, seed: int = 0) -> list:
    """Sentences in the prompt format's vocabulary (USER:/ASSISTANT: included)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
        a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
        out.append(f"USER: {q}? ASSISTANT: {a}.")
    return out


@pytest.fixture(scope="session")
def spm_model_path(tmp_path_factory) -> str:
    prefix = str(tmp_path_factory.mktemp("spm") / "tiny")
    return train_sentencepiece(synthetic_corpus(), prefix, vocab_size=128)


@pytest.fixture(scope="session")
def spm_tokenizer(spm_model_path) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(spm_model_path)


def write_png(path, rgb=(255, 0, 0), size=(10, 12), fmt="PNG") -> str:
    """A constant-colour image (width, height = size)."""
    from PIL import Image

    Image.new("RGB", size, rgb).save(path, format=fmt)
    return str(path)


def write_records(path, records, jsonl: bool = False) -> str:
    with open(path, "w") as f:
        if jsonl:
            for r in records:
                f.write(json.dumps(r) + "\n")
        else:
            json.dump(records, f)
    return str(path)


def conv(question: str, answer: str, *more) -> list:
    """Conversation turns: human/gpt pairs from (question, answer, question, answer, ...)."""
    texts = (question, answer) + more
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(texts)]


def mixed_records(root) -> list:
    """Records with 0, 1 and 2 images (PNG and .npy), a multi-turn one, written under ``root``."""
    write_png(os.path.join(root, "red.png"), (255, 0, 0))
    np.save(os.path.join(root, "gray.npy"), np.full((6, 6), 0.25, dtype=np.float32))
    return [
        {"id": "a", "image": "red.png",
         "conversations": conv("<image>\nwhat color is the cat?", "red")},
        {"id": "b", "conversations": conv("how many dogs are there?", "two dogs sit on a mat")},
        {"id": "c", "image": ["red.png", "gray.npy"],
         "conversations": conv("<image> and <image> what is in the picture?", "a cat and a box",
                               "describe it", "a small red animal")},
        {"id": "d", "conversations": conv("describe the image", "a big blue box")},
    ]

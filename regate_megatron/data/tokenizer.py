"""The SentencePiece tokenizer shared by the student and the text-only teacher.

ReGATE's reference losses are per-token losses of a teacher over the student's
token ids, so both must use the same vocabulary. `SentencePieceTokenizer.sha256`
(a digest of the ``.model`` file) is the fingerprint recorded in the
reference-loss store and checked before training.
"""

from __future__ import annotations

import hashlib
import io
import os
from typing import Iterable, List, Sequence

import sentencepiece as spm

__all__ = ["SentencePieceTokenizer", "train_sentencepiece"]


class SentencePieceTokenizer:
    """A SentencePiece model loaded from ``model_path`` (the ``--tokenizer-model`` flag).

    Attributes:
        model_path: the ``.model`` file.
        vocab_size: number of pieces.
        pad_id: the id used for padding and, in the teacher's view, for visual positions.
            Models trained without a pad piece (SentencePiece's ``pad_id=-1``, the
            default) fall back to the **unk id**: padding never carries a trained label
            and the teacher masks those positions from attention, so any valid id works;
            unk is the one a text corpus is least likely to teach the model anything about.
        bos_id: beginning-of-sequence id, or -1 if the model has none (then no bos is
            prepended to conversations).
        eos_id: end-of-sequence id; every assistant answer ends with it (required).
        sha256: hex SHA-256 of the ``.model`` file bytes (tokenizer fingerprint).
    """

    def __init__(self, model_path: str):
        self.model_path = str(model_path)
        if not os.path.isfile(self.model_path):
            raise FileNotFoundError(
                f"--tokenizer-model: SentencePiece model {self.model_path!r} does not exist "
                f"(pass the path of a .model file)"
            )
        with open(self.model_path, "rb") as f:
            blob = f.read()
        self.sha256 = hashlib.sha256(blob).hexdigest()
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(blob)
        except Exception as exc:  # sentencepiece raises RuntimeError/OSError variants
            raise ValueError(
                f"--tokenizer-model: {self.model_path!r} is not a valid SentencePiece model "
                f"({exc}); pass the .model file written by spm_train"
            ) from None
        self._sp = processor
        self.vocab_size = int(processor.GetPieceSize())
        self.bos_id = int(processor.bos_id())
        self.eos_id = int(processor.eos_id())
        if self.eos_id < 0:
            raise ValueError(
                f"--tokenizer-model: {self.model_path!r} has no eos piece; ReGATE ends every "
                f"assistant answer with eos (train the model with eos_id >= 0)"
            )
        pad = int(processor.pad_id())
        self.pad_id = pad if pad >= 0 else int(processor.unk_id())

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text`` (no bos/eos added)."""
        return list(self._sp.EncodeAsIds(text))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids; ids outside the vocabulary (e.g. image slots) are dropped."""
        return self._sp.DecodeIds([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def id_to_piece(self, i: int) -> str:
        """The piece string of id ``i``."""
        return self._sp.IdToPiece(int(i))

    def __repr__(self) -> str:
        return (
            f"SentencePieceTokenizer({self.model_path!r}, vocab_size={self.vocab_size}, "
            f"sha256={self.sha256[:12]}...)"
        )


def train_sentencepiece(
    texts: Sequence[str], model_prefix: str, vocab_size: int, model_type: str = "bpe"
) -> str:
    """Train a SentencePiece model on ``texts``; return the ``<model_prefix>.model`` path.

    Deterministic (one thread, no sentence sampling or shuffling; the file's bytes do not
    depend on ``model_prefix``), quiet, writes no ``.vocab`` file, and usable on
    small corpora: ``vocab_size`` is an upper bound (``hard_vocab_limit=False``).
    Special ids: pad 0, unk 1, bos 2, eos 3. ``model_type`` is ``"bpe"`` or ``"unigram"``.
    """
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("train_sentencepiece needs at least one non-empty text")
    model_path = model_prefix + ".model"
    os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
    # Serialised in memory rather than via `model_prefix`, which SentencePiece would record
    # in the model: the same texts then give the same bytes (and sha256) at any path.
    blob = io.BytesIO()
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(texts),
        model_writer=blob,
        vocab_size=vocab_size,
        model_type=model_type,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        hard_vocab_limit=False,
        character_coverage=1.0,
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    with open(model_path, "wb") as f:
        f.write(blob.getvalue())
    return model_path

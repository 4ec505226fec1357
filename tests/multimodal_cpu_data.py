"""Tiny offline inputs for Megatron-LM's ``examples/multimodal/train.py`` on CPU (tests only).

``make(root, mlm)`` writes under ``root``:

- ``blend.yaml``: an Energon metadataset whose train split blends two captioning
  webdatasets (``capsA``: 12 samples, ``capsB``: 6; png one to three tiles wide + txt; the
  last shard of each is its val split; the val split reads ``capsA``'s), as
  ``examples/multimodal/pretrain_dataset.yaml`` does with one;
- ``tokenizer/``: a byte-level BPE HF tokenizer trained on the captions and the script's
  prompts, with the chatml specials the ``qwen2p0`` prompt format uses (``<image>`` is not
  in it: Megatron-LM's MultimodalTokenizer adds it);
- ``siglip/``: a random 2 x 64 HF SigLIP vision model (``--vision-model-type
  hf://<dir>``): the script's built-in vision types cannot be made small by flags.

Needs ``megatron-energon``, ``transformers`` and ``tokenizers``.
"""

import io
import json
from pathlib import Path

import numpy as np

WORDS = ("red green blue small large cat dog bird tree house car boat sky field road "
         "river sits runs flies near under over the a of on in with and two one").split()
DATASETS = {"capsA": (3, 4), "capsB": (3, 2)}  # name: (shards, samples per shard)
IMAGE_SIZE, PATCH = 32, 16


def _captions(n: int, rng) -> list:
    return [" ".join(rng.choice(WORDS) for _ in range(4 + k % 5)).capitalize() + "."
            for k in range(n)]


def captioning_webdataset(folder: Path, captions: list, per_shard: int, image,
                          splits: list) -> None:
    """An Energon captioning webdataset in ``folder``: ``shard_<s>.tar`` holds ``per_shard``
    samples, sample ``k`` keyed ``<folder name>_<k:04d>`` with a png of ``image()`` (uint8
    [h, w, 3]) and the text ``captions[k]``; ``splits``: [(split, shard pattern)]."""
    import webdataset as wds
    from megatron.energon.flavors.webdataset import BaseWebdatasetFactory
    from PIL import Image

    folder.mkdir(parents=True)
    shards = -(-len(captions) // per_shard)
    for s in range(shards):
        with wds.TarWriter(str(folder / f"shard_{s}.tar")) as writer:
            for k in range(s * per_shard, min((s + 1) * per_shard, len(captions))):
                png = io.BytesIO()
                Image.fromarray(image()).save(png, format="png")
                writer.write({"__key__": f"{folder.name}_{k:04d}", "png": png.getvalue(),
                              "txt": captions[k]})
    BaseWebdatasetFactory.prepare_dataset(
        folder, [f"shard_{s}.tar" for s in range(shards)], split_parts_patterns=splits,
        workers=1, shuffle_seed=None)
    (folder / ".nv-meta" / "dataset.yaml").write_text(
        "sample_type:\n  __module__: megatron.energon\n  __class__: CaptioningSample\n"
        "field_map:\n  image: png\n  caption: txt\n")


def _dataset(folder: Path, shards: int, per: int, rng) -> list:
    captions = _captions(shards * per, rng)

    def image():  # one to three tiles wide under --use-tiling
        wide = IMAGE_SIZE * int(rng.choice([1, 2, 3]))
        return rng.integers(0, 255, (IMAGE_SIZE, wide, 3), dtype=np.uint8)

    captioning_webdataset(folder, captions, per, image,
                          [("train", f"shard_{{0..{shards - 2}}}.tar"),
                           ("val", f"shard_{shards - 1}.tar")])
    return captions


def _tokenizer(out: Path, corpus: list) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainer=trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                            pad_token="<|endoftext|>", model_max_length=4096
                            ).save_pretrained(str(out))


def _siglip(out: Path) -> None:
    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    config = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, image_size=IMAGE_SIZE,
                                patch_size=PATCH)
    config.architectures = ["SiglipVisionModel"]
    SiglipVisionModel(config).save_pretrained(str(out))


def make(root: Path, mlm: str) -> dict:
    """Write the inputs; returns their paths and the train split's sample count."""
    rng = np.random.default_rng(0)
    captions = []
    for name, (shards, per) in DATASETS.items():
        captions += _dataset(root / name, shards, per, rng)
    prompts = json.loads((Path(mlm) / "examples/multimodal/manual_prompts.json").read_text())
    corpus = (captions * 5 + prompts["CaptioningPretraining"]["raw"] * 5
              + ["<|im_start|>system\n", "<|im_start|>user\n", "<|im_start|>assistant\n"] * 50
              + [" ".join(WORDS)] * 5)
    _tokenizer(root / "tokenizer", corpus)
    _siglip(root / "siglip")
    entries = [f"      - weight: 1.\n        path: {name}\n" for name in DATASETS]
    # one val dataset: Megatron-LM's loop takes one validation loader unless told otherwise
    (root / "blend.yaml").write_text(
        "__module__: megatron.energon\n__class__: Metadataset\nsplits:\n"
        f"  train:\n    datasets:\n{''.join(entries)}  val:\n    datasets:\n{entries[0]}")
    return dict(data=str(root / "blend.yaml"), tokenizer=str(root / "tokenizer"),
                vision=f"hf://{root / 'siglip'}",
                train_samples=sum((s - 1) * p for s, p in DATASETS.values()))

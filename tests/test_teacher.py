"""The text-only teacher's view (pad / drop) and its reference losses, on a stock GPTModel."""

import numpy as np
import pytest
import torch
from fixtures_data import mixed_records, spm_model_path, spm_tokenizer, write_records  # noqa: F401

from regate_megatron.data.llava import IGNORE_INDEX, IMAGE_TOKEN_INDEX, ConversationDataset, collate
from regate_megatron.scoring.teacher import reference_losses, teacher_inputs

SEQ = 64
K = 4  # image tokens per image


@pytest.fixture
def dataset(tmp_path, spm_tokenizer):
    path = write_records(tmp_path / "d.json", mixed_records(tmp_path))
    return ConversationDataset(path, spm_tokenizer, seq_length=SEQ, num_image_tokens=K,
                               image_size=(8, 8))


@pytest.fixture
def batch(dataset, spm_tokenizer):
    return collate([dataset[i] for i in range(len(dataset))], seq_length=SEQ,
                   pad_id=spm_tokenizer.pad_id)


def _teacher(vocab_size, position_embedding_type="rope"):
    """A tiny stock Megatron-Core GPTModel (local backend: torch SDPA, explicit masks honoured)."""
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_layer import TransformerLayer
    from models import tiny_config

    from regate_megatron.core.spec import get_regate_decoder_block_spec

    config = tiny_config(init_method_std=0.3)  # sharp attention: positions visibly matter
    torch.manual_seed(7)
    spec = get_regate_decoder_block_spec(config, backend="local", layer_module=TransformerLayer)
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=vocab_size,
                     max_sequence_length=SEQ + 1, position_embedding_type=position_embedding_type,
                     share_embeddings_and_output_weights=False)
    return model.eval()


def _run(model, view):
    with torch.no_grad():
        return model(view["input_ids"], view["position_ids"], view["attention_mask"],
                     labels=view["labels"])  # per-token loss [b, s']


# -- the views, without a model --------------------------------------------------------


def test_pad_view(batch, spm_tokenizer):
    pad = spm_tokenizer.pad_id
    view = teacher_inputs(batch, pad_id=pad, mode="pad")
    visual = batch.tokens == IMAGE_TOKEN_INDEX  # [b, s]
    assert visual.any()
    assert torch.equal(view["input_ids"], batch.tokens.masked_fill(visual, pad))
    assert torch.equal(view["position_ids"], torch.arange(SEQ).expand(4, SEQ))
    assert (torch.equal(view["labels"], batch.labels)
            and torch.equal(view["loss_mask"], batch.loss_mask))
    mask = view["attention_mask"]
    assert mask.dtype == torch.bool and mask.shape == (4, 1, SEQ, SEQ)
    q = torch.arange(SEQ)[:, None]
    k = torch.arange(SEQ)[None, :]
    for i in range(4):
        expected = (k > q) | (visual[i][None, :] & (k != q))
        assert torch.equal(mask[i, 0], expected)
    assert not mask.all(dim=-1).any()  # every query attends to something


def test_drop_view(batch, spm_tokenizer):
    pad = spm_tokenizer.pad_id
    view = teacher_inputs(batch, pad_id=pad, mode="drop")
    assert view["attention_mask"] is None
    visual = batch.tokens == IMAGE_TOKEN_INDEX
    s_out = int((~visual).sum(dim=1).max())
    assert view["input_ids"].shape == view["labels"].shape == view["loss_mask"].shape == (4, s_out)
    assert torch.equal(view["position_ids"], torch.arange(s_out).expand(4, s_out))
    assert IMAGE_TOKEN_INDEX not in view["input_ids"]
    for i in range(4):
        kept = batch.tokens[i][~visual[i]]
        n = kept.numel()
        assert torch.equal(view["input_ids"][i, :n], kept)
        assert (view["input_ids"][i, n:] == pad).all()
        assert ((view["labels"][i, n:] == IGNORE_INDEX).all()
                and (view["loss_mask"][i, n:] == 0).all())


def test_drop_view_shrinks_to_the_longest_text(dataset, spm_tokenizer):
    images_only = collate([dataset[0], dataset[2]], seq_length=SEQ, pad_id=spm_tokenizer.pad_id)
    view = teacher_inputs(images_only, pad_id=spm_tokenizer.pad_id, mode="drop")
    assert view["input_ids"].shape == (2, SEQ - K)  # sample 0 drops one image's K slots


def test_views_keep_the_same_targets_in_order(batch, dataset, spm_tokenizer):
    pad_view = teacher_inputs(batch, pad_id=spm_tokenizer.pad_id, mode="pad")
    drop_view = teacher_inputs(batch, pad_id=spm_tokenizer.pad_id, mode="drop")
    counts = dataset.target_counts()
    for i in range(4):
        in_pad = pad_view["labels"][i][pad_view["loss_mask"][i] > 0]
        in_drop = drop_view["labels"][i][drop_view["loss_mask"][i] > 0]
        assert torch.equal(in_pad, in_drop)
        assert torch.equal(in_pad, batch.labels[i][batch.loss_mask[i] > 0])
        assert in_pad.numel() == counts[int(batch.sample_ids[i])]


def test_unknown_mode(batch):
    with pytest.raises(ValueError, match="pad.*drop"):
        teacher_inputs(batch, pad_id=0, mode="blur")


# -- reference losses from a tiny stock GPTModel ---------------------------------------


@pytest.mark.parametrize("position_embedding_type", ["rope", "learned_absolute"])
def test_pad_and_drop_reference_losses(megatron_world, batch, dataset, spm_tokenizer,
                                       position_embedding_type):
    model = _teacher(spm_tokenizer.vocab_size, position_embedding_type)
    pad = spm_tokenizer.pad_id
    per_mode = {}
    for mode in ("pad", "drop"):
        view = teacher_inputs(batch, pad_id=pad, mode=mode)
        per_mode[mode] = reference_losses(_run(model, view), view, batch)

    counts = dataset.target_counts()
    has_images = batch.num_images > 0
    assert has_images.tolist() == [True, False, True, False]
    for i in range(4):
        r_pad, r_drop = per_mode["pad"][i], per_mode["drop"][i]
        assert r_pad.dtype == np.float32 and r_pad.shape == r_drop.shape == (counts[i],)
        assert np.isfinite(r_pad).all() and (r_pad > 0).all()
        if has_images[i]:
            # Same text, but in pad mode the image slots still occupy positions.
            assert not np.allclose(r_pad, r_drop, atol=1e-4)
        else:
            np.testing.assert_allclose(r_pad, r_drop, rtol=0, atol=1e-5)


def test_pad_masks_image_slots_but_keeps_positions(megatron_world, batch, spm_tokenizer):
    model = _teacher(spm_tokenizer.vocab_size, "learned_absolute")
    view = teacher_inputs(batch, pad_id=spm_tokenizer.pad_id, mode="pad")
    base = reference_losses(_run(model, view), view, batch)

    # Whatever token sits at the image slots, the losses at the targets are unchanged ...
    visual = batch.tokens == IMAGE_TOKEN_INDEX
    g = torch.Generator().manual_seed(0)
    noisy = dict(view)
    noisy["input_ids"] = view["input_ids"].masked_scatter(
        visual, torch.randint(4, spm_tokenizer.vocab_size, (int(visual.sum()),), generator=g))
    for a, b in zip(base, reference_losses(_run(model, noisy), noisy, batch)):
        np.testing.assert_array_equal(a, b)

    # ... which is the mask's doing: plain causal attention would see them.
    unmasked = dict(noisy, attention_mask=None)
    changed = reference_losses(_run(model, unmasked), unmasked, batch)
    assert not np.allclose(base[0], changed[0], atol=1e-4)
    np.testing.assert_allclose(base[1], changed[1], rtol=0, atol=1e-5)  # text only: same

    # The positions matter: the same tokens one position later give other losses.
    shifted = dict(view, position_ids=view["position_ids"] + 1)
    moved = reference_losses(_run(model, shifted), shifted, batch)
    assert not np.allclose(base[1], moved[1], atol=1e-4)


def test_reference_losses_checks_shapes(batch):
    view = teacher_inputs(batch, pad_id=0, mode="pad")
    with pytest.raises(ValueError, match="shape"):
        reference_losses(torch.zeros(4, SEQ - 1), view, batch)

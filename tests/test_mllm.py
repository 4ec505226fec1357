"""The LLaVA student: stock Megatron-Core LLaVA when nothing is elided, correct input layout,
routing through LLaVA's language model."""

import torch
import torch.nn.functional as F
from fixtures_data import conv, mixed_records, spm_model_path, spm_tokenizer, write_records  # noqa: F401
from megatron.core.models.multimodal.llava_model import LLaVAModel
from megatron.core.transformer.transformer_layer import TransformerLayer

from regate_megatron.config import ReGateConfig
from regate_megatron.core.mllm import llava_inputs
from regate_megatron.core.selection import TokenSelection, select_top_targets
from regate_megatron.core.spec import get_regate_decoder_block_spec
from regate_megatron.data.layout import num_image_tokens
from regate_megatron.data.llava import ConversationDataset, collate
from regate_megatron.training.arguments import build_parser, fill_model_defaults
from regate_megatron.training.model_config import language_config
from regate_megatron.training.model_provider import build_model, llava_kwargs

SEQ = 48
VOCAB = 128


def tiny_args(**over):
    argv = ["--num-layers", "2", "--hidden-size", "16", "--num-attention-heads", "4",
            "--seq-length", str(SEQ), "--img-h", "8", "--img-w", "8", "--patch-dim", "4",
            "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
            "--hidden-dropout", "0", "--attention-dropout", "0", "--transformer-impl", "local"]
    args = build_parser().parse_args(argv)
    fill_model_defaults(args)
    vars(args).update(over)
    return args


def mixed_batch(tmp_path, tokenizer, args):
    """A batch whose samples hold 1, 0, 2 and 2 adjacent images (compressed lengths differ)."""
    records = mixed_records(str(tmp_path))
    records.append({"id": "adjacent", "image": ["red.png", "red.png"],
                    "conversations": conv("<image><image>\nwhat is it?", "a red box")})
    path = write_records(tmp_path / "data.json", records)
    image_tokens = num_image_tokens(args.img_h, args.img_w, args.patch_dim)
    data = ConversationDataset(path, tokenizer, seq_length=SEQ, num_image_tokens=image_tokens,
                               image_size=(args.img_h, args.img_w))
    return collate([data[0], data[1], data[2], data[4]], seq_length=SEQ, pad_id=tokenizer.pad_id)


def loss_and_grads(model, batch, **kw):
    model.zero_grad()
    loss, loss_mask = model(**llava_inputs(batch, 4), **kw)
    (loss * loss_mask).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), loss_mask, grads


def test_regate_llava_equals_stock_llava(megatron_world, tmp_path, spm_tokenizer):
    args = tiny_args()
    batch = mixed_batch(tmp_path, spm_tokenizer, args)
    torch.manual_seed(3)
    routed = build_model(args, VOCAB, regate_config=ReGateConfig(enabled=True, keep_ratio=0.5))
    config = language_config(args)
    stock_spec = get_regate_decoder_block_spec(config, backend="local",
                                               layer_module=TransformerLayer)
    torch.manual_seed(3)
    common = dict(share_embeddings_and_output_weights=True, pre_process=True, post_process=True)
    stock = LLaVAModel(**llava_kwargs(args, VOCAB, config, stock_spec, "local", common))
    for (n1, p1), (n2, p2) in zip(routed.named_parameters(), stock.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)

    dense = TokenSelection.dense(batch.loss_mask.bool())
    for kw in ({}, {"token_selection": dense}):
        loss, mask, grads = loss_and_grads(routed, batch, **kw)
        ref_loss, ref_mask, ref_grads = loss_and_grads(stock, batch)
        assert torch.equal(loss, ref_loss) and torch.equal(mask, ref_mask)
        assert grads.keys() == ref_grads.keys()
        assert all(torch.equal(grads[n], ref_grads[n]) for n in grads)


def test_llava_inputs_reproduce_the_expanded_layout(megatron_world, tmp_path, spm_tokenizer):
    """LLaVA re-expands the compressed inputs into exactly the data's combined layout:
    its loss mask is the batch's, and its per-token loss is CE(logits, batch.labels)."""
    args = tiny_args()
    batch = mixed_batch(tmp_path, spm_tokenizer, args)
    assert batch.num_images.tolist() == [1, 0, 2, 2]
    torch.manual_seed(0)
    model = build_model(args, VOCAB)
    with torch.no_grad():
        loss, loss_mask = model(**llava_inputs(batch, 4))
        logits, _ = model(**dict(llava_inputs(batch, 4), labels=None))
    assert loss.shape == (4, SEQ) and logits.shape[:2] == (4, SEQ)
    assert torch.equal(loss_mask, batch.loss_mask)
    targets = batch.loss_mask.bool()
    ce = F.cross_entropy(logits[targets], batch.labels[targets], reduction="none")
    assert torch.allclose(loss[targets], ce, atol=1e-5)


def test_routing_inside_llava(megatron_world, tmp_path, spm_tokenizer):
    """A selection in combined coordinates reaches LLaVA's language model: elided targets
    get no loss, kept ones do, and the decoder layers ran on the kept rows only."""
    args = tiny_args()
    batch = mixed_batch(tmp_path, spm_tokenizer, args)
    torch.manual_seed(0)
    model = build_model(args, VOCAB, regate_config=ReGateConfig(enabled=True, keep_ratio=0.5))
    targets = batch.loss_mask.bool()
    scores = torch.arange(SEQ, dtype=torch.float32).flip(0).expand(4, SEQ)  # earliest targets first
    selection = select_top_targets(scores, targets, 0.5)
    rows = []
    hook = model.language_model.decoder.layers[0].mlp.register_forward_hook(
        lambda mod, inp, out: rows.append(inp[0].shape[0]))
    loss, loss_mask, grads = loss_and_grads(model, batch, token_selection=selection)
    hook.remove()
    computed = selection.computed_loss_mask()
    assert bool((loss[targets & ~computed] == 0).all())
    assert bool((loss[computed] > 0).all())
    assert rows == [int(selection.keep_mask().sum(1).max())] and rows[0] < SEQ
    assert model.language_model.token_router.last_keep_index is selection.keep_index
    assert all(torch.isfinite(g).all() for g in grads.values())
    # The step wrapper's way in (`ReGateForwardBackward`): `selecting` around a forward that
    # passes no selection routes the same tokens (LLaVA's forward keeps the outer selection).
    model.language_model.token_router.last_keep_index = None
    with model.language_model.selecting(selection):
        outer_loss, _, _ = loss_and_grads(model, batch)
    assert model.language_model.token_router.last_keep_index is selection.keep_index
    assert torch.equal(outer_loss, loss)


def test_freeze_flags_follow_megatron(megatron_world):
    args = tiny_args(freeze_ViT=True)
    model = build_model(args, VOCAB)
    assert not any(p.requires_grad for p in model.vision_model.parameters())
    assert all(p.requires_grad for p in model.language_model.parameters())
    assert all(p.requires_grad for p in model.vision_projection.parameters())
    model = build_model(tiny_args(freeze_LM=True), VOCAB)
    assert not any(p.requires_grad for p in model.language_model.parameters())
    assert all(p.requires_grad for p in model.vision_model.parameters())


def _load_parts(rank, ckpt_dir):
    from regate_megatron.training.checkpoint import load_module_weights, save_checkpoint

    args = tiny_args()
    torch.manual_seed(1)
    saved = build_model(args, VOCAB)
    save_checkpoint(ckpt_dir, 1, [saved])
    torch.manual_seed(2)
    fresh = build_model(args, VOCAB)

    def same(a, b):
        return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))

    out = {"lm_before": same(saved.language_model, fresh.language_model)}
    load_module_weights(fresh.vision_model, ckpt_dir, ("", "vision_model."))
    out["vision"] = same(saved.vision_model, fresh.vision_model)
    out["lm_untouched"] = same(saved.language_model, fresh.language_model)
    load_module_weights(fresh.language_model, ckpt_dir, ("", "language_model."))
    out["lm"] = same(saved.language_model, fresh.language_model)
    try:
        load_module_weights(fresh.vision_model, ckpt_dir)  # no prefix: not a bare ViT checkpoint
        out["error"] = None
    except ValueError as err:
        out["error"] = str(err)
    return out


def test_language_and_vision_weights_load_from_a_llava_checkpoint(tmp_path):
    """--language-model-checkpoint / --vision-model-checkpoint accept an earlier LLaVA run."""
    from dist import run_world

    out = run_world(_load_parts, world_size=1, ckpt_dir=str(tmp_path / "ckpt"))[0]
    assert out["lm_before"] is False and out["lm_untouched"] is False
    assert out["vision"] and out["lm"]
    assert out["error"] and "does not hold the weights" in out["error"]


def test_text_only_runs_keep_the_students_image_layout(megatron_world, tmp_path, spm_model_path):
    """The teacher is trained on the positions regate-precompute-ref scores: every image
    keeps the student's slot count (masked in the teacher view), not one slot."""
    from regate_megatron.training.arguments import parse_args
    from regate_megatron.training.train import Run

    write_records(tmp_path / "d.json", mixed_records(str(tmp_path)))
    argv = ["--num-layers", "2", "--hidden-size", "16", "--num-attention-heads", "4",
            "--seq-length", str(SEQ), "--img-h", "8", "--img-w", "8", "--patch-dim", "4",
            "--train-iters", "1", "--lr", "1e-3", "--data-path", str(tmp_path / "d.json"),
            "--tokenizer-model", spm_model_path, "--transformer-impl", "local", "--no-progress"]
    teacher = Run(parse_args(argv + ["--text-only"])).setup()
    student_layout = ConversationDataset(str(tmp_path / "d.json"), teacher.tokenizer,
                                         seq_length=SEQ, num_image_tokens=4, image_size=(8, 8))
    for i in range(len(student_layout)):
        assert torch.equal(teacher.train_data[i].tokens, student_layout[i].tokens)

"""The device rule: each rank's device is chosen once (`parallel.rank_device`) and everything
that reaches the model goes there through `Batch.to` / `TokenSelection.to`.

On a CPU machine the rank device is the CPU, so these tests pin the plumbing (every model
input passes through a hook that checks its device; selections come back from a broadcast
on the requested device on every rank, the source included). `tests/test_gpu.py` runs the
same checks on a GPU, where the devices differ.
"""

import dataclasses
import os

import pytest
import torch
from dist import run_world

from regate_megatron.core.selection import TokenSelection, broadcast_selections, select_top_targets
from regate_megatron.data.llava import Batch


def _batch() -> Batch:
    return Batch(
        sample_ids=torch.tensor([3, 5]), tokens=torch.randint(0, 9, (2, 6)),
        labels=torch.randint(0, 9, (2, 6)), loss_mask=torch.ones(2, 6),
        images=torch.zeros(1, 3, 4, 4), num_images=torch.tensor([1, 0]),
    )


def test_batch_to_moves_every_field():
    batch = _batch()
    moved = batch.to("meta")  # a device without data: only placement is checked
    for field in dataclasses.fields(Batch):
        before, after = getattr(batch, field.name), getattr(moved, field.name)
        assert after.is_meta, field.name
        assert (after.shape, after.dtype) == (before.shape, before.dtype), field.name
    same = batch.to("cpu")
    assert all(torch.equal(getattr(same, f.name), getattr(batch, f.name))
               for f in dataclasses.fields(Batch))


def test_selection_to_keeps_content_and_dense_flag():
    targets = torch.tensor([[False, True, True, True], [False, False, True, True]])
    scores = torch.arange(8.0).view(2, 4)
    sel = select_top_targets(scores, targets, 0.5)
    assert sel.to("cpu") is sel  # already there: no copy, no re-validation
    moved = sel.to("meta")
    assert moved.keep_index.is_meta and moved.target_mask.is_meta
    dense = TokenSelection.dense(targets)
    assert dense.is_dense and dense.to("meta").is_dense  # carried over, not recomputed


def _broadcast_world(rank: int, device: str) -> list:
    import torch.distributed as dist

    torch.manual_seed(0)  # the same batches on every rank; only the source's are used
    targets = torch.rand(3, 2, 7) > 0.3
    targets[..., -1] = True
    scores = torch.rand(3, 2, 7)
    source = [select_top_targets(scores[i], targets[i], 0.5) for i in range(3)]
    got = broadcast_selections(source if rank == 0 else None, dist.group.WORLD, device=device)
    return [(str(sel.keep_index.device), str(sel.target_mask.device),
             torch.equal(sel.keep_index.cpu(), ref.keep_index),
             torch.equal(sel.target_mask.cpu(), ref.target_mask))
            for sel, ref in zip(got, source, strict=True)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="gloo world; tests/test_gpu.py on CUDA")
def test_broadcast_selections_lands_on_the_requested_device_on_every_rank():
    for rank_result in run_world(_broadcast_world, 2, device="cpu"):
        assert rank_result == [("cpu", "cpu", True, True)] * 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="a 2-rank NCCL world needs 2 GPUs")
def test_tests_dist_gives_each_rank_its_local_rank():
    assert run_world(_local_rank, 2) == ["0", "1"]


def _local_rank(rank: int) -> str:
    return os.environ["LOCAL_RANK"]


# --------------------------------------------------------------------------------------
# Every tensor reaching the model is on the rank's device (training, evaluation, decoding)
# --------------------------------------------------------------------------------------


def _tensors(value):
    """Every tensor inside a model call's arguments (TokenSelection fields included)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, TokenSelection):
        yield value.keep_index
        yield value.target_mask
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def watch_model_inputs(module: torch.nn.Module, device: torch.device) -> dict:
    """Count the model's forward calls and the input tensors not on ``device``."""
    seen = {"calls": 0, "misplaced": []}

    def hook(mod, args, kwargs):
        seen["calls"] += 1
        for tensor in _tensors((args, kwargs)):
            if tensor.device != device:
                seen["misplaced"].append((tuple(tensor.shape), str(tensor.device)))

    module.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def tiny_student_workspace(root: str) -> list:
    """Records, tokenizer and a reference-loss store for a tiny `regate-train` run; returns
    the flags (paths under ``root``)."""
    from fixtures_data import mixed_records, synthetic_corpus, write_records

    from regate_megatron.data.llava import ConversationDataset
    from regate_megatron.data.tokenizer import SentencePieceTokenizer, train_sentencepiece
    from regate_megatron.scoring.ref_store import write_store

    tok = train_sentencepiece(synthetic_corpus(), os.path.join(root, "tok"), vocab_size=128)
    records = mixed_records(root)
    write_records(os.path.join(root, "train.json"), records * 3)
    write_records(os.path.join(root, "valid.json"), records)
    tokenizer = SentencePieceTokenizer(tok)
    dataset = ConversationDataset(os.path.join(root, "train.json"), tokenizer, seq_length=48,
                                  num_image_tokens=4, image_size=(8, 8))
    counts = dataset.target_counts()
    write_store(os.path.join(root, "store"), [torch.rand(int(n)).numpy() * 4 for n in counts],
                dict(teacher="random", tokenizer_sha256=tokenizer.sha256,
                     dataset_fingerprint=dataset.fingerprint, teacher_visual="pad"))
    return [
        "--num-layers", "2", "--hidden-size", "16", "--num-attention-heads", "4",
        "--seq-length", "48", "--img-h", "8", "--img-w", "8", "--patch-dim", "4",
        "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
        "--hidden-dropout", "0", "--attention-dropout", "0", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--lr", "3e-3", "--train-iters", "2", "--seed", "7",
        "--make-vocab-size-divisible-by", "64", "--no-progress",
        "--data-path", os.path.join(root, "train.json"),
        "--valid-data-path", os.path.join(root, "valid.json"), "--eval-max-new-tokens", "2",
        "--tokenizer-model", tok, "--regate", "--regate-ref-store", os.path.join(root, "store"),
        "--regate-keep-ratio", "0.5", "--regate-schedule", "constant",
    ]


def inputs_on_rank_device_world(rank: int, root: str, extra: list) -> dict:
    """One routed training step and one evaluation (loss + greedy decoding) with a hook on
    the model: every tensor it receives must be on `run.device`."""
    from regate_megatron.training.arguments import parse_args
    from regate_megatron.training.evaluation import evaluate
    from regate_megatron.training.parallel import rank_device
    from regate_megatron.training.train import Run

    run = Run(parse_args(tiny_student_workspace(root) + list(extra))).setup()
    assert run.device == rank_device()
    seen = watch_model_inputs(run.model[0], run.device)
    step = run.train_step()
    routed = step["kept_target_tokens"] < step["target_tokens"]
    evaluate(run)
    return dict(device=str(run.device), calls=seen["calls"], misplaced=seen["misplaced"],
                routed=routed, loss=step["lm_loss"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests/test_gpu.py runs it on CUDA")
def test_every_model_input_is_on_the_rank_device(tmp_path):
    (result,) = run_world(inputs_on_rank_device_world, 1, root=str(tmp_path), extra=[],
                          timeout=300)
    assert result["device"] == "cpu" and result["routed"]
    assert result["calls"] >= 3  # a training micro-batch, an eval forward, a decoding step
    assert result["misplaced"] == []

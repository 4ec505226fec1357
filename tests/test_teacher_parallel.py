"""The frozen teacher at TP/PP > 1 (`regate_megatron.scoring.teacher_model`) and
`regate-precompute-ref --tensor-model-parallel-size / --pipeline-model-parallel-size`:
the same reference losses as at TP1, from one teacher checkpoint saved at TP1.

One module-scoped workspace: tokenizer, LLaVA-format records with 0/1/2 images, a tiny
text-only teacher trained by `regate-train --text-only` (4 heads, 2 layers, vocabulary 128)
and its TP1 store.
"""

import argparse
import re

import numpy as np
import pytest
from dist import run_world
from fixtures_data import mixed_records, synthetic_corpus, write_records
from test_cli import SEQ, _run, train

PRECOMPUTE = ["regate_megatron.tools.precompute", "--data-path", "train.json", "--tokenizer-model",
              "tok.model", "--load", "teacher", "--seq-length", str(SEQ), "--img-h", "8",
              "--img-w", "8", "--patch-dim", "4", "--no-progress", "--micro-batch-size", "3",
              "--shard-size", "7"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from regate_megatron.data.tokenizer import train_sentencepiece

    root = tmp_path_factory.mktemp("teacher_parallel")
    train_sentencepiece(synthetic_corpus(), str(root / "tok"), vocab_size=128)
    records = mixed_records(str(root))
    write_records(root / "train.json", records * 5)
    train(root, "--text-only", "--train-iters", "3", "--save", "teacher")
    _run([*PRECOMPUTE, "--output", "store_tp1"], root)
    return root


def _teacher_losses(rank, ws, layouts):
    """Every sample's reference losses at each (TP, PP, mode), from the reporting ranks."""
    from megatron.core import parallel_state as ps

    from regate_megatron.data.llava import ConversationDataset, collate
    from regate_megatron.data.tokenizer import SentencePieceTokenizer
    from regate_megatron.scoring.teacher_model import (
        FrozenTeacher,
        micro_batch_groups,
        teacher_architecture,
    )
    from regate_megatron.training.parallel import initialize_parallel, rank_device

    tok = SentencePieceTokenizer(f"{ws}/tok.model")
    arch = teacher_architecture(f"{ws}/teacher", tok)
    data = ConversationDataset(f"{ws}/train.json", tok, seq_length=SEQ, num_image_tokens=4,
                               image_size=(8, 8), load_images=False)
    out = {}
    for tp, pp, mode in layouts:
        ps.destroy_model_parallel()
        initialize_parallel(tp, pp)
        teacher = FrozenTeacher(f"{ws}/teacher", arch, pad_id=tok.pad_id, mode=mode,
                                device=rank_device())
        losses = []
        for group in micro_batch_groups(list(range(len(data))), 3, 2):  # 2 per schedule call
            got = teacher.losses([collate([data[j] for j in ids], seq_length=SEQ,
                                          pad_id=tok.pad_id) for ids in group])
            losses += got if got is not None else []
        if teacher.reports:
            out[(tp, pp, mode)] = losses
    return out


def _max_rel(a, b):
    a, b = np.concatenate(a), np.concatenate(b)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-30)))


def test_teacher_losses_at_tp2_and_pp2_equal_tp1(ws):
    """fp32 losses, before the store's float16 rounding: TP2 and PP2 within 1e-5 relative of
    TP1 (TP1 runs on both ranks as DP2), in both teacher views."""
    layouts = [(1, 1, "pad"), (2, 1, "pad"), (1, 2, "pad"), (1, 1, "drop"), (2, 1, "drop"),
               (1, 2, "drop")]
    per_rank = run_world(_teacher_losses, 2, timeout=300, ws=str(ws), layouts=layouts)
    got = {}
    for result in per_rank:
        got.update(result)
    assert set(got) == set(layouts)
    assert per_rank[0][(1, 1, "pad")] is not None and len(got[(1, 1, "pad")]) == 20
    for mode in ("pad", "drop"):
        ref = got[(1, 1, mode)]
        for layout in ((2, 1, mode), (1, 2, mode)):
            assert [len(x) for x in got[layout]] == [len(x) for x in ref]
            rel = _max_rel(ref, got[layout])
            print(f"teacher losses {layout} vs TP1: max relative difference {rel:.2e}")
            assert rel <= 1e-5, (layout, rel)


def _fp16_close(a, b):
    """Equal, or one float16 rounding step apart (the fp32 losses agree within 1e-5)."""
    a, b = np.asarray(a, dtype=np.float16), np.asarray(b, dtype=np.float16)
    step = np.spacing(np.maximum(np.abs(a), np.abs(b)))
    return np.abs(a.astype(np.float32) - b.astype(np.float32)) <= step.astype(np.float32)


@pytest.mark.parametrize("name,nproc,layout", [
    ("tp2", 2, ["--tensor-model-parallel-size", "2"]),
    ("pp2", 2, ["--pipeline-model-parallel-size", "2"]),
    ("tp2dp2", 4, ["--tensor-model-parallel-size", "2"]),  # two replicas, one writer each
])
def test_precompute_at_tp2_and_pp2_equals_tp1(ws, name, nproc, layout):
    from regate_megatron.scoring.ref_store import RefLossStore

    name = f"store_{name}"
    proc = _run([*PRECOMPUTE, "--output", name, *layout], ws, nproc=nproc)
    assert f"DP {nproc // 2}" in proc.stdout
    one, two = RefLossStore.open(str(ws / "store_tp1")), RefLossStore.open(str(ws / name))
    assert one.meta == two.meta
    np.testing.assert_array_equal(np.asarray(one.offsets), np.asarray(two.offsets))
    close = _fp16_close(one.values, two.values)
    exact = float(np.mean(np.asarray(one.values) == np.asarray(two.values)))
    print(f"{name}: {exact:.1%} of {close.size} float16 values bitwise equal to TP1")
    assert close.all()


def test_bad_teacher_parallel_sizes(ws):
    from regate_megatron.scoring.teacher_model import check_teacher_parallel

    arch = argparse.Namespace(num_attention_heads=4, num_query_groups=4, num_layers=2,
                              vocab_size=128)
    check_teacher_parallel(arch, 8, 2, 2)
    for world, tp, pp, flag, words in (
        (2, 3, 1, "--tensor-model-parallel-size 3", "does not divide the teacher's 2 ranks"),
        (3, 3, 1, "--tensor-model-parallel-size 3", "4 attention heads"),
        (3, 1, 3, "--pipeline-model-parallel-size 3", "2 layers"),
        (2, 0, 1, "--tensor-model-parallel-size", ">= 1"),
    ):
        with pytest.raises(ValueError, match=flag) as err:
            check_teacher_parallel(arch, world, tp, pp)
        assert words in str(err.value)
    # The CLI: one line naming the flag, exit 2, before any compute (no store directory).
    proc = _run([*PRECOMPUTE, "--output", "store_bad", "--tensor-model-parallel-size", "2"], ws,
                expect_ok=False)
    assert proc.returncode == 2
    assert "error: --tensor-model-parallel-size 2" in proc.stderr
    # one line of ours; torch may add its own log lines (glog format: "W1129 00:47:50.67 ...]",
    # e.g. a CUDA build of torch without a GPU logs "No CUDA runtime is found")
    ours = [line for line in proc.stderr.strip().splitlines()
            if not re.match(r"[IWEF]\d{4} [\d:.]+ +\d+ \S+:\d+\] ", line)]
    assert len(ours) == 1, proc.stderr
    assert not (ws / "store_bad").exists()

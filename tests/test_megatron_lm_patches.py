"""patches/ against a Megatron-LM checkout (``MEGATRON_LM_DIR``, a tag with a patch set in
patches/README.md; the set is the one `patch_set` picks for the checkout): each patch
applies with ``git apply --check`` and the patched script imports, with ReGATE's flags,
provider and schedule hook in place."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from regate_megatron.megatron_lm.patch_set import patch_set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MLM = os.environ.get("MEGATRON_LM_DIR")
needs_mlm = pytest.mark.skipif(
    not MLM, reason="MEGATRON_LM_DIR is not set: point it at a Megatron-LM checkout of a tag "
                    "with a patch set in patches/ to check the patches (CI has none)")


def patch_dir():
    """The patch set for the checkout (patches/core_vX.Y.Z/)."""
    return patch_set(MLM, os.path.join(ROOT, "patches"))


def patch_path(name):
    return os.path.join(patch_dir(), name)


def test_patch_set_is_picked_from_the_checkouts_megatron_core_version(tmp_path):
    """Exact version, else the newest earlier set of the same minor (the core_v0.19.0 tag's
    package_info reads 0.19.1), else one line naming the version and the sets."""
    def checkout(version):
        info = tmp_path / version / "megatron" / "core" / "package_info.py"
        info.parent.mkdir(parents=True)
        major, minor, patch = version.split(".")
        info.write_text(f"MAJOR = {major}\nMINOR = {minor}\nPATCH = {patch}\n")
        return str(tmp_path / version)

    patches = os.path.join(ROOT, "patches")
    assert patch_set(checkout("0.16.1")) == os.path.join(patches, "core_v0.16.1")
    assert patch_set(checkout("0.19.1")) == os.path.join(patches, "core_v0.19.0")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "regate_megatron", "megatron_lm",
                                                       "patch_set.py"), checkout("0.16.0")],
                         capture_output=True, text=True)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and "core_v0.16.0" in run.stderr
    assert "core_v0.16.1, core_v0.19.0" in run.stderr


CASES = {
    "pretrain_vlm.patch": (["pretrain_vlm.py"], "", "pretrain_vlm", """
        assert m.add_vlm_extra_args._regate_flags
        args = m.add_vlm_extra_args(argparse.ArgumentParser()).parse_args(
            ["--regate", "--regate-selector", "random", "--freeze-ViT"])
        assert args.regate and args.freeze_ViT
        """),
    "examples_multimodal_train.patch": (
        ["examples/multimodal"], "examples/multimodal", "train", """
        assert m.add_multimodal_extra_args._regate_flags and m.model_provider._regate
        assert m.multimodal_model.get_layer_spec._regate
        view = m.regate.multimodal_energon_view(m.TaskEncoder, image_decode="pil")
        assert isinstance(view, m.regate.EnergonView)
        """),
}


@needs_mlm
@pytest.mark.parametrize("patch", sorted(CASES))
def test_patch_applies_and_the_patched_script_imports(patch, tmp_path):
    path = patch_path(patch)
    check = subprocess.run(["git", "apply", "--check", "-v", path], cwd=MLM,
                           capture_output=True, text=True)
    assert check.returncode == 0, f"git apply --check {patch} in {MLM}:\n{check.stderr}"
    files, folder, module, checks = CASES[patch]
    for rel in files:  # patch a copy: the checkout stays as it is
        src, dst = os.path.join(MLM, rel), str(tmp_path / rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, dst)
    applied = subprocess.run(["git", "apply", path], cwd=tmp_path, capture_output=True,
                             text=True)
    assert applied.returncode == 0, applied.stderr
    script = textwrap.dedent(f"""
        import argparse, sys
        sys.path[:0] = [{str(tmp_path / folder)!r}, {MLM!r}]
        import {module} as m
        import megatron.training.training as training
        m.regate.install()
        assert training.get_forward_backward_func._regate
        m.regate.install()  # idempotent
        """) + textwrap.dedent(checks) + "print('imported', m.__file__)\n"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert "imported" in _finished(run, module)


@needs_mlm
def test_carry_folder_for_the_gpu_check_is_patched_inside_a_git_work_tree(tmp_path):
    """benchmarks/carry_megatron_lm.sh writes its folder into this checkout (.megatron_lm/,
    inside a git work tree, where a plain `git apply` skips every path silently): the
    folder's pretrain_vlm.py carries the patch lines and megatron/training is there."""
    tree = tmp_path / "checkout"
    tree.mkdir()
    subprocess.run(["git", "init", "-q", str(tree)], check=True)
    dest = tree / ".megatron_lm"
    run = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "carry_megatron_lm.sh"), MLM,
                          str(dest)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    with open(dest / "pretrain_vlm.py") as f:
        patched = f.read()
    assert patched.count("# ReGATE") == 6 and "regate.install(" in patched
    assert (dest / "megatron" / "training" / "training.py").is_file()


PRETRAIN_VLM_FLAGS = [
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "1024",
    "--decoder-num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--encoder-num-layers", "1", "--img-h", "32", "--img-w", "32", "--patch-dim", "16",
    "--disable-vision-class-token", "--seq-length", "1024",
    "--max-position-embeddings", "2048", "--micro-batch-size", "2",
    "--global-batch-size", "4", "--lr", "1e-4", "--min-lr", "1e-5",
    "--lr-decay-style", "constant", "--lr-decay-iters", "8", "--transformer-impl",
    "local", "--no-persist-layer-norm", "--no-rope-fusion",
    "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion",
    "--no-bias-gelu-fusion", "--no-bias-dropout-fusion", "--ckpt-format", "torch",
    "--save", "ckpt", "--eval-iters", "0",
    "--eval-interval", "1000", "--log-interval", "1", "--regate",
    "--regate-selector", "random", "--regate-schedule", "constant",
    "--regate-keep-ratio", "0.5", "--distributed-backend", "gloo"]


def _carried(tmp_path):
    """The folder the GPU check carries (benchmarks/carry_megatron_lm.sh) under ``tmp_path``:
    megatron/training & co. of the checkout, its patched pretrain_vlm.py."""
    mlm = tmp_path / "mlm"
    carry = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "carry_megatron_lm.sh"), MLM,
                            str(mlm)], capture_output=True, text=True, timeout=300)
    assert carry.returncode == 0, carry.stderr[-3000:]
    return mlm


def _carried_pretrain_vlm(tmp_path):
    """The carried folder, and the command and environment that run its patched
    pretrain_vlm.py on CPU (tests/megatron_lm_cpu.py)."""
    mlm = _carried(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_DEVICE_MAX_CONNECTIONS="1",
               PYTHONPATH=os.pathsep.join([str(mlm), ROOT, os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
               "--master-port", str(29400 + os.getpid() % 500),
               os.path.join(ROOT, "tests", "megatron_lm_cpu.py"), str(mlm / "pretrain_vlm.py"),
               *PRETRAIN_VLM_FLAGS]
    return command, env


def _finished(run, script="pretrain_vlm.py"):
    missing = [line for line in run.stderr.splitlines() if "ModuleNotFoundError" in line]
    if run.returncode and missing and "regate" not in missing[-1]:
        pytest.skip(f"{script} needs a package this environment lacks: {missing[-1]}")
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    return run.stdout


def _saved_model(ckpt, step):
    import torch

    return torch.load(ckpt / f"iter_{step:07d}" / "mp_rank_00" / "model_optim_rng.pt",
                      map_location="cpu", weights_only=False)["model"]


@needs_mlm
def test_patched_pretrain_vlm_trains_saves_and_resumes_on_cpu(tmp_path):
    """Megatron-LM's own pretrain() through the patched pretrain_vlm.py, on CPU (gloo,
    tests/megatron_lm_cpu.py), with the GPU check's stage flags (no bf16, 2 layers): ReGATE
    (random selector) for 6 steps, saved at 3 and 6 with the EMA in the checkpoint, then
    resumed to 8. The same folder the GPU check carries (benchmarks/carry_megatron_lm.sh)."""
    import torch

    command, env = _carried_pretrain_vlm(tmp_path)

    def pretrain(*more):
        return _finished(subprocess.run([*command, "--save-interval", "3", *more], cwd=tmp_path,
                                        env=env, capture_output=True, text=True, timeout=900))

    out = pretrain("--train-iters", "6")
    assert "iteration        6/       6" in out and "ReGATE: target counts of" in out
    saved = _saved_model(tmp_path / "ckpt", 6)
    table, vocab = saved["regate.ema_table"], saved["regate.vocab_ema"]
    observed = int((~torch.isnan(table)).sum())
    # 6 steps x 4 distinct samples (the sequential sampler), each keeping half of its 1024
    # targets (the mock data's loss mask covers the text; constant keep ratio 0.5)
    assert observed == 6 * 4 * 512
    assert int((~torch.isnan(vocab)).sum()) > 0
    out = pretrain("--train-iters", "8", "--load", "ckpt", "--override-opt_param-scheduler")
    assert "iteration        8/       8" in out and "iteration        7/" in out
    after = _saved_model(tmp_path / "ckpt", 8)["regate.ema_table"]
    kept = ~torch.isnan(table)
    assert torch.equal(after[kept], table[kept])  # the first run's EMA came back unchanged
    assert int((~torch.isnan(after)).sum()) > observed  # steps 7-8 added their samples


@needs_mlm
def test_patched_pretrain_vlm_with_full_recomputation_trains_like_without(tmp_path):
    """Megatron-LM's --recompute-granularity full (uniform, one layer a chunk: the routed
    span is re-run in the backward pass, the vision encoder too): 3 ReGATE steps end with
    the weights and the EMA of the same 3 steps without recomputation, bit for bit."""
    import torch

    command, env = _carried_pretrain_vlm(tmp_path)
    command += ["--hidden-dropout", "0", "--attention-dropout", "0", "--train-iters", "3",
                "--save-interval", "3"]
    recompute = ["--recompute-granularity", "full", "--recompute-method", "uniform",
                 "--recompute-num-layers", "1"]
    for name, more in (("stored", []), ("recomputed", recompute)):
        out = _finished(subprocess.run([*command, "--save", name, *more], cwd=tmp_path,
                                       env=env, capture_output=True, text=True, timeout=900))
    assert re.search(r"recompute_granularity \.+ full", out)  # Megatron-LM's args print
    stored = _saved_model(tmp_path / "stored", 3)
    recomputed = _saved_model(tmp_path / "recomputed", 3)
    tensors = [n for n in stored if isinstance(stored[n], torch.Tensor)]
    assert "regate.ema_table" in tensors and len(tensors) > 10
    for name in tensors:
        assert torch.equal(torch.nan_to_num(stored[name], nan=-1.0),
                           torch.nan_to_num(recomputed[name], nan=-1.0)), name


@needs_mlm
def test_patched_pretrain_vlm_preempted_by_sigterm_resumes_like_uninterrupted(tmp_path):
    """Preemption inside Megatron-LM's loop with ReGATE: SIGTERM to the training process
    under --exit-signal-handler (what SLURM sends before a time limit) -> Megatron-LM saves
    at the end of the step it is in and exits 0, the EMA in that checkpoint; the resumed run
    to step k + 2 ends with the EMA and weights of an uninterrupted run to k + 2."""
    import signal
    import time

    import torch

    command, env = _carried_pretrain_vlm(tmp_path)
    # no dropout: the CPU launcher's answer for the CUDA RNG state does not put the RNG
    # tracker's streams back on a resume
    command += ["--hidden-dropout", "0", "--attention-dropout", "0"]
    preempted = subprocess.Popen([*command, "--train-iters", "1000", "--exit-signal-handler",
                                  "--save", "pre", "--save-interval", "1000"], cwd=tmp_path,
                                 env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines, deadline = [], time.time() + 600
    for line in preempted.stdout:  # wait for step 3, then signal the training process
        lines.append(line)
        if "iteration        3/" in line:
            worker = subprocess.run(["pgrep", "-f", "-P", str(preempted.pid), "megatron_lm_cpu"],
                                    capture_output=True, text=True).stdout.split()
            assert worker, "the training process was not found"
            os.kill(int(worker[0]), signal.SIGTERM)
            break
        assert time.time() < deadline, "".join(lines)[-3000:]
    out, err = preempted.communicate(timeout=600)
    out = "".join(lines) + out
    assert preempted.returncode == 0, (out + err)[-4000:]
    assert "exiting program after receiving SIGTERM" in out
    k = int((tmp_path / "pre" / "latest_checkpointed_iteration.txt").read_text())
    assert 3 <= k < 1000
    assert int((~torch.isnan(_saved_model(tmp_path / "pre", k)["regate.ema_table"])).sum()) > 0

    def pretrain(*more):  # the same --train-iters (the data's epoch follows it), to step k + 2
        return _finished(subprocess.run([*command, "--train-iters", "1000", "--save-interval",
                                         "1000", "--exit-interval", str(k + 2), *more],
                                        cwd=tmp_path, env=env,
                                        capture_output=True, text=True, timeout=900))

    pretrain("--save", "pre", "--load", "pre")
    pretrain("--save", "whole")
    resumed, whole = _saved_model(tmp_path / "pre", k + 2), _saved_model(tmp_path / "whole", k + 2)
    a, b = resumed["regate.ema_table"], whole["regate.ema_table"]
    assert torch.equal(torch.nan_to_num(a, nan=-1.0), torch.nan_to_num(b, nan=-1.0)), (
        k, int((~a.isnan()).sum()), int((~b.isnan()).sum()))
    weights = [name for name in whole if not name.startswith("regate.")
               and isinstance(whole[name], torch.Tensor)]
    assert weights and all(torch.equal(resumed[n], whole[n]) for n in weights)


def _signal_once(command, env, cwd, ready, deadline_s=600):
    """Run ``command``; SIGTERM to its training worker (the launcher's child) once
    ``ready()``; (returncode, output) when it has ended."""
    import signal
    import threading
    import time

    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    lines = []  # read as it comes: a full pipe would stop the process
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    deadline = time.time() + deadline_s
    while not ready():
        assert process.poll() is None, "".join(lines)[-4000:]
        assert time.time() < deadline, "".join(lines)[-4000:]
        time.sleep(0.2)
    worker = subprocess.run(["pgrep", "-f", "-P", str(process.pid), "megatron_lm_cpu"],
                            capture_output=True, text=True).stdout.split()
    assert worker, "the training process was not found"
    os.kill(int(worker[0]), signal.SIGTERM)
    process.wait(timeout=600)
    reader.join(timeout=60)
    return process.returncode, "".join(lines)


@needs_mlm
def test_patched_pretrain_vlm_store_build_preempted_by_sigterm_resumes(tmp_path):
    """The in-script store build inside Megatron-LM's loop, preempted: with
    --exit-signal-handler, SIGTERM during the build (the mock data's 66,592 samples take
    about an hour on this CPU; a chunk is written every 60 s) stops it at the next
    micro-batch group; the chunks written so far stay
    beside the store path, no store is written, and the process exits 0. The next run says
    how many samples are done and goes on from there (stopped again by SIGTERM here)."""
    import numpy as np

    command, env = _carried_pretrain_vlm(tmp_path)
    at = command.index("--regate-selector")
    del command[at:at + 2]  # the store's selector (regate)
    store = tmp_path / "store"
    parts = tmp_path / ".store.parts"
    command += ["--regate-ref-store", str(store), "--regate-build-ref-store",
                "--exit-signal-handler", "--train-iters", "4", "--save-interval", "1000"]

    def chunks():
        return sorted(parts.glob("chunk-*.npz")) if parts.is_dir() else []

    def done():
        return sum(int(np.load(c)["ids"].size) for c in chunks())

    rc, out = _signal_once(command, env, tmp_path, lambda: bool(chunks()))
    assert rc == 0, out[-4000:]
    first = done()
    assert "the reference-store build stopped on signal" in out and first > 0, out[-3000:]
    assert not store.exists() and "iteration        1/" not in out
    assert (parts / "build.json").is_file()
    rc, out = _signal_once(command, env, tmp_path, lambda: done() > first)
    assert rc == 0, out[-4000:]
    assert f"resuming the reference-store build in {parts}: {first} of 66592" in out, out[-3000:]
    assert done() > first and not store.exists()


STOCK_FIXES_V019 = {  # stock core_v0.19.0 examples/multimodal does not start without them
    "train.py": [  # it calls pretrain_cfg_container_from_args unimported, and leaves it out
        ("from megatron.training import get_args,",
         "from megatron.training.argument_utils import pretrain_cfg_container_from_args\n"
         "from megatron.training import get_args,"),
        ("    pretrain(\n        train_valid_test_dataloaders_provider,",
         "    pretrain(\n        full_config,\n        train_valid_test_dataloaders_provider,")],
    "model.py": [  # its MLP specs are functools.partial(MLP.as_mlp_submodule, submodules=...)
        ("get_mlp_module_spec(use_te=use_te).submodules",
         "get_mlp_module_spec(use_te=use_te).keywords['submodules']")],
}


def fix_stock_examples_multimodal_v019(script_dir):
    """The stock fixes the core_v0.19.0 script needs (patches/README.md), in the test's copy
    only; the MultimodalTokenizer path is given by tests/megatron_lm_cpu.py."""
    for name, edits in STOCK_FIXES_V019.items():
        text = (script_dir / name).read_text()
        for old, new in edits:
            assert text.count(old) == 1, f"{name}: {old!r}"
            text = text.replace(old, new)
        (script_dir / name).write_text(text)


RANDOM = ["--regate-selector", "random"]


def _examples_multimodal(tmp_path):
    """Megatron-LM's examples/multimodal/train.py, patched, run in its own pretrain() on CPU
    (gloo, bf16, tests/megatron_lm_cpu.py): a tiny LLaVA (random 2 x 64 SigLIP, 2-layer LM,
    image tiling: 1-3 tiles and a thumbnail per image) on a blend of two Energon captioning
    webdatasets (tests/multimodal_cpu_data.py), ReGATE at a constant keep ratio of 0.5.
    Returns (train, the data's paths and sample count)."""
    pytest.importorskip("transformers", reason="examples/multimodal's tokenizer needs it")
    pytest.importorskip("megatron.energon", reason="examples/multimodal reads Energon data")
    from multimodal_cpu_data import make

    mlm = _carried(tmp_path)
    shutil.copytree(os.path.join(MLM, "examples", "multimodal"), mlm / "examples" / "multimodal")
    applied = subprocess.run(["git", "apply", patch_path("examples_multimodal_train.patch")],
                             cwd=mlm, capture_output=True, text=True,
                             env=dict(os.environ, GIT_CEILING_DIRECTORIES=str(tmp_path)))
    assert applied.returncode == 0, applied.stderr
    script_dir = mlm / "examples" / "multimodal"
    if os.path.basename(patch_dir()) == "core_v0.19.0":
        fix_stock_examples_multimodal_v019(script_dir)
    data = make(tmp_path / "data", MLM)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_DEVICE_MAX_CONNECTIONS="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               # the script restores its Energon loader state with a bare torch.load
               TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1",
               PYTHONPATH=os.pathsep.join([str(mlm), str(script_dir), ROOT,
                                           os.environ.get("PYTHONPATH", "")]))
    flags = ["--language-model-type", "mistral_7b", "--vision-model-type", data["vision"],
             "--freeze-ViT", "--num-layers", "2", "--hidden-size", "64",
             "--num-attention-heads", "4", "--img-h", "32", "--img-w", "32", "--patch-dim", "16",
             # images of 1-3 tiles, plus a thumbnail tile: num_tiles varies per image
             "--use-tiling", "--max-num-tiles", "4", "--use-thumbnail",
             "--seq-length", "4", "--decoder-seq-length", "128",
             "--max-position-embeddings", "128", "--dataloader-seq-length", "96",
             "--allow-missing-vision-projection-checkpoint", "--bf16",
             "--transformer-impl", "local", "--no-persist-layer-norm", "--no-rope-fusion",
             "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion",
             "--no-bias-gelu-fusion", "--no-bias-dropout-fusion", "--attention-softmax-in-fp32",
             "--tokenizer-type", "MultimodalTokenizer", "--tokenizer-model", data["tokenizer"],
             "--tokenizer-prompt-format", "qwen2p0", "--data-path", data["data"],
             # the script's default; at core_v0.19.0 the core flag --tokenizer-special-tokens
             # (same dest, default None) shadows it
             "--special-tokens", "<image>",
             "--prompt-path", str(script_dir / "manual_prompts.json"),
             "--dataloader-type", "external", "--num-workers", "0", "--split", "100,0,0",
             "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3",
             "--min-lr", "1e-5", "--lr-decay-style", "constant", "--lr-decay-iters", "100",
             "--train-iters", "6", "--log-interval", "1", "--eval-iters", "0",
             "--eval-interval", "1000", "--ckpt-format", "torch", "--save-interval", "3",
             "--override-opt_param-scheduler",
             # no dropout: the launcher's CPU answer for the CUDA RNG state does not put the
             # model-parallel RNG tracker's streams back on a resume
             "--hidden-dropout", "0", "--attention-dropout", "0",
             "--regate", "--regate-schedule", "constant", "--regate-keep-ratio", "0.5",
             "--distributed-backend", "gloo"]

    def train(ckpt, *more, ranks=1, regate=RANDOM, check=True):
        """Train into (and from) ``ckpt``: (stdout, {step: logged lm loss}); with
        ``check=False`` the finished process itself."""
        run = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
             "--master-port", str(29400 + os.getpid() % 500),
             os.path.join(ROOT, "tests", "megatron_lm_cpu.py"), str(script_dir / "train.py"),
             *flags, *regate, "--save", ckpt, "--load", ckpt, "--dataloader-save",
             f"{ckpt}/loader", *more],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        if not check:
            return run
        out = _finished(run, "examples/multimodal")
        losses = {int(m.group(1)): m.group(2) for m in re.finditer(
            r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: (\S+) \|", out)}
        return out, losses

    return train, data


def _ema(tmp_path, ckpt, step):
    return _saved_model(tmp_path / ckpt, step)["regate.ema_table"]


@needs_mlm
def test_patched_examples_multimodal_trains_and_resumes_like_uninterrupted_on_cpu(tmp_path):
    """The patched examples/multimodal (`_examples_multimodal`) with the random selector.
    The ids come from the Energon restore keys and the target counts from one pass through
    the script's TaskEncoder: a wrong id or count stops the step (the scorer checks
    every sample's targets), so 6 steps over the 12-sample blend (revisits included) check
    them. Then resume-equals-uninterrupted: from the step-3 checkpoint (model, optimizer,
    EMA, Energon loader state) to 6 gives the same EMA, bit for bit. Then two ranks at DP2
    and at TP2."""
    import torch

    train, data = _examples_multimodal(tmp_path)
    out, whole = train("a")
    n = data["train_samples"]
    assert f"ReGATE: target counts of {n} Energon samples" in out
    assert sorted(whole) == [1, 2, 3, 4, 5, 6]
    assert all(float(v) == float(v) and float(v) < 100 for v in whole.values())  # finite
    table = _ema(tmp_path, "a", 6)
    observed = ~torch.isnan(table)
    assert 0 < int(observed.sum()) < table.numel()  # half the targets of each visit kept
    # resume from step 3 of the same run
    shutil.copytree(tmp_path / "a", tmp_path / "b", ignore=shutil.ignore_patterns("iter_0000006"))
    (tmp_path / "b" / "latest_checkpointed_iteration.txt").write_text("3")
    out, resumed = train("b")
    assert "at iteration 3" in out and "restored dataset state" in out
    assert sorted(resumed) == [4, 5, 6]
    # The EMA folds in every computed target's loss of steps 4-6: equal bit for bit. The
    # logged losses agree at 4 and 6; the one logged for the second step after a resume
    # differs in the stock script as well (seen without --regate), a logging matter.
    assert resumed[4] == whole[4] and resumed[6] == whole[6], (whole, resumed)
    again = _ema(tmp_path, "b", 6)
    assert torch.equal(torch.nan_to_num(again, nan=-1.0), torch.nan_to_num(table, nan=-1.0))
    # two ranks, DP2 then TP2 (the data loader on TP rank 0 only; TP rank 1 receives its
    # selections): both ranks count a share, every step's ids and counts agree
    for parallel in (["--tensor-model-parallel-size", "1"], ["--tensor-model-parallel-size", "2"]):
        out, losses = train(f"tp{parallel[-1]}", *parallel, "--train-iters", "3", ranks=2)
        assert f"ReGATE: target counts of {n} Energon samples" in out and "by 2 ranks" in out
        assert sorted(losses) == [1, 2, 3]
        assert _ema(tmp_path, f"tp{parallel[-1]}", 3).numel() == table.numel()


@needs_mlm
def test_patched_examples_multimodal_builds_its_reference_store_and_trains_on_it(tmp_path):
    """--regate-ref-store S --regate-build-ref-store in the patched examples/multimodal
    (`_examples_multimodal`, the regate selector): the script's language model as it starts
    (--use-cpu-initialization: the same weights at any TP) reads every sample of the Energon
    blend once through the TaskEncoder, text only (pad view). Built at TP2, PP2 and DP2 with
    --regate-build-ref-store-exit (status 0, no step run), and at one rank at the first step
    of a run that then trains 3 steps on it: the stores have the same layout, the TP2 one
    the same losses as the one-rank build (same weights, same prompts); each sample's target
    count is what the scorer checks at every step (the random selector's count pass gives
    the same total). A second run opens the store without rebuilding it; a run whose
    sequence layout differs is refused before any step, naming the store."""
    import numpy as np

    from regate_megatron.scoring.ref_store import RefLossStore

    train, data = _examples_multimodal(tmp_path)
    n = data["train_samples"]

    def store_flags(name):
        return ["--regate-ref-store", str(tmp_path / name), "--regate-build-ref-store",
                "--use-cpu-initialization"]

    built, logs = {}, {}
    for name, ranks, more in (("tp2", 2, ["--tensor-model-parallel-size", "2"]),
                              ("pp2", 2, ["--pipeline-model-parallel-size", "2"]),
                              ("dp2", 2, ["--tensor-model-parallel-size", "1"])):
        out, losses = train(f"ckpt_{name}", *more, "--regate-build-ref-store-exit", ranks=ranks,
                            regate=store_flags(name))
        assert f"built by the script's language model: {n} samples" in out, out[-3000:]
        assert "exiting before training" in out and not losses
        assert not (tmp_path / f"ckpt_{name}" / "latest_checkpointed_iteration.txt").exists()
        built[name], logs[name] = RefLossStore.open(str(tmp_path / name)), out
    out, losses = train("ckpt_one", "--train-iters", "3", regate=store_flags("one"))
    assert f"built by the script's language model: {n} samples" in out
    assert sorted(losses) == [1, 2, 3]
    one = RefLossStore.open(str(tmp_path / "one"))
    assert len(one) == n and one.meta["teacher_visual"] == "pad"
    counts = [one[i].size for i in range(n)]
    assert min(counts) > 0
    vocab = len(json.loads((Path(data["tokenizer"]) / "tokenizer.json").read_text())
                ["model"]["vocab"])
    for name, store in (("one", one), *built.items()):
        assert len(store) == n and [store[i].size for i in range(n)] == counts, name
        assert store.meta["dataset_fingerprint"] == one.meta["dataset_fingerprint"]
        # an untrained LM: the targets' mean loss near log(vocabulary size)
        mean = float(np.concatenate([store[i] for i in range(n)]).astype(np.float32).mean())
        assert abs(mean - np.log(vocab)) < 1.0, (name, mean, vocab)
    for i in range(n):  # TP2: one replica reads in the one-rank order, the same weights
        np.testing.assert_allclose(built["tp2"][i].astype(np.float32),
                                   one[i].astype(np.float32), rtol=0, atol=0.02,
                                   err_msg=f"sample {i}")
    # DP2 deals the samples to two readers: the script's captioning prompt, drawn from a seed
    # of the reader and the sample's place in its stream (Energon's restore_seeds), differs
    # for some samples, and so do their reference losses (patches/README.md); the rest agree
    same = [bool(np.allclose(built["dp2"][i].astype(np.float32), one[i].astype(np.float32),
                             rtol=0, atol=0.02)) for i in range(n)]
    assert sum(same) >= n // 3, same
    # PP2 runs the pipeline path (its values are checked against a written-out teacher in
    # tests/test_megatron_lm_reference.py): Megatron-LM seeds each stage's initialisation
    # apart (seed + 100 x stage), so its second stage is another random model here
    assert "(TP 1, PP 2)" in logs["pp2"] and "(TP 2, PP 1)" in logs["tp2"]
    # the EMA table is laid out by the store; the random selector's count pass agrees
    assert _ema(tmp_path, "ckpt_one", 3).numel() == sum(counts)
    _, _ = train("ckpt_counts", "--train-iters", "1")
    assert _ema(tmp_path, "ckpt_counts", 1).numel() == sum(counts)
    # opened, not rebuilt
    stamp = (tmp_path / "one" / "meta.json").stat().st_mtime_ns
    out, losses = train("ckpt_again", "--train-iters", "2", regate=store_flags("one"))
    assert "built by the script" not in out and sorted(losses) == [1, 2]
    assert (tmp_path / "one" / "meta.json").stat().st_mtime_ns == stamp
    # another sequence layout: refused before any step, the store kept
    run = train("ckpt_other", "--train-iters", "2", "--decoder-seq-length", "120",
                regate=store_flags("one"), check=False)
    assert run.returncode != 0 and "iteration        1/" not in run.stdout
    assert "other training data or another sequence layout" in run.stdout + run.stderr
    assert f"remove {tmp_path / 'one'}" in run.stdout + run.stderr
    assert (tmp_path / "one" / "meta.json").stat().st_mtime_ns == stamp

"""benchmarks/gpu_check.sh refuses a bad stage selection before doing anything."""

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_unknown_stage_in_gpu_check_only_is_one_line_error(tmp_path):
    env = dict(os.environ, GPU_CHECK_ONLY="megatron_lm pipelin", OUT=str(tmp_path))
    run = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--dry-run"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "gpu_check.sh: GPU_CHECK_ONLY names an unknown stage 'pipelin' (stages: gpu_tests "
        "pipeline megatron_lm bench_<version> profile gpu_tests_<version> megatron_lm_store)"]
    assert run.stdout == "" and not os.listdir(tmp_path)  # no stage ran, nothing written

#!/usr/bin/env bash
# The GPU check of regate-megatron: ONE command, within 6 minutes on one H200 (Python 3.12,
# torch 2.11, no Megatron-Core, no TE, no network). Megatron-Core comes as carried cp312
# wheels in .whl/ (0.16.1 and the newest 0.19.x, with pydantic for Megatron-LM's
# megatron/training: benchmarks/carry_wheels.sh), Megatron-LM's patched pretrain_vlm.py
# and megatron/training in .megatron_lm/ (benchmarks/carry_megatron_lm.sh).
#
#   benchmarks/gpu_check.sh              on a GPU machine
#   benchmarks/gpu_check.sh --dry-run    the same stages at tiny size on CPU (plumbing check;
#                                        also GPU_CHECK_ALLOW_CPU=1); PYTHON must be a 3.12
#                                        interpreter with torch for the cp312 wheels
#
# Stages (each timed; a failing stage is recorded and the later ones still run):
#   install            the carried wheels, each Megatron-Core into its own --target directory
#   gpu_tests          pytest -m gpu (tests/test_gpu.py) on Megatron-Core 0.16.1, bf16 + fp32
#   pipeline           README pipeline, small: teacher, regate-precompute-ref, then
#                      regate-train --bf16 --regate 30 steps with an evaluation, resumed for 10
#                      more, compared with a straight 40-step run (steps 31-40 and the eval)
#   megatron_lm        (optional) patched Megatron-LM pretrain_vlm.py --mock-data --regate, 20 steps,
#                      EMA in the saved checkpoint, resumed (the carried .megatron_lm/, or
#                      MEGATRON_LM_TRAINING_DIR; a dry run goes through tests/megatron_lm_cpu.py)
#   bench_<version>    benchmarks/router.py at 1B-class size, seq 4096, micro-batch 1, bf16,
#                      once per Megatron-Core version (0.16.1, newest 0.19.x)
#   profile            (optional) router.py --profile when a speedup is below 0.9 x ideal
#   gpu_tests_<newest> (optional, if time is left) pytest -m gpu on the newest version
#   megatron_lm_store  (optional, if time is left) the patched pretrain_vlm.py builds its
#                      reference store in the script (--regate-build-ref-store-exit; the mock
#                      data at --seq-length 4096: 16.6k samples, 8 a micro-batch), then trains
#                      10 steps on it;
#                      a dry run stops the build with SIGTERM and checks what it left
# GPU_CHECK_ONLY="megatron_lm ..." runs only the named stages (and install): e.g. the
# megatron_lm stage in a second call when the 6-minute run has no time left for it.
# Budget: GPU_CHECK_BUDGET_S (default 330 s of the 6 minutes). A stage gets at most its
# cap and never the time the later required stages need; an optional stage runs only if
# half its cap fits. The last line is machine-readable:
#   gpu_check ok=<0|1> overhead=<per version> speedup_0.5=... ideal_0.5=... mcore=<versions> ...
# ok=1 iff every required stage passed; goals= says whether the benchmark met its goals.
# Files: $OUT (the device tool's) or runs/gpu_check/: gpu_check.log (every stage's output),
# stages.tsv, bench_<version>.json, resume.txt, router_profile.txt.
set -uo pipefail

# The whole script is one function, parsed before it runs (an edit during a run cannot
# shift what bash reads next).
main() {
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
[ "${GPU_CHECK_ALLOW_CPU:-0}" = "1" ] && DRY=1
PY="${PYTHON:-python3}"
WHEELS="${GPU_CHECK_WHEELS:-$REPO/.whl}"
for name in ${GPU_CHECK_ONLY:-}; do  # a misspelt stage would silently run nothing
    case "$name" in
        install|gpu_tests|pipeline|megatron_lm|megatron_lm_store|profile|bench_*|gpu_tests_*) ;;
        *) echo "gpu_check.sh: GPU_CHECK_ONLY names an unknown stage '$name' (stages: gpu_tests" \
                "pipeline megatron_lm bench_<version> profile gpu_tests_<version>" \
                "megatron_lm_store)" >&2
           exit 2 ;;
    esac
done
# A dry run on a small, shared CPU is slower than the GPU run it stands in for: its stage caps
# and reserves are scaled (GPU_CHECK_SCALE) and its budget is larger.
if [ "$DRY" = 1 ]; then
    BUDGET="${GPU_CHECK_BUDGET_S:-3600}"; SCALE="${GPU_CHECK_SCALE:-8}"
else
    BUDGET="${GPU_CHECK_BUDGET_S:-330}"; SCALE="${GPU_CHECK_SCALE:-1}"
fi
if [ -n "${OUT:-}" ]; then WORK=/tmp/gpu_check; else WORK="$REPO/runs/gpu_check"; fi
rm -rf "$WORK" && mkdir -p "$WORK/bin" "$WORK/logs"
LOG="$WORK/gpu_check.log"
STAGES="$WORK/stages.tsv"
: > "$STAGES"
START=$SECONDS
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false
export CUDA_DEVICE_MAX_CONNECTIONS=1

note() { echo "[gpu_check $(( SECONDS - START ))s] $*" | tee -a "$LOG"; }

# The README's command names, run from this checkout (no install into the interpreter).
for pair in regate-train:training.train regate-precompute-ref:tools.precompute \
        regate-inspect:tools.inspect_refs; do
    printf '#!/usr/bin/env bash\nexec "%s" -m regate_megatron.%s "$@"\n' "$PY" "${pair#*:}" \
        > "$WORK/bin/${pair%%:*}"
    chmod +x "$WORK/bin/${pair%%:*}"
done
export PATH="$WORK/bin:$PATH"

# run_stage NAME REQUIRED CAP RESERVE FUNCTION: runs FUNCTION with a timeout of
# min(CAP, time left - RESERVE); skipped (failed if required) when that is under 10 s
# (optional stages need half their CAP).
run_stage() {
    local name=$1 required=$2 cap=$(( $3 * SCALE )) reserve=$(( $4 * SCALE )) fn=$5
    if [ -n "${GPU_CHECK_ONLY:-}" ] && [ "$name" != install ] \
            && [[ " $GPU_CHECK_ONLY " != *" $name "* ]]; then
        printf '%s\tskip\t0\t0\tnot in GPU_CHECK_ONLY\n' "$name" >> "$STAGES"
        return
    fi
    local left=$(( BUDGET - (SECONDS - START) - reserve ))
    local limit=$(( cap < left ? cap : left ))
    if [ "$limit" -lt 10 ] || { [ "$required" = 0 ] && [ "$limit" -lt $(( cap / 2 )) ]; }; then
        note "stage $name: SKIPPED (${left}s left after reserving ${reserve}s)"
        printf '%s\tskip\t0\t%s\tno time left\n' "$name" "$required" >> "$STAGES"
        return
    fi
    note "stage $name: start (limit ${limit}s)"
    local t0=$SECONDS
    timeout -k 10 "$limit" bash -c "$fn" > "$WORK/logs/$name.log" 2>&1
    local rc=$?
    local took=$(( SECONDS - t0 ))
    { echo "===== $name (rc=$rc, ${took}s)"; cat "$WORK/logs/$name.log"; } >> "$LOG"
    local status=ok why=""
    if [ "$rc" -ne 0 ]; then
        status=FAIL
        why="rc=$rc$([ "$rc" -ge 124 ] && echo " (timed out after ${limit}s)")"
        tail -n 25 "$WORK/logs/$name.log"
    fi
    tail -n 3 "$WORK/logs/$name.log" | sed "s/^/    [$name] /"
    note "stage $name: $status in ${took}s $why"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$took" "$required" "$why" >> "$STAGES"
}

# ---------------------------------------------------------------- install
stage_install() {
    set -eo pipefail
    "$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__,
        "cuda", torch.cuda.is_available(),
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
    ls "$WHEELS"/*.whl
    local deps=()
    for whl in "$WHEELS"/*.whl; do
        case "$(basename "$whl")" in
            megatron_core-*)
                local ver; ver=$(basename "$whl" | cut -d- -f2)
                "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
                    --target "$WORK/mc-$ver" "$whl"
                echo "megatron-core $ver -> $WORK/mc-$ver" ;;
            *) deps+=("$whl") ;;
        esac
    done
    if [ "${#deps[@]}" -gt 0 ]; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --target "$WORK/deps" "${deps[@]}"
    fi
    [ -d "$WORK/mc-0.16.1" ] || { echo "no megatron_core-0.16.1 wheel in $WHEELS"; exit 1; }
}
export -f stage_install
export PY WHEELS WORK REPO DRY
run_stage install 1 60 200 stage_install

# Megatron-Core versions carried: 0.16.1 and the newest other one.
NEWEST=$(ls -d "$WORK"/mc-* 2>/dev/null | sed 's/.*mc-//' | grep -v '^0\.16\.1$' | sort -V | tail -n 1)
note "Megatron-Core versions: 0.16.1 ${NEWEST:-(no newer wheel carried)}"
mcore_path() { echo "$WORK/mc-$1:$WORK/deps:$REPO"; }

# ---------------------------------------------------------------- GPU tests
stage_gpu_tests() {
    set -eo pipefail
    cd "$REPO"
    "$PY" -c 'import megatron.core as m; print("megatron-core", m.__version__, m.__file__)'
    if [ "$DRY" = 1 ]; then export REGATE_GPU_TESTS_ON_CPU=1; fi
    "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -rs
}
export -f stage_gpu_tests
PYTHONPATH="$(mcore_path 0.16.1)" run_stage gpu_tests 1 110 170 stage_gpu_tests

# ---------------------------------------------------------------- README pipeline, small
stage_pipeline() {
    set -eo pipefail
    local p="$WORK/pipeline"
    mkdir -p "$p" && cd "$p"
    "$PY" "$REPO/benchmarks/gpu_check.py" data "$p"
    # digits-VQA's --seq-length/--img-h/--img-w/--patch-dim, defined once in Python
    local layout
    read -r -a layout < <("$PY" -c "from regate_megatron.tools.demo.digits import DIGITS_LAYOUT
print(*DIGITS_LAYOUT)")
    local model=(--num-layers 2 --hidden-size 64 --num-attention-heads 4
        --position-embedding-type rope --normalization RMSNorm --swiglu "${layout[@]}"
        --vision-num-layers 1 --vision-hidden-size 32 --vision-num-attention-heads 2
        --hidden-dropout 0 --attention-dropout 0 --make-vocab-size-divisible-by 64)
    local common=(--data-path data/train.json --tokenizer-model tokenizer.model
        --micro-batch-size 8 --global-batch-size 16 --lr 1e-3 --lr-decay-style constant
        --weight-decay 0 --seed 1234 --no-progress --log-interval 10)
    echo "--- teacher: regate-train --text-only"
    regate-train "${model[@]}" "${common[@]}" --text-only --train-iters 10 --save teacher
    echo "--- regate-precompute-ref"
    regate-precompute-ref --data-path data/train.json --tokenizer-model tokenizer.model \
        --load teacher --output ref_store "${layout[@]}" \
        --micro-batch-size 64 --no-progress
    local student=("${model[@]}" "${common[@]}" --bf16 --regate --regate-ref-store ref_store
        --regate-keep-ratio 0.3 --regate-schedule cyclic --regate-cycle-steps 10
        --regate-dense-steps 1 --language-model-checkpoint teacher
        --valid-data-path data/valid.json --eval-interval 30 --eval-iters 1
        --eval-max-new-tokens 8)
    echo "--- regate-train --bf16 --regate: 30 steps with an evaluation, saved"
    regate-train "${student[@]}" --train-iters 30 --save ckpt --save-interval 30 \
        --metrics-jsonl first30.jsonl
    echo "--- resumed for 10 more"
    regate-train "${student[@]}" --train-iters 40 --load ckpt --metrics-jsonl resumed.jsonl
    echo "--- uninterrupted 40 steps"
    regate-train "${student[@]}" --train-iters 40 --metrics-jsonl straight.jsonl
    "$PY" "$REPO/benchmarks/gpu_check.py" resume first30.jsonl resumed.jsonl straight.jsonl \
        | tee "$WORK/resume.txt"
}
export -f stage_pipeline
PYTHONPATH="$(mcore_path 0.16.1)" run_stage pipeline 1 150 110 stage_pipeline

# ---------------------------------------------------------------- Megatron-LM's pretrain()
# The patched pretrain_vlm.py of a Megatron-LM core_v0.16.1 checkout (patches/core_v0.16.1,
# the Megatron-Core this stage installs; patches/README.md), carried as
# MEGATRON_LM_TRAINING_DIR (benchmarks/carry_megatron_lm.sh, ~2 MB; default .megatron_lm/):
# --mock-data with ReGATE for 20 steps on one GPU saving at 10 and 20, the EMA checked in the
# saved checkpoint, then resumed from it for 5 more steps.
MLM_DIR="${MEGATRON_LM_TRAINING_DIR:-$REPO/.megatron_lm}"
megatron_lm_folder() {  # $WORK/megatron_lm: Megatron-Core 0.16.1 + the carried folder
    local m="$WORK/megatron_lm"
    [ -f "$m/pretrain_vlm.py" ] && return
    mkdir -p "$m"
    cp -r "$WORK/mc-0.16.1/megatron" "$m/" && cp -r "$MLM_DIR"/megatron/* "$m/megatron/"
    cp "$MLM_DIR"/*.py "$m/"
    grep -q "regate.install" "$m/pretrain_vlm.py" || { echo "pretrain_vlm.py is not patched"; exit 1; }
}
export -f megatron_lm_folder
# pretrain_vlm_setup DIR: a fresh $WORK/megatron_lm/DIR to run in, RUN (the script; a dry
# run takes Megatron-LM's loop through the tests' CPU launcher, gloo, fp32) and VLM_ARGS, the
# flags both Megatron-LM stages share (a small LLaVA on the mock data, no apex/TE:
# --no-persist-layer-norm, ReGATE at keep ratio 0.5).
pretrain_vlm_setup() {
    local m="$WORK/megatron_lm" tiny=() precision=(--bf16)
    megatron_lm_folder
    rm -rf "${m:?}/$1" && mkdir -p "$m/$1" && cd "$m/$1"
    RUN=("$m/pretrain_vlm.py")
    if [ "$DRY" = 1 ]; then
        tiny=(--decoder-num-layers 2 --hidden-size 64)
        RUN=("$REPO/tests/megatron_lm_cpu.py" "$m/pretrain_vlm.py")
        precision=(--distributed-backend gloo)
    fi
    VLM_ARGS=(--mock-data --tokenizer-type NullTokenizer --vocab-size 1024
        --decoder-num-layers 4 --hidden-size 256 --num-attention-heads 4 "${tiny[@]}"
        --encoder-num-layers 1 --img-h 32 --img-w 32 --patch-dim 16 --disable-vision-class-token
        --lr 1e-4 --min-lr 1e-5 --lr-decay-style constant "${precision[@]}"
        --transformer-impl local --no-persist-layer-norm --no-rope-fusion
        --no-gradient-accumulation-fusion --no-masked-softmax-fusion --no-bias-gelu-fusion
        --no-bias-dropout-fusion --ckpt-format torch --save ckpt --eval-iters 0
        --eval-interval 1000 --log-interval 5
        --regate --regate-schedule constant --regate-keep-ratio 0.5)
    export PYTHONPATH="$m:$WORK/deps:$REPO"
}
export -f pretrain_vlm_setup
stage_megatron_lm() {
    set -eo pipefail
    pretrain_vlm_setup run
    # --seq-length 1024: the mock data's epoch is then 66,592 samples, whose target counts
    # the random selector reads once at start (~0.5 ms each; 532,736 at --seq-length 128).
    # A fixed --lr-decay-iters: the resume's schedule is the first run's; the resume's longer
    # --train-iters changes Megatron-LM's weight-decay horizon, which
    # --override-opt_param-scheduler accepts.
    local args=("${VLM_ARGS[@]}" --seq-length 1024 --max-position-embeddings 2048
        --micro-batch-size 2 --global-batch-size 4 --lr-decay-iters 25 --save-interval 10
        --regate-selector random)
    local launch=(torch.distributed.run --nproc-per-node 1 --master-port 29533)  # torchrun
    echo "--- patched pretrain_vlm.py --mock-data --regate: 20 steps"
    "$PY" -m "${launch[@]}" "${RUN[@]}" "${args[@]}" --train-iters 20
    echo "--- the EMA rides in the checkpoint"
    "$PY" - <<'PYEOF'
import glob, torch
path = sorted(glob.glob("ckpt/iter_0000020/mp_rank_00*/model_optim_rng.pt"))[0]
model = torch.load(path, map_location="cpu", weights_only=False)["model"]
table = model["regate.ema_table"]
seen = int((~torch.isnan(table)).sum())
print(f"{path}: regate.ema_table {tuple(table.shape)}, {seen} entries observed")
assert seen > 0 and "regate.vocab_ema" in model
PYEOF
    echo "--- resumed from iteration 20 for 5 more"
    "$PY" -m "${launch[@]}" "${RUN[@]}" "${args[@]}" --train-iters 25 --load ckpt \
        --override-opt_param-scheduler
}
export -f stage_megatron_lm
export MLM_DIR
if [ -f "$MLM_DIR/pretrain_vlm.py" ]; then
    PYTHONPATH="$(mcore_path 0.16.1)" run_stage megatron_lm 0 130 150 stage_megatron_lm
else
    note "stage megatron_lm: SKIPPED (no Megatron-LM carried: set MEGATRON_LM_TRAINING_DIR, see benchmarks/carry_megatron_lm.sh)"
    printf 'megatron_lm\tskip\t0\t0\tno MEGATRON_LM_TRAINING_DIR\n' >> "$STAGES"
fi

# ---------------------------------------------------------------- router benchmark
if [ "$DRY" = 1 ]; then
    BENCH=(--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 256
        --micro-batch-size 1 --vocab-size 512 --bf16 --rounds 1 --warmup 1)
else
    BENCH=(--hidden-size 2048 --num-layers 16 --num-attention-heads 16 --seq-length 4096
        --micro-batch-size 1 --vocab-size 32000 --bf16 --rounds 5 --warmup 2)
fi
export BENCH_ARGS="${BENCH[*]}"
stage_bench() {
    set -eo pipefail
    cd "$REPO"
    # shellcheck disable=SC2086
    "$PY" benchmarks/router.py $BENCH_ARGS --json "$WORK/bench_$BENCH_VERSION.json"
}
export -f stage_bench
BENCH_VERSION=0.16.1 PYTHONPATH="$(mcore_path 0.16.1)" run_stage bench_0.16.1 1 75 50 stage_bench
if [ -n "$NEWEST" ]; then
    BENCH_VERSION=$NEWEST PYTHONPATH="$(mcore_path "$NEWEST")" \
        run_stage "bench_$NEWEST" 1 75 0 stage_bench
else
    note "stage bench_0.19.x: FAIL (no newer Megatron-Core wheel in $WHEELS)"
    printf 'bench_0.19.x\tFAIL\t0\t1\tno wheel carried\n' >> "$STAGES"
fi

# ---------------------------------------------------------------- profile, if short of ideal
stage_profile() {
    set -eo pipefail
    cd "$REPO"
    # shellcheck disable=SC2086
    "$PY" benchmarks/router.py $BENCH_ARGS --rounds 1 --warmup 1 \
        --profile "$WORK/router_profile.txt" --profile-top 20
}
export -f stage_profile
SHORT=$("$PY" - "$WORK/bench_0.16.1.json" <<'EOF' 2>/dev/null || echo 0
import json, sys
r = json.load(open(sys.argv[1]))
short = r["overhead_ratio"] > 1.02 or any(
    v["of_ideal"] < 0.9 for k, v in r["variants"].items() if k not in ("stock", "routed_1.0"))
print(int(short or r["device"] == "cpu"))
EOF
)
if [ "$SHORT" = 1 ]; then
    PYTHONPATH="$(mcore_path 0.16.1)" run_stage profile 0 45 0 stage_profile
fi

# ---------------------------------------------------------------- GPU tests on the newest
if [ -n "$NEWEST" ]; then
    PYTHONPATH="$(mcore_path "$NEWEST")" run_stage "gpu_tests_$NEWEST" 0 90 0 stage_gpu_tests
fi

# ---------------------------------------------------------------- the in-script store
# The same carried pretrain_vlm.py building its reference-loss store with its own language
# model (patches/README.md): all of the mock data at --seq-length 4096 once on the GPU, the
# store checked, then 10 ReGATE steps on it (the regate selector). A dry run cannot read
# the 16.6k samples on a CPU in time: SIGTERM under --exit-signal-handler stops its build
# and the chunks it leaves are checked.
stage_megatron_lm_store() {
    set -eo pipefail
    pretrain_vlm_setup store_run
    local batch=(--micro-batch-size 8 --global-batch-size 16)
    # a dry run: a group done before its SIGTERM
    [ "$DRY" = 1 ] && batch=(--micro-batch-size 2 --global-batch-size 4)
    local args=("${VLM_ARGS[@]}" --seq-length 4096 --max-position-embeddings 8192
        "${batch[@]}" --lr-decay-iters 10 --save-interval 1000 --exit-signal-handler
        --train-iters 10 --regate-ref-store store --regate-build-ref-store)
    local launch=(torch.distributed.run --nproc-per-node 1 --master-port 29534)
    if [ "$DRY" = 1 ]; then
        echo "--- the build, stopped by SIGTERM once it has started"
        "$PY" -m "${launch[@]}" "${RUN[@]}" "${args[@]}" > build.log 2>&1 &
        local launcher=$! worker=""
        for _ in $(seq 600); do
            grep -q "building the reference-loss store" build.log 2>/dev/null && break
            kill -0 "$launcher" 2>/dev/null || { tail -n 30 build.log; exit 1; }
            sleep 0.5
        done
        sleep 15  # a few micro-batch groups read
        worker=$(pgrep -f -P "$launcher" megatron_lm_cpu | head -n 1)
        kill -TERM "$worker"
        wait "$launcher"
        tail -n 3 build.log
        grep -q "reference-store build stopped on signal" build.log
        ls .store.parts/build.json .store.parts/chunk-*.npz
        [ ! -e store ]
        return
    fi
    echo "--- the build, all of the mock data"
    "$PY" -m "${launch[@]}" "${RUN[@]}" "${args[@]}" --regate-build-ref-store-exit
    "$PY" - <<'PYEOF'
import json
meta = json.load(open("store/meta.json"))
print("store:", meta["num_samples"], "samples,", meta["teacher_visual"], "view,", meta["built_by"])
assert meta["num_samples"] > 10000 and meta["built_by"] == "regate_megatron.megatron_lm"
PYEOF
    echo "--- 10 ReGATE steps on the store"
    "$PY" -m "${launch[@]}" "${RUN[@]}" "${args[@]}"
    "$PY" - <<'PYEOF'
import glob, torch
path = sorted(glob.glob("ckpt/iter_0000010/mp_rank_00*/model_optim_rng.pt"))[0]
table = torch.load(path, map_location="cpu", weights_only=False)["model"]["regate.ema_table"]
seen = int((~torch.isnan(table)).sum())
print(f"{path}: regate.ema_table {tuple(table.shape)}, {seen} entries observed")
assert seen > 0
PYEOF
}
export -f stage_megatron_lm_store
if [ -f "$MLM_DIR/pretrain_vlm.py" ]; then
    PYTHONPATH="$(mcore_path 0.16.1)" run_stage megatron_lm_store 0 150 0 stage_megatron_lm_store
fi

# ---------------------------------------------------------------- summary
note "total $(( SECONDS - START ))s of budget ${BUDGET}s"
if [ -n "${OUT:-}" ]; then
    cp "$STAGES" "$LOG" "$WORK"/bench_*.json "$WORK"/resume.txt "$WORK"/router_profile.txt \
        "$OUT"/ 2>/dev/null
fi
if ! "$PY" "$REPO/benchmarks/gpu_check.py" summary "$WORK" 2>>"$LOG"; then
    echo "gpu_check ok=0 overhead=nan speedup_0.5=nan ideal_0.5=nan mcore=none (summary failed)"
fi
}

main "$@"

#!/bin/bash
# Train an MLLM with ReGATE token elision on SLURM: one task per GPU, one srun, no torchrun.
#
#   sbatch [--nodes=N] slurm/train_regate.sh examples/llava15_7b.sh [regate-train flags...]
#
# The config (examples/*.sh) defines the flags as bash arrays; paths come from the
# environment (defaults below, documented in slurm/README.md); extra arguments are
# passed on to regate-train and win over the config's (argparse: the last value counts).
# On a cluster without GPUs (or GRES), override the GPU request: sbatch --gpus-per-node=0 ...
#
# Preemption / time limit: SLURM sends USR1 to this script 300 s before the end
# (--signal=B:USR1@300); the trap forwards it to every rank, the ranks finish the
# step, save a checkpoint and exit 0, and this script requeues the job, which
# resumes from $CHECKPOINT_DIR with the same flags. A rank that fails ends the whole
# job at once (--kill-on-bad-exit); lines are labelled with the rank (srun --label).
#
# Online teacher on its own nodes: TEACHER_NODES=K (with TEACHER_CHECKPOINT) gives the job's
# last K nodes to the frozen teacher (srun's default block distribution puts the last ranks
# there: --regate-teacher-ranks = K x tasks per node) instead of reading $REF_STORE; its
# TP/PP come from the config or the extra flags (--regate-teacher-tensor-model-parallel-size).
#   TEACHER_NODES=1 TEACHER_CHECKPOINT=/ckpt/teacher sbatch --nodes=3 slurm/train_regate.sh C
#
#SBATCH --job-name=regate-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

set -euo pipefail

CONFIG=${1:?usage: sbatch [--nodes=N] slurm/train_regate.sh examples/<config>.sh [regate-train flags...]}
shift
: "${SLURM_JOB_ID:?submit this script with sbatch (it runs srun inside the allocation)}"
# sbatch runs a copy of this script from its spool directory: paths are relative to where
# the job was submitted.
cd "${SLURM_SUBMIT_DIR:-$PWD}"
if [[ ! -f $CONFIG ]]; then
    echo "train_regate.sh: config $CONFIG not found (relative to $PWD)" >&2
    exit 2
fi

# ---- paths: environment variables with defaults (see slurm/README.md)
export DATA_PATH=${DATA_PATH:-data/train.json}               # LLaVA-format JSON/JSONL records
export VALID_DATA_PATH=${VALID_DATA_PATH:-}                  # held-out records (optional)
export IMAGE_ROOT=${IMAGE_ROOT:-}                            # default: the data file's directory
export TOKENIZER_MODEL=${TOKENIZER_MODEL:-data/tokenizer.model}
export REF_STORE=${REF_STORE:-ref_store}                     # built by slurm/precompute_ref.sh
export LM_CHECKPOINT=${LM_CHECKPOINT:-}                      # language model to start from (optional)
export TEACHER_NODES=${TEACHER_NODES:-0}                     # online teacher: the job's last K nodes
export TEACHER_CHECKPOINT=${TEACHER_CHECKPOINT:-checkpoints/teacher}
export CHECKPOINT_DIR=${CHECKPOINT_DIR:-checkpoints/${SLURM_JOB_NAME:-regate-train}}
export METRICS_JSONL=${METRICS_JSONL:-$CHECKPOINT_DIR/metrics.jsonl}
export TENSORBOARD_DIR=${TENSORBOARD_DIR:-$CHECKPOINT_DIR/tensorboard}
PYTHON=${PYTHON:-python}

# ---- environment, as Megatron-LM's scripts set it
export CUDA_DEVICE_MAX_CONNECTIONS=1
export NCCL_IB_SL=${NCCL_IB_SL:-1}
export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}  # a dead peer fails the collective
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}                 # as torchrun sets it
export PYTHONUNBUFFERED=1

# ---- rendezvous: the first node's address (its NodeAddr; the name may not resolve) and a
# per-job port (the same rule as regate_megatron.training.parallel.launch_env)
first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
node_addr=$(scontrol show node "$first_node" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
export MASTER_ADDR=${MASTER_ADDR:-${node_addr:-$first_node}}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}

# ---- flags: the config's groups, the paths, the checkpoint/preemption flags, then ours
MODEL_ARGS=() TRAINING_ARGS=() MODEL_PARALLEL_ARGS=() DATA_ARGS=() EVAL_AND_LOGGING_ARGS=()
REGATE_ARGS=()
# shellcheck source=/dev/null
source "$CONFIG"
CHECKPOINT_ARGS=(
    --save "$CHECKPOINT_DIR"
    --load "$CHECKPOINT_DIR"          # resume in place; a fresh run starts from scratch
    --exit-signal-handler             # SIGTERM / SIGUSR1: finish the step, save, exit 0
    --metrics-jsonl "$METRICS_JSONL"
    --tensorboard-dir "$TENSORBOARD_DIR"
)
if [[ -n $VALID_DATA_PATH ]]; then DATA_ARGS+=(--valid-data-path "$VALID_DATA_PATH"); fi
if [[ -n $IMAGE_ROOT ]]; then DATA_ARGS+=(--image-root "$IMAGE_ROOT"); fi
if [[ -n $LM_CHECKPOINT ]]; then CHECKPOINT_ARGS+=(--language-model-checkpoint "$LM_CHECKPOINT"); fi
RANKS=${SLURM_NTASKS:?run this script with sbatch}
if (( TEACHER_NODES > 0 )); then  # the online teacher replaces the store
    TEACHER_RANKS=$((TEACHER_NODES * RANKS / SLURM_JOB_NUM_NODES))
    OFFLINE=("${REGATE_ARGS[@]}") REGATE_ARGS=()
    for ((i = 0; i < ${#OFFLINE[@]}; i++)); do
        if [[ ${OFFLINE[i]} == --regate-ref-store ]]; then i=$((i + 1)); continue; fi
        if [[ ${OFFLINE[i]} == --regate-ref-store=* ]]; then continue; fi
        REGATE_ARGS+=("${OFFLINE[i]}")
    done
    REGATE_ARGS+=(--regate-teacher-ranks "$TEACHER_RANKS" --regate-teacher-load "$TEACHER_CHECKPOINT")
fi
ARGS=("${MODEL_ARGS[@]}" "${TRAINING_ARGS[@]}" "${MODEL_PARALLEL_ARGS[@]}" "${DATA_ARGS[@]}"
      "${EVAL_AND_LOGGING_ARGS[@]}" "${REGATE_ARGS[@]}" "${CHECKPOINT_ARGS[@]}" "$@")

last_value() {  # the value regate-train will see for a flag: its last occurrence wins
    local flag=$1 value=${2:-} i
    for ((i = 0; i < ${#ARGS[@]}; i++)); do
        if [[ ${ARGS[i]} == "$flag" ]]; then value=${ARGS[i + 1]:-}; fi
        if [[ ${ARGS[i]} == "$flag="* ]]; then value=${ARGS[i]#*=}; fi
    done
    echo "$value"
}
SAVE_DIR=$(last_value --save)
TP=$(last_value --tensor-model-parallel-size 1)
PP=$(last_value --pipeline-model-parallel-size 1)
TEACHER_RANKS=$(last_value --regate-teacher-ranks 0)  # the config's, or TEACHER_NODES'
STUDENTS=$((RANKS - TEACHER_RANKS))
if (( STUDENTS < 1 || STUDENTS % (TP * PP) )); then
    echo "train_regate.sh: $STUDENTS student ranks ($RANKS - $TEACHER_RANKS teacher ranks) are" \
         "not divisible by TP $TP x PP $PP" >&2
    exit 2
fi
mkdir -p "$SAVE_DIR"
MARKER=$SAVE_DIR/stopped_early        # written by the trainer when it stops early
rm -f "$MARKER"

CMD=("$PYTHON" -u -m regate_megatron.training.train "${ARGS[@]}")
echo "[train_regate.sh] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) config $CONFIG"
echo "[train_regate.sh] layout: ${SLURM_JOB_NUM_NODES} nodes x ${SLURM_NTASKS_PER_NODE:-?} ranks" \
     "= $RANKS ranks = TP $TP x PP $PP x DP $((STUDENTS / (TP * PP))) students + $TEACHER_RANKS" \
     "teacher ranks; master $MASTER_ADDR:$MASTER_PORT"
echo "[train_regate.sh] checkpoints: $SAVE_DIR"
echo "[train_regate.sh] command: $(printf '%q ' "${CMD[@]}")"

# ---- launch: one process per rank. srun runs in the background so that the traps run at
# once (bash runs a trap only after a foreground child exits); they forward the signal to
# srun, which passes it to every task.
srun --kill-on-bad-exit=1 --label "${CMD[@]}" &
SRUN_PID=$!
SIGNALLED=0
# shellcheck disable=SC2317  # called from the traps
forward() {
    SIGNALLED=1
    echo "[train_regate.sh] got SIG$1: forwarding it to the ranks (they save and exit)"
    kill -s "$1" "$SRUN_PID" 2>/dev/null || true
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
rc=0
while :; do
    wait "$SRUN_PID" && rc=0 || rc=$?
    # A trap makes wait return early (status > 128): wait again for srun's own status
    # (bash keeps it even when srun has already ended).
    if (( SIGNALLED && rc > 128 )); then SIGNALLED=0; continue; fi
    break
done
trap - USR1 TERM
if (( rc != 0 )); then
    echo "[train_regate.sh] regate-train failed (srun exit status $rc); the failing rank is" \
         "named above (\"<rank>: ...\" lines, srun's \"task <rank>\")" >&2
    exit "$rc"
fi

# ---- stopped early? Requeue on the preemption / time-limit signal (or an exhausted
# --exit-duration-in-mins); the requeued job resumes from $SAVE_DIR with the same flags.
if [[ -f $MARKER ]]; then
    echo "[train_regate.sh] the run stopped early: $(cat "$MARKER")"
    if grep -q -e '"SIGUSR1"' -e '"duration"' "$MARKER" && [[ ${REGATE_REQUEUE:-1} == 1 ]]; then
        rm -f "$MARKER"
        echo "[train_regate.sh] requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
    fi
fi
exit 0

#!/bin/bash
# Reference losses of a frozen text-only teacher for every training sample, data-parallel
# over all tasks (regate-precompute-ref): the store that `--regate` training reads.
#
#   sbatch [--nodes=N] slurm/precompute_ref.sh examples/llava15_7b.sh [regate-precompute-ref flags...]
#
# The config supplies the student's layout (--seq-length, --img-h, --img-w, --patch-dim,
# --regate-teacher-visual), so target positions line up with training. A teacher too big for
# one GPU runs model-parallel: append --tensor-model-parallel-size T
# --pipeline-model-parallel-size P (DP = tasks / (T x P)). Paths:
# DATA_PATH, IMAGE_ROOT, TOKENIZER_MODEL, TEACHER_CHECKPOINT, REF_STORE (slurm/README.md).
# The build is resumable: finished shards survive a failure; resubmit to finish it.
# Chain training after it:
#   jid=$(sbatch --parsable slurm/precompute_ref.sh C) && sbatch --dependency=afterok:$jid slurm/train_regate.sh C
#
#SBATCH --job-name=regate-precompute-ref
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=02:00:00
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

set -euo pipefail

CONFIG=${1:?usage: sbatch [--nodes=N] slurm/precompute_ref.sh examples/<config>.sh [regate-precompute-ref flags...]}
shift
: "${SLURM_JOB_ID:?submit this script with sbatch (it runs srun inside the allocation)}"
cd "${SLURM_SUBMIT_DIR:-$PWD}"
if [[ ! -f $CONFIG ]]; then
    echo "precompute_ref.sh: config $CONFIG not found (relative to $PWD)" >&2
    exit 2
fi

export DATA_PATH=${DATA_PATH:-data/train.json}
export VALID_DATA_PATH=${VALID_DATA_PATH:-}
export IMAGE_ROOT=${IMAGE_ROOT:-}
export TOKENIZER_MODEL=${TOKENIZER_MODEL:-data/tokenizer.model}
export TEACHER_CHECKPOINT=${TEACHER_CHECKPOINT:-checkpoints/teacher}
export REF_STORE=${REF_STORE:-ref_store}
PYTHON=${PYTHON:-python}

export CUDA_DEVICE_MAX_CONNECTIONS=1
export NCCL_IB_SL=${NCCL_IB_SL:-1}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONUNBUFFERED=1

first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
node_addr=$(scontrol show node "$first_node" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
export MASTER_ADDR=${MASTER_ADDR:-${node_addr:-$first_node}}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}

# shellcheck disable=SC2034  # the groups a config may define; precompute reads two
MODEL_ARGS=() TRAINING_ARGS=() MODEL_PARALLEL_ARGS=() DATA_ARGS=() EVAL_AND_LOGGING_ARGS=()
REGATE_ARGS=()
# shellcheck source=/dev/null
source "$CONFIG"
CONFIG_ARGS=("${MODEL_ARGS[@]}" "${REGATE_ARGS[@]}")
last_value() {  # a flag's value in the config (its last occurrence), or the default $2
    local flag=$1 value=${2:-} i
    for ((i = 0; i < ${#CONFIG_ARGS[@]}; i++)); do
        if [[ ${CONFIG_ARGS[i]} == "$flag" ]]; then value=${CONFIG_ARGS[i + 1]:-}; fi
        if [[ ${CONFIG_ARGS[i]} == "$flag="* ]]; then value=${CONFIG_ARGS[i]#*=}; fi
    done
    echo "$value"
}
ARGS=(
    --data-path "$DATA_PATH" --tokenizer-model "$TOKENIZER_MODEL"
    --load "$TEACHER_CHECKPOINT" --output "$REF_STORE"
    --seq-length "$(last_value --decoder-seq-length "$(last_value --seq-length)")"
    --img-h "$(last_value --img-h 336)" --img-w "$(last_value --img-w 336)"
    --patch-dim "$(last_value --patch-dim 14)"
    --regate-teacher-visual "$(last_value --regate-teacher-visual pad)"
    --no-progress
)
if [[ -n $IMAGE_ROOT ]]; then ARGS+=(--image-root "$IMAGE_ROOT"); fi
CMD=("$PYTHON" -u -m regate_megatron.tools.precompute "${ARGS[@]}" "$@")
echo "[precompute_ref.sh] job $SLURM_JOB_ID config $CONFIG: ${SLURM_JOB_NUM_NODES} nodes," \
     "$SLURM_NTASKS data-parallel ranks; master $MASTER_ADDR:$MASTER_PORT"
echo "[precompute_ref.sh] command: $(printf '%q ' "${CMD[@]}")"
srun --kill-on-bad-exit=1 --label "${CMD[@]}"

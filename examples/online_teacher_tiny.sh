# shellcheck shell=bash disable=SC2034  # sourced by slurm/*.sh, which read the arrays
# examples/online_teacher_tiny.sh: examples/tiny.sh with the online teacher. Of 4 ranks, the
# last 2 run the frozen text-only teacher at TP 2 one global batch ahead and stream its
# reference losses (no store to precompute); the first 2 are TP 2 students.
#
#   torchrun --nproc-per-node 4 -m regate_megatron.training.train $(flags of this config)
#   sbatch --nodes=2 --ntasks-per-node=2 slurm/train_regate.sh examples/online_teacher_tiny.sh
#
# Paths come from the environment (DATA_PATH, TOKENIZER_MODEL, TEACHER_CHECKPOINT: a
# regate-train --text-only checkpoint with the same tokenizer; see slurm/README.md).

# The model, training, parallel, data and logging groups are tiny.sh's; only REGATE_ARGS differ.
# shellcheck source=examples/tiny.sh
source "$(dirname "${BASH_SOURCE[0]}")/tiny.sh"

REGATE_ARGS=(
    --regate
    --regate-teacher-ranks 2
    --regate-teacher-load "${TEACHER_CHECKPOINT:-checkpoints/teacher}"
    --regate-teacher-tensor-model-parallel-size 2
    --regate-keep-ratio 0.4
    --regate-lambda 0.5
    --regate-schedule cyclic
    --regate-cycle-steps 3
    --regate-dense-steps 1
)

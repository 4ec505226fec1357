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

MODEL_ARGS=(
    --num-layers 2
    --hidden-size 16
    --num-attention-heads 4
    --seq-length 48
    --max-position-embeddings 48
    --position-embedding-type rope
    --normalization RMSNorm
    --swiglu
    --disable-bias-linear
    --hidden-dropout 0
    --attention-dropout 0
    --img-h 8
    --img-w 8
    --patch-dim 4
    --make-vocab-size-divisible-by 64
)

TRAINING_ARGS=(
    --micro-batch-size 2
    --global-batch-size 4
    --train-iters 8
    --lr 3e-3
    --lr-decay-style constant
    --seed 7
)

MODEL_PARALLEL_ARGS=(
    --tensor-model-parallel-size 2
    --pipeline-model-parallel-size 1
)

DATA_ARGS=(
    --data-path "$DATA_PATH"
    --tokenizer-type SentencePieceTokenizer
    --tokenizer-model "$TOKENIZER_MODEL"
)

EVAL_AND_LOGGING_ARGS=(
    --log-interval 1
    --no-progress
)

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

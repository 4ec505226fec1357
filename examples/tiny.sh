# shellcheck shell=bash disable=SC2034  # sourced by slurm/*.sh, which read the arrays
# examples/tiny.sh: a tiny LLaVA (2-layer LM, hidden 16; 8x8 images -> 4 image tokens) that
# trains in seconds on CPUs: the config the SLURM tests run. ReGATE at the paper's
# defaults (lambda 0.5, cyclic schedule), with a short cycle so a few steps show it.
#
# Sourced by slurm/train_regate.sh and slurm/precompute_ref.sh; paths come from the
# environment (DATA_PATH, TOKENIZER_MODEL, REF_STORE, ...: see slurm/README.md).

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
    --regate-ref-store "${REF_STORE:-ref_store}"
    --regate-keep-ratio 0.4
    --regate-lambda 0.5
    --regate-schedule cyclic
    --regate-cycle-steps 3
    --regate-dense-steps 1
)

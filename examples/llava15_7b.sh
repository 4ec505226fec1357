# shellcheck shell=bash disable=SC2034  # sourced by slurm/*.sh, which read the arrays
# examples/llava15_7b.sh: LLaVA-1.5-7B visual instruction tuning (stage 2) with ReGATE.
#   language model  Vicuna-7B v1.5 (LLaMA-2-7B): 32 layers, hidden 4096, 32 heads, MLP 11008,
#                   RMSNorm, SwiGLU, RoPE, no biases, untied output layer
#   vision encoder  CLIP ViT-L/14 at 336 px: 24 layers, hidden 1024, 16 heads -> 576 image tokens
#   parallelism     8 GPUs per node: TP 4 x PP 1 (DP 2 per node), distributed optimizer
#   ReGATE          the paper's defaults: lambda 0.5, keep ratio 0.35, cyclic schedule
#
#   sbatch --nodes=2 slurm/train_regate.sh examples/llava15_7b.sh
#
# Paths from the environment (slurm/README.md): DATA_PATH (e.g. llava_v1_5_mix665k.json),
# IMAGE_ROOT, TOKENIZER_MODEL (Vicuna's tokenizer.model), REF_STORE, LM_CHECKPOINT (the
# stage-1 checkpoint, as a Megatron-Core dist checkpoint), VALID_DATA_PATH (optional).

MODEL_ARGS=(
    --num-layers 32
    --hidden-size 4096
    --ffn-hidden-size 11008
    --num-attention-heads 32
    --seq-length 2048
    --max-position-embeddings 4096
    --position-embedding-type rope
    --rotary-base 10000
    --normalization RMSNorm
    --norm-epsilon 1e-5
    --swiglu
    --disable-bias-linear
    --untie-embeddings-and-output-weights
    --init-method-std 0.02
    --attention-dropout 0.0
    --hidden-dropout 0.0
    --bf16
    --transformer-impl transformer_engine
    --vision-model-type clip
    --img-h 336
    --img-w 336
    --patch-dim 14
    --vision-num-layers 24
    --vision-hidden-size 1024
    --vision-num-attention-heads 16
    --vision-ffn-hidden-size 4096
    --disable-vision-class-token
    --freeze-ViT
)

TRAINING_ARGS=(
    --micro-batch-size 4
    --global-batch-size 128
    --train-iters 5197                # one epoch of llava_v1_5_mix665k
    --lr 2e-5
    --min-lr 0.0
    --lr-decay-style cosine
    --lr-warmup-fraction 0.03
    --weight-decay 0.0
    --adam-beta1 0.9
    --adam-beta2 0.999
    --clip-grad 1.0
    --seed 1234
)

MODEL_PARALLEL_ARGS=(
    --tensor-model-parallel-size 4
    --pipeline-model-parallel-size 1
    --use-distributed-optimizer
    --distributed-timeout-minutes 10
)

DATA_ARGS=(
    --data-path "$DATA_PATH"
    --tokenizer-type SentencePieceTokenizer
    --tokenizer-model "$TOKENIZER_MODEL"
    --make-vocab-size-divisible-by 128
)

EVAL_AND_LOGGING_ARGS=(
    --log-interval 10
    --save-interval 500
    --no-progress
)
if [[ -n ${VALID_DATA_PATH:-} ]]; then
    EVAL_AND_LOGGING_ARGS+=(--eval-interval 500 --eval-iters 50)
fi

REGATE_ARGS=(
    --regate
    --regate-ref-store "$REF_STORE"
    --regate-keep-ratio 0.35
    --regate-lambda 0.5
    --regate-schedule cyclic
    --regate-cycle-steps 10
    --regate-dense-steps 1
    --regate-ema-decay 0.9
    --regate-teacher-visual pad
)

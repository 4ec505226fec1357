# shellcheck shell=bash disable=SC2034  # sourced by slurm/*.sh, which read the arrays
# examples/video_7b.sh: video instruction tuning (Video-LLaVA style) of a 7B LLaVA with ReGATE.
#   a video is its frames: each record lists 8 frames under "image" and has one <image>
#   placeholder per frame in its first turn, e.g.
#     {"id": "v17", "image": ["v17/f0.jpg", ..., "v17/f7.jpg"],
#      "conversations": [{"from": "human", "value": "<image><image>...<image>\nWhat happens?"},
#                        {"from": "gpt", "value": "A man opens a door ..."}]}
#   (regate-train does not decode video files; extract frames first, e.g. with ffmpeg)
#   language model  LLaMA-2-7B / Vicuna-7B v1.5 shape
#   vision encoder  CLIP ViT-L/14 at 224 px -> 256 tokens per frame, 2048 per video
#   parallelism     8 GPUs per node: TP 4 x PP 2 (longer sequences), distributed optimizer
#   ReGATE          lambda 0.5, keep ratio 0.3, cyclic schedule
#
#   sbatch --nodes=4 slurm/train_regate.sh examples/video_7b.sh

MODEL_ARGS=(
    --num-layers 32
    --hidden-size 4096
    --ffn-hidden-size 11008
    --num-attention-heads 32
    --seq-length 3072                 # 2048 visual + up to 1024 text tokens
    --max-position-embeddings 4096
    --position-embedding-type rope
    --normalization RMSNorm
    --norm-epsilon 1e-5
    --swiglu
    --disable-bias-linear
    --untie-embeddings-and-output-weights
    --attention-dropout 0.0
    --hidden-dropout 0.0
    --bf16
    --transformer-impl transformer_engine
    --vision-model-type clip
    --img-h 224
    --img-w 224
    --patch-dim 14
    --vision-num-layers 24
    --vision-hidden-size 1024
    --vision-num-attention-heads 16
    --vision-ffn-hidden-size 4096
    --disable-vision-class-token
    --freeze-ViT
)

TRAINING_ARGS=(
    --micro-batch-size 1
    --global-batch-size 128
    --train-iters 3000
    --lr 2e-5
    --min-lr 0.0
    --lr-decay-style cosine
    --lr-warmup-fraction 0.03
    --weight-decay 0.0
    --clip-grad 1.0
)

MODEL_PARALLEL_ARGS=(
    --tensor-model-parallel-size 4
    --pipeline-model-parallel-size 2
    --use-distributed-optimizer
)

DATA_ARGS=(
    --data-path "$DATA_PATH"
    --tokenizer-type SentencePieceTokenizer
    --tokenizer-model "$TOKENIZER_MODEL"
)

EVAL_AND_LOGGING_ARGS=(
    --log-interval 10
    --save-interval 250
    --no-progress
)
if [[ -n ${VALID_DATA_PATH:-} ]]; then
    EVAL_AND_LOGGING_ARGS+=(--eval-interval 250 --eval-iters 20)
fi

REGATE_ARGS=(
    --regate
    --regate-ref-store "$REF_STORE"
    --regate-keep-ratio 0.3
    --regate-lambda 0.5
    --regate-schedule cyclic
    --regate-cycle-steps 10
    --regate-dense-steps 1
)

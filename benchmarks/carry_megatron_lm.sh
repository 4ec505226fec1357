#!/usr/bin/env bash
# Make the Megatron-LM folder the GPU check carries (~2 MB): from a checkout of a tag with a
# patch set (patches/README.md; the set is picked from the checkout's megatron/core version by
# regate_megatron/megatron_lm/patch_set.py), the files patched pretrain_vlm.py needs beside
# the Megatron-Core wheel — megatron/{training,legacy,rl,post_training}, pretrain_vlm.py (patched),
# pretrain_gpt.py, gpt_builders.py, model_provider.py.
#
#   benchmarks/carry_megatron_lm.sh MEGATRON_LM_CHECKOUT [DEST=.megatron_lm]
# then run the GPU check with MEGATRON_LM_TRAINING_DIR=DEST (carry DEST with the run).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="${1:?usage: carry_megatron_lm.sh MEGATRON_LM_CHECKOUT [DEST]}"
DEST="${2:-$REPO/.megatron_lm}"
PATCH="$("${PYTHON:-python3}" "$REPO/regate_megatron/megatron_lm/patch_set.py" "$SRC")/pretrain_vlm.patch"
rm -rf "$DEST" && mkdir -p "$DEST/megatron"
for d in training legacy rl post_training; do
    [ -d "$SRC/megatron/$d" ] && cp -r "$SRC/megatron/$d" "$DEST/megatron/"
done
cp "$SRC"/{pretrain_vlm.py,pretrain_gpt.py,gpt_builders.py,model_provider.py} "$DEST/"
# DEST may sit inside a git work tree (this checkout's .megatron_lm/): git apply would then
# take the patch's paths from that tree's root and skip them, silently. Apply as plain files.
(cd "$DEST" && export GIT_CEILING_DIRECTORIES="$(dirname "$DEST")" \
    && git apply --check "$PATCH" && git apply "$PATCH")
grep -q "regate.install" "$DEST/pretrain_vlm.py" \
    || { echo "carry_megatron_lm.sh: pretrain_vlm.py was not patched" >&2; exit 1; }
find "$DEST" -name __pycache__ -prune -exec rm -rf {} +
du -sh "$DEST"

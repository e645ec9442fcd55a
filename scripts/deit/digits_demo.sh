#!/usr/bin/env bash
# DeiT recipe on scikit-learn's digits, offline, a few CPU minutes: not a paper row. The DeiT recipe (AdamW,
# label smoothing, EMA, cls token) on a small ViT; mixup/cutmix, RandAugment, random erasing and the random
# resized crop are off because 8x8 digits do not survive them. Add `--distill hard --teacher-ckpt RUN` to
# distil from an earlier run of this demo (a Flax teacher).
#
# Usage: bash scripts/deit/digits_demo.sh [FLAG ...]
#   OUT   run folder (default runs/deit/digits_demo)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/deit/digits_demo}

python deit_jax.py \
    --data digits \
    --output-dir "$OUT" \
    --recipe deit \
    --model t16 \
    --image-size 32 \
    --patch-size 4 \
    --layers 4 \
    --dim 96 \
    --heads 3 \
    --drop-path 0.0 \
    --batch-size 64 \
    --epochs 20 \
    --warmup-epochs 2 \
    --lr 2e-3 \
    --lr-ref-batch 0 \
    --weight-decay 0.05 \
    --random-crop none \
    --auto-augment none \
    --random-erasing 0.0 \
    --augment-repeats 1 \
    --mixup 0.0 \
    --cutmix 0.0 \
    --label-smoothing 0.1 \
    --test-crop-ratio 1.0 \
    --ema-decay 0.99 \
    --workers 0 \
    "$@"

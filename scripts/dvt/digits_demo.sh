#!/usr/bin/env bash
# Offline demo, not a paper row: a tiny DVT (DeiT-style exits of width 64, 3 blocks, 4 heads) on scikit-learn's 8x8
# digits upscaled to 32 px, read as 2x2, 3x3 and 4x4 tokens, with feature and relationship reuse; then the exit
# thresholds for q = 0.2 and the early-exit evaluation with the accuracy/GFLOPs curve. No download, a few minutes on
# 2 CPU cores. Every exit reaches about 96-97% val top-1 (chance: 10%); at q = 0.2 about 80% of the digits leave at
# 2x2 tokens and the early exit keeps that accuracy at about a fifth of the FLOPs of running all three exits. The
# ImageNet augmentations are off (crops, flips and RandAugment do not suit digits), and so are the EMA and drop path
# (a few hundred steps).
#
# Usage: bash scripts/dvt/digits_demo.sh [FLAG ...]   (later flags override the training preset's)
#   OUT     run folder (default runs/dvt/digits_demo)
#   EPOCHS  (default 15)
set -euo pipefail
cd "$(dirname "$0")/../.."  # paths below are relative to the repository root
OUT=${OUT:-runs/dvt/digits_demo}
EPOCHS=${EPOCHS:-15}

python dvt.py train \
    --data digits \
    --output-dir "$OUT" \
    --model dvt_deit_s \
    --image-size 32 \
    --grids 2,3,4 \
    --embed-dim 64 \
    --depth 3 \
    --num-heads 4 \
    --feature-reuse \
    --relation-reuse \
    --drop-path 0 \
    --random-crop none \
    --hflip 0 \
    --auto-augment none \
    --random-erasing 0 \
    --mixup 0 \
    --cutmix 0 \
    --label-smoothing 0.1 \
    --test-crop-ratio 1.0 \
    --optimizer adamw \
    --batch-size 64 \
    --lr 2e-3 \
    --weight-decay 0.05 \
    --epochs "$EPOCHS" \
    --cooldown-epochs 0 \
    --warmup-epochs 1 \
    --model-ema-decay 0 \
    --workers 0 \
    --log-interval 10 \
    --seed 0 \
    "$@"
python dvt.py budget "$OUT" --q 0.2 --workers 0      # thresholds on the 1,437 training digits -> budget.json
python dvt.py eval "$OUT" --curve --workers 0        # real early exit at those thresholds; curve.csv, curve.png

#!/usr/bin/env bash
# Not a paper row: DVT trained from scratch on CIFAR-10 or CIFAR-100 at their own 32 px, where the paper fine-tunes its
# ImageNet model at 224 px (see cifar10_dvt_t2t_vit_12.sh). T2T-ViT-12 exits on 4x4, 6x6 and 8x8 tokens (the paper's
# 7:10:14 ratio, 8x8 = 4-pixel tokens, the usual ViT grid on CIFAR) with both reuses, trained with the T2T-ViT recipe
# (AdamW, per-epoch cosine with warmup 20 and cooldown 10, mixup 0.8 / cutmix 1.0, label smoothing 0.1, random erasing
# 0.25, drop path 0.1, EMA) and the usual CIFAR crop (4-pixel padding) + flip. The lr 5e-4 at batch 128 and the 300
# epochs are an untuned starting point; no accuracy was measured for this preset.
# Expected top-1: none (not a paper row; no accuracy was measured).
#
# Usage: bash scripts/dvt/cifar_32px.sh [FLAG ...]   (later flags override the preset's)
#   DATA    cifar10 or cifar100 (default cifar10; $VIT_RECIPES_DATA holds or receives the files)
#   OUT     run folder (default runs/dvt/<DATA>_32px)
#   LAUNCH  the launcher (default: one GPU)
set -euo pipefail
cd "$(dirname "$0")/../.."  # paths below are relative to the repository root
DATA=${DATA:-cifar10}
OUT=${OUT:-runs/dvt/${DATA}_32px}
LAUNCH=${LAUNCH:-torchrun --standalone --nproc_per_node=1}

$LAUNCH dvt.py train \
    --data "$DATA" \
    --output-dir "$OUT" \
    --model dvt_t2t_vit_12 \
    --image-size 32 \
    --grids 4,6,8 \
    --feature-reuse \
    --relation-reuse \
    --drop-path 0.1 \
    --random-crop pad \
    --hflip 0.5 \
    --auto-augment none \
    --random-erasing 0.25 \
    --mixup 0.8 \
    --cutmix 1.0 \
    --label-smoothing 0.1 \
    --test-crop-ratio 1.0 \
    --optimizer adamw \
    --batch-size 128 \
    --lr 5e-4 \
    --weight-decay 0.03 \
    --epochs 300 \
    --cooldown-epochs 10 \
    --warmup-epochs 20 \
    --warmup-lr 1e-6 \
    --min-lr 1e-5 \
    --model-ema-decay 0.99996 \
    --precision bf16 \
    --seed 0 \
    "$@"

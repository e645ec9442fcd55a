#!/usr/bin/env bash
# DeiT, ImageNet-1k from scratch: ViT-S/16 (DeiT-S), 300 epochs at 224 px, no distillation.
# Paper: Training data-efficient image transformers & distillation through attention (Touvron et al.,
# ICML 2021): recipe Table 9 (and facebookresearch/deit main.py defaults); Table 5 row ViT-S/16 (DeiT-S): top-1 79.8.
# lr 5e-4 x batch / 512 (paper §6); EMA 0.99996 kept as in the original code, the raw weights are reported.
#
# Usage: bash scripts/deit/deit_s16.sh [FLAG ...]   (later flags override the preset's)
#   DATA  ImageNet-1k: an ImageNet-layout folder or webdataset shards (default /data/imagenet)
#   OUT   run folder (default runs/deit/deit_s16)
set -euo pipefail
cd "$(dirname "$0")/../.."  # paths below are relative to the repository root
DATA=${DATA:-/data/imagenet}
OUT=${OUT:-runs/deit/deit_s16}

python deit_jax.py \
    --data "$DATA" \
    --output-dir "$OUT" \
    --num-classes 1000 \
    --recipe deit \
    --model s16 \
    --image-size 224 \
    --pooling cls \
    --head-init trunc_normal \
    --dropout 0.0 \
    --drop-path 0.1 \
    --batch-size 1024 \
    --epochs 300 \
    --warmup-epochs 5 \
    --lr 5e-4 \
    --lr-ref-batch 512 \
    --warmup-lr 1e-6 \
    --min-lr 1e-5 \
    --weight-decay 0.05 \
    --adam-b1 0.9 \
    --adam-b2 0.999 \
    --adam-eps 1e-8 \
    --clip-grad 0 \
    --grad-accum 1 \
    --random-crop rrc \
    --auto-augment rand-m9-mstd0.5-inc1 \
    --color-jitter 0.0 \
    --random-erasing 0.25 \
    --augment-repeats 3 \
    --mixup 0.8 \
    --cutmix 1.0 \
    --label-smoothing 0.1 \
    --test-crop-ratio 0.875 \
    --ema-decay 0.99996 \
    --no-ema-eval \
    --distill none \
    --seed 0 \
    "$@"

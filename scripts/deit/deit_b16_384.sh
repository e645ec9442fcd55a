#!/usr/bin/env bash
# DeiT-B↑384: ViT-B/16 (DeiT-B) fine-tuned at 384 px from the 224 run (deit_b16.sh).
# Paper: Training data-efficient image transformers & distillation through attention (Touvron et al.,
# ICML 2021): Table 5 row DeiT-B↑384: top-1 83.1 (the abstract's "83.1% (single-crop)"; the README's released
# deit_base_patch16_384 evaluates at 82.9).
# Command: the DeiT README's (facebookresearch/deit README_deit.md) "finetune a DeiT-base on 384 resolution images
# for 30 epochs, starting from a DeiT-base trained on 224 resolution images": batch 32 x 16 GPUs = 512,
# lr 5e-6 x batch / 512 (main.py's linear scaling), wd 1e-8, 30 epochs, min lr 5e-6 (so the lr stays at 5e-6
# after warmup); everything else is main.py's defaults, as in the 224 run: AdamW, 5 warmup epochs from 1e-6,
# drop path 0.1, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, mixup 0.8 / cutmix 1.0, label smoothing
# 0.1, 3 repeated augmentations, EMA 0.99996 kept but not reported, eval resize 438 + centre crop 384 (ratio 0.875).
# Paper §6 "Fine-tuning at different resolution": the pos-emb interpolated bicubically (--init: main.py --finetune's
# F.interpolate(mode="bicubic", align_corners=False), here on the 14 x 14 -> 24 x 24 grid).
#
# Usage: bash scripts/deit/deit_b16_384.sh [FLAG ...]   (later flags override the preset's)
#   DATA        ImageNet-1k: an ImageNet-layout folder or webdataset shards (default /data/imagenet)
#   PRETRAINED  the 224 run (default runs/deit/deit_b16, deit_b16.sh's OUT)
#   OUT         run folder (default runs/deit/deit_b16_384)
set -euo pipefail
cd "$(dirname "$0")/../.."  # paths below are relative to the repository root
DATA=${DATA:-/data/imagenet}
PRETRAINED=${PRETRAINED:-runs/deit/deit_b16}
OUT=${OUT:-runs/deit/deit_b16_384}

python deit_jax.py \
    --data "$DATA" \
    --output-dir "$OUT" \
    --init "$PRETRAINED" \
    --num-classes 1000 \
    --recipe deit \
    --model b16 \
    --image-size 384 \
    --pooling cls \
    --head-init trunc_normal \
    --dropout 0.0 \
    --drop-path 0.1 \
    --batch-size 512 \
    --epochs 30 \
    --warmup-epochs 5 \
    --lr 5e-6 \
    --lr-ref-batch 512 \
    --warmup-lr 1e-6 \
    --min-lr 5e-6 \
    --weight-decay 1e-8 \
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

#!/usr/bin/env bash
# DeiT-III, ImageNet-1k fine-tune at 384 px: ViT-L/16 after 800 epochs of pretraining
# (in1k_l16_800ep_pretrain.sh, pretrained at 192).
# Source: the official DeiT III README (facebookresearch/deit README_revenge.md), ImageNet-1k table, row
# ViT-L 384x384: top-1 85.8 (the README's log of this command ends at 85.812); timm
# deit3_large_patch16_384.fb_in1k. Command: the README's "finetuning for ViT-S, B and L at resolution 384x384":
# AdamW lr 1e-5 (unscaled), wd 0.1, batch 16 x 32 GPUs = 512, 20 epochs (5 warmup from 1e-6), eval crop ratio
# 1.0, RandAugment rand-m9-mstd0.5-inc1, CE + label smoothing 0.1, mixup 0.8 / cutmix 1.0, no repeats, no
# random erasing, no gradient clipping; the pos-emb is resized bicubically to the 24 x 24 grid when loading.
# Drop path 0.4: the README's 384 command, not the pretraining value (pretraining: 0.45).
# Color jitter 0: timm ignores the README's 0.3 whenever RandAugment is on. min-lr 1e-5 equals the peak lr, so
# the lr stays at 1e-5 after warmup, as in the original code (its --min-lr default is 1e-5).
# The README's command starts from "model_path" without naming it; this preset starts from the 800-epoch
# pretraining run (the README's 224 rows are the 800-epoch models); PRETRAINED can name another run.
#
# Usage: bash scripts/deit3/in1k_l16_800ep_finetune384.sh [FLAG ...]   (later flags override the preset's)
#   DATA        ImageNet-1k (default /data/imagenet)
#   PRETRAINED  the pretraining run folder (default runs/deit3/in1k_l16_800ep_pretrain, its OUT)
#   OUT         run folder (default runs/deit3/in1k_l16_800ep_finetune384)
set -euo pipefail
cd "$(dirname "$0")/../.."  # paths below are relative to the repository root
DATA=${DATA:-/data/imagenet}
PRETRAINED=${PRETRAINED:-runs/deit3/in1k_l16_800ep_pretrain}
OUT=${OUT:-runs/deit3/in1k_l16_800ep_finetune384}

python deit3_jax.py \
    --data "$DATA" \
    --output-dir "$OUT" \
    --pretrained-ckpt "$PRETRAINED" \
    --num-classes 1000 \
    --model l16 \
    --image-size 384 \
    --layerscale \
    --layerscale-init 1e-4 \
    --posemb learnable \
    --pooling cls \
    --dropout 0.0 \
    --drop-path 0.4 \
    --batch-size 512 \
    --epochs 20 \
    --warmup-epochs 5 \
    --optimizer adamw \
    --lr 1e-5 \
    --lr-ref-batch 0 \
    --warmup-lr 1e-6 \
    --min-lr 1e-5 \
    --weight-decay 0.1 \
    --adam-b1 0.9 \
    --adam-b2 0.999 \
    --adam-eps 1e-8 \
    --lr-decay 1.0 \
    --clip-grad 0.0 \
    --grad-accum 1 \
    --criterion ce \
    --label-smoothing 0.1 \
    --mixup 0.8 \
    --cutmix 1.0 \
    --random-crop rrc \
    --color-jitter 0.0 \
    --auto-augment rand-m9-mstd0.5-inc1 \
    --random-erasing 0.0 \
    --augment-repeats 1 \
    --test-crop-ratio 1.0 \
    --seed 0 \
    "$@"

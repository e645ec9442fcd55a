#!/usr/bin/env bash
# How to train your ViT? (Steiner et al. 2021), ImageNet-21k pretraining: ViT-Ti/16 (vit_tiny_patch16_224), AugReg
# level none (no RandAugment, no mixup), no dropout / stochastic depth, weight decay 3e-5 (AdamW 0.03 at lr 1e-3),
# 300 epochs at batch 4096.
# Source: the released upstream of timm's vit_tiny_patch16_384.augreg_in21k_ft_in1k (timm vision_transformer.py URL
# Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0), the row whose transfer number is known.
# Paper §3 on ImageNet-21k: Adam (0.9, 0.999), lr 1e-3 at batch 4096, gradient clip 1.0, 10k linear warmup steps
# then cosine to 0, sigmoid cross-entropy (head bias -log 21843 = -9.99; vit_i21k.py: -10), inception crop + flip at
# 224 px, class token and no pre-logits layer (the released checkpoints' ViT, as timm loads them; vit_i21k.py's
# later config pools by GAP). ImageNet-21k as an ImageNet-layout folder or webdataset shards, with a held-out val/
# split (vit_i21k.py holds out the first 51,200 images of 'full' for val and test).
# Expected top-1: the upstream's own ImageNet-21k accuracy is not verified here; transferred with
# ft_i21k_ti16_in1k_384.sh, ImageNet-1k 78.42 (timm's evaluation of the released
# vit_tiny_patch16_384.augreg_in21k_ft_in1k (pytorch-image-models results/results-imagenet.csv: resize 384 / crop
# 1.0, bicubic)).
# --grad-accum 1: 512 images per GPU per micro-batch on 8 GPUs (an estimate for 80 GB GPUs, not measured here); the
# global batch stays 4096 whatever the number of GPUs.
#
# Usage: bash scripts/howtotrain/i21k_ti16_none_300ep.sh [FLAG ...]   (later flags override the preset's)
#   DATA    ImageNet-21k: an ImageNet-layout folder or webdataset shards (default /data/imagenet21k)
#   OUT     run folder (default runs/howtotrain/i21k_ti16_none_300ep)
#   LAUNCH  the launcher (default: this node's 8 GPUs). Many nodes: run this script on each node with
#           LAUNCH="torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 --rdzv-id=augreg"
set -euo pipefail
cd "$(dirname "$0")/../.."  # paths below are relative to the repository root
DATA=${DATA:-/data/imagenet21k}
OUT=${OUT:-runs/howtotrain/i21k_ti16_none_300ep}
LAUNCH=${LAUNCH:-torchrun --standalone --nproc_per_node=8}

$LAUNCH howtotrain_vit.py train \
    --data "$DATA" \
    --output-dir "$OUT" \
    --model vit_tiny_patch16_224 \
    --image-size 224 \
    --no-pre-logits \
    --augreg none \
    --reg 0.0 \
    --random-crop rrc \
    --hflip 0.5 \
    --test-crop-ratio 0.875 \
    --loss sigmoid \
    --label-smoothing 0.0 \
    --batch-size 4096 \
    --grad-accum 1 \
    --epochs 300 \
    --lr 1e-3 \
    --lr-ref-batch 4096 \
    --lr-scaling sqrt \
    --weight-decay 3e-5 \
    --adam-b1 0.9 \
    --adam-b2 0.999 \
    --clip-grad 1.0 \
    --warmup-steps 10000 \
    --decay cosine \
    --precision bf16 \
    --seed 0 \
    "$@"

#!/usr/bin/env bash
# DVT T2T-ViT-12 fine-tuned on CIFAR-10 from its ImageNet run (Wang et al. 2021, Fig. 6; "in the same way as
# T2T-ViT": its transfer_learning.py). Images resized to 224 (bilinear; 7x7, 10x10, 14x14 tokens as on ImageNet),
# random crop with 28-pixel zero padding + flip; SGD momentum 0.9, weight decay 5e-4 on every parameter, lr 0.05 for
# the heads and 0.01 x that for the rest (T2T-ViT's transfer ratio), batch 64, per-epoch cosine over 60 epochs to 2e-4,
# drop path 0.1, plain cross-entropy; eval on the resized image. New heads for the 10 classes.
# Expected top-1: DVT reports its CIFAR results as accuracy-vs-GFLOPs curves (paper Fig. 6, the official README's
# cifar.png), with no single top-1 that could be checked here, so none is asserted.
# Departures: ImageNet mean/std for the inputs (T2T-ViT's script renormalises with CIFAR's); the class tokens, final
# norms and relationship-reuse convs train at 0.01x (T2T-ViT's script leaves class token and norm out of the optimizer).
#
# Usage: bash scripts/dvt/cifar10_dvt_t2t_vit_12.sh [FLAG ...]   (later flags override the preset's)
#   INIT    the ImageNet run to start from (default runs/dvt/in1k_dvt_t2t_vit_12)
#   OUT     run folder (default runs/dvt/cifar10_dvt_t2t_vit_12)
#   LAUNCH  the launcher (default: one GPU)
set -euo pipefail
cd "$(dirname "$0")/../.."  # paths below are relative to the repository root
INIT=${INIT:-runs/dvt/in1k_dvt_t2t_vit_12}
OUT=${OUT:-runs/dvt/cifar10_dvt_t2t_vit_12}
LAUNCH=${LAUNCH:-torchrun --standalone --nproc_per_node=1}

$LAUNCH dvt.py train \
    --data cifar10 \
    --init-from "$INIT" \
    --output-dir "$OUT" \
    --model dvt_t2t_vit_12 \
    --image-size 224 \
    --grids 7,10,14 \
    --feature-reuse \
    --relation-reuse \
    --drop-path 0.1 \
    --random-crop pad \
    --interpolation bilinear \
    --hflip 0.5 \
    --auto-augment none \
    --random-erasing 0 \
    --mixup 0 \
    --cutmix 0 \
    --label-smoothing 0 \
    --test-crop-ratio 1.0 \
    --optimizer sgd \
    --momentum 0.9 \
    --batch-size 64 \
    --lr 0.05 \
    --backbone-lr-scale 0.01 \
    --weight-decay 5e-4 \
    --epochs 60 \
    --cooldown-epochs 0 \
    --warmup-epochs 0 \
    --min-lr 2e-4 \
    --model-ema-decay 0 \
    --precision bf16 \
    --seed 0 \
    "$@"

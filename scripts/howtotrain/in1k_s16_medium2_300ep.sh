#!/usr/bin/env bash
# How to train your ViT? (Steiner et al. 2021), ImageNet-1k from scratch: ViT-S/16 (vit_small_patch16_224), AugReg level
# medium2 (RandAugment 2 layers, magnitude 15; mixup 0.5), no dropout / stochastic depth, 300 epochs at batch 4096.
# Paper §3: Adam (0.9, 0.999), lr 1e-3, decoupled weight decay 1e-4 (= AdamW 0.1 at lr 1e-3), gradient clip 1.0,
# 10k linear warmup steps then cosine to 0, sigmoid cross-entropy (head bias -log 1000), inception crop + flip
# at 224 px; eval resize 256 / center crop 224. The level is the per-model pick of big_vision's
# configs/vit_i1k.py, the paper's official config (which also adds the tanh pre-logits layer).
# Released checkpoint: timm's vit_small_patch16_224.augreg_in1k is this grid point (aug_medium2, wd_0.1, do_0.0, sd_0.0).
# --grad-accum 1: 512 images per GPU per micro-batch on 8 GPUs (an estimate for 80 GB GPUs, not measured
# here); the global batch stays 4096 whatever the number of GPUs.
# Expected top-1: 78.85, timm's evaluation of the released vit_small_patch16_224.augreg_in1k
# (pytorch-image-models results/results-imagenet.csv: resize 248 / crop 224, bicubic).
#
# Usage: bash scripts/howtotrain/in1k_s16_medium2_300ep.sh [FLAG ...]   (later flags override the preset's)
#   DATA    ImageNet-1k: an ImageNet-layout folder or webdataset shards (default /data/imagenet)
#   OUT     run folder (default runs/howtotrain/in1k_s16_medium2_300ep)
#   LAUNCH  the launcher (default: this node's 8 GPUs). Many nodes: run this script on each node with
#           LAUNCH="torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 --rdzv-id=augreg"
set -euo pipefail
cd "$(dirname "$0")/../.."  # paths below are relative to the repository root
DATA=${DATA:-/data/imagenet}
OUT=${OUT:-runs/howtotrain/in1k_s16_medium2_300ep}
LAUNCH=${LAUNCH:-torchrun --standalone --nproc_per_node=8}

$LAUNCH howtotrain_vit.py train \
    --data "$DATA" \
    --output-dir "$OUT" \
    --model vit_small_patch16_224 \
    --image-size 224 \
    --pre-logits \
    --augreg medium2 \
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
    --weight-decay 1e-4 \
    --adam-b1 0.9 \
    --adam-b2 0.999 \
    --clip-grad 1.0 \
    --warmup-steps 10000 \
    --decay cosine \
    --precision bf16 \
    --seed 0 \
    "$@"

#!/usr/bin/env bash
# LocalMIM (Wang et al., CVPR 2023), ViT-B/16 pretraining on ImageNet-1k for 1600 epochs: 75% random masking, HOG
# targets (9 bins) reconstructed by one light decoder (1 block, 256-d, 8 heads) at each of blocks 2, 4, 10 and 12
# at scales 4, 2, 1, 0.5 (HOG cells 4, 8, 16, 32 px), equal loss weights. The official README: batch 256 per GPU x 8
# GPUs = 2048, blr 2e-4 (lr 1.6e-3), weight decay 0.05, warmup 40 epochs (10 for 100-epoch runs, else 40), AdamW (0.9,
# 0.95), cosine per iteration to 1e-6, RandomResizedCrop(0.2-1) + flip, no gradient clipping, a checkpoint every
# 50 epochs. Reported ImageNet top-1: 84.0 after the fine-tune (finetune_b16_1600ep.sh).
# Precision: bf16 autocast (the paper's V100s used fp16 with a loss scaler: add --precision fp16).
#
# Usage: bash scripts/localmim/pretrain_b16_1600ep.sh [FLAG ...]   (later flags override the preset's)
#   DATA  ImageNet-1k: an ImageNet-layout folder or webdataset shards (default /data/imagenet)
#   OUT   run folder (default runs/localmim/pretrain_b16_1600ep)
#   GPUS  GPUs on this node (1, 2, 4 or 8; default 8): --grad-accum 8/GPUS keeps the effective batch at 2048
set -euo pipefail
cd "$(dirname "$0")/../.."  # paths below are relative to the repository root
DATA=${DATA:-/data/imagenet}
OUT=${OUT:-runs/localmim/pretrain_b16_1600ep}
GPUS=${GPUS:-8}
if (( 8 % GPUS )); then echo "GPUS must divide 8" >&2; exit 2; fi
LAUNCH=${LAUNCH:-torchrun --standalone --nproc_per_node=$GPUS}

$LAUNCH localmim_freezeout.py pretrain \
    --data "$DATA" \
    --output-dir "$OUT" \
    --model vit_base_patch16 \
    --image-size 224 \
    --mask-ratio 0.75 \
    --target hog \
    --hog-nbins 9 \
    --batch-size-per-process 256 \
    --grad-accum $((8 / GPUS)) \
    --epochs 1600 \
    --warmup-epochs 40 \
    --blr 2e-4 \
    --min-lr 1e-6 \
    --weight-decay 0.05 \
    --precision bf16 \
    --save-every 50 \
    --seed 0 \
    "$@"

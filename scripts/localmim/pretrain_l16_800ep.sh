#!/usr/bin/env bash
# LocalMIM (Wang et al., CVPR 2023), ViT-L/16 pretraining on ImageNet-1k for 800 epochs: 75% random masking, HOG
# targets with 18 bins and the HOG convolution's untrained random bias (--hog-bias), reconstructed by one light decoder
# (1 block, 256-d, 8 heads) at each of blocks 2, 4, 22 and 24 (0-based 1, 3, 21, 23: [1, 3, depth-3, depth-1]) at
# scales 4, 2, 1, 0.5 (HOG cells 4, 8, 16, 32 px), equal loss weights. The official README's ViT-L command: batch 128
# per GPU x 4 accumulation x 8 GPUs = 4096, blr 1.5e-4 (lr 2.4e-3), weight decay 0.05, warmup 40 epochs, mask 0.75,
# --hog_nbins 18 --hog_bias; MAE's main_pretrain.py for the rest: AdamW (0.9, 0.95), cosine per iteration to 1e-6,
# RandomResizedCrop(0.2-1) + flip, no gradient clipping, a checkpoint every 50 epochs. Reported ImageNet top-1 (paper,
# ViT-L 800 epochs): 85.8 after the fine-tune (finetune_l16_800ep.sh).
# Precision: bf16 autocast (the paper's V100s used fp16 with a loss scaler: add --precision fp16).
#
# Usage: bash scripts/localmim/pretrain_l16_800ep.sh [FLAG ...]   (later flags override the preset's)
#   DATA  ImageNet-1k: an ImageNet-layout folder or webdataset shards (default /data/imagenet)
#   OUT   run folder (default runs/localmim/pretrain_l16_800ep)
#   GPUS  GPUs on this node (1, 2, 4 or 8; default 8): --grad-accum 32/GPUS keeps the effective batch at 4096
set -euo pipefail
cd "$(dirname "$0")/../.."  # paths below are relative to the repository root
DATA=${DATA:-/data/imagenet}
OUT=${OUT:-runs/localmim/pretrain_l16_800ep}
GPUS=${GPUS:-8}
if (( 8 % GPUS )); then echo "GPUS must divide 8" >&2; exit 2; fi
LAUNCH=${LAUNCH:-torchrun --standalone --nproc_per_node=$GPUS}

$LAUNCH localmim_freezeout.py pretrain \
    --data "$DATA" \
    --output-dir "$OUT" \
    --model vit_large_patch16 \
    --image-size 224 \
    --mask-ratio 0.75 \
    --target hog \
    --hog-nbins 18 \
    --hog-bias \
    --batch-size-per-process 128 \
    --grad-accum $((32 / GPUS)) \
    --epochs 800 \
    --warmup-epochs 40 \
    --blr 1.5e-4 \
    --min-lr 1e-6 \
    --weight-decay 0.05 \
    --precision bf16 \
    --save-every 50 \
    --seed 0 \
    "$@"

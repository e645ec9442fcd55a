#!/usr/bin/env bash
# LocalMIM (Wang et al., CVPR 2023) ViT-L/16 fine-tuning on ImageNet-1k after the 800-epoch pretraining
# (pretrain_l16_800ep.sh). The official README's ViT-L command: batch 64 per GPU x 2 accumulation x 8 GPUs = 1024,
# 50 epochs, warmup 5, lr 3e-3 (absolute), layer decay 0.75, weight decay 0.05, drop path 0.2, random erasing 0.25,
# mixup 0.8, cutmix 1.0, --dist_eval; MAE's main_finetune.py for the rest: min lr 1e-6 (its default; the command
# gives none), AdamW (0.9, 0.999), label smoothing 0.1, RandAugment rand-m9-mstd0.5-inc1, global average pooling +
# fc_norm, head init std 2e-5, no gradient clipping, eval resize 256 / center crop 224. Reported ImageNet top-1
# (paper, ViT-L 800 epochs): 85.8.
#
# Usage: bash scripts/localmim/finetune_l16_800ep.sh [FLAG ...]   (later flags override the preset's)
#   DATA        ImageNet-1k (default /data/imagenet)
#   PRETRAINED  the pretraining run or checkpoint (default runs/localmim/pretrain_l16_800ep)
#   OUT         run folder (default runs/localmim/finetune_l16_800ep)
#   GPUS        GPUs on this node (1, 2, 4 or 8; default 8): --grad-accum 16/GPUS keeps the effective batch at 1024
set -euo pipefail
cd "$(dirname "$0")/../.."  # paths below are relative to the repository root
DATA=${DATA:-/data/imagenet}
PRETRAINED=${PRETRAINED:-runs/localmim/pretrain_l16_800ep}
OUT=${OUT:-runs/localmim/finetune_l16_800ep}
GPUS=${GPUS:-8}
if (( 8 % GPUS )); then echo "GPUS must divide 8" >&2; exit 2; fi
LAUNCH=${LAUNCH:-torchrun --standalone --nproc_per_node=$GPUS}

$LAUNCH localmim_freezeout.py finetune \
    --data "$DATA" \
    --pretrained "$PRETRAINED" \
    --output-dir "$OUT" \
    --model vit_large_patch16 \
    --image-size 224 \
    --batch-size-per-process 64 \
    --grad-accum $((16 / GPUS)) \
    --epochs 50 \
    --warmup-epochs 5 \
    --lr 3e-3 \
    --lr-ref-batch 0 \
    --min-lr 1e-6 \
    --layer-decay 0.75 \
    --weight-decay 0.05 \
    --drop-path 0.2 \
    --label-smoothing 0.1 \
    --mixup 0.8 \
    --cutmix 1.0 \
    --auto-augment rand-m9-mstd0.5-inc1 \
    --random-erasing 0.25 \
    --dist-eval \
    --precision bf16 \
    --seed 0 \
    "$@"

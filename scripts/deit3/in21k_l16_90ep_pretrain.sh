#!/usr/bin/env bash
# DeiT-III, ImageNet-21k pretraining: ViT-L/16, 90 epochs at 224 px.
# Paper: DeiT III: Revenge of the ViT (Touvron, Cord, Jegou, ECCV 2022): recipe Table 1 (ImageNet-21k column);
# ImageNet-21k results, row ViT-L/16 90 epochs: top-1 86.8 on ImageNet-1k
# after the in1k fine-tune (in21k_l16_90ep_finetune_in1k.sh).
# Recipe: LAMB lr 1e-3, wd 0.02, clip 1.0, CE + label smoothing 0.1, cutmix 1.0 without mixup, simple
# random crop, 3-Augment + color jitter 0.3, no repeated augmentation.
# lr 1e-3 at batch 2048: the official README's commands (its note: 1.5e-3 at batch 4096). The paper's Table 1
# gives 3e-3, with which deit3-jax reproduced the ImageNet-21k rows within half a point; the README wins (below).
# Where the paper's Table 1 or the reference notes and the official README's command disagree, the preset
# follows the README: its commands trained the released checkpoints, whose top-1 are the paper's numbers.
#
# Usage: bash scripts/deit3/in21k_l16_90ep_pretrain.sh [FLAG ...]   (later flags override the preset's)
#   DATA21K  ImageNet-21k (winter 21, 19,167 classes): folder or webdataset shards (default /data/imagenet21k)
#   OUT      run folder (default runs/deit3/in21k_l16_90ep_pretrain)
set -euo pipefail
cd "$(dirname "$0")/../.."  # paths below are relative to the repository root
DATA21K=${DATA21K:-/data/imagenet21k}
OUT=${OUT:-runs/deit3/in21k_l16_90ep_pretrain}

python deit3_jax.py \
    --data "$DATA21K" \
    --output-dir "$OUT" \
    --num-classes 19167 \
    --model l16 \
    --image-size 224 \
    --layerscale \
    --layerscale-init 1e-4 \
    --posemb learnable \
    --pooling cls \
    --dropout 0.0 \
    --drop-path 0.3 \
    --batch-size 2048 \
    --epochs 90 \
    --warmup-epochs 5 \
    --optimizer lamb \
    --lr 1e-3 \
    --lr-ref-batch 0 \
    --warmup-lr 1e-6 \
    --min-lr 1e-5 \
    --weight-decay 0.02 \
    --adam-b1 0.9 \
    --adam-b2 0.999 \
    --adam-eps 1e-8 \
    --lr-decay 1.0 \
    --clip-grad 1.0 \
    --grad-accum 1 \
    --criterion ce \
    --label-smoothing 0.1 \
    --mixup 0.0 \
    --cutmix 1.0 \
    --random-crop src \
    --color-jitter 0.3 \
    --auto-augment 3a \
    --random-erasing 0.0 \
    --augment-repeats 1 \
    --test-crop-ratio 1.0 \
    --seed 0 \
    "$@"

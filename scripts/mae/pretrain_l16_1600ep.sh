#!/usr/bin/env bash
# MAE pretraining, ViT-L/16, 1600 epochs on ImageNet-1k at 224 px.
# Paper: Masked Autoencoders Are Scalable Vision Learners (He et al., CVPR 2022), Table 8 and
# main_pretrain.py: AdamW (0.9, 0.95), wd 0.05, blr 1.5e-4 (lr = 1.5e-4 x 4096 / 256 = 2.4e-3),
# 40 warmup epochs then cosine, mask 75%, decoder 8 x 512, norm-pix loss, RRC (0.2, 1) + flip.
# Released weights: fine-tuned top-1 85.9 (Table 3), linear probe 75.8.
#
# Then: bash scripts/mae/finetune_l16.sh and scripts/mae/linprobe_l16.sh with PRETRAINED=$OUT.
#
# Usage: bash scripts/mae/pretrain_l16_1600ep.sh [FLAG ...]   (later flags override the preset's)
#   DATA  ImageNet-1k: an ImageNet-layout folder or webdataset shards (default /data/imagenet)
#   OUT   run folder (default runs/mae/pretrain_l16_1600ep)
set -euo pipefail
cd "$(dirname "$0")/../.."  # paths below are relative to the repository root
DATA=${DATA:-/data/imagenet}
OUT=${OUT:-runs/mae/pretrain_l16_1600ep}

python mae_jax.py pretrain \
    --data "$DATA" \
    --output-dir "$OUT" \
    --model l16 \
    --image-size 224 \
    --mask-ratio 0.75 \
    --norm-pix-loss \
    --decoder-layers 8 \
    --decoder-dim 512 \
    --decoder-heads 16 \
    --min-crop-scale 0.2 \
    --random-crop rrc \
    --batch-size 4096 \
    --epochs 1600 \
    --warmup-epochs 40 \
    --lr 1.5e-4 \
    --lr-ref-batch 256 \
    --min-lr 0.0 \
    --weight-decay 0.05 \
    --adam-b1 0.9 \
    --adam-b2 0.95 \
    --grad-accum 1 \
    --seed 0 \
    "$@"

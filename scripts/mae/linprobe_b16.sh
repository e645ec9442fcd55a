#!/usr/bin/env bash
# MAE linear probing, ViT-B/16, 90 epochs on ImageNet-1k at 224 px.
# Paper: Masked Autoencoders Are Scalable Vision Learners (He et al., CVPR 2022), Table 10 and
# main_linprobe.py: the frozen encoder's cls token, BatchNorm without affine + linear head, LARS
# (momentum 0.9), blr 0.1 (lr = 0.1 x 16384 / 256 = 6.4), wd 0, 10 warmup epochs, RRC + flip.
# From the 1600-epoch pretraining: top-1 68.0 (the official README's linear-probing table).
#
# Usage: bash scripts/mae/linprobe_b16.sh [FLAG ...]   (later flags override the preset's)
#   DATA  ImageNet-1k (default /data/imagenet)
#   PRETRAINED pretrained encoder (default runs/mae/pretrain_b16_1600ep)
#   OUT   run folder (default runs/mae/linprobe_b16)
set -euo pipefail
cd "$(dirname "$0")/../.."  # paths below are relative to the repository root
DATA=${DATA:-/data/imagenet}
PRETRAINED=${PRETRAINED:-runs/mae/pretrain_b16_1600ep}
OUT=${OUT:-runs/mae/linprobe_b16}

python mae_jax.py linprobe \
    --data "$DATA" \
    --output-dir "$OUT" \
    --init "$PRETRAINED" \
    --num-classes 1000 \
    --model b16 \
    --image-size 224 \
    --pooling cls \
    --batch-size 16384 \
    --epochs 90 \
    --warmup-epochs 10 \
    --lr 0.1 \
    --lr-ref-batch 256 \
    --min-lr 0.0 \
    --weight-decay 0.0 \
    --lars-momentum 0.9 \
    --random-crop rrc \
    --test-crop-ratio 0.875 \
    --seed 0 \
    "$@"

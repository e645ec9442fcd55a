#!/usr/bin/env bash
# DeiT with hard distillation through the distillation token: ViT-B/16 (DeiT-B)⚗, 300 epochs at 224 px.
# Paper: Training data-efficient image transformers & distillation through attention (Touvron et al.,
# ICML 2021): §4 (hard-label distillation, eq. 3, alpha 0.5), recipe Table 9; Table 5 row ViT-B/16 (DeiT-B)⚗
# (teacher RegNetY-16GF, 82.9% top-1): top-1 83.4. At test time the two heads' logits are averaged.
#
# Usage: bash scripts/deit/deit_b16_distilled.sh [FLAG ...]   (later flags override the preset's)
#   DATA  ImageNet-1k: an ImageNet-layout folder or webdataset shards (default /data/imagenet)
#   OUT   run folder (default runs/deit/deit_b16_distilled)
#   TEACHER  the RegNetY-16GF teacher's weights, a timm `regnety_160` state dict (the DeiT repo's
#            https://dl.fbaipublicfiles.com/deit/regnety_160-a5fe301d.pth; fetch it beforehand, nothing is
#            downloaded at run time) (default /data/teachers/regnety_160-a5fe301d.pth)
set -euo pipefail
cd "$(dirname "$0")/../.."  # paths below are relative to the repository root
DATA=${DATA:-/data/imagenet}
OUT=${OUT:-runs/deit/deit_b16_distilled}
TEACHER=${TEACHER:-/data/teachers/regnety_160-a5fe301d.pth}

python deit_jax.py \
    --data "$DATA" \
    --output-dir "$OUT" \
    --num-classes 1000 \
    --recipe deit \
    --model b16 \
    --image-size 224 \
    --pooling cls \
    --head-init trunc_normal \
    --dropout 0.0 \
    --drop-path 0.1 \
    --batch-size 1024 \
    --epochs 300 \
    --warmup-epochs 5 \
    --lr 5e-4 \
    --lr-ref-batch 512 \
    --warmup-lr 1e-6 \
    --min-lr 1e-5 \
    --weight-decay 0.05 \
    --adam-b1 0.9 \
    --adam-b2 0.999 \
    --adam-eps 1e-8 \
    --clip-grad 0 \
    --grad-accum 1 \
    --random-crop rrc \
    --auto-augment rand-m9-mstd0.5-inc1 \
    --color-jitter 0.0 \
    --random-erasing 0.25 \
    --augment-repeats 3 \
    --mixup 0.8 \
    --cutmix 1.0 \
    --label-smoothing 0.1 \
    --test-crop-ratio 0.875 \
    --ema-decay 0.99996 \
    --no-ema-eval \
    --distill hard \
    --teacher regnety_160 \
    --teacher-ckpt "$TEACHER" \
    --distill-alpha 0.5 \
    --seed 0 \
    "$@"

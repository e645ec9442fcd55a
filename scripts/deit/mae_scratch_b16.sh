#!/usr/bin/env bash
# MAE paper's supervised ViT from scratch: ViT-B/16 (DeiT-B), 300 epochs at 224 px.
# Paper: Masked Autoencoders Are Scalable Vision Learners (He et al., CVPR 2022): Appendix A.2 and Table 11
# (supervised training from scratch; wd 0.3, batch 4096, beta2 0.95, long warmup, EMA 0.9999): ViT-B/16 (DeiT-B)
# top-1 82.3, reported with the EMA weights. lr = 1e-4 x batch / 256.
# Drop path 0.1 (Table 11: 0.1 B, 0.2 L/H). Random erasing 0: Table 11 lists none and A.2 disables the
# regularisations it does not list (DeiT's 0.25 is not part of this recipe).
#
# Usage: bash scripts/deit/mae_scratch_b16.sh [FLAG ...]   (later flags override the preset's)
#   DATA  ImageNet-1k: an ImageNet-layout folder or webdataset shards (default /data/imagenet)
#   OUT   run folder (default runs/deit/mae_scratch_b16)
set -euo pipefail
cd "$(dirname "$0")/../.."  # paths below are relative to the repository root
DATA=${DATA:-/data/imagenet}
OUT=${OUT:-runs/deit/mae_scratch_b16}

python deit_jax.py \
    --data "$DATA" \
    --output-dir "$OUT" \
    --num-classes 1000 \
    --recipe mae \
    --model b16 \
    --image-size 224 \
    --pooling gap \
    --head-init zero \
    --dropout 0.0 \
    --drop-path 0.1 \
    --batch-size 4096 \
    --epochs 300 \
    --warmup-epochs 20 \
    --lr 1e-4 \
    --lr-ref-batch 256 \
    --warmup-lr 0.0 \
    --min-lr 1e-6 \
    --weight-decay 0.3 \
    --adam-b1 0.9 \
    --adam-b2 0.95 \
    --adam-eps 1e-8 \
    --clip-grad 0 \
    --grad-accum 1 \
    --random-crop rrc \
    --auto-augment rand-m9-mstd0.5-inc1 \
    --color-jitter 0.0 \
    --random-erasing 0.0 \
    --augment-repeats 1 \
    --mixup 0.8 \
    --cutmix 1.0 \
    --label-smoothing 0.1 \
    --test-crop-ratio 0.875 \
    --ema-decay 0.9999 \
    --ema-eval \
    --distill none \
    --seed 0 \
    "$@"

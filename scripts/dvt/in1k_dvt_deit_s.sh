#!/usr/bin/env bash
# DVT with DeiT-S exits on ImageNet-1k (Wang et al. 2021, Fig. 4; official models_deit.py). Three DeiT-S (D 384,
# 12 blocks, 6 heads, MLP ratio 4, qkv bias, learned position embedding) on 7x7, 10x10 and 14x14 tokens (patch 32,
# patch 23 with padding 3, patch 16) with feature and relationship reuse, trained on the sum of the three
# cross-entropies. The DVT code took its DeiT training from facebookresearch/deit, so this is DeiT's recipe (Touvron
# et al. 2021, Table 9): AdamW lr 5e-4 x batch / 512 = 1e-3 at batch 1024, weight decay 0.05, 300 epochs of per-epoch
# cosine (warmup 5 from 1e-6, min 1e-5; DeiT's loop stops at 300, no cooldown), RandAugment m9-mstd0.5-inc1, random
# erasing 0.25, mixup 0.8 / cutmix 1.0, label smoothing 0.1, drop path 0.1, repeated augmentation x3. DeiT keeps an
# EMA but reports the raw weights: no EMA here.
# Expected top-1: DVT reports its ImageNet results as accuracy-vs-budget curves (paper Fig. 4, the official README's
# result_main.png), with no single top-1 that could be checked here, so none is asserted.
# Then: python dvt.py budget "$OUT" --target-gmacs 3.0 && python dvt.py eval "$OUT" --curve
#
# Usage: bash scripts/dvt/in1k_dvt_deit_s.sh [FLAG ...]   (later flags override the preset's)
#   DATA    ImageNet-1k: an ImageNet-layout folder or webdataset shards (default /data/imagenet)
#   OUT     run folder (default runs/dvt/in1k_dvt_deit_s)
#   LAUNCH  the launcher (default: torchrun on the 8 GPUs of this node; the global batch stays 1024 on any count)
set -euo pipefail
cd "$(dirname "$0")/../.."  # paths below are relative to the repository root
DATA=${DATA:-/data/imagenet}
OUT=${OUT:-runs/dvt/in1k_dvt_deit_s}
LAUNCH=${LAUNCH:-torchrun --standalone --nproc_per_node=8}

$LAUNCH dvt.py train \
    --data "$DATA" \
    --output-dir "$OUT" \
    --model dvt_deit_s \
    --image-size 224 \
    --grids 7,10,14 \
    --feature-reuse \
    --relation-reuse \
    --drop-path 0.1 \
    --random-crop rrc \
    --hflip 0.5 \
    --auto-augment rand-m9-mstd0.5-inc1 \
    --random-erasing 0.25 \
    --mixup 0.8 \
    --cutmix 1.0 \
    --label-smoothing 0.1 \
    --repeats 3 \
    --test-crop-ratio 0.875 \
    --optimizer adamw \
    --batch-size 1024 \
    --lr 1e-3 \
    --weight-decay 0.05 \
    --clip-grad 0 \
    --epochs 300 \
    --cooldown-epochs 0 \
    --warmup-epochs 5 \
    --warmup-lr 1e-6 \
    --min-lr 1e-5 \
    --model-ema-decay 0 \
    --precision bf16 \
    --seed 0 \
    "$@"

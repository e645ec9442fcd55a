#!/usr/bin/env bash
# MAE on scikit-learn's digits, offline, a few CPU minutes: not a paper row. Pretrains a small ViT as a masked
# autoencoder (raw-pixel targets: the 2x2-pixel patches of upscaled 8x8 digits are mostly flat), writes
# original | masked | reconstruction images, then fine-tunes the encoder and, for comparison, the same model
# from random init. RandAugment, mixup/cutmix, random erasing and the random resized crop are off in
# fine-tuning because 8x8 digits do not survive them.
#
# Usage: bash scripts/mae/digits_demo.sh
#   OUT   parent folder of the three runs (default runs/mae/digits_demo)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/mae/digits_demo}
MODEL=(--data digits --image-size 16 --patch-size 4 --layers 4 --dim 96 --heads 4 --precision float32 --workers 0)
FINETUNE=(finetune "${MODEL[@]}" --batch-size 64 --epochs 15 --warmup-epochs 1 --lr 4e-3
          --random-crop none --auto-augment none --random-erasing 0 --mixup 0 --cutmix 0 --drop-path 0.0
          --test-crop-ratio 1.0)

PRETRAIN=(pretrain "${MODEL[@]}" --output-dir "$OUT/pretrain" --decoder-layers 2 --decoder-dim 64 --decoder-heads 4
          --no-norm-pix-loss --batch-size 64 --epochs 60 --warmup-epochs 5 --lr 1.5e-3)

python mae_jax.py "${PRETRAIN[@]}"
python mae_jax.py "${PRETRAIN[@]}" --visualize 8   # -> $OUT/pretrain/reconstructions.png
python mae_jax.py "${FINETUNE[@]}" --output-dir "$OUT/finetune" --init "$OUT/pretrain"
python mae_jax.py "${FINETUNE[@]}" --output-dir "$OUT/finetune_from_scratch"

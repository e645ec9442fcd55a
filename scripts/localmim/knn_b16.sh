#!/usr/bin/env bash
# Weighted kNN of a LocalMIM ViT-B/16 encoder on ImageNet-1k (DINO's eval_knn.py protocol; the official LocalMIM repo
# has none): L2-normalised CLS features of resize-256 / center-crop-224 images for the train set (the bank) and the
# val set; each val image takes the vote sum over its k nearest train images of exp(cosine / 0.07) x one-hot label;
# top-1 and top-5 for k = 10, 20, 100, 200 (DINO reports k = 20). Labels travel with their images (the FreezeOut
# study's kNN paired shuffled features with file-order labels and reported chance accuracy).
#
# Usage: bash scripts/localmim/knn_b16.sh [FLAG ...]   (later flags override the preset's)
#   DATA        ImageNet-1k (default /data/imagenet)
#   PRETRAINED  the pretraining run or checkpoint (default runs/localmim/pretrain_b16_1600ep)
#   OUT         result folder (default runs/localmim/knn_b16)
#   GPUS        GPUs on this node (default 8); every GPU holds the whole feature bank (1.28M x 768 floats, 3.9 GB)
set -euo pipefail
cd "$(dirname "$0")/../.."  # paths below are relative to the repository root
DATA=${DATA:-/data/imagenet}
PRETRAINED=${PRETRAINED:-runs/localmim/pretrain_b16_1600ep}
OUT=${OUT:-runs/localmim/knn_b16}
GPUS=${GPUS:-8}
LAUNCH=${LAUNCH:-torchrun --standalone --nproc_per_node=$GPUS}

$LAUNCH localmim_freezeout.py knn \
    --data "$DATA" \
    --pretrained "$PRETRAINED" \
    --output-dir "$OUT" \
    --model vit_base_patch16 \
    --image-size 224 \
    --test-crop-ratio 0.875 \
    --batch-size-per-process 128 \
    --nb-knn 10 20 100 200 \
    --temperature 0.07 \
    --precision bf16 \
    "$@"

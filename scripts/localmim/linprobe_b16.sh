#!/usr/bin/env bash
# Linear probe of a LocalMIM ViT-B/16 encoder on ImageNet-1k (the official repo has none; this is MAE's
# main_linprobe.py protocol): frozen encoder, the CLS token after the pretrained final norm, BatchNorm without affine
# + a linear head (weight init std 0.01), LARS (momentum 0.9, trust 0.001, no weight decay), blr 0.1 with an effective
# batch of 16384 (lr 6.4), 90 epochs, warmup 10, cosine to 0, RandomResizedCrop + flip, eval resize 256 / crop 224.
# The FreezeOut study probed global-pool features instead; this script follows MAE and the issue: CLS.
# Expected top-1: not verified (neither the LocalMIM paper nor its repo reports a linear probe).
#
# Usage: bash scripts/localmim/linprobe_b16.sh [FLAG ...]   (later flags override the preset's)
#   DATA        ImageNet-1k (default /data/imagenet)
#   PRETRAINED  the pretraining run or checkpoint (default runs/localmim/pretrain_b16_1600ep)
#   OUT         run folder (default runs/localmim/linprobe_b16)
#   GPUS        GPUs on this node (1, 2, 4 or 8; default 8): --grad-accum 32/GPUS keeps the effective batch at 16384
set -euo pipefail
cd "$(dirname "$0")/../.."  # paths below are relative to the repository root
DATA=${DATA:-/data/imagenet}
PRETRAINED=${PRETRAINED:-runs/localmim/pretrain_b16_1600ep}
OUT=${OUT:-runs/localmim/linprobe_b16}
GPUS=${GPUS:-8}
if (( 8 % GPUS )); then echo "GPUS must divide 8" >&2; exit 2; fi
LAUNCH=${LAUNCH:-torchrun --standalone --nproc_per_node=$GPUS}

$LAUNCH localmim_freezeout.py linprobe \
    --data "$DATA" \
    --pretrained "$PRETRAINED" \
    --output-dir "$OUT" \
    --model vit_base_patch16 \
    --image-size 224 \
    --batch-size-per-process 512 \
    --grad-accum $((32 / GPUS)) \
    --epochs 90 \
    --warmup-epochs 10 \
    --blr 0.1 \
    --min-lr 0 \
    --weight-decay 0 \
    --dist-eval \
    --precision bf16 \
    --seed 0 \
    "$@"

#!/usr/bin/env bash
# How to train your ViT? (Steiner et al. 2021), ImageNet-21k -> CIFAR-10 transfer at 384 px: ViT-B/32
# (vit_base_patch32_224), 10k steps at lr 0.003: the row of big_vision configs/transfer.py's docstring (upstream
# 'howto-i21k-B/32' = B_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0, the run of i21k_b32_light1_300ep.sh;
# crop resmall_crop).
# The transfer recipe (paper §3; big_vision configs/transfer.py): SGD momentum 0.9, no weight decay, gradient clip
# 1.0, batch 512, 500 linear warmup steps then cosine to 0, softmax cross-entropy, the upstream's head replaced by a
# zero head, no mixup / RandAugment / dropout; resmall_crop (resize the shorter side to 448, random 384 crop; host
# loader) + flip at 384 px (position embedding resized bicubically from the 224 px grid), eval resize 448 / center
# crop 384.
# Upstream (INIT): the run of i21k_b32_light1_300ep.sh, or the released one saved from timm (no download at run
# time):
#   python -c "import timm, torch; torch.save(timm.create_model('vit_base_patch32_224.augreg_in21k', pretrained=True).state_dict(), 'up.pth')"
# Expected top-1: 98.55 (transfer.py's docstring: mean of 5 runs on the test split, lr 0.003 picked on minival).
# Departure: transfer.py trains on train[:98%] (the rest is its minival); this preset trains on all of train.
#
# Usage: bash scripts/howtotrain/ft_i21k_b32_cifar10.sh [FLAG ...]   (later flags override the preset's)
#   INIT    the upstream: a run folder, its .pt checkpoint or a timm .pth/.safetensors
#           (default runs/howtotrain/i21k_b32_light1_300ep)
#   DATA    cifar10 (downloaded by common/data.py) or an ImageNet-layout folder of it (default cifar10)
#   OUT     run folder (default runs/howtotrain/ft_i21k_b32_cifar10)
#   LAUNCH  the launcher (default: this node's 8 GPUs)
set -euo pipefail
cd "$(dirname "$0")/../.."  # paths below are relative to the repository root
INIT=${INIT:-runs/howtotrain/i21k_b32_light1_300ep}
DATA=${DATA:-cifar10}
OUT=${OUT:-runs/howtotrain/ft_i21k_b32_cifar10}
LAUNCH=${LAUNCH:-torchrun --standalone --nproc_per_node=8}

$LAUNCH howtotrain_vit.py finetune \
    --init "$INIT" \
    --data "$DATA" \
    --output-dir "$OUT" \
    --model vit_base_patch32_224 \
    --image-size 384 \
    --augreg none \
    --reg 0.0 \
    --random-crop resmall \
    --hflip 0.5 \
    --test-crop-ratio 0.8571428571428571 \
    --loss softmax \
    --label-smoothing 0.0 \
    --batch-size 512 \
    --grad-accum 1 \
    --training-steps 10000 \
    --lr 0.003 \
    --lr-ref-batch 512 \
    --lr-scaling linear \
    --weight-decay 0.0 \
    --momentum 0.9 \
    --clip-grad 1.0 \
    --warmup-steps 500 \
    --decay cosine \
    --loader pil \
    --eval-interval 1000 \
    --precision bf16 \
    --seed 0 \
    "$@"

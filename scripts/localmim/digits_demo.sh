#!/usr/bin/env bash
# Offline demo, not a paper row: LocalMIM pretraining with FreezeOut (cubic, t0 0.8) on scikit-learn's 8x8 digits
# (16 px, patch 4: a 4x4 grid, HOG cells 1, 2, 4, 8 px), then kNN and the linear probe of the pretrained encoder and
# of the encoder it started from ('random', same seed), then a short fine-tune. Tiny ViT (4 blocks, width 64,
# decoders of width 32); the stages tap blocks 2, 4, 2, 4 (LocalMIM's [1, 3, depth-3, depth-1] for depth 4). No
# download; a few CPU minutes. Crops and flips are off for the probes and the fine-tune (centred 16 px digits).
#
# Usage: bash scripts/localmim/digits_demo.sh      OUT: the runs' parent folder (default runs/localmim/digits_demo)
set -euo pipefail
cd "$(dirname "$0")/../.."  # paths below are relative to the repository root
OUT=${OUT:-runs/localmim/digits_demo}
ARCH=(--data digits --model vit_tiny_patch16 --image-size 16 --patch-size 4 --depth 4 --embed-dim 64 --num-heads 2
      --test-crop-ratio 1.0 --workers 0 --seed 0)

python localmim_freezeout.py pretrain "${ARCH[@]}" --output-dir "$OUT/pretrain" --decoder-dim 32 --decoder-heads 2 \
    --batch-size 32 --epochs 4 --warmup-epochs 1 --blr 1e-2 --weight-decay 0.05 --mask-ratio 0.75 --target hog \
    --hog-nbins 9 --freezeout --how-scale cubic --t0 0.8 --log-interval 20 --save-every 2
for SOURCE in "$OUT/pretrain" random; do
    NAME=$([ "$SOURCE" = random ] && echo random || echo pretrained)
    python localmim_freezeout.py knn "${ARCH[@]}" --pretrained "$SOURCE" --output-dir "$OUT/knn_$NAME" \
        --batch-size 256 --nb-knn 10 20 --temperature 0.07
    python localmim_freezeout.py linprobe "${ARCH[@]}" --pretrained "$SOURCE" --output-dir "$OUT/linprobe_$NAME" \
        --batch-size 32 --epochs 4 --warmup-epochs 1 --blr 240 --weight-decay 0 --random-crop none --hflip 0 \
        --log-interval 100
done
python localmim_freezeout.py finetune "${ARCH[@]}" --pretrained "$OUT/pretrain" --output-dir "$OUT/finetune" \
    --batch-size 64 --epochs 15 --warmup-epochs 2 --lr 3e-3 --lr-ref-batch 0 --layer-decay 0.75 --weight-decay 0.05 \
    --drop-path 0.1 --mixup 0 --cutmix 0 --random-erasing 0 --auto-augment none --random-crop none --hflip 0 \
    --log-interval 20
python localmim_freezeout.py export "$OUT/pretrain"

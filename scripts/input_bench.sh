#!/usr/bin/env bash
# Which --loader feeds this machine faster, and is training input-bound? On the same JPEGs and with each recipe's own
# augmentation: the input pipeline alone (--benchmark-input) with --loader pil (host workers decode and augment) and
# --loader gpu (host workers read bytes; the device decodes and augments, common/gpu_input.py). Then training steps
# fed by each loader (--benchmark on real data: end_to_end_img_per_sec beside img_per_sec, the steps on a
# device-made batch) for DeiT-III B/16 (JAX) and AugReg B/16 (PyTorch, torch.compile on CUDA; also at 384 px).
# One table at the end. Nothing is written outside OUT.
#
# Usage: bash scripts/input_bench.sh                      # on 2,048 generated 500x375 JPEGs (made once, in OUT)
#        DATA=/data/imagenet bash scripts/input_bench.sh  # on an ImageNet-layout folder of yours
#        TINY=1 bash scripts/input_bench.sh               # the script's own check: tiny shapes, CPU, about 2 minutes
#   DATA     an ImageNet-layout folder (default: generated under OUT)
#   OUT      results, logs and the generated JPEGs (default /tmp/input_bench)
#   WORKERS  loader worker processes (default: the cores less 2)
#   BATCH    global batch (default 256; 128 for the 384 px row)
#   BUDGET_S no item starts once this many seconds have passed (default 480); each item is killed after ITEM_S (150)
#   PYTHON   the interpreter (default python)
set -u
cd "$(dirname "$0")/.."  # paths below are relative to the repository root
OUT=${OUT:-/tmp/input_bench}
PY=${PYTHON:-python}
TINY=${TINY:-0}
WORKERS=${WORKERS:-$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))}
BATCH=${BATCH:-256}
BUDGET_S=${BUDGET_S:-480}
ITEM_S=${ITEM_S:-150}
mkdir -p "$OUT/logs"
RESULTS=$OUT/results.jsonl
: > "$RESULTS"
START=$(date +%s)
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2

if [ -z "${DATA:-}" ]; then  # JPEGs of ImageNet's typical size and file size (~100 kB): smooth fields plus noise
  DATA=$OUT/jpegs
  [ "$TINY" = 1 ] && COUNT=96 || COUNT=2048
  "$PY" - "$DATA" "$COUNT" <<'EOF'
import sys
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

root, count = Path(sys.argv[1]), int(sys.argv[2])


def write(index: int) -> None:
    split, classes = ("val", 8) if index < count // 8 else ("train", 8)
    path = root / split / f"class{index % classes}" / f"{index:06d}.JPEG"
    if path.exists():
        return
    rng = np.random.default_rng(index)
    field = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
    pixels = np.asarray(field, np.float32) + rng.normal(0, 10, (375, 500, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)


with get_context("fork").Pool() as pool:  # the functions above live in this stdin script: fork, not spawn
    pool.map(write, range(count + count // 8))
EOF
fi
[ -d "$DATA/train" ] || { echo "error: DATA=$DATA has no train/ folder (an ImageNet-layout folder is needed)"; exit 2; }

# item NAME -- COMMAND...: runs it (unless the budget is spent), keeps its last JSON line tagged with NAME.
item() {
  local name=$1; shift 2
  local now=$(( $(date +%s) - START ))
  if [ "$now" -ge "$BUDGET_S" ]; then
    echo "{\"item\": \"$name\", \"skipped\": true}" >> "$RESULTS"; echo "[${now}s] skip $name (budget spent)"; return
  fi
  echo "[${now}s] $name"
  timeout -k 10 "$ITEM_S" "$@" > "$OUT/logs/$name.log" 2>&1
  local code=$? line
  line=$(grep -E '^\{.*\}$' "$OUT/logs/$name.log" | tail -n 1)
  if [ "$code" -ne 0 ] || [ -z "$line" ]; then
    echo "{\"item\": \"$name\", \"failed\": $code}" >> "$RESULTS"; tail -n 3 "$OUT/logs/$name.log" | sed 's/^/    | /'
  else
    echo "{\"item\": \"$name\", \"result\": $line}" >> "$RESULTS"
  fi
}

if [ "$TINY" = 1 ]; then  # tiny shapes: checks the flags and the table, not the speed
  STEPS="--benchmark-steps 2"; BATCH=8; BIG=8; SIZE=32; BIG_SIZE=48
  JAX_MODEL="--model t16 --patch-size 8 --layers 2 --dim 64 --heads 2 --dtype float32"
  MAE_MODEL="--patch-size 8 --layers 2 --dim 64 --heads 2 --decoder-layers 1 --decoder-dim 32 --decoder-heads 2"
  TORCH_MODEL="--model vit_tiny_patch16_224 --patch-size 8 --depth 2"
  DVT_MODEL="--model dvt_deit_s --grids 2,3,4 --embed-dim 64 --depth 2 --num-heads 2"
  MIM_MODEL="--model vit_tiny_patch16 --patch-size 8 --depth 4 --embed-dim 64 --num-heads 2 --decoder-dim 32 --decoder-heads 2"
else
  STEPS="--benchmark-steps 20"; BIG=$(( BATCH / 2 )); SIZE=224; BIG_SIZE=384
  JAX_MODEL="--model b16"; MAE_MODEL="--model b16"; TORCH_MODEL="--model vit_base_patch16_224"
  DVT_MODEL="--model dvt_t2t_vit_14"; MIM_MODEL="--model vit_base_patch16"
fi
COMMON="--data $DATA --workers $WORKERS $STEPS"
RUN=$OUT/run  # --benchmark and --benchmark-input write nothing there

# The input pipeline alone: the recipes' augmentations, heaviest last (MAE: crop + flip; DeiT-III: 3-Augment;
# DeiT and AugReg: RandAugment, and DeiT's random erasing).
for loader in pil gpu; do
  item "input mae-pretrain $loader" -- "$PY" mae_jax.py pretrain $MAE_MODEL --image-size $SIZE $COMMON \
    --batch-size "$BATCH" --loader $loader --benchmark-input --output-dir "$RUN"
  item "input deit3 $loader" -- "$PY" deit3_jax.py $JAX_MODEL --image-size $SIZE $COMMON --batch-size "$BATCH" \
    --loader $loader --benchmark-input --output-dir "$RUN"
  item "input deit $loader" -- "$PY" deit_jax.py $JAX_MODEL --image-size $SIZE $COMMON --batch-size "$BATCH" \
    --loader $loader --benchmark-input --output-dir "$RUN"
  item "input howtotrain $loader" -- "$PY" howtotrain_vit.py train $TORCH_MODEL --image-size $SIZE $COMMON \
    --batch-size "$BATCH" --loader $loader --benchmark-input --output-dir "$RUN"
done
# Training steps fed by each loader.
for loader in pil gpu; do
  item "train deit3 $loader" -- "$PY" deit3_jax.py $JAX_MODEL --image-size $SIZE $COMMON --batch-size "$BATCH" \
    --loader $loader --benchmark --output-dir "$RUN"
  item "train howtotrain $loader" -- "$PY" howtotrain_vit.py train $TORCH_MODEL --image-size $SIZE $COMMON \
    --batch-size "$BATCH" --loader $loader --benchmark --output-dir "$RUN"
done
item "train howtotrain gpu ${BIG_SIZE}px" -- "$PY" howtotrain_vit.py train $TORCH_MODEL --image-size $BIG_SIZE \
  $COMMON --batch-size "$BIG" --loader gpu --benchmark --output-dir "$RUN"
# The other two PyTorch recipes' pipelines, if time is left.
for loader in pil gpu; do
  item "input dvt $loader" -- "$PY" dvt.py train $DVT_MODEL --image-size $SIZE $COMMON --batch-size "$BATCH" \
    --loader $loader --benchmark-input --output-dir "$RUN"
  item "input localmim $loader" -- "$PY" localmim_freezeout.py pretrain $MIM_MODEL --image-size $SIZE $COMMON \
    --batch-size "$BATCH" --loader $loader --benchmark-input --output-dir "$RUN"
done

echo "[$(( $(date +%s) - START ))s] done: $RESULTS"
"$PY" - "$RESULTS" "$DATA" "$WORKERS" <<'EOF'
import json
import sys

rows = [json.loads(line) for line in open(sys.argv[1])]
print(f"\ndata {sys.argv[2]}, {sys.argv[3]} workers")
print(f"{'item':<34} {'batch':>5} {'img/s':>9} {'end-to-end':>11}  note")
for row in rows:
    result = row.get("result")
    if result is None:
        print(f"{row['item']:<34} {'-':>5} {'-':>9} {'-':>11}  " + ("skipped" if row.get("skipped") else
                                                                     f"failed (exit {row['failed']})"))
        continue
    end_to_end = result.get("end_to_end_img_per_sec")
    note = result.get("device") or result.get("device_kind") or ""
    print(f"{row['item']:<34} {result['batch_size']:>5} {result['img_per_sec']:>9.0f} "
          f"{'-' if end_to_end is None else f'{end_to_end:.0f}':>11}  {note}")
print("input rows: img/s of the pipeline alone. train rows: img/s on a device-made batch, and end-to-end fed by the "
      "loader (below img/s: the run is input-bound).")
EOF

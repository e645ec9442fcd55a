"""Pack an ImageNet-layout folder into webdataset shards that `--data OUT_DIR` reads.

    python scripts/make_shards.py /data/imagenet /data/imagenet-shards --shard-size 1000

SRC_FOLDER holds train/<class>/<image> and optionally val/<class>/<image>. OUT_DIR gets, for each split,
train-000000.tar, train-000001.tar, ... with samples `<key>.jpg` (the original file bytes, not re-encoded;
a non-JPEG source keeps its own extension, e.g. `.png`) and `<key>.cls` (the class index as text), plus
info.json:

    {"num_classes": 1000, "class_names": [...],
     "train": {"pattern": "train-{000000..001281}.tar", "size": 1281167, "shard_sizes": [1000, ...]},
     "val": {...}}

Training images are written in a fixed-seed shuffled order: the loader draws whole shards and shuffles
within a buffer, so class-sorted shards would give class-sorted batches. Validation keeps folder order.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import UserError  # noqa: E402


def sample_extension(path: str) -> str:
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


def write_split(paths: list[str], labels: list[int], out_dir: str, split: str, shard_size: int,
                max_shard_bytes: int | None) -> dict:
    """Write `split-%06d.tar` shards of at most `shard_size` images (and `max_shard_bytes` bytes)."""
    shard_sizes: list[int] = []
    shard_bytes = 0
    tar = None
    for i, (path, label) in enumerate(tqdm(list(zip(paths, labels)), desc=split, unit="img")):
        with open(path, "rb") as f:
            image_bytes = f.read()
        full = tar is not None and (shard_sizes[-1] >= shard_size or (
            max_shard_bytes is not None and shard_bytes + len(image_bytes) > max_shard_bytes))
        if tar is None or full:
            if tar is not None:
                tar.close()
            tar = tarfile.open(os.path.join(out_dir, f"{split}-{len(shard_sizes):06d}.tar"), "w")
            shard_sizes.append(0)
            shard_bytes = 0
        # webdataset splits a member name at the first dot: keys must have none.
        key = f"{i:08d}_" + os.path.splitext(os.path.basename(path))[0].replace(".", "_")
        for name, payload in ((f"{key}.{sample_extension(path)}", image_bytes), (f"{key}.cls", str(label).encode())):
            member = tarfile.TarInfo(name)
            member.size = len(payload)
            member.mode = 0o444
            tar.addfile(member, io.BytesIO(payload))
        shard_sizes[-1] += 1
        shard_bytes += len(image_bytes)
    if tar is not None:
        tar.close()
    pattern = f"{split}-{{000000..{len(shard_sizes) - 1:06d}}}.tar"
    return {"pattern": pattern, "size": len(paths), "shard_sizes": shard_sizes}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("src", metavar="SRC_FOLDER", help="ImageNet-layout folder (train/, optional val/)")
    parser.add_argument("out", metavar="OUT_DIR", help="where the shards and info.json go")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    parser.add_argument("--max-shard-bytes", type=int, default=None, help="also start a new shard past this size")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training images' shuffled order")
    args = parser.parse_args(argv)

    if not os.path.isdir(args.src):
        raise UserError(f"source folder {args.src} does not exist")
    if not os.path.isdir(os.path.join(args.src, "train")):
        raise UserError(f"source folder {args.src} has no train/ subfolder")
    if args.shard_size < 1:
        raise UserError(f"--shard-size must be positive, got {args.shard_size}")
    from common.data import scan_image_folder  # imports torch: after the cheap checks, so errors come fast
    paths, labels, class_names = scan_image_folder(args.src, "train")
    os.makedirs(args.out, exist_ok=True)
    order = np.random.default_rng(args.seed).permutation(len(paths))
    info = {"num_classes": len(class_names), "class_names": class_names}
    info["train"] = write_split([paths[i] for i in order], [labels[i] for i in order], args.out, "train",
                                args.shard_size, args.max_shard_bytes)
    if os.path.isdir(os.path.join(args.src, "val")):
        val_paths, val_labels, _ = scan_image_folder(args.src, "val", class_names)
        info["val"] = write_split(val_paths, val_labels, args.out, "val", args.shard_size, args.max_shard_bytes)
    with open(os.path.join(args.out, "info.json"), "w") as f:
        json.dump(info, f, indent=1)
    summary = ", ".join(f"{s}: {info[s]['size']} images in {len(info[s]['shard_sizes'])} shards"
                        for s in ("train", "val") if s in info)
    print(f"{args.out}: {summary}", file=sys.stderr)
    return info


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

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

--max-side N re-encodes every image whose longer side exceeds N px: shrunk to a longer side of N (aspect kept,
Lanczos after PIL's JPEG draft scaling) and saved as JPEG at --quality (default 90, FFCV's ImageNet files: 500 px,
quality 90); smaller images keep their original bytes, and so do unreadable ones (the loader skips them).
info.json then records "max_side" and "quality". Smaller files decode several times faster, which is what an
input-bound run needs (see `--benchmark-input`); the price is the resolution lost: fine for RandomResizedCrop at
224 (FFCV trains ImageNet from <= 500 px), not for fine-tuning at 384 px or more.

    python scripts/make_shards.py /data/imagenet /data/imagenet-500 --max-side 500
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile

import numpy as np
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import UserError  # noqa: E402


def sample_extension(path: str) -> str:
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


def shrunk_jpeg(image_bytes: bytes, max_side: int, quality: int) -> bytes | None:
    """The image re-encoded as JPEG with its longer side cut to `max_side` (aspect kept), or None where it is small
    enough already or cannot be decoded (its original bytes are then stored as they are)."""
    try:
        with Image.open(io.BytesIO(image_bytes)) as image:
            if max(image.size) <= max_side:  # read from the header: small images are not decoded
                return None
            image = image.convert("RGB")
            image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    except Exception:  # unreadable or truncated: the loader names and skips it, as for the original folder
        return None
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def write_split(paths: list[str], labels: list[int], out_dir: str, split: str, shard_size: int,
                max_shard_bytes: int | None, max_side: int | None = None, quality: int = 90) -> dict:
    """Write `split-%06d.tar` shards of at most `shard_size` images (and `max_shard_bytes` bytes); with `max_side`,
    larger images are stored shrunk (`shrunk_jpeg`)."""
    shard_sizes: list[int] = []
    shard_bytes = 0
    tar = None
    for i, (path, label) in enumerate(tqdm(list(zip(paths, labels)), desc=split, unit="img")):
        with open(path, "rb") as f:
            image_bytes = f.read()
        extension = sample_extension(path)
        smaller = shrunk_jpeg(image_bytes, max_side, quality) if max_side else None
        if smaller is not None:
            image_bytes, extension = smaller, "jpg"
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
        for name, payload in ((f"{key}.{extension}", image_bytes), (f"{key}.cls", str(label).encode())):
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
    parser.add_argument("--max-side", type=int, default=None,
                        help="re-encode images whose longer side exceeds this many px, shrunk to it (FFCV: 500)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of the re-encoded images (FFCV: 90)")
    args = parser.parse_args(argv)

    if not os.path.isdir(args.src):
        raise UserError(f"source folder {args.src} does not exist")
    if not os.path.isdir(os.path.join(args.src, "train")):
        raise UserError(f"source folder {args.src} has no train/ subfolder")
    if args.shard_size < 1:
        raise UserError(f"--shard-size must be positive, got {args.shard_size}")
    if args.max_side is not None and args.max_side < 1:
        raise UserError(f"--max-side must be positive, got {args.max_side}")
    if not 1 <= args.quality <= 100:
        raise UserError(f"--quality takes 1 to 100, got {args.quality}")
    from common.data import scan_image_folder  # imports torch: after the cheap checks, so errors come fast
    paths, labels, class_names = scan_image_folder(args.src, "train")
    os.makedirs(args.out, exist_ok=True)
    order = np.random.default_rng(args.seed).permutation(len(paths))
    info = {"num_classes": len(class_names), "class_names": class_names}
    if args.max_side:
        info.update(max_side=args.max_side, quality=args.quality)
    shrink = dict(max_side=args.max_side, quality=args.quality)
    info["train"] = write_split([paths[i] for i in order], [labels[i] for i in order], args.out, "train",
                                args.shard_size, args.max_shard_bytes, **shrink)
    if os.path.isdir(os.path.join(args.src, "val")):
        val_paths, val_labels, _ = scan_image_folder(args.src, "val", class_names)
        info["val"] = write_split(val_paths, val_labels, args.out, "val", args.shard_size, args.max_shard_bytes,
                                  **shrink)
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

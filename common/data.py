"""Data sources and per-host uint8 batches for the recipes.

One `--data` string picks the source:
    synthetic                  random batches made on the device by the recipe (only `describe` answers here)
    digits                     scikit-learn's 1797 8x8 handwritten digits, upscaled to 32x32 RGB (offline)
    cifar10, cifar100          torchvision's CIFAR10/100 (python version) in $VIT_RECIPES_DATA or ~/.cache/vit-recipes
    /path/to/imagenet          ImageNet layout: train/<class>/<image>, optionally val/<class>/<image>
    /path/to/shards            webdataset shards + info.json written by scripts/make_shards.py (a URL prefix works too)
    'train-{000000..000099}.tar', 'pipe:...', URLs of .tar shards: raw webdataset shards (train only, give num_classes)

Batches are dicts of numpy arrays for this host: {"image": uint8 (B_local, H, W, 3), "label": int32 (B_local,),
"skipped": int}; B_local = global_batch // process_count. Normalisation and batch-level augmentation
(mixup, cutmix, random erasing) run on the device: see `common.augment`.

Exact resume (folders, digits, cifar): the batch of global step k is a pure function of (seed, k), whatever
the number of workers or the step the run started from. Epoch e's sample stream is a permutation of the
dataset seeded by (seed, e), each index repeated `repeats` times (DeiT's repeated augmentation), and each
stream position has its own augmentation seed; step k takes stream positions [k B, (k+1) B) and host h the
h-th contiguous slice of them. A repeat group is decoded once and augmented `repeats` times (timm's
RepeatAugSampler decodes every copy again).

Unreadable images never stop a run: training moves on to the next dataset index (deterministically),
evaluation pads the slot with label -1; each batch reports how many it met in "skipped" and every bad
file is named once on stderr.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import itertools
import json
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from common import UserError

Transform = Callable[[Image.Image], np.ndarray]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
BUILTIN_SOURCES = ("synthetic", "digits", "cifar10", "cifar100")
SHARD_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


@dataclasses.dataclass
class DataSpec:
    """What a `--data` string holds. Sizes are None where unknown (synthetic, raw shards, no val split)."""

    num_classes: int
    train_size: int | None
    val_size: int | None
    class_names: list[str] | None
    source: str  # 'synthetic', 'digits', 'cifar10', 'cifar100', 'folder' or 'shards'


def data_cache_dir() -> Path:
    """Where cifar10/cifar100 live (and are downloaded to): $VIT_RECIPES_DATA, else ~/.cache/vit-recipes."""
    return Path(os.environ.get("VIT_RECIPES_DATA") or Path.home() / ".cache" / "vit-recipes")


def steps_per_epoch(train_size: int, global_batch: int) -> int:
    """Optimizer steps in one epoch = one dataset-size of samples, repeats included (DeiT's RASampler);
    the last partial batch is dropped."""
    steps = train_size // global_batch
    if steps == 0:
        raise UserError(f"the global batch {global_batch} is larger than the {train_size} training images")
    return steps


# ----------------------------------------------------------------------------------------------
# Sources: what a --data string points to
# ----------------------------------------------------------------------------------------------


def _is_shard_pattern(data: str) -> bool:
    return data.startswith("pipe:") or "{" in data or data.endswith(".tar") or "::" in data


def _is_url(data: str) -> bool:
    return "://" in data


def source_kind(data: str) -> str:
    """'synthetic' | 'digits' | 'cifar10' | 'cifar100' | 'folder' | 'shards' (info.json) | 'raw_shards'."""
    if data in BUILTIN_SOURCES:
        return data
    if _is_shard_pattern(data):
        return "raw_shards"
    if _is_url(data):
        return "shards"
    if not os.path.exists(data):
        if os.sep not in data and not data.startswith("."):
            raise UserError(f"unknown data source {data!r}: expected {', '.join(BUILTIN_SOURCES)}, an "
                            "ImageNet-layout folder or webdataset shards")
        raise UserError(f"data folder {data} does not exist")
    if not os.path.isdir(data):
        raise UserError(f"--data {data} is a file; expected a folder, webdataset shards or one of "
                        f"{', '.join(BUILTIN_SOURCES)}")
    return "shards" if os.path.exists(os.path.join(data, "info.json")) else "folder"


def describe(data: str, num_classes: int = -1) -> DataSpec:
    """Number of classes, split sizes and class names of `data` (see the module docstring for the forms).

    num_classes: -1 reads it from the data; required (> 0) for raw shards, optional for synthetic (default
    1000); for other sources it must match the data when given.
    """
    kind = source_kind(data)
    if kind == "synthetic":
        return DataSpec(num_classes if num_classes > 0 else 1000, None, None, None, "synthetic")
    if kind == "raw_shards":
        if num_classes <= 0:
            raise UserError(f"webdataset shards {data} come without info.json: give the number of classes")
        return DataSpec(num_classes, None, None, None, "shards")
    if kind == "shards":
        info = shard_info(data)
        spec = DataSpec(int(info["num_classes"]), info["train"]["size"] if "train" in info else None,
                        info["val"]["size"] if "val" in info else None, info.get("class_names"), "shards")
    else:
        train, val, class_names = splits(kind, data)
        spec = DataSpec(len(class_names), len(train), len(val) if val is not None else None, class_names,
                        kind)
    if num_classes > 0 and num_classes != spec.num_classes:
        raise UserError(f"{num_classes} classes requested but {data} has {spec.num_classes}")
    return spec


# ----------------------------------------------------------------------------------------------
# Map-style splits: an image folder, digits, cifar
# ----------------------------------------------------------------------------------------------


def _decode_image(path: str) -> Image.Image:
    """Open and fully decode an image file as RGB (raises on unreadable or truncated files)."""
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")  # forces the decode while the file is open


class _FileSplit:
    """Labelled image files, decoded on access.

    Paths are kept in one numpy bytes array, not a list of str: forked loader workers would otherwise copy
    the list page by page as they touch the objects' reference counts (pytorch/pytorch#13246).
    """

    def __init__(self, paths: list[str], labels: list[int]):
        self.paths = np.array([os.fsencode(p) for p in paths])
        self.labels = np.asarray(labels, np.int32)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Image.Image:
        return _decode_image(self.name(index))

    def name(self, index: int) -> str:
        return os.fsdecode(self.paths[index])


class ArraySplit:
    """Labelled uint8 HWC images held in memory (digits, cifar)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, source: str):
        self.images, self.labels, self.source = images, np.asarray(labels, np.int32), source

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])

    def name(self, index: int) -> str:
        return f"{self.source}[{index}]"


def scan_image_folder(root: str, split: str,
                      class_names: Sequence[str] | None = None) -> tuple[list[str], list[int], list[str]]:
    """Image paths, labels and class names of `root/split/<class>/**/<image>` (torchvision ImageFolder order:
    classes and files sorted). With `class_names` (the train classes), labels index into that list."""
    split_dir = os.path.join(root, split)
    folders = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())
    if not folders:
        raise UserError(f"folder {split_dir} has no class subfolders (expected {split}/<class>/<image>)")
    class_names = list(class_names or folders)
    class_index = {name: i for i, name in enumerate(class_names)}
    paths, labels = [], []
    for folder in folders:
        if folder not in class_index:
            raise UserError(f"class folder {split}/{folder} is not a class of train/")
        found = []
        for dirpath, _, filenames in sorted(os.walk(os.path.join(split_dir, folder), followlinks=True)):
            found += [os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not found:
            raise UserError(f"class folder {split}/{folder} has no images")
        paths += found
        labels += [class_index[folder]] * len(found)
    return paths, labels, class_names


def _folder_splits(root: str) -> tuple[_FileSplit, _FileSplit | None, list[str]]:
    if not os.path.isdir(os.path.join(root, "train")):
        raise UserError(f"data folder {root} has no train/ subfolder (expected train/<class>/<image> and "
                        "optionally val/<class>/<image>)")
    paths, labels, class_names = scan_image_folder(root, "train")
    val = None
    if os.path.isdir(os.path.join(root, "val")):
        val = _FileSplit(*scan_image_folder(root, "val", class_names)[:2])
    return _FileSplit(paths, labels), val, class_names


def _digits_splits() -> tuple[ArraySplit, ArraySplit, list[str]]:
    """scikit-learn's digits (UCI, 1797 images of 8x8 in 0..16): upscaled to 32x32 RGB; 20% val by a
    fixed-seed permutation."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.stack([np.array(Image.fromarray(im).resize((32, 32), Image.BILINEAR).convert("RGB"))
                       for im in small])
    order = np.random.default_rng(0).permutation(len(images))
    num_val = len(images) // 5
    val, train = order[:num_val], order[num_val:]
    return (ArraySplit(images[train], digits.target[train], "digits/train"),
            ArraySplit(images[val], digits.target[val], "digits/val"), [str(i) for i in range(10)])


def _cifar_splits(name: str, root: Path) -> tuple[ArraySplit, ArraySplit, list[str]]:
    """torchvision's CIFAR10/CIFAR100 under `root` (downloaded there when absent). The md5 of the official files is
    checked when torchvision downloads the archive, not on every load, so a locally made file of the format works."""
    import torchvision

    official = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]

    class Cifar(official):  # no md5 per file (None: present is enough); the downloaded archive's is still checked
        train_list = [[filename, None] for filename, _ in official.train_list]
        test_list = [[filename, None] for filename, _ in official.test_list]
        meta = dict(official.meta, md5=None)

    def split(train: bool) -> torchvision.datasets.CIFAR10:
        try:
            return Cifar(str(root), train=train, download=True)
        except Exception as e:  # offline, disk full, ...
            raise UserError(f"{name} is not in {root} and could not be downloaded ({e}); set VIT_RECIPES_DATA to a "
                            "folder that holds it") from None

    train, val = split(True), split(False)
    return (ArraySplit(train.data, np.asarray(train.targets), f"{name}/train"),
            ArraySplit(val.data, np.asarray(val.targets), f"{name}/val"), list(train.classes))


def splits(kind: str, data: str) -> tuple[Any, Any, list[str]]:
    """(train split, val split or None, class names) of a folder, digits or cifar source (`source_kind`): map-style
    splits, `len(split)` images, `split.load(i)` -> (PIL image or uint8 array, label)."""
    return _cached_splits(kind, data if kind == "folder" else str(data_cache_dir()))


@functools.lru_cache(maxsize=4)
def _cached_splits(kind: str, location: str):
    # Cached so that `describe` and the loaders of one run scan a folder (or read cifar) once.
    if kind == "folder":
        return _folder_splits(location)
    if kind == "digits":
        return _digits_splits()
    return _cifar_splits(kind, Path(location))


# ----------------------------------------------------------------------------------------------
# The sample stream (exact resume and repeated augmentation)
# ----------------------------------------------------------------------------------------------


def epoch_stream(num_samples: int, seed: int, epoch: int, repeats: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Dataset index and augmentation seed of each of the `num_samples` stream positions of one epoch.

    The epoch's permutation is seeded by (seed, epoch); with repeats r every index of it appears r times in a
    row (so an epoch sees the first ceil(N / r) indices of the permutation, DeiT's RASampler).
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(num_samples)
    sample_seeds = rng.integers(0, 2**31 - 1, size=num_samples)
    return np.repeat(order, repeats)[:num_samples], sample_seeds


class TrainBatchSampler:
    """Yields, for global steps start_step, start_step + 1, ..., this host's slice of the step's stream positions
    as groups (index, seeds): consecutive copies of one image, decoded once by `_DecodingDataset`."""

    def __init__(self, num_samples: int, *, global_batch: int, seed: int, repeats: int, start_step: int,
                 process_index: int, process_count: int):
        self.num_samples, self.global_batch, self.seed, self.repeats = num_samples, global_batch, seed, repeats
        self.start_step = start_step
        self.local_batch = global_batch // process_count
        self.offset = process_index * self.local_batch
        self.steps_per_epoch = steps_per_epoch(num_samples, global_batch)
        self._epoch, self._stream = -1, None

    def groups(self, step: int) -> list[tuple[int, tuple[int, ...]]]:
        """This host's part of global step `step` as (dataset index, augmentation seed of each copy)."""
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._stream = epoch, epoch_stream(self.num_samples, self.seed, epoch, self.repeats)
        start = step_in_epoch * self.global_batch + self.offset
        indices, seeds = (a[start:start + self.local_batch] for a in self._stream)
        groups: list[tuple[int, tuple[int, ...]]] = []
        for index, group in itertools.groupby(zip(indices.tolist(), seeds.tolist()), key=lambda pair: pair[0]):
            groups.append((index, tuple(s for _, s in group)))
        return groups

    def __iter__(self) -> Iterator[list]:
        for step in itertools.count(self.start_step):
            yield self.groups(step)


def _seed_everything(seed: int) -> None:
    """timm/torchvision transforms draw from python `random`, numpy and torch: seed all three."""
    random.seed(seed)
    np.random.seed(seed)
    # The CPU generator only: torch.manual_seed also queues a seed for every accelerator backend, recording a
    # stack trace per call (3x the cost of loading a small image).
    torch.default_generator.manual_seed(seed)


class _DecodingDataset(Dataset):
    """dataset[(index, seeds)] -> `len(seeds)` augmentations of one decoded image, each under its own seed.

    seeds None: one deterministic (eval) transform. index -1: an eval padding slot (zeros, label -1).
    Training skips an unreadable image to the next dataset index; evaluation turns it into a padding slot.
    """

    def __init__(self, split, transform: Transform, skip_bad: bool):
        self.split, self.transform, self.skip_bad = split, transform, skip_bad
        self._pad = None

    def _padding(self) -> np.ndarray:
        if self._pad is None:  # the output shape of the (deterministic) eval transform
            self._pad = np.zeros_like(self.transform(Image.new("RGB", (64, 64))))
        return self._pad

    def __getitem__(self, group: tuple[int, tuple[int, ...] | None]):
        index, seeds = group
        bad = []
        if index < 0:
            return [self._padding()], [-1], bad
        for _ in range(len(self.split)):
            try:
                image = self.split.load(index)
                break
            except Exception as e:  # any decode failure: truncated, corrupt, not an image
                bad.append(f"{self.split.name(index)} ({type(e).__name__}: {e})")
                if not self.skip_bad:
                    return [self._padding()], [-1], bad
                index = (index + 1) % len(self.split)
        else:
            raise RuntimeError("no readable image in the whole split")
        label = int(self.split.labels[index])
        if seeds is None:
            return [self.transform(image)], [label], bad
        outputs = []
        for seed in seeds:
            _seed_everything(seed)
            outputs.append(self.transform(image))
        return outputs, [label] * len(outputs), bad

    def __len__(self) -> int:
        return len(self.split)


def _stack(images: list[np.ndarray], labels: list[int], bad: list[str]) -> dict:
    # Torch tensors cross from the loader workers through shared memory (numpy arrays would be pickled).
    return {"image": torch.from_numpy(np.stack(images)), "label": torch.tensor(labels, dtype=torch.int32),
            "bad": bad}


def _collate(items: list) -> dict:
    """Batch of `_DecodingDataset` items (each: images, labels, bad files) -> one torch batch."""
    return _stack([image for images, _, _ in items for image in images],
                  [label for _, labels, _ in items for label in labels],
                  [name for _, _, names in items for name in names])


_NAMED_UNREADABLE: set[str] = set()  # the unreadable files named on stderr in this run


def forget_named_files() -> None:
    """Start a new run's record of named unreadable files: each is named once per run (train and eval alike)."""
    _NAMED_UNREADABLE.clear()


def name_unreadable(entries: Iterable[str]) -> None:
    """Name each unreadable file (path and reason) on stderr, once per run, whichever loader met it."""
    for entry in entries:
        if entry not in _NAMED_UNREADABLE:
            _NAMED_UNREADABLE.add(entry)
            print(f"warning: skipping unreadable image {entry}", file=sys.stderr, flush=True)


def _host_batches(loader: DataLoader) -> Iterator[dict]:
    """Torch batches from `loader` -> numpy batches {"image", "label", "skipped"}; names each bad file once."""
    with warnings.catch_warnings():
        # Workers are forked (fast start, nothing to pickle). They run PIL/torch code only and never touch JAX,
        # so JAX's generic warning about forking a multithreaded process does not apply to them.
        warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
        batches = iter(loader)
    for batch in batches:
        name_unreadable(batch["bad"])
        yield {"image": batch["image"].numpy(), "label": batch["label"].numpy(), "skipped": len(batch["bad"])}


def check_batch(global_batch: int, process_count: int) -> int:
    """The per-process batch of a global batch split over `process_count` processes (UserError if it does not split)."""
    if global_batch <= 0 or global_batch % process_count:
        raise UserError(f"the global batch {global_batch} must be a positive multiple of the "
                        f"{process_count} processes")
    return global_batch // process_count


# ----------------------------------------------------------------------------------------------
# Public loaders (arguments are checked when called; batches are made when iterated)
# ----------------------------------------------------------------------------------------------


def train_batches(data: str, transform: Transform, *, global_batch: int, seed: int, repeats: int = 1,
                  start_step: int = 0, workers: int, process_index: int = 0, process_count: int = 1,
                  shuffle_buffer: int = 2000, pin_memory: bool = False) -> Iterator[dict]:
    """Endless per-host training batches {"image", "label", "skipped"} starting at global step `start_step`.

    transform: PIL image -> uint8 HWC array (`common.augment.train_transform`).
    repeats: DeiT's repeated augmentation (3 in DeiT/DeiT-III): each image is decoded once and augmented
        `repeats` times; an epoch is still one dataset-size of samples (`steps_per_epoch`).
    workers: loader processes per host (0: load in this process).
    Folders, digits and cifar resume exactly (batch k depends on (seed, k) only). Webdataset shards cannot:
    a resumed run continues at the right step with a fresh shuffle seeded by (seed, start_step, host).
    shuffle_buffer: samples per loader worker in webdataset's shuffle buffer (shards only).
    pin_memory: the batches land in page-locked memory, copied there by the DataLoader's pinning thread (not the
        training loop), so that a CUDA copy of them is asynchronous (PyTorch recipes on GPUs).
    """
    local_batch = check_batch(global_batch, process_count)
    if repeats < 1:
        raise UserError(f"repeats must be >= 1, got {repeats}")
    kind = source_kind(data)
    if kind == "synthetic":
        raise UserError("synthetic batches are made on the device by the recipe, not by the data loader")
    if kind in ("shards", "raw_shards"):
        urls = train_shard_urls(data, kind)
        return _shard_train_batches(urls, transform, local_batch=local_batch, repeats=repeats, seed=seed,
                                    start_step=start_step, workers=workers, process_index=process_index,
                                    process_count=process_count, shuffle_buffer=shuffle_buffer, pin_memory=pin_memory)
    train, _, _ = splits(kind, data)
    sampler = TrainBatchSampler(len(train), global_batch=global_batch, seed=seed, repeats=repeats,
                                 start_step=start_step, process_index=process_index, process_count=process_count)
    dataset = _DecodingDataset(train, transform, skip_bad=True)
    return _host_batches(DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=_collate,
                                    pin_memory=pin_memory))


def eval_batches(data: str, transform: Transform, *, global_batch: int, workers: int, process_index: int = 0,
                 process_count: int = 1, pin_memory: bool = False) -> Iterator[dict]:
    """Per-host batches {"image", "label", "skipped"} covering the val split once over all hosts.

    Every host yields the same number of batches of global_batch // process_count; slots past the end (and
    unreadable images) hold zeros with label -1, to be masked out. Sources without a val split (synthetic,
    raw shards, a folder without val/) yield no batches.
    """
    local_batch = check_batch(global_batch, process_count)
    kind = source_kind(data)
    if kind in ("synthetic", "raw_shards"):
        return iter(())
    if kind == "shards":
        val = shard_info(data).get("val")
        if val is None:
            return iter(())
        urls = expand_shards(join_url(data, val["pattern"]))
        sizes = val.get("shard_sizes")
        if sizes is None or len(sizes) != len(urls):
            raise UserError(f"{join_url(data, 'info.json')}: val needs shard_sizes, one per shard")
        return _shard_eval_batches(data, urls, sizes, transform, local_batch=local_batch, workers=workers,
                                   process_index=process_index, process_count=process_count)
    _, val, _ = splits(kind, data)
    if val is None:
        return iter(())
    # Global batch k holds val positions [k B, (k+1) B); host h its h-th slice; positions >= len(val) pad.
    offset = process_index * local_batch
    batches = [[(p if p < len(val) else -1, None) for p in range(start + offset, start + offset + local_batch)]
               for start in range(0, len(val), global_batch)]
    dataset = _DecodingDataset(val, transform, skip_bad=False)
    return _host_batches(DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=_collate,
                                    pin_memory=pin_memory))


# ----------------------------------------------------------------------------------------------
# Webdataset shards
# ----------------------------------------------------------------------------------------------


def join_url(prefix: str, name: str) -> str:
    """`name` under a folder or URL prefix."""
    return prefix.rstrip("/") + "/" + name if _is_url(prefix) else os.path.join(prefix, name)


@functools.lru_cache(maxsize=8)
def shard_info(data: str) -> dict:
    """info.json of a shard folder / URL prefix (see scripts/make_shards.py)."""
    import webdataset as wds

    location = join_url(data, "info.json")
    try:
        with wds.gopen(location, "rb") as f:
            info = json.load(f)
    except Exception as e:
        raise UserError(f"could not read {location}: {e}") from None
    if "num_classes" not in info or not any(split in info for split in ("train", "val")):
        raise UserError(f"{location} needs num_classes and a train or val entry (see scripts/make_shards.py)")
    return info


def expand_shards(pattern: str) -> list[str]:
    """A brace pattern ('train-{0000..0099}.tar') as the list of shard paths or URLs it names."""
    import webdataset as wds

    return wds.shardlists.expand_urls(pattern)


def train_shard_urls(data: str, kind: str) -> list[str]:
    """The training shards of a shard source: raw shards as given, or info.json's train pattern under its folder."""
    if kind == "raw_shards":
        urls = expand_shards(data)
    else:
        info = shard_info(data)
        if "train" not in info:
            raise UserError(f"{join_url(data, 'info.json')} lists no train shards")
        urls = expand_shards(join_url(data, info["train"]["pattern"]))
    missing = [u for u in urls if not _is_url(u) and not u.startswith("pipe:") and not os.path.exists(u)]
    if missing:
        raise UserError(f"{len(missing)} of {len(urls)} shards are missing, e.g. {missing[0]}")
    return urls


class SkipLog:
    """webdataset error handler that keeps going, remembering what it skipped (reported with the next batch).
    Many failures in a row (every shard missing, say) stop the run instead of looping forever."""

    def __init__(self, max_in_a_row: int = 100):
        self.bad: list[str] = []
        self.in_a_row, self.max_in_a_row = 0, max_in_a_row

    def __call__(self, exn: Exception) -> bool:
        self.add(" ".join(str(a) for a in exn.args if isinstance(a, str))[:300] or repr(exn))
        return True

    def add(self, entry: str) -> None:
        self.bad.append(entry)
        self.in_a_row += 1
        if self.in_a_row > self.max_in_a_row:
            raise RuntimeError(f"{self.in_a_row} unreadable samples or shards in a row; last: {entry}")

    def take(self) -> list[str]:
        bad, self.bad = self.bad, []
        return bad


def _decoded_samples(samples: Iterator[dict], skips: SkipLog) -> Iterator[tuple[Image.Image, int]]:
    """webdataset samples ({"jpg": bytes, "cls": b"3", ...}) -> (RGB image, label); bad samples are skipped."""
    for sample in samples:
        try:
            key = next(k for k in SHARD_IMAGE_KEYS if k in sample)
            image = Image.open(io.BytesIO(sample[key])).convert("RGB")
            label = int(sample["cls"])
        except Exception as e:  # no image, undecodable image, no or bad label
            skips.add(f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')} ({type(e).__name__}: {e})")
            continue
        skips.in_a_row = 0
        yield image, label


def worker_slot() -> tuple[int, int]:
    """(this DataLoader worker's index, the number of workers); (0, 1) in the main process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class _ShardTrainStream(IterableDataset):
    """Endless batches from shards drawn with replacement (webdataset's resampling): every host and worker
    streams forever, so unequal shard counts can never leave one host waiting for another at the end of an
    epoch (the usual webdataset multi-host hang). Decodes once, augments `repeats` times."""

    def __init__(self, urls: list[str], transform: Transform, *, local_batch: int, repeats: int, seed: int,
                 shuffle_buffer: int):
        self.urls, self.transform, self.local_batch, self.repeats = urls, transform, local_batch, repeats
        self.seed, self.shuffle_buffer = seed, shuffle_buffer

    def __iter__(self):
        import webdataset as wds

        worker, _ = worker_slot()
        rng = random.Random(int(np.random.SeedSequence([self.seed, worker]).generate_state(1)[0]))
        skips = SkipLog()
        shards = (dict(url=rng.choice(self.urls)) for _ in itertools.count())
        samples = wds.tarfile_samples(shards, handler=skips)
        samples = wds.shuffle(self.shuffle_buffer, min(self.shuffle_buffer, 100), rng=rng)(samples)
        images, labels = [], []
        for image, label in _decoded_samples(samples, skips):
            for _ in range(self.repeats):
                _seed_everything(rng.getrandbits(31))
                images.append(self.transform(image))
                labels.append(label)
            while len(images) >= self.local_batch:
                yield _stack(images[:self.local_batch], labels[:self.local_batch], skips.take())
                images, labels = images[self.local_batch:], labels[self.local_batch:]


def _shard_train_batches(urls: list[str], transform: Transform, *, local_batch: int, repeats: int, seed: int,
                         start_step: int, workers: int, process_index: int, process_count: int,
                         shuffle_buffer: int, pin_memory: bool = False) -> Iterator[dict]:
    # Each host resamples from its own shards (all of them when there are fewer shards than hosts).
    host_urls = urls[process_index::process_count] if len(urls) >= process_count else urls
    host_seed = int(np.random.SeedSequence([seed, start_step, process_index]).generate_state(1)[0])
    stream = _ShardTrainStream(host_urls, transform, local_batch=local_batch, repeats=repeats, seed=host_seed,
                               shuffle_buffer=shuffle_buffer)
    return _host_batches(DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory))


class _ShardReader(IterableDataset):
    """Each loader worker reads its share of `urls` in order and yields batches of up to `batch` images
    (an empty one carries the bad samples met after the last image)."""

    def __init__(self, urls: list[str], transform: Transform, batch: int, image_shape: tuple[int, ...]):
        self.urls, self.transform, self.batch, self.image_shape = urls, transform, batch, image_shape

    def __iter__(self):
        import webdataset as wds

        worker, num_workers = worker_slot()
        skips = SkipLog()
        samples = wds.tarfile_samples((dict(url=u) for u in self.urls[worker::num_workers]), handler=skips)
        images, labels = [], []
        for image, label in _decoded_samples(samples, skips):
            images.append(self.transform(image))
            labels.append(label)
            if len(images) == self.batch:
                yield _stack(images, labels, skips.take())
                images, labels = [], []
        if images:
            yield _stack(images, labels, skips.take())
        elif skips.bad:
            yield {"image": torch.zeros((0, *self.image_shape), dtype=torch.uint8),
                   "label": torch.zeros(0, dtype=torch.int32), "bad": skips.take()}


def _shard_eval_batches(data: str, urls: list[str], sizes: list[int], transform: Transform, *, local_batch: int,
                        workers: int, process_index: int, process_count: int) -> Iterator[dict]:
    """Host h reads val shards h, h + P, ...; info.json's shard sizes tell every host how many batches the
    busiest host needs, and the others pad up to that count. The workers' partial batches are re-cut here."""
    num_batches = max(math.ceil(sum(sizes[h::process_count]) / local_batch) for h in range(process_count))
    host_urls = urls[process_index::process_count]
    pad = np.zeros_like(transform(Image.new("RGB", (64, 64))))  # the eval transform's output shape
    images = np.zeros((0, *pad.shape), np.uint8)
    labels = np.zeros((0,), np.int32)
    skipped, emitted = 0, 0
    if host_urls:
        reader = _ShardReader(host_urls, transform, local_batch, pad.shape)
        for batch in _host_batches(DataLoader(reader, batch_size=None, num_workers=min(workers, len(host_urls)))):
            images = np.concatenate([images, batch["image"]])
            labels = np.concatenate([labels, batch["label"]])
            skipped += batch["skipped"]
            while len(labels) >= local_batch:
                if emitted == num_batches:
                    raise UserError(f"val shards of {data} hold more images than info.json's shard_sizes say")
                yield {"image": images[:local_batch], "label": labels[:local_batch], "skipped": skipped}
                images, labels, skipped, emitted = images[local_batch:], labels[local_batch:], 0, emitted + 1
    if emitted == num_batches and len(labels):
        raise UserError(f"val shards of {data} hold more images than info.json's shard_sizes say")
    for _ in range(emitted, num_batches):  # the last partial batch, then padding batches
        missing = local_batch - len(labels)
        yield {"image": np.concatenate([images, np.broadcast_to(pad, (missing, *pad.shape))]),
               "label": np.concatenate([labels, np.full(missing, -1, np.int32)]), "skipped": skipped}
        images, labels, skipped = images[:0], labels[:0], 0


# ----------------------------------------------------------------------------------------------
# Input benchmark: is a run input-bound?
# ----------------------------------------------------------------------------------------------


def time_input(make_batches: Callable[[], Iterator[dict]], fields: dict[str, Any], *, steps: int, warmup: int,
               process_index: int, process_count: int, sync: Callable[[], None] = lambda: None) -> dict:
    """The clock of --benchmark-input, for either loader: build the batches, skip `warmup` of them (workers starting,
    first decodes), time the next `steps` (`sync` waits for the device before each clock), and print (on process 0)
    and return one JSON line: `fields`, then steps, skipped, batch_ms and `img_per_sec` last.

    img_per_sec is the global rate: this host's images/s x process_count (the hosts load in parallel)."""
    if steps <= 0 or warmup < 0:
        raise UserError(f"the input benchmark needs steps > 0 and warmup >= 0, got {steps} and {warmup}")
    batches = make_batches()
    try:
        for _ in range(warmup):
            next(batches)
        sync()
        start, images, skipped = time.perf_counter(), 0, 0
        for _ in range(steps):
            batch = next(batches)
            images += len(batch["label"])
            skipped += batch["skipped"]
        sync()
        seconds = time.perf_counter() - start
    finally:
        batches.close()  # shuts the loader workers down
    result = dict(fields, steps=steps, skipped=skipped, batch_ms=round(1000 * seconds / steps, 2),
                  img_per_sec=round(images * process_count / seconds, 1))
    if process_index == 0:
        print(json.dumps(result), flush=True)
    return result


def benchmark_input(data: str, transform: Transform, *, global_batch: int, workers: int, steps: int,
                    seed: int = 0, repeats: int = 1, warmup: int = 3, process_index: int = 0, process_count: int = 1,
                    **report: Any) -> dict:
    """Time the host input pipeline alone (`train_batches` with the recipe's transform, workers and repeats; no
    model, no device) with `time_input`: one JSON line, `report` first and `img_per_sec` last, as --benchmark prints.
    Compare img_per_sec with --benchmark's figure: a recipe whose steps take more images/s than this is input-bound.
    """
    if source_kind(data) == "synthetic":
        raise UserError("--benchmark-input times the input pipeline and --data synthetic has none (its batches are "
                        "made on the device): give an image folder, shards, digits or cifar")
    return time_input(
        lambda: train_batches(data, transform, global_batch=global_batch, seed=seed, repeats=repeats,
                              workers=workers, process_index=process_index, process_count=process_count),
        dict(report, data=data, batch_size=global_batch, workers=workers, repeats=repeats, loader="pil"),
        steps=steps, warmup=warmup, process_index=process_index, process_count=process_count)

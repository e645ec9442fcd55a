"""`--loader gpu`: the host reads bytes, the device decodes and augments whole batches.

The PIL loader (`common.data` + `common.augment`) decodes and augments on the host: about 2,100-2,400 img/s on
16 cores, less than one H100 trains a ViT-S at (issue 14). Here the loader workers only read files and draw the
random parameters of each sample (NumPy, from the per-sample seed of `common.data.epoch_stream`); the device
decodes the JPEGs in one call (`torchvision.io.decode_jpeg`, nvJPEG on CUDA) and runs the augmentation batched:

    geometry     random resized crop (timm), DeiT-III's simple random crop, resize + centre crop, horizontal flip:
                 per sample, torch's antialiased resize (PIL's algorithm: the crop matches PIL's to +-1 grey level)
    colour ops   colour jitter, 3-Augment, RandAugment (timm's op set and magnitude rules): each op runs on the
                 samples that drew it, with per-sample arguments drawn on the host
    erasing      timm RandomErasing(mode='pixel') on normalised images (only with `normalize=`)

Folders, digits and cifar: batch k is a function of (seed, k), the same samples and per-sample seeds as
`common.data`, so a resumed run is bitwise exact (on CPU; on a GPU up to nvJPEG's and the kernels' own
determinism), and process h of P gets the h-th slice of the global batch. Webdataset shards stream as in
`common.data` (a resumed run reshuffles). Repeated augmentation decodes once and augments every copy.
Unreadable images: a file whose header is not an image's is skipped in the worker (the next dataset index, as
`common.data`); a JPEG the device cannot decode goes to PIL, and if PIL fails too its copies take the next
decodable image of the batch (with their own seeds). Each batch counts them in "skipped"; each is named once.

Nothing here imports JAX: `to_jax` imports it when called.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import itertools
import math
import random
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset

from common import UserError, augment, data

RANDOM_CROPS = ("rrc", "src", "none")
INTERPOLATIONS = ("bilinear", "bicubic")
JPEG_MAGIC = b"\xff\xd8\xff"
# timm's RandAugment op lists (timm/data/auto_augment.py _RAND_TRANSFORMS / _RAND_INCREASING_TRANSFORMS).
RAND_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
            "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
RAND_INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                       "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                       "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
# The device ops; a sample's op program is a few (op id, argument) slots, -1 = nothing.
DEVICE_OPS = ("autocontrast", "equalize", "invert", "rotate", "posterize", "solarize", "solarize_add", "color",
              "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y",
              "gaussian_blur")
OP_ID = {name: i for i, name in enumerate(DEVICE_OPS)}
_TIMM_TO_DEVICE_OP = {"AutoContrast": "autocontrast", "Equalize": "equalize", "Invert": "invert", "Rotate": "rotate",
                      "Posterize": "posterize", "PosterizeIncreasing": "posterize", "Solarize": "solarize",
                      "SolarizeIncreasing": "solarize", "SolarizeAdd": "solarize_add", "Color": "color",
                      "ColorIncreasing": "color", "Contrast": "contrast", "ContrastIncreasing": "contrast",
                      "Brightness": "brightness", "BrightnessIncreasing": "brightness", "Sharpness": "sharpness",
                      "SharpnessIncreasing": "sharpness", "ShearX": "shear_x", "ShearY": "shear_y",
                      "TranslateXRel": "translate_x", "TranslateYRel": "translate_y"}
FILL = (124, 116, 104)  # timm's img_mean hparam: round(255 * IMAGENET_DEFAULT_MEAN), the fill of geometric ops


# ----------------------------------------------------------------------------------------------
# The augmentation a recipe asks for
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AugSpec:
    """What `common.augment.train_transform` / `eval_transform` take, as one value a recipe fills from its flags.

    random_crop: 'rrc' (timm RandomResizedCrop with `scale`, ratio (3/4, 4/3)), 'src' (DeiT-III simple random
        crop) or 'none' (resize the shorter side + centre crop).
    auto_augment: '3a' (DeiT-III 3-Augment), a timm RandAugment string ('rand-m9-mstd0.5-inc1', 'rand-n2-m15')
        or None. As in timm, RandAugment switches colour jitter off; 3-Augment keeps it.
    random_erasing: timm RandomErasing(mode='pixel') probability; needs normalised output (`normalize=`).
    crop_ratio: eval only: resize the shorter side to int(image_size / crop_ratio), centre crop image_size.
    """

    image_size: int
    random_crop: str = "rrc"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    color_jitter: float = 0.0
    auto_augment: str | None = None
    random_erasing: float = 0.0
    interpolation: str = "bicubic"
    crop_ratio: float = 0.875

    def __post_init__(self):
        if self.random_crop not in RANDOM_CROPS:
            raise UserError(f"unknown random crop {self.random_crop!r}; choose one of {', '.join(RANDOM_CROPS)}")
        if self.interpolation not in INTERPOLATIONS:
            raise UserError(f"--loader gpu resizes with {' or '.join(INTERPOLATIONS)}, not {self.interpolation!r}")
        if not 0 < self.crop_ratio <= 1:
            raise UserError(f"crop ratio must be in (0, 1], got {self.crop_ratio}")
        parse_auto_augment(self.auto_augment)


@dataclasses.dataclass(frozen=True)
class RandAugmentSpec:
    """timm `rand_augment_transform`'s settings: ops, layers per image, magnitude (+ its noise), op probability."""

    ops: tuple[str, ...]
    num_layers: int = 2
    magnitude: float = 10.0
    magnitude_std: float = 0.0
    magnitude_max: float = 10.0
    prob: float = 0.5


def parse_auto_augment(policy: str | None) -> RandAugmentSpec | str | None:
    """None / 'none' -> None, '3a' -> '3a', 'rand-...' -> RandAugmentSpec (timm's parser: m, n, mstd, mmax, inc, p)."""
    if not policy or policy == "none":
        return None
    if policy == "3a":
        return "3a"
    if not policy.startswith("rand"):
        raise UserError(f"--loader gpu implements 3-Augment ('3a') and RandAugment ('rand-...'), not {policy!r}: "
                        "use --loader pil")
    settings: dict[str, Any] = {}
    increasing = False
    for section in policy.split("-")[1:]:
        key, *value = re.split(r"(\d.*)", section)
        if section.startswith("t") or not value:
            raise UserError(f"RandAugment section {section!r} of {policy!r} is not supported by --loader gpu")
        value = value[0]
        if key == "mstd":
            settings["magnitude_std"] = math.inf if float(value) > 100 else float(value)
        elif key == "mmax":
            settings["magnitude_max"] = float(int(value))
        elif key == "inc":
            increasing = bool(int(value))
        elif key == "m":
            settings["magnitude"] = float(int(value))
        elif key == "n":
            settings["num_layers"] = int(value)
        elif key == "p":
            settings["prob"] = float(value)
        else:
            raise UserError(f"unknown RandAugment section {section!r} in {policy!r}")
    return RandAugmentSpec(RAND_INCREASING_OPS if increasing else RAND_OPS, **settings)


# ----------------------------------------------------------------------------------------------
# Host: per-sample random parameters (NumPy, from the sample's seed)
# ----------------------------------------------------------------------------------------------

GEOMETRY = ("y0", "h", "x0", "w", "out_h", "out_w", "row0", "col0", "flip")  # see `_geometry`
ERASE = ("erase", "top", "left", "erase_h", "erase_w")


def _shorter_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """torchvision Resize(int)'s output size: the shorter side becomes `size`, the longer int(size * long / short)."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def _rrc_box(rng: np.random.Generator, height: int, width: int, scale: tuple[float, float],
             ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """timm RandomResizedCropAndInterpolation.get_params: (top, left, h, w); 10 tries, then the central crop."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = rng.uniform(*scale) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if w <= width and h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def _geometry(rng: np.random.Generator | None, spec: AugSpec, height: int, width: int) -> list[int]:
    """Crop box (y0, h, x0, w) of the source, the size it is resized to (out_h, out_w), the first output row and
    column in that resized image (may be negative: reflect padding) and the flip. rng None: the eval geometry."""
    size = spec.image_size
    if rng is not None and spec.random_crop == "rrc":
        y0, x0, h, w = _rrc_box(rng, height, width, spec.scale, spec.ratio)
        box = [y0, h, x0, w, size, size, 0, 0]
    else:
        resize_to = int(size / spec.crop_ratio) if rng is None else size
        out_h, out_w = _shorter_side_size(height, width, resize_to)
        if rng is not None and spec.random_crop == "src":
            # torchvision RandomCrop(size, padding=4, padding_mode='reflect') of the resized image.
            row0 = int(rng.integers(0, out_h + 8 - size + 1)) - 4
            col0 = int(rng.integers(0, out_w + 8 - size + 1)) - 4
        else:  # CenterCrop
            row0, col0 = int(round((out_h - size) / 2.0)), int(round((out_w - size) / 2.0))
        box = [0, height, 0, width, out_h, out_w, row0, col0]
    flip = rng is not None and spec.hflip > 0 and rng.random() < spec.hflip
    return box + [int(flip)]


def _timm_op_argument(name: str, magnitude: float, rng: np.random.Generator) -> float:
    """timm's LEVEL_TO_ARG for the RandAugment ops (magnitude already clipped to [0, magnitude_max])."""
    level = magnitude / 10.0
    sign = -1.0 if rng.random() > 0.5 else 1.0  # timm `_randomly_negate`; drawn always, used by the signed ops
    if name == "Rotate":
        return sign * level * 30.0
    if name in ("ShearX", "ShearY"):
        return sign * level * 0.3
    if name in ("TranslateXRel", "TranslateYRel"):
        return sign * level * 0.45
    if name == "Posterize":
        return float(int(level * 4))
    if name == "PosterizeIncreasing":
        return float(4 - int(level * 4))
    if name == "Solarize":
        return float(min(256, int(level * 256)))
    if name == "SolarizeIncreasing":
        return float(256 - min(256, int(level * 256)))
    if name == "SolarizeAdd":
        return float(min(128, int(level * 110)))
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return level * 1.8 + 0.1
    if name.endswith("Increasing"):  # Color / Contrast / Brightness / SharpnessIncreasing
        return max(0.1, 1.0 + sign * level * 0.9)
    return 0.0  # AutoContrast, Equalize, Invert


def _op_slots(rng: np.random.Generator, spec: AugSpec) -> list[tuple[int, float]]:
    """The colour/geometric op program of one sample: (device op id, argument) per slot, -1 for no op.

    3-Augment (timm auto_augment_policy_3a): one of solarize(128) / grayscale / gaussian blur radius U(0.1, 2).
    RandAugment (timm RandAugment + AugmentOp): `num_layers` ops drawn with replacement, each applied with
    probability `prob` at magnitude N(m, mstd) clipped to [0, mmax] (U(0, m) for mstd inf).
    Colour jitter (torchvision ColorJitter(b, c, s), hue off): brightness, contrast, saturation factors
    U(1 - cj, 1 + cj) in a random order; off with RandAugment, as in timm.
    """
    policy = parse_auto_augment(spec.auto_augment)
    slots: list[tuple[int, float]] = []
    if policy == "3a":
        choice = int(rng.integers(3))
        slots.append([(OP_ID["solarize"], 128.0), (OP_ID["color"], 0.0),
                      (OP_ID["gaussian_blur"], float(rng.uniform(0.1, 2.0)))][choice])
    elif isinstance(policy, RandAugmentSpec):
        for _ in range(policy.num_layers):
            name = policy.ops[int(rng.integers(len(policy.ops)))]
            if policy.prob < 1.0 and rng.random() > policy.prob:
                slots.append((-1, 0.0))
                continue
            magnitude = policy.magnitude
            if policy.magnitude_std == math.inf:
                magnitude = rng.uniform(0, magnitude)
            elif policy.magnitude_std > 0:
                magnitude = rng.normal(magnitude, policy.magnitude_std)
            magnitude = max(0.0, min(magnitude, policy.magnitude_max))
            slots.append((OP_ID[_TIMM_TO_DEVICE_OP[name]], _timm_op_argument(name, magnitude, rng)))
    if spec.color_jitter > 0 and not isinstance(policy, RandAugmentSpec):
        factors = rng.uniform(1 - spec.color_jitter, 1 + spec.color_jitter, 3)
        jitter_ops = (OP_ID["brightness"], OP_ID["contrast"], OP_ID["color"])
        slots += [(jitter_ops[i], float(max(0.0, factors[i]))) for i in rng.permutation(3)]
    return slots


def _erase_box(rng: np.random.Generator, spec: AugSpec) -> list[int]:
    """timm RandomErasing(probability, mode='pixel', max_count=1): (erase, top, left, h, w)."""
    if spec.random_erasing <= 0 or rng.random() > spec.random_erasing:
        return [0, 0, 0, 0, 0]
    size, area = spec.image_size, spec.image_size ** 2
    for _ in range(10):
        target_area = rng.uniform(0.02, 1 / 3) * area
        aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
        h = int(round(math.sqrt(target_area * aspect)))
        w = int(round(math.sqrt(target_area / aspect)))
        if w < size and h < size:
            return [1, int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1)), h, w]
    return [0, 0, 0, 0, 0]


def sample_params(spec: AugSpec, seed: int | None, height: int, width: int) -> dict[str, Any]:
    """Every random draw of one augmented copy, from its seed alone (None: the deterministic eval transform)."""
    if seed is None:
        return {"geometry": _geometry(None, spec, height, width), "slots": [], "erase": [0] * 5, "seed": 0}
    rng = np.random.default_rng(seed)
    geometry = _geometry(rng, spec, height, width)
    slots = _op_slots(rng, spec)
    return {"geometry": geometry, "slots": slots, "erase": _erase_box(rng, spec), "seed": int(seed)}


# ----------------------------------------------------------------------------------------------
# Host: read bytes (loader workers)
# ----------------------------------------------------------------------------------------------


def _read_payload(split, index: int) -> tuple[np.ndarray, bool, int, int]:
    """(payload, is_jpeg, height, width) of one image: the file's bytes for a JPEG (the header is parsed to learn
    the size and that it is an image), else the decoded uint8 HWC pixels (PNG & co are rare; PIL decodes them)."""
    if isinstance(split, data.ArraySplit):
        pixels = np.ascontiguousarray(split.images[index])
        if pixels.ndim == 2:
            pixels = np.repeat(pixels[..., None], 3, axis=-1)
        return pixels, False, pixels.shape[0], pixels.shape[1]
    with open(split.name(index), "rb") as f:
        encoded = f.read()
    return _payload_from_bytes(encoded)


def _payload_from_bytes(encoded: bytes) -> tuple[np.ndarray, bool, int, int]:
    if encoded[:3] == JPEG_MAGIC:
        with Image.open(io.BytesIO(encoded)) as img:  # the header only: raises on a non-image
            width, height = img.size
        return np.frombuffer(encoded, np.uint8), True, height, width
    pixels = np.array(Image.open(io.BytesIO(encoded)).convert("RGB"))
    return pixels, False, pixels.shape[0], pixels.shape[1]


def _read_item(split, index: int, seeds: tuple[int, ...] | None, spec: AugSpec,
               skip_bad: bool) -> tuple[dict | None, list[str]]:
    """One dataset group: payload, label and each copy's params. A file that cannot be read moves on to the next
    dataset index (training) or becomes None (evaluation: a padding slot), as `common.data` does."""
    bad: list[str] = []
    for _ in range(len(split)):
        try:
            payload, is_jpeg, height, width = _read_payload(split, index)
            break
        except Exception as e:  # empty, truncated header, not an image
            message = re.sub(r"<_io.BytesIO object at 0x[0-9a-f]+>", "its bytes", str(e))  # one name per file
            bad.append(f"{split.name(index)} ({type(e).__name__}: {message})")
            if not skip_bad:
                return None, bad
            index = (index + 1) % len(split)
    else:
        raise RuntimeError("no readable image in the whole split")
    params = [sample_params(spec, seed, height, width) for seed in (seeds if seeds is not None else (None,))]
    return {"payload": payload, "jpeg": is_jpeg, "label": int(split.labels[index]), "name": split.name(index),
            "params": params}, bad


class _ByteReader(Dataset):
    """dataset[list of (index, seeds)] -> one host batch: payloads and per-copy parameters (see `_pack`)."""

    def __init__(self, split, spec: AugSpec, skip_bad: bool):
        self.split, self.spec, self.skip_bad = split, spec, skip_bad

    def __getitem__(self, groups: list[tuple[int, tuple[int, ...] | None]]) -> dict:
        items, bad = [], []
        for index, seeds in groups:
            if index < 0:  # eval padding slot
                items.append(None)
                continue
            item, item_bad = _read_item(self.split, index, seeds, self.spec, self.skip_bad)
            items.append(item)
            bad += item_bad
        return _pack(items, bad)

    def __len__(self) -> int:
        return len(self.split)


def _pack(items: list[dict | None], bad: list[str]) -> dict:
    """Host batch as few tensors (each crosses from a worker through one shared-memory segment): every payload's
    bytes in one flat uint8 tensor, and per copy its payload, label, geometry, op slots and erasing box."""
    sizes, shapes, jpeg, names, labels, owner, geometry, erase, seeds, slots = [], [], [], [], [], [], [], [], [], []
    chunks = []
    for item in items:
        if item is None:
            labels.append(-1)
            owner.append(-1)
            geometry.append([0] * len(GEOMETRY))
            erase.append([0] * len(ERASE))
            seeds.append(0)
            slots.append([])
            continue
        payload = item["payload"]
        chunks.append(payload.reshape(-1))
        sizes.append(payload.size)
        shapes.append(payload.shape[:2] if not item["jpeg"] else (0, 0))
        jpeg.append(item["jpeg"])
        names.append(item["name"])
        for params in item["params"]:
            labels.append(item["label"])
            owner.append(len(sizes) - 1)
            geometry.append(params["geometry"])
            erase.append(params["erase"])
            seeds.append(params["seed"])
            slots.append(params["slots"])
    num_slots = max((len(s) for s in slots), default=0)
    op_ids = np.full((len(labels), num_slots), -1, np.int64)
    op_args = np.zeros((len(labels), num_slots), np.float64)
    for row, sample_slots in enumerate(slots):
        for column, (op, argument) in enumerate(sample_slots):
            op_ids[row, column], op_args[row, column] = op, argument
    flat = np.concatenate(chunks) if chunks else np.zeros(0, np.uint8)
    return {"bytes": torch.from_numpy(flat), "sizes": torch.tensor(sizes, dtype=torch.int64),
            "shapes": torch.tensor(np.array(shapes, np.int64).reshape(-1, 2)),
            "jpeg": torch.tensor(jpeg, dtype=torch.bool), "label": torch.tensor(labels, dtype=torch.int64),
            "owner": torch.tensor(owner, dtype=torch.int64),
            "geometry": torch.tensor(np.array(geometry, np.int64).reshape(-1, len(GEOMETRY))),
            "erase": torch.tensor(np.array(erase, np.int64).reshape(-1, len(ERASE))),
            "seed": torch.tensor(seeds, dtype=torch.int64), "op_ids": torch.from_numpy(op_ids),
            "op_args": torch.from_numpy(op_args), "names": names, "bad": bad}


def _first(batch: list[dict]) -> dict:
    """collate_fn: the sampler hands each worker one whole host batch, already packed."""
    return batch[0] if isinstance(batch, list) else batch


class _WholeBatches:
    """batch_sampler that hands a worker a host batch's groups as one item, so the worker packs the whole batch."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self) -> Iterator[list]:
        for groups in self.batches:
            yield [groups]


def _shard_item(sample: dict, spec: AugSpec, seeds: tuple[int, ...] | None, skips: data.SkipLog) -> dict | None:
    """A webdataset sample ({"jpg": bytes, "cls": b"3", ...}) as `_read_item`'s dict; None (logged) if unreadable."""
    name = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
    try:
        key = next(k for k in data.SHARD_IMAGE_KEYS if k in sample)
        payload, is_jpeg, height, width = _payload_from_bytes(sample[key])
        label = int(sample["cls"])
    except Exception as e:  # no image, not an image, no or bad label
        message = re.sub(r"<_io.BytesIO object at 0x[0-9a-f]+>", "its bytes", str(e))
        skips.add(f"{name} ({type(e).__name__}: {message})")
        return None
    skips.in_a_row = 0
    params = [sample_params(spec, seed, height, width) for seed in (seeds if seeds is not None else (None,))]
    return {"payload": payload, "jpeg": is_jpeg, "label": label, "name": name, "params": params}


class _ShardByteStream(IterableDataset):
    """`common.data`'s shard train stream reading bytes: endless packed batches of `local_batch` copies from shards
    drawn with replacement (so no host waits for another at an epoch's end). A repeat group that does not fit
    continues in the next batch."""

    def __init__(self, urls: list[str], spec: AugSpec, *, local_batch: int, repeats: int, seed: int,
                 shuffle_buffer: int):
        self.urls, self.spec, self.local_batch, self.repeats = urls, spec, local_batch, repeats
        self.seed, self.shuffle_buffer = seed, shuffle_buffer

    def __iter__(self) -> Iterator[dict]:
        import webdataset as wds

        worker, _ = data.worker_slot()
        rng = random.Random(int(np.random.SeedSequence([self.seed, worker]).generate_state(1)[0]))
        skips = data.SkipLog()
        shards = (dict(url=rng.choice(self.urls)) for _ in itertools.count())
        samples = wds.tarfile_samples(shards, handler=skips)
        samples = wds.shuffle(self.shuffle_buffer, min(self.shuffle_buffer, 100), rng=rng)(samples)
        pending: list[dict] = []
        for sample in samples:
            item = _shard_item(sample, self.spec, tuple(rng.getrandbits(31) for _ in range(self.repeats)), skips)
            if item is not None:
                pending.append(item)
            while sum(len(i["params"]) for i in pending) >= self.local_batch:
                batch, room = [], self.local_batch
                while room:
                    item = pending.pop(0)
                    if len(item["params"]) > room:  # split the repeat group: the rest opens the next batch
                        pending.insert(0, dict(item, params=item["params"][room:]))
                        item = dict(item, params=item["params"][:room])
                    batch.append(item)
                    room -= len(item["params"])
                yield _pack(batch, skips.take())


def _shard_eval_host_batches(data_source: str, spec: AugSpec, *, local_batch: int, process_index: int,
                             process_count: int) -> Iterator[dict]:
    """Packed val batches from the shards listed in info.json, read in this process (bytes only: cheap): process
    h reads shards h, h + P, ... in order; info.json's shard sizes tell every process how many batches the busiest
    one needs, and the others pad up to that count (as `common.data`)."""
    import webdataset as wds

    val = data.shard_info(data_source).get("val")
    if val is None:
        return
    urls = data.expand_shards(data.join_url(data_source, val["pattern"]))
    sizes = val.get("shard_sizes")
    if sizes is None or len(sizes) != len(urls):
        raise UserError(f"{data.join_url(data_source, 'info.json')}: val needs shard_sizes, one per shard")
    num_batches = max(math.ceil(sum(sizes[h::process_count]) / local_batch) for h in range(process_count))
    skips = data.SkipLog()
    items: list[dict | None] = []
    emitted = 0
    samples = wds.tarfile_samples((dict(url=u) for u in urls[process_index::process_count]), handler=skips)
    for sample in samples:
        items.append(_shard_item(sample, spec, None, skips))  # an unreadable sample: a padding slot
        if len(items) == local_batch:
            if emitted == num_batches:
                raise UserError(f"val shards of {data_source} hold more images than info.json's shard_sizes say")
            yield _pack(items, skips.take())
            items, emitted = [], emitted + 1
    for _ in range(emitted, num_batches):  # the last partial batch, then padding batches
        yield _pack(items + [None] * (local_batch - len(items)), skips.take())
        items = []


# ----------------------------------------------------------------------------------------------
# Device: decode
# ----------------------------------------------------------------------------------------------


def _pil_decode(encoded: torch.Tensor) -> torch.Tensor:
    """CPU fallback: PIL decode of one encoded image -> uint8 (3, H, W)."""
    with Image.open(io.BytesIO(encoded.numpy().tobytes())) as img:
        return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).contiguous()


def _decode_jpegs(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """decode_jpeg on `device` (one batched nvJPEG call on CUDA; one call per image on CPU); an image it cannot
    decode goes to PIL, and one PIL cannot decode either comes back None."""
    from torchvision.io import ImageReadMode, decode_jpeg

    # torchvision 0.29 deprecates its decoders for TorchCodec's (not yet a dependency); the warning is per call.
    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                            category=DeprecationWarning)
    decoded: list[torch.Tensor | None] = [None] * len(encoded)
    if device.type == "cuda" and encoded:
        try:
            decoded = list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:  # one bad image fails the batched call: decode one by one
            pass
    for i, data_bytes in enumerate(encoded):
        if decoded[i] is not None:
            continue
        try:
            decoded[i] = decode_jpeg(data_bytes, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            try:
                decoded[i] = _pil_decode(data_bytes).to(device)
            except Exception:
                decoded[i] = None
    return decoded


def _decode_payloads(batch: dict, device: torch.device) -> list[torch.Tensor | None]:
    """The host batch's payloads as uint8 (3, H, W) images on `device` (None: undecodable)."""
    offsets = [0] + torch.cumsum(batch["sizes"], 0).tolist()
    payloads = [batch["bytes"][offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
    is_jpeg = batch["jpeg"].tolist()
    jpeg_positions = [i for i, flag in enumerate(is_jpeg) if flag]
    images: list[torch.Tensor | None] = [None] * len(payloads)
    for i, image in zip(jpeg_positions, _decode_jpegs([payloads[i] for i in jpeg_positions], device)):
        images[i] = image
    for i, flag in enumerate(is_jpeg):
        if not flag:
            height, width = batch["shapes"][i].tolist()
            images[i] = payloads[i].view(height, width, 3).permute(2, 0, 1).to(device, non_blocking=True)
    return images


# ----------------------------------------------------------------------------------------------
# Device: crop, resize, flip
# ----------------------------------------------------------------------------------------------


def _round_uint8(x: torch.Tensor) -> torch.Tensor:
    """A resampled value as PIL stores it: floor(x + 0.5) clipped to [0, 255] (kept in float)."""
    return torch.floor(x + 0.5).clamp(0.0, 255.0)


def _resize(image: torch.Tensor, height: int, width: int, interpolation: str) -> torch.Tensor:
    """uint8 (3, h, w) -> float (3, height, width) of whole numbers: torch's antialiased resize, PIL's algorithm
    (the filter stretched by the downscale factor). On CPU it runs on uint8 (a port of Pillow-SIMD's, equal to
    PIL's up to +-1 in a few pixels); the CUDA kernel takes floats and skips PIL's rounding between the passes."""
    if image.shape[1:] == (height, width):
        return image.float()
    if image.device.type == "cpu":
        return F.interpolate(image[None], size=(height, width), mode=interpolation, antialias=True)[0].float()
    resized = F.interpolate(image[None].float(), size=(height, width), mode=interpolation, antialias=True)
    return _round_uint8(resized[0])


def crop_resize_flip(images: Sequence[torch.Tensor], owner: torch.Tensor, geometry: torch.Tensor, size: int,
                     interpolation: str) -> torch.Tensor:
    """Each copy b: crop images[owner[b]] to its box (y0, h, x0, w), resize to (out_h, out_w), take `size` rows
    and columns from (row0, col0) (reflecting past the edges: DeiT-III's padded crop) and flip -> float
    (n, 3, size, size) holding whole numbers 0..255. As torchvision on PIL: resized_crop (the filter does not
    reach outside the crop), Resize + CenterCrop / RandomCrop(padding=4, 'reflect'), RandomHorizontalFlip."""
    outputs = []
    for b, (y0, h, x0, w, out_h, out_w, row0, col0, flip) in enumerate(geometry.tolist()):
        resized = _resize(images[int(owner[b])][:, y0:y0 + h, x0:x0 + w], out_h, out_w, interpolation)
        pad = max(0, -row0, -col0, row0 + size - out_h, col0 + size - out_w)
        if pad:
            resized = F.pad(resized[None], (pad, pad, pad, pad), mode="reflect")[0]
        crop = resized[:, row0 + pad:row0 + pad + size, col0 + pad:col0 + pad + size]
        outputs.append(crop.flip(-1) if flip else crop)
    return torch.stack(outputs)


# ----------------------------------------------------------------------------------------------
# Device: colour and geometric ops on float (n, 3, H, W) batches of whole numbers 0..255 (PIL's semantics)
# ----------------------------------------------------------------------------------------------


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """PIL convert('L'): ITU-R 601-2 luma in PIL's fixed point, (n, 1, H, W)."""
    red, green, blue = x.unbind(1)
    return torch.floor((red * 19595 + green * 38470 + blue * 7471 + 32768) / 65536)[:, None]


def blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL Image.blend(degenerate, x, factor) (every ImageEnhance op): truncated to 8 bits, clipped."""
    return torch.floor(degenerate + _per_sample(factor) * (x - degenerate)).clamp(0.0, 255.0)


def brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(torch.zeros_like(x), x, factor)


def contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance.Contrast: blend with the image's mean grey level, int(mean + 0.5)."""
    mean = torch.floor(grayscale(x).mean(dim=(1, 2, 3), keepdim=True) + 0.5)
    return blend(mean.expand_as(x), x, factor)


def color(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance.Color (saturation; factor 0 = grayscale)."""
    return blend(grayscale(x).expand_as(x), x, factor)


def sharpness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance.Sharpness: blend with ImageFilter.SMOOTH (3x3 [1 1 1; 1 5 1; 1 1 1] / 13), whose border
    pixels are the image's own."""
    kernel = torch.ones(3, 3, device=x.device)
    kernel[1, 1] = 5.0
    kernel = (kernel / 13.0).expand(3, 1, 3, 3)
    smooth = torch.floor(F.conv2d(x, kernel, groups=3) + 0.5).clamp(0.0, 255.0)
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth
    return blend(degenerate, x, factor)


def invert(x: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    return 255.0 - x


def posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the top `bits` bits; 0 bits is black (as `common.augment._posterize`), 8 keeps the image."""
    step = torch.pow(2.0, 8.0 - bits.clamp(0.0, 8.0))
    return _per_sample(bits > 0) * torch.floor(x / _per_sample(step)) * _per_sample(step)


def solarize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """PIL ImageOps.solarize: values >= threshold are inverted (threshold 256: nothing)."""
    return torch.where(x >= _per_sample(threshold), 255.0 - x, x)


def solarize_add(x: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    """timm solarize_add: values below 128 get `add` more, clipped at 255."""
    return torch.where(x < 128.0, (x + _per_sample(add)).clamp(max=255.0), x)


def autocontrast(x: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    """PIL ImageOps.autocontrast (cutoff 0), per channel: stretch [min, max] to [0, 255], truncated."""
    low = x.amin(dim=(2, 3), keepdim=True)
    high = x.amax(dim=(2, 3), keepdim=True)
    scale = 255.0 / (high - low).clamp(min=1.0)
    stretched = torch.floor(x * scale - low * scale).clamp(0.0, 255.0)
    return torch.where(high > low, stretched, x)


def equalize(x: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    """PIL ImageOps.equalize per channel: lut[i] = (step // 2 + #pixels below i) // step, step = (#pixels - #pixels
    at the top value) // 255; a channel with one value (or step 0) is kept."""
    n, channels, height, width = x.shape
    levels = x.long().view(n * channels, -1)
    histogram = torch.zeros(n * channels, 256, device=x.device).scatter_add_(
        1, levels, torch.ones_like(levels, dtype=torch.float32))
    top_value = torch.where(histogram > 0, torch.arange(256, device=x.device), -1).amax(1, keepdim=True)
    top_count = histogram.gather(1, top_value)
    step = torch.floor((height * width - top_count) / 255.0)
    below = torch.cumsum(histogram, 1) - histogram
    lut = torch.floor((torch.floor(step / 2) + below) / step.clamp(min=1.0))
    keep = (step == 0) | ((histogram > 0).sum(1, keepdim=True) <= 1)
    lut = torch.where(keep, torch.arange(256, device=x.device, dtype=torch.float32).expand_as(lut), lut)
    return lut.clamp(0.0, 255.0).gather(1, levels).view(n, channels, height, width)


def affine(x: torch.Tensor, coefficients: torch.Tensor, interpolation: str) -> torch.Tensor:
    """PIL Image.transform(AFFINE, (a, b, c, d, e, f), fillcolor=timm's mean): output pixel centre (x, y) samples
    the input at (a x + b y + c, d x + e y + f); outside the input the fill colour. grid_sample's bicubic uses
    a = -0.75 where PIL uses -0.5 (a difference of a few grey levels on edges)."""
    n, _, height, width = x.shape
    ys, xs = torch.meshgrid(torch.arange(height, device=x.device, dtype=torch.float32) + 0.5,
                            torch.arange(width, device=x.device, dtype=torch.float32) + 0.5, indexing="ij")
    a, b, c, d, e, f = (coefficients[:, i].float().view(-1, 1, 1) for i in range(6))
    x_in = a * xs + b * ys + c
    y_in = d * xs + e * ys + f
    grid = torch.stack([2.0 * x_in / width - 1.0, 2.0 * y_in / height - 1.0], dim=-1)
    sampled = F.grid_sample(x, grid, mode=interpolation, padding_mode="border", align_corners=False)
    inside = ((x_in >= 0) & (x_in < width) & (y_in >= 0) & (y_in < height))[:, None]
    fill = torch.tensor(FILL, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return torch.where(inside, _round_uint8(sampled), fill)


def _affine_coefficients(op: str, argument: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(n, 6) PIL affine coefficients of timm's rotate / shear_x / shear_y / translate_x_rel / translate_y_rel."""
    ones, zeros = torch.ones_like(argument), torch.zeros_like(argument)
    if op == "rotate":  # PIL Image.rotate(degrees) about the centre (w / 2, h / 2)
        angle = -torch.deg2rad(argument)
        cos, sin = torch.cos(angle), torch.sin(angle)
        center_x, center_y = width / 2.0, height / 2.0
        c = cos * -center_x + sin * -center_y + center_x
        f = -sin * -center_x + cos * -center_y + center_y
        return torch.stack([cos, sin, c, -sin, cos, f], 1)
    if op == "shear_x":
        return torch.stack([ones, argument, zeros, zeros, ones, zeros], 1)
    if op == "shear_y":
        return torch.stack([ones, zeros, zeros, argument, ones, zeros], 1)
    if op == "translate_x":
        return torch.stack([ones, zeros, argument * width, zeros, ones, zeros], 1)
    return torch.stack([ones, zeros, zeros, zeros, ones, argument * height], 1)  # translate_y


def gaussian_blur(x: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """PIL ImageFilter.GaussianBlur(radius), as a true Gaussian of sigma = radius (PIL runs three box blurs),
    edges extended; per-sample kernels of 13 taps (radius <= 2)."""
    n, channels, height, width = x.shape
    taps = torch.arange(-6, 7, device=x.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps[None] / radius.float().clamp(min=1e-3)[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(channels, 0)  # (n * 3, 13)
    flat = x.reshape(1, n * channels, height, width)
    flat = F.conv2d(F.pad(flat, (6, 6, 0, 0), mode="replicate"), kernel[:, None, None, :], groups=n * channels)
    flat = F.conv2d(F.pad(flat, (0, 0, 6, 6), mode="replicate"), kernel[:, None, :, None], groups=n * channels)
    return _round_uint8(flat.view(n, channels, height, width))


def apply_op(name: str, x: torch.Tensor, argument: torch.Tensor, interpolation: str) -> torch.Tensor:
    """One device op on the samples that drew it (`argument`: per sample, as `_op_slots` drew it)."""
    if name in ("rotate", "shear_x", "shear_y", "translate_x", "translate_y"):
        return affine(x, _affine_coefficients(name, argument, x.shape[2], x.shape[3]), interpolation)
    return {"autocontrast": autocontrast, "equalize": equalize, "invert": invert, "posterize": posterize,
            "solarize": solarize, "solarize_add": solarize_add, "color": color, "contrast": contrast,
            "brightness": brightness, "sharpness": sharpness, "gaussian_blur": gaussian_blur}[name](x, argument)


def run_op_slots(x: torch.Tensor, op_ids: torch.Tensor, op_args: torch.Tensor, interpolation: str) -> torch.Tensor:
    """Slot by slot, each op on the subset of the batch that drew it (op ids and arguments are host tensors).
    Works in place on `x`."""
    for slot in range(op_ids.shape[1]):
        for op in torch.unique(op_ids[:, slot]).tolist():
            if op < 0:
                continue
            chosen = torch.nonzero(op_ids[:, slot] == op).flatten()
            argument = op_args[chosen, slot].to(x.device, torch.float32)
            chosen = chosen.to(x.device)
            x.index_copy_(0, chosen, apply_op(DEVICE_OPS[op], x.index_select(0, chosen), argument, interpolation))
    return x


def random_erasing(x: torch.Tensor, boxes: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """timm RandomErasing(mode='pixel') on normalised (n, 3, H, W) images: box b filled with N(0, 1) noise from a
    generator seeded by the copy's seed (its box was drawn on the host)."""
    x = x.clone()
    for b, (erase, top, left, height, width) in enumerate(boxes.tolist()):
        if erase:
            generator = torch.Generator(x.device).manual_seed(int(seeds[b]) + 1)
            x[b, :, top:top + height, left:left + width] = torch.randn(
                (x.shape[1], height, width), generator=generator, device=x.device, dtype=x.dtype)
    return x


# ----------------------------------------------------------------------------------------------
# Device: a host batch -> the batch the recipe trains on
# ----------------------------------------------------------------------------------------------


def _replace_undecodable(batch: dict, images: list[torch.Tensor | None], spec: AugSpec, train: bool) -> list[str]:
    """Copies whose image could not be decoded: in training they take the next decodable image of the batch
    (their own seeds, params drawn again for its size), in evaluation they become padding (label -1)."""
    failed = [i for i, image in enumerate(images) if image is None]
    if not failed:
        return []
    good = [i for i, image in enumerate(images) if image is not None]
    if train and not good:
        raise RuntimeError(f"no image of a batch could be decoded, e.g. {batch['names'][failed[0]]}")
    for i in failed:
        copies = torch.nonzero(batch["owner"] == i).flatten().tolist()
        if not train:
            batch["owner"][copies] = -1
            batch["label"][copies] = -1
            continue
        source = next((j for j in good if j > i), good[0])
        images[i] = images[source]
        height, width = images[source].shape[1:]
        for copy in copies:
            params = sample_params(spec, int(batch["seed"][copy]), height, width)
            batch["geometry"][copy] = torch.tensor(params["geometry"])
            batch["erase"][copy] = torch.tensor(params["erase"])
            for slot, (op, argument) in enumerate(params["slots"]):
                batch["op_ids"][copy, slot], batch["op_args"][copy, slot] = op, argument
            batch["label"][copy] = batch["label"][batch["owner"] == source][0]
    return [f"{batch['names'][i]} (decode failed on the device and in PIL)" for i in failed]


def _exact_float32() -> contextlib.AbstractContextManager:
    """cuDNN convolutions (sharpness, blur) in full float32 and deterministic while augmenting: recipes switch TF32
    on for the model, and its 10-bit mantissa would move pixels that are rounded to 8 bits after every op."""
    try:
        return torch.backends.cudnn.flags(enabled=True, deterministic=True, fp32_precision="ieee")
    except TypeError:  # torch < 2.9
        return torch.backends.cudnn.flags(enabled=True, deterministic=True, allow_tf32=False)


@functools.cache
def normalisation_constants(device: torch.device, mean: tuple[float, ...],
                            std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """mean and std in 0-255 units as (1, C, 1, 1) float32 tensors on `device`, made once (not a host copy every
    batch); `common.torch_run.images_to_device` normalises the PIL loader's batches with them too."""
    return (torch.tensor(mean, device=device, dtype=torch.float32).view(1, -1, 1, 1) * 255.0,
            torch.tensor(std, device=device, dtype=torch.float32).view(1, -1, 1, 1) * 255.0)


def augment_batch(batch: dict, spec: AugSpec, device: torch.device, *, train: bool,
                  normalize: tuple[Sequence[float], Sequence[float]] | None = None) -> dict:
    """One host batch (`_pack`) -> {"image", "label" (int64), "skipped"} on `device`.

    image: uint8 (n, size, size, 3) as `common.data` yields (normalize None), or float32 (n, 3, size, size)
    normalised with (mean, std) in 0-1 units as `common.torch_run.images_to_device`, random erasing applied.
    """
    images = _decode_payloads(batch, device)
    bad = list(batch["bad"]) + _replace_undecodable(batch, images, spec, train)
    data.name_unreadable(bad)
    size, count = spec.image_size, len(batch["label"])
    real = torch.nonzero(batch["owner"] >= 0).flatten()
    x = torch.zeros((count, 3, size, size), device=device)
    if len(real):
        crops = crop_resize_flip(images, batch["owner"][real], batch["geometry"][real], size, spec.interpolation)
        with _exact_float32():
            crops = run_op_slots(crops, batch["op_ids"][real], batch["op_args"][real], spec.interpolation)
        x = x.index_copy(0, real.to(device), crops) if len(real) < count else crops
    labels = batch["label"].to(device, non_blocking=True)
    if normalize is None:
        if spec.random_erasing > 0 and train:
            raise UserError("random erasing runs on normalised images: pass normalize=(mean, std)")
        return {"image": x.to(torch.uint8).permute(0, 2, 3, 1).contiguous(), "label": labels, "skipped": len(bad)}
    mean, std = normalisation_constants(device, tuple(normalize[0]), tuple(normalize[1]))
    x = (x - mean) / std
    if train and spec.random_erasing > 0:
        x = random_erasing(x, batch["erase"], batch["seed"])
    return {"image": x, "label": labels, "skipped": len(bad)}


def _device_batches(loader: DataLoader, spec: AugSpec, device: torch.device, train: bool,
                    normalize: tuple[Sequence[float], Sequence[float]] | None) -> Iterator[dict]:
    with warnings.catch_warnings():
        # Forked workers read files and run NumPy only; JAX's warning about forking a threaded process does not apply.
        warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
        host_batches = iter(loader)
    for batch in host_batches:
        yield augment_batch(batch, spec, device, train=train, normalize=normalize)


# ----------------------------------------------------------------------------------------------
# Public loaders (arguments are checked when called; batches are made when iterated)
# ----------------------------------------------------------------------------------------------


def loader_choice(flag: str, device: torch.device | str) -> str:
    """--loader auto|gpu|pil -> 'gpu' or 'pil'. auto: the GPU pipeline on a CUDA device, PIL elsewhere (on CPU the
    device pipeline works, and is what the tests run, but the PIL loader's workers are the faster choice there)."""
    if flag not in ("auto", "gpu", "pil"):
        raise UserError(f"--loader must be auto, gpu or pil, got {flag!r}")
    if flag == "auto":
        return "gpu" if torch.device(device).type == "cuda" else "pil"
    return flag


def loader_for(flag: str, device: torch.device | str, augmentation: Mapping[str, Any] | Callable) -> str:
    """The loader a run uses: `loader_choice`, and 'gpu' only for an augmentation this module has (`augmentation`:
    the keyword arguments of `AugSpec`, or a recipe's own PIL transform, which only the host runs). With --loader
    auto an augmentation it lacks goes to the host loader; asked for with --loader gpu, it is a UserError."""
    choice = loader_choice(flag, device)
    if choice != "gpu":
        return choice
    try:
        if not isinstance(augmentation, Mapping):
            raise UserError("the recipe's augmentation here is a PIL transform, which only the host runs")
        AugSpec(**augmentation)
    except UserError as e:
        if flag == "auto":
            return "pil"
        raise UserError(f"--loader gpu: {e}; use --loader pil") from None
    return choice


def _source(data_source: str) -> str:
    kind = data.source_kind(data_source)
    if kind == "synthetic":
        raise UserError("synthetic batches are made on the device by the recipe, not by the data loader")
    return kind


def train_batches(data_source: str, spec: AugSpec, *, global_batch: int, seed: int, start_step: int = 0,
                  workers: int, device: torch.device | str, process_index: int = 0, process_count: int = 1,
                  repeats: int = 1, normalize: tuple[Sequence[float], Sequence[float]] | None = None,
                  shuffle_buffer: int = 2000) -> Iterator[dict]:
    """Endless per-process training batches {"image", "label", "skipped"} on `device`, from global step `start_step`.

    The same samples and per-sample seeds as `common.data.train_batches` (batch k depends on (seed, k) only;
    process h of `process_count` gets the h-th slice of the global batch; repeats: each image read and decoded
    once, augmented `repeats` times). Workers (loader processes, 0: this process) only read bytes and draw params.
    image: uint8 NHWC, or normalised float NCHW with `normalize=(mean, std)` (needed for random erasing).
    Webdataset shards stream as in `common.data` (resampled shards, `shuffle_buffer` samples per worker; a resumed
    run reshuffles), their workers reading bytes only.
    """
    data.check_batch(global_batch, process_count)
    if repeats < 1:
        raise UserError(f"repeats must be >= 1, got {repeats}")
    if spec.random_erasing > 0 and normalize is None:
        raise UserError("random erasing runs on normalised images: pass normalize=(mean, std)")
    kind = _source(data_source)
    if kind in ("shards", "raw_shards"):
        # As common.data: shards resume at the right step with a fresh shuffle seeded by (seed, start_step, process).
        urls = data.train_shard_urls(data_source, kind)
        process_urls = urls[process_index::process_count] if len(urls) >= process_count else urls
        process_seed = int(np.random.SeedSequence([seed, start_step, process_index]).generate_state(1)[0])
        stream = _ShardByteStream(process_urls, spec, local_batch=global_batch // process_count, repeats=repeats,
                                  seed=process_seed, shuffle_buffer=shuffle_buffer)
        loader = DataLoader(stream, batch_size=None, num_workers=workers)
        return _device_batches(loader, spec, torch.device(device), True, normalize)
    train, _, _ = data.splits(kind, data_source)
    sampler = data.TrainBatchSampler(len(train), global_batch=global_batch, seed=seed, repeats=repeats,
                                      start_step=start_step, process_index=process_index,
                                      process_count=process_count)
    loader = DataLoader(_ByteReader(train, spec, skip_bad=True), batch_sampler=_WholeBatches(sampler),
                        num_workers=workers, collate_fn=_first)
    return _device_batches(loader, spec, torch.device(device), True, normalize)


def eval_batches(data_source: str, spec: AugSpec, *, global_batch: int, workers: int, device: torch.device | str,
                 process_index: int = 0, process_count: int = 1,
                 normalize: tuple[Sequence[float], Sequence[float]] | None = None) -> Iterator[dict]:
    """Per-process batches covering the val split once (resize the shorter side to image_size / crop_ratio, centre
    crop), as `common.data.eval_batches`: slots past the end and unreadable images hold zeros with label -1.
    Val shards are read in this process (bytes only); sources without a val split yield no batches."""
    local_batch = data.check_batch(global_batch, process_count)
    kind = _source(data_source)
    if kind == "raw_shards":
        return iter(())
    if kind == "shards":
        host_batches = _shard_eval_host_batches(data_source, spec, local_batch=local_batch,
                                                process_index=process_index, process_count=process_count)
        return (augment_batch(batch, spec, torch.device(device), train=False, normalize=normalize)
                for batch in host_batches)
    _, val, _ = data.splits(kind, data_source)
    if val is None:
        return iter(())
    offset = process_index * local_batch
    batches = [[(p if p < len(val) else -1, None) for p in range(start + offset, start + offset + local_batch)]
               for start in range(0, len(val), global_batch)]
    loader = DataLoader(_ByteReader(val, spec, skip_bad=False), batch_sampler=_WholeBatches(batches),
                        num_workers=workers, collate_fn=_first)
    return _device_batches(loader, spec, torch.device(device), False, normalize)


def to_jax(tensor: torch.Tensor):
    """A torch tensor as a jax.Array without a copy (DLPack; on the tensor's device). JAX is imported here only."""
    import jax.numpy as jnp

    return jnp.from_dlpack(tensor.contiguous())


def benchmark_input(data_source: str, spec: AugSpec, *, global_batch: int, workers: int, steps: int,
                    device: torch.device | str, seed: int = 0, repeats: int = 1, warmup: int = 3,
                    process_index: int = 0, process_count: int = 1, **report: Any) -> dict:
    """Time this pipeline alone (`train_batches`, no model) with the PIL loader's clock (`common.data.time_input`):
    one JSON line with "loader": "gpu" and img_per_sec last. The device is synchronised before each clock."""
    device = torch.device(device)
    return data.time_input(
        lambda: train_batches(data_source, spec, global_batch=global_batch, seed=seed, repeats=repeats,
                              workers=workers, device=device, process_index=process_index,
                              process_count=process_count),
        dict(report, data=data_source, batch_size=global_batch, workers=workers, repeats=repeats, loader="gpu",
             device=str(device)),
        steps=steps, warmup=warmup, process_index=process_index, process_count=process_count,
        sync=torch.cuda.synchronize if device.type == "cuda" else (lambda: None))


# ----------------------------------------------------------------------------------------------
# Either loader: what a recipe calls, whichever --loader resolved to (`loader_for`)
# ----------------------------------------------------------------------------------------------


def host_transform(augmentation: Mapping[str, Any] | Callable) -> Callable:
    """The PIL transform of an augmentation description (`AugSpec`'s keyword arguments, as `common.augment` takes
    them); a recipe's own PIL transform, for an augmentation only the host runs, passes through."""
    return augment.train_transform(**augmentation) if isinstance(augmentation, Mapping) else augmentation


def _spec(augmentation: Mapping[str, Any] | Callable) -> AugSpec:
    if not isinstance(augmentation, Mapping):  # `loader_for` sends these to the host loader, or refuses them
        raise UserError("--loader gpu cannot run the recipe's PIL transform: use --loader pil")
    return AugSpec(**augmentation)


def loader_train_batches(loader: str, data_source: str, augmentation: Mapping[str, Any] | Callable, *,
                         global_batch: int, seed: int, start_step: int, workers: int, device: torch.device | str,
                         process_index: int = 0, process_count: int = 1, repeats: int = 1,
                         normalize: tuple[Sequence[float], Sequence[float]] | None = None,
                         pin_memory: bool = False) -> Iterator[dict]:
    """This process's training batches from `loader`, one augmentation description for both: 'gpu' decodes and
    augments on `device` (`train_batches`; normalised with `normalize`), 'pil' in host workers (`common.data`:
    uint8 numpy batches, page-locked with `pin_memory`)."""
    if loader == "gpu":
        return train_batches(data_source, _spec(augmentation), global_batch=global_batch, seed=seed,
                             start_step=start_step, workers=workers, device=device, process_index=process_index,
                             process_count=process_count, repeats=repeats, normalize=normalize)
    return data.train_batches(data_source, host_transform(augmentation), global_batch=global_batch, seed=seed,
                              repeats=repeats, start_step=start_step, workers=workers, process_index=process_index,
                              process_count=process_count, pin_memory=pin_memory)


def loader_eval_batches(loader: str, data_source: str, *, image_size: int, crop_ratio: float, interpolation: str,
                        global_batch: int, workers: int, device: torch.device | str, process_index: int = 0,
                        process_count: int = 1, normalize: tuple[Sequence[float], Sequence[float]] | None = None,
                        pin_memory: bool = False) -> Iterator[dict]:
    """The val split once from `loader` (resize the shorter side to image_size / crop_ratio, centre crop), as
    `loader_train_batches` delivers training batches."""
    if loader == "gpu":
        spec = AugSpec(image_size, crop_ratio=crop_ratio, interpolation=interpolation)
        return eval_batches(data_source, spec, global_batch=global_batch, workers=workers, device=device,
                            process_index=process_index, process_count=process_count, normalize=normalize)
    transform = augment.eval_transform(image_size, crop_ratio=crop_ratio, interpolation=interpolation)
    return data.eval_batches(data_source, transform, global_batch=global_batch, workers=workers,
                             process_index=process_index, process_count=process_count, pin_memory=pin_memory)


def loader_benchmark_input(loader: str, data_source: str, augmentation: Mapping[str, Any] | Callable, *,
                           global_batch: int, workers: int, steps: int, seed: int, device: torch.device | str,
                           repeats: int = 1, process_index: int = 0, process_count: int = 1, **report: Any) -> dict:
    """--benchmark-input for `loader`: the input pipeline alone, one JSON line, img_per_sec last."""
    process = dict(process_index=process_index, process_count=process_count)
    if loader == "gpu":
        return benchmark_input(data_source, _spec(augmentation), global_batch=global_batch, workers=workers,
                               steps=steps, device=device, seed=seed, repeats=repeats, **process, **report)
    return data.benchmark_input(data_source, host_transform(augmentation), global_batch=global_batch,
                                workers=workers, steps=steps, seed=seed, repeats=repeats, **process, **report)

"""Host-side augmentation: PIL transforms built from timm, for the data loader workers of every recipe.

Crop, flip, RandAugment / 3-Augment, color jitter. Every transform ends in `ToUint8HWC`: the batch crosses to the
accelerator as uint8 (4x fewer bytes than float32) and is normalised there (`common.jax_augment` for the JAX
recipes, `common.torch_run.images_to_device` for the PyTorch ones). Transforms draw from python `random`, numpy
and torch's global RNGs, as timm's do; `common.data` seeds all three per sample so that a batch is a function of
(seed, step). Nothing here imports JAX.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps
from timm.data import auto_augment as _timm_auto_augment
from timm.data import create_transform
from timm.data.transforms import str_to_interp_mode
from torchvision import transforms

from common import UserError

RANDOM_CROPS = ("rrc", "src", "none")


def _posterize(img: Image.Image, bits_to_keep: int, **__) -> Image.Image:
    """timm's posterize op, also for 0 bits: RandAugment 'inc1' (DeiT, MAE) keeps 4 - int(0.4 * magnitude) bits,
    0 at magnitude 10. Pillow < 12 turned that into a black image (every bit masked off); Pillow 12+ raises."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _use_zero_bit_posterize() -> None:
    """Point timm's posterize ops at `_posterize` (once a RandAugment transform is built, not on import)."""
    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        _timm_auto_augment.NAME_TO_OP[name] = _posterize

# ----------------------------------------------------------------------------------------------
# Host side: PIL image -> uint8 HWC array
# ----------------------------------------------------------------------------------------------


class ToUint8HWC:
    """Final host transform: PIL image -> uint8 (H, W, 3) array. No ToTensor/Normalize: that runs on the device."""

    def __call__(self, img: Image.Image) -> np.ndarray:
        if img.mode != "RGB":
            img = img.convert("RGB")
        return np.array(img, dtype=np.uint8)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SimpleRandomCrop:
    """DeiT-III's simple random crop (`--src`; paper §3 "Data-augmentation"; used on ImageNet-21k): resize the
    shorter side to `size`, then a random `size` crop of the image padded by 4 pixels with reflection. Not in timm."""

    def __init__(self, size: int, padding: int = 4, interpolation: str = "bicubic"):
        self.resize = transforms.Resize(size, interpolation=str_to_interp_mode(interpolation))
        self.crop = transforms.RandomCrop(size, padding=padding, padding_mode="reflect")

    def __call__(self, img: Image.Image) -> Image.Image:
        return self.crop(self.resize(img))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(resize={self.resize}, crop={self.crop})"


def train_transform(image_size: int, *, random_crop: str = "rrc", scale: tuple[float, float] = (0.08, 1.0),
                    hflip: float = 0.5, color_jitter: float = 0.0, auto_augment: str | None = None,
                    interpolation: str = "bicubic") -> Callable[[Image.Image], np.ndarray]:
    """Training transform: PIL image -> uint8 (image_size, image_size, 3) array.

    random_crop: 'rrc' (timm RandomResizedCrop with `scale`), 'src' (DeiT-III simple random crop) or
        'none' (resize the shorter side + center crop).
    auto_augment: a timm string, e.g. 'rand-m9-mstd0.5-inc1' (DeiT's RandAugment) or '3a' (DeiT-III's
        3-Augment: one of solarize / grayscale / gaussian blur). As in timm, any policy other than '3a'
        switches color jitter off.
    """
    if random_crop not in RANDOM_CROPS:
        raise UserError(f"unknown random crop {random_crop!r}; choose one of {', '.join(RANDOM_CROPS)}")
    if auto_augment:
        _use_zero_bit_posterize()
    # timm's factory gives (crop + flip, auto-augment + color jitter, to-tensor + normalize); keep the first two.
    primary, secondary, _ = create_transform(
        image_size, is_training=True, scale=scale, hflip=hflip, color_jitter=color_jitter or None,
        auto_augment=auto_augment, interpolation=interpolation, separate=True)
    crop_and_flip = list(primary.transforms)
    if random_crop != "rrc":
        interp = str_to_interp_mode(interpolation)
        crop = ([SimpleRandomCrop(image_size, interpolation=interpolation)] if random_crop == "src" else
                [transforms.Resize(image_size, interpolation=interp), transforms.CenterCrop(image_size)])
        crop_and_flip = crop + ([transforms.RandomHorizontalFlip(hflip)] if hflip > 0 else [])
    return transforms.Compose(crop_and_flip + list(secondary.transforms) + [ToUint8HWC()])


def eval_transform(image_size: int, crop_ratio: float = 0.875,
                   interpolation: str = "bicubic") -> Callable[[Image.Image], np.ndarray]:
    """Eval transform: resize the shorter side to int(image_size / crop_ratio), center crop -> uint8 HWC.

    crop_ratio 0.875 is DeiT's (resize 256, crop 224); DeiT-III evaluates with 1.0.
    """
    if not 0 < crop_ratio <= 1:
        raise UserError(f"crop ratio must be in (0, 1], got {crop_ratio}")
    resize = int(image_size / crop_ratio)
    return transforms.Compose([transforms.Resize(resize, interpolation=str_to_interp_mode(interpolation)),
                               transforms.CenterCrop(image_size), ToUint8HWC()])

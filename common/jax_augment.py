"""Device-side augmentation for the JAX recipes, inside the jitted train step (batch-first NHWC):

    normalize       uint8 -> float32 with the ImageNet mean/std
    mixup_cutmix    timm `Mixup(mode='batch')`: one lambda per batch, the partner is the batch flipped
    random_erasing  timm `RandomErasing(mode='pixel')` on normalised images, vectorised over the batch

The recipes call them as normalize -> mixup/cutmix -> random erasing. timm erases in the loader, before
mixup, so there a mixed image can hold a blend of two erased rectangles; erasing after mixing keeps the
rectangle pure N(0, 1) noise. Either way the rectangle is noise on normalised pixels, never near-black.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


def normalize(images: jax.Array, mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
              std: tuple[float, ...] = IMAGENET_DEFAULT_STD) -> jax.Array:
    """uint8 NHWC -> float32 (x - 255 mean) / (255 std); mean/std in 0-1 units as timm's constants."""
    mean = jnp.asarray(mean, jnp.float32) * 255.0
    std = jnp.asarray(std, jnp.float32) * 255.0
    return (images.astype(jnp.float32) - mean) / std


def random_erasing(key: jax.Array, images: jax.Array, prob: float, *, min_area: float = 0.02,
                   max_area: float = 1 / 3, min_aspect: float = 0.3, mode: str = "pixel") -> jax.Array:
    """timm `RandomErasing(prob, mode, max_count=1)` per sample, on normalised float NHWC images.

    With probability `prob` a sample gets one rectangle of area U(min_area, max_area) x H x W and aspect
    ratio exp(U(log min_aspect, -log min_aspect)); as timm, up to 10 (area, aspect) draws and the first
    that fits inside the image wins (none fits: nothing erased). mode 'pixel' fills with N(0, 1) per pixel
    (DeiT's setting), 'rand' with one N(0, 1) colour per sample, 'const' with 0.
    """
    if mode not in ("pixel", "rand", "const"):
        raise ValueError(f"random_erasing mode must be 'pixel', 'rand' or 'const', got {mode!r}")
    batch, height, width, channels = images.shape
    attempts = 10
    k_apply, k_area, k_aspect, k_top, k_left, k_fill = jax.random.split(key, 6)
    area = jax.random.uniform(k_area, (batch, attempts), minval=min_area, maxval=max_area) * (height * width)
    log_aspect = jax.random.uniform(k_aspect, (batch, attempts), minval=np.log(min_aspect),
                                    maxval=-np.log(min_aspect))
    aspect = jnp.exp(log_aspect)
    h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)  # round half to even, as python's round()
    w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    fits = (h < height) & (w < width)
    first = jnp.argmax(fits, axis=1)  # first attempt that fits (0 if none; masked out below)
    h = jnp.take_along_axis(h, first[:, None], axis=1)[:, 0]
    w = jnp.take_along_axis(w, first[:, None], axis=1)[:, 0]
    erase = (jax.random.uniform(k_apply, (batch,)) < prob) & fits.any(axis=1)
    # random.randint(0, H - h) is inclusive on both ends: floor(U * (H - h + 1)).
    top = jnp.floor(jax.random.uniform(k_top, (batch,)) * (height - h + 1)).astype(jnp.int32)
    left = jnp.floor(jax.random.uniform(k_left, (batch,)) * (width - w + 1)).astype(jnp.int32)
    rows = jnp.arange(height)[None, :]
    cols = jnp.arange(width)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + h)[:, None])  # (B, H)
    in_cols = (cols >= left[:, None]) & (cols < (left + w)[:, None])  # (B, W)
    mask = in_rows[:, :, None] & in_cols[:, None, :] & erase[:, None, None]  # (B, H, W)
    if mode == "pixel":
        fill = jax.random.normal(k_fill, images.shape, images.dtype)
    elif mode == "rand":
        fill = jnp.broadcast_to(jax.random.normal(k_fill, (batch, 1, 1, channels), images.dtype), images.shape)
    else:
        fill = jnp.zeros_like(images)
    return jnp.where(mask[..., None], fill, images)


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float = 0.0) -> jax.Array:
    """timm's smoothed one-hot: off = smoothing / C, on = 1 - smoothing + off."""
    off = smoothing / num_classes
    return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def cutmix_box(key: jax.Array, height: int, width: int, lam: jax.Array) -> tuple[jax.Array, ...]:
    """timm `rand_bbox`: a box of sides int(H sqrt(1-lam)) x int(W sqrt(1-lam)), centre uniform, clipped.

    Returns (y_low, y_high, x_low, x_high) as int32 scalars.
    """
    k_y, k_x = jax.random.split(key)
    center_y = jax.random.randint(k_y, (), 0, height)
    center_x = jax.random.randint(k_x, (), 0, width)
    return box_from_center(height, width, lam, center_y, center_x)


def box_from_center(height: int, width: int, lam: jax.Array, center_y: jax.Array,
                    center_x: jax.Array) -> tuple[jax.Array, ...]:
    """Deterministic part of `cutmix_box` (timm `rand_bbox` for a given centre)."""
    ratio = jnp.sqrt(1.0 - lam)
    cut_h = jnp.floor(height * ratio).astype(jnp.int32)
    cut_w = jnp.floor(width * ratio).astype(jnp.int32)
    y_low = jnp.clip(center_y - cut_h // 2, 0, height)
    y_high = jnp.clip(center_y + (cut_h + 1) // 2, 0, height)
    x_low = jnp.clip(center_x - cut_w // 2, 0, width)
    x_high = jnp.clip(center_x + (cut_w + 1) // 2, 0, width)
    return y_low, y_high, x_low, x_high


def mix_batch(images: jax.Array, labels: jax.Array, num_classes: int, lam: jax.Array, use_cutmix: jax.Array,
              box: tuple[jax.Array, ...], label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Deterministic core of `mixup_cutmix` (timm `Mixup._mix_batch` + `mixup_target`, correct_lam=True).

    Mixup: x = lam x + (1 - lam) x.flip(0). CutMix: the `box` of x is replaced by the flipped batch's and lam
    becomes 1 - box area / image area. Targets: lam onehot(y) + (1 - lam) onehot(y.flip(0)), both smoothed.
    Returns (mixed images, soft targets, the lam actually used).
    """
    height, width = images.shape[1:3]
    flipped = images[::-1]
    y_low, y_high, x_low, x_high = box
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    in_box = (rows >= y_low) & (rows < y_high) & (cols >= x_low) & (cols < x_high)  # (H, W)
    box_lam = 1.0 - ((y_high - y_low) * (x_high - x_low)) / (height * width)
    cutmixed = jnp.where(in_box[None, :, :, None], flipped, images)
    mixed_up = images * lam + flipped * (1.0 - lam)
    # jnp.where, not python `if`: the choice is a traced value, both branches are cheap elementwise ops.
    mixed = jnp.where(use_cutmix, cutmixed, mixed_up).astype(images.dtype)
    lam = jnp.where(use_cutmix, box_lam, lam).astype(jnp.float32)
    targets = smooth_one_hot(labels, num_classes, label_smoothing)
    targets = targets * lam + targets[::-1] * (1.0 - lam)
    return mixed, targets, lam


def mixup_cutmix(key: jax.Array, images: jax.Array, labels: jax.Array, num_classes: int, *, mixup_alpha: float,
                 cutmix_alpha: float, prob: float = 1.0, switch_prob: float = 0.5,
                 label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """Mixup / CutMix on a float NHWC batch with timm `Mixup(mode='batch', correct_lam=True)` semantics.

    One lam ~ Beta(alpha, alpha) for the whole batch; each image is paired with the flipped batch, so the
    batch size must be even (ValueError otherwise). With both alphas > 0, CutMix is chosen with probability
    `switch_prob`; mixing happens with probability `prob` (otherwise lam = 1 and the images pass through).
    Returns (images, soft targets (B, num_classes) float32).
    """
    batch, height, width = images.shape[:3]
    if batch % 2:
        raise ValueError(f"mixup/cutmix pairs each image with the flipped batch: batch size {batch} must be even")
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return images, smooth_one_hot(labels, num_classes, label_smoothing)
    k_apply, k_switch, k_mixup, k_cutmix, k_box = jax.random.split(key, 5)
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(k_switch) < switch_prob
    else:
        use_cutmix = jnp.asarray(cutmix_alpha > 0)
    lam_mixup = jax.random.beta(k_mixup, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else jnp.float32(1.0)
    lam_cutmix = jax.random.beta(k_cutmix, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else jnp.float32(1.0)
    lam = jnp.where(use_cutmix, lam_cutmix, lam_mixup)
    lam = jnp.where(jax.random.uniform(k_apply) < prob, lam, 1.0)  # lam 1: empty box / identity blend
    box = cutmix_box(k_box, height, width, lam)
    mixed, targets, _ = mix_batch(images, labels, num_classes, lam, use_cutmix, box, label_smoothing)
    return mixed, targets

"""common.augment: host transforms built from timm, device-side mixup/cutmix and random erasing vs timm."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm.data.mixup as timm_mixup
import torch
from conftest import REPO
from PIL import Image
from timm.data.auto_augment import AutoAugment, RandAugment
from torchvision import transforms

from common import UserError, augment, jax_augment


def _image(width=48, height=40, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


# ----------------------------------------------------------------------------------------------
# Host transforms
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("random_crop", ["rrc", "src", "none"])
def test_train_transform_gives_uint8_hwc(random_crop):
    out = augment.train_transform(32, random_crop=random_crop, color_jitter=0.3, auto_augment="3a")(_image())
    assert out.dtype == np.uint8 and out.shape == (32, 32, 3)


def test_eval_transform_resizes_shorter_side_then_center_crops():
    transform = augment.eval_transform(32, crop_ratio=0.875)
    resize = next(t for t in transform.transforms if isinstance(t, transforms.Resize))
    assert resize.size == int(32 / 0.875) == 36
    out = transform(_image(80, 50))
    assert out.dtype == np.uint8 and out.shape == (32, 32, 3)
    # crop ratio 1.0 (DeiT-III): the shorter side is the crop.
    square = _image(32, 32)
    np.testing.assert_array_equal(augment.eval_transform(32, crop_ratio=1.0)(square), np.asarray(square))


def test_simple_random_crop_pads_with_reflection():
    crop = augment.SimpleRandomCrop(8)
    assert crop.crop.padding_mode == "reflect" and crop.crop.padding == 4
    image = _image(8, 8)
    padded = np.pad(np.asarray(image), ((4, 4), (4, 4), (0, 0)), mode="reflect")
    seen_offsets = set()
    for seed in range(40):
        torch.manual_seed(seed)
        out = np.asarray(crop(image))
        assert out.shape == (8, 8, 3)
        # The output is an 8x8 window of the reflect-padded image (not zero padded).
        offsets = [(y, x) for y in range(9) for x in range(9) if np.array_equal(padded[y:y + 8, x:x + 8], out)]
        assert offsets, "crop is not a window of the reflect-padded image"
        seen_offsets.update(offsets)
    assert len(seen_offsets) > 5


def test_src_transform_is_resize_pad_crop_flip():
    transform = augment.train_transform(32, random_crop="src", color_jitter=0.3, auto_augment="3a")
    kinds = [type(t) for t in transform.transforms]
    assert kinds[:2] == [augment.SimpleRandomCrop, transforms.RandomHorizontalFlip]


def _names(transform):
    return [type(t).__name__ for t in transform.transforms]


def test_3a_preset_holds_timm_three_augment_and_color_jitter():
    transform = augment.train_transform(32, color_jitter=0.3, auto_augment="3a")  # DeiT-III §3, official README
    auto = next(t for t in transform.transforms if isinstance(t, AutoAugment))
    ops = sorted(op.name for sub_policy in auto.policy for op in sub_policy)
    assert ops == ["Desaturate", "GaussianBlurRand", "Solarize"]  # DeiT-III §3: grayscale, solarize, blur
    assert all(op.prob == 1.0 for sub_policy in auto.policy for op in sub_policy)
    assert "ColorJitter" in _names(transform)  # '3a' keeps color jitter on
    assert "RandomResizedCropAndInterpolation" in _names(transform)


def test_deit_randaugment_switches_color_jitter_off():
    """DeiT's main.py passes color jitter 0.3 with RandAugment m9-mstd0.5-inc1: timm drops the jitter."""
    transform = augment.train_transform(32, color_jitter=0.3, auto_augment="rand-m9-mstd0.5-inc1")
    names = _names(transform)
    assert "RandAugment" in names and "ColorJitter" not in names
    assert any(isinstance(t, RandAugment) for t in transform.transforms)


def test_mae_preset_is_crop_and_flip_only():
    transform = augment.train_transform(32, scale=(0.2, 1.0))  # MAE main_pretrain.py
    assert _names(transform) == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip", "ToUint8HWC"]
    assert transform.transforms[0].scale == (0.2, 1.0)


def test_randaugment_posterize_at_full_magnitude_is_black_not_an_error():
    """timm's 'inc1' posterize keeps 4 - int(0.4 * magnitude) bits: 0 at magnitude 10 (old Pillow: a black image;
    Pillow 12+ raises). The DeiT / MAE RandAugment must not crash the loader on it."""
    from timm.data.auto_augment import AugmentOp

    op = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    assert not np.asarray(op(image)).any()
    kept = np.asarray(AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=5)(image))  # 2 bits kept
    np.testing.assert_array_equal(kept, np.asarray(image) & 0b11000000)
    transform = augment.train_transform(16, auto_augment="rand-n3-m10-mstd0-inc1")
    for seed in range(20):
        torch.manual_seed(seed)
        assert transform(image.resize((16, 16))).shape == (16, 16, 3)


def test_unknown_random_crop_is_a_user_error():
    with pytest.raises(UserError, match="unknown random crop"):
        augment.train_transform(32, random_crop="center")


# ----------------------------------------------------------------------------------------------
# Device side
# ----------------------------------------------------------------------------------------------


def test_normalize_matches_timm_to_tensor_normalize():
    image = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    ours = np.asarray(jax_augment.normalize(jnp.asarray(image)))
    reference = transforms.Normalize(jax_augment.IMAGENET_DEFAULT_MEAN, jax_augment.IMAGENET_DEFAULT_STD)(
        torch.from_numpy(image).permute(0, 3, 1, 2).float() / 255)
    np.testing.assert_allclose(ours, reference.permute(0, 2, 3, 1).numpy(), atol=1e-5)


def _timm_mix(x_nhwc, labels, lam, use_cutmix, box, smoothing, num_classes, monkeypatch):
    """timm Mixup(mode='batch') with the lam / cutmix choice / box forced."""
    mixup = timm_mixup.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=smoothing, num_classes=num_classes)
    monkeypatch.setattr(mixup, "_params_per_batch", lambda: (lam, use_cutmix))
    monkeypatch.setattr(timm_mixup, "rand_bbox", lambda *args, **kwargs: box)
    x = torch.from_numpy(np.array(x_nhwc)).permute(0, 3, 1, 2).contiguous()
    x, target = mixup(x, torch.from_numpy(np.array(labels)).long())
    return x.permute(0, 2, 3, 1).numpy(), target.numpy()


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_mixup_core_matches_timm(smoothing, monkeypatch):
    images = np.random.default_rng(0).normal(size=(4, 6, 6, 3)).astype(np.float32)
    labels = np.array([0, 3, 1, 4], np.int32)
    lam = 0.7
    ref_images, ref_targets = _timm_mix(images, labels, lam, False, None, smoothing, 5, monkeypatch)
    mixed, targets, used_lam = jax_augment.mix_batch(jnp.asarray(images), jnp.asarray(labels), 5, jnp.float32(lam),
                                                 jnp.asarray(False), (0, 0, 0, 0), smoothing)
    np.testing.assert_allclose(np.asarray(mixed), ref_images, atol=1e-6)
    np.testing.assert_allclose(np.asarray(targets), ref_targets, atol=1e-6)
    assert float(used_lam) == pytest.approx(lam)


@pytest.mark.parametrize("box", [(1, 4, 2, 6), (0, 6, 3, 5), (2, 2, 0, 6)])
def test_cutmix_core_matches_timm_with_a_fixed_box(box, monkeypatch):
    images = np.random.default_rng(1).normal(size=(6, 6, 6, 3)).astype(np.float32)
    labels = np.array([0, 1, 2, 3, 4, 0], np.int32)
    ref_images, ref_targets = _timm_mix(images, labels, 0.6, True, box, 0.1, 5, monkeypatch)
    mixed, targets, used_lam = jax_augment.mix_batch(jnp.asarray(images), jnp.asarray(labels), 5, jnp.float32(0.6),
                                                 jnp.asarray(True), tuple(map(jnp.int32, box)), 0.1)
    np.testing.assert_array_equal(np.asarray(mixed), ref_images)
    np.testing.assert_allclose(np.asarray(targets), ref_targets, atol=1e-6)
    yl, yh, xl, xh = box
    assert float(used_lam) == pytest.approx(1 - (yh - yl) * (xh - xl) / 36)  # lam corrected to the box area


@pytest.mark.parametrize("lam, center", [(0.3, (5, 2)), (0.75, (0, 9)), (0.05, (3, 3)), (0.999, (7, 7))])
def test_cutmix_box_matches_timm_rand_bbox(lam, center, monkeypatch):
    centers = iter(center)
    monkeypatch.setattr(timm_mixup.np.random, "randint", lambda *args, **kwargs: next(centers))
    expected = timm_mixup.rand_bbox((3, 8, 10), lam)
    ours = jax_augment.box_from_center(8, 10, jnp.float32(lam), jnp.int32(center[0]), jnp.int32(center[1]))
    assert tuple(int(v) for v in ours) == tuple(int(v) for v in expected)


def test_label_smoothing_values():
    targets = np.asarray(jax_augment.smooth_one_hot(jnp.array([2]), 10, 0.1))
    assert targets[0, 2] == pytest.approx(1 - 0.1 + 0.01) and targets[0, 0] == pytest.approx(0.01)
    assert targets.sum() == pytest.approx(1.0)


# One compiled function per test module: prob is traced, so both tests below share it.
_MIX_IMAGES = jnp.asarray(np.random.default_rng(0).normal(size=(8, 16, 16, 3)), jnp.float32)
_MIX_LABELS = jnp.arange(8) % 4
_mix = jax.jit(lambda key, prob: jax_augment.mixup_cutmix(key, _MIX_IMAGES, _MIX_LABELS, 4, mixup_alpha=0.8,
                                                      cutmix_alpha=1.0, prob=prob, label_smoothing=0.1))


def test_mixup_cutmix_end_to_end_is_jittable_and_switches():
    images = np.asarray(_MIX_IMAGES)
    cutmix_count = 0
    for i in range(60):
        mixed, targets = map(np.asarray, _mix(jax.random.PRNGKey(i), 1.0))
        np.testing.assert_allclose(targets.sum(-1), 1.0, atol=1e-5)
        # A cutmix batch keeps exact pixels of either image; a mixup batch blends them.
        cutmix_count += bool((np.isclose(mixed, images) | np.isclose(mixed, images[::-1])).all())
    assert 15 <= cutmix_count <= 45, f"switch_prob 0.5 gave {cutmix_count}/60 cutmix batches"


def test_mixup_prob_zero_leaves_images_and_gives_smoothed_targets():
    mixed, targets = _mix(jax.random.PRNGKey(0), 0.0)
    np.testing.assert_array_equal(np.asarray(mixed), np.asarray(_MIX_IMAGES))
    np.testing.assert_allclose(np.asarray(targets), np.asarray(jax_augment.smooth_one_hot(_MIX_LABELS, 4, 0.1)),
                               atol=1e-6)


def test_mixup_rejects_odd_batches():
    with pytest.raises(ValueError, match="even"):
        jax_augment.mixup_cutmix(jax.random.PRNGKey(0), jnp.zeros((3, 4, 4, 3)), jnp.zeros(3, jnp.int32), 2,
                             mixup_alpha=0.8, cutmix_alpha=1.0)


_erase = jax.jit(jax_augment.random_erasing, static_argnames=("mode",))  # prob is traced: one compile per mode
_ERASE_INPUT = jnp.full((4000, 16, 16, 3), 7.0)  # 7.0: never produced by N(0, 1) noise at float32


def test_random_erasing_erases_a_quarter_of_samples_with_normal_noise():
    out = np.asarray(_erase(jax.random.PRNGKey(0), _ERASE_INPUT, 0.25))
    changed = out != 7.0
    erased = changed.any(axis=(1, 2, 3))
    assert abs(erased.mean() - 0.25) < 0.03, f"erased fraction {erased.mean():.3f}, expected 0.25"
    np.testing.assert_array_equal(out[~erased], np.asarray(_ERASE_INPUT)[~erased])  # the rest bitwise unchanged
    noise = out[changed]
    assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1.0) < 0.02, "erased pixels are not N(0, 1)"
    for mask in changed[erased][:200]:  # one axis-aligned rectangle, all channels, within timm's area range
        rows, cols = np.nonzero(mask[..., 0])
        h, w = np.ptp(rows) + 1, np.ptp(cols) + 1
        assert mask[..., 0].sum() == h * w and (mask == mask[..., :1]).all()
        assert 0.02 * 256 * 0.5 <= h * w <= 256 / 3 * 1.5 and h < 16 and w < 16


def test_random_erasing_area_distribution_matches_timm():
    import random

    from timm.data.random_erasing import RandomErasing

    random.seed(0)
    torch.manual_seed(0)
    reference = torch.full((4000, 3, 16, 16), 7.0)
    RandomErasing(1.0, mode="pixel", device="cpu")(reference)
    timm_area = (reference[:, 0] != 7.0).float().mean().item()
    ours = np.asarray(_erase(jax.random.PRNGKey(1), _ERASE_INPUT, 1.0))
    our_area = (ours[..., 0] != 7.0).mean()
    assert abs(our_area - timm_area) < 0.05 * timm_area, f"mean erased area {our_area:.4f} vs timm {timm_area:.4f}"


def test_random_erasing_modes():
    images = jnp.full((64, 8, 8, 3), 7.0)
    out = np.asarray(_erase(jax.random.PRNGKey(1), images, 1.0, mode="const"))
    assert set(np.unique(out)) == {0.0, 7.0}
    out = np.asarray(_erase(jax.random.PRNGKey(1), images, 1.0, mode="rand"))
    for sample in out:
        values = sample[(sample != 7.0).any(-1)]
        assert len(values) == 0 or (values == values[0]).all()  # one colour per rectangle


def test_pytorch_recipes_import_without_jax():
    """The PyTorch recipes and the host-side augmentation need no JAX (issue 13): a fresh interpreter where importing
    jax, flax or optax fails still imports them."""
    code = ("import sys; sys.modules.update(jax=None, flax=None, optax=None); "
            "import howtotrain_vit, dvt, localmim_freezeout, common.augment, common.data")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]

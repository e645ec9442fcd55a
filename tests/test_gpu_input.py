"""common.gpu_input (--loader gpu) on CPU tensors: its random draws follow timm's distributions, its pixels match
the PIL pipeline's, and its batches are a function of (seed, step) split exactly over processes."""

import importlib.util
import itertools
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import auto_augment as timm_auto_augment
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.transforms import functional as TF

from common import UserError, augment, data, gpu_input, torch_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
DRAWS = 3000  # per distribution test: the tolerances below are ~4 standard errors at this count
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _natural_image(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """Smooth random colours (a bicubic upscale of noise): JPEG-friendly, with edges for the filters to matter."""
    noise = rng.integers(0, 256, (height // 8 + 2, width // 8 + 2, 3)).astype(np.uint8)
    return Image.fromarray(noise).resize((width, height), Image.BICUBIC)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """ImageNet layout, 3 classes, JPEGs of varied sizes and aspect ratios; 8 train and 4 val images per class."""
    root = tmp_path_factory.mktemp("gpu_input")
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 4)):
        for label in range(3):
            for i in range(count):
                height, width = (int(v) for v in rng.integers(36, 100, 2))
                path = root / split / f"class_{label}" / f"img_{i}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                _natural_image(rng, height, width).save(path, quality=90)
    return root


def _seeds(count: int) -> list[int]:
    return np.random.default_rng(123).integers(0, 2**31 - 1, count).tolist()


def _take(iterator, count):
    return list(itertools.islice(iterator, count))


# ----------------------------------------------------------------------------------------------
# Random draws: the same distributions as timm's
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("height,width", [(300, 200), (40, 400)])  # the second often falls back to the central crop
def test_random_resized_crop_boxes_follow_timm_distribution(height, width):
    random.seed(0)
    image = Image.new("RGB", (width, height))
    timm_boxes = np.array([RandomResizedCropAndInterpolation.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3))
                           for _ in range(DRAWS)])
    ours = np.array([gpu_input._rrc_box(np.random.default_rng(s), height, width, (0.08, 1.0), (3 / 4, 4 / 3))
                     for s in _seeds(DRAWS)])
    for name, boxes in (("timm", timm_boxes), ("gpu_input", ours)):
        top, left, h, w = boxes.T
        assert (top >= 0).all() and (top + h <= height).all() and (left + w <= width).all(), f"{name}: box outside"
    stats = {}
    for name, (top, left, h, w) in (("timm", timm_boxes.T), ("gpu_input", ours.T)):
        area, log_aspect = h * w / (height * width), np.log(w / h)
        stats[name] = np.concatenate([np.quantile(area, [0.1, 0.5, 0.9]), np.quantile(log_aspect, [0.1, 0.5, 0.9]),
                                      [np.mean((top + h / 2) / height), np.mean((left + w / 2) / width)]])
    np.testing.assert_allclose(stats["gpu_input"], stats["timm"], atol=0.04,
                               err_msg="area quantiles, log-aspect quantiles, mean centre differ from timm's")


def test_horizontal_flip_rate_is_half():
    spec = gpu_input.AugSpec(32)
    flips = [gpu_input.sample_params(spec, s, 64, 64)["geometry"][-1] for s in _seeds(DRAWS)]
    assert abs(np.mean(flips) - 0.5) < 0.04, f"flip rate {np.mean(flips):.3f}"


def test_three_augment_draws_each_op_a_third_of_the_time_then_colour_jitter():
    spec = gpu_input.AugSpec(32, auto_augment="3a", color_jitter=0.3)
    slots = [gpu_input.sample_params(spec, s, 64, 64)["slots"] for s in _seeds(DRAWS)]
    first = np.array([sample[0][0] for sample in slots])
    for op in ("solarize", "color", "gaussian_blur"):
        share = np.mean(first == gpu_input.OP_ID[op])
        assert abs(share - 1 / 3) < 0.04, f"3-Augment drew {op} {share:.3f} of the time, expected 1/3"
    blur_radius = np.array([sample[0][1] for sample in slots if sample[0][0] == gpu_input.OP_ID["gaussian_blur"]])
    assert 0.1 <= blur_radius.min() and blur_radius.max() <= 2.0 and abs(blur_radius.mean() - 1.05) < 0.05
    assert all(sample[0][1] == 128 for sample in slots if sample[0][0] == gpu_input.OP_ID["solarize"])
    assert all(sample[0][1] == 0 for sample in slots if sample[0][0] == gpu_input.OP_ID["color"]), "grayscale"
    jitter = np.array([[op for op, _ in sample[1:]] for sample in slots])
    assert sorted(jitter[0]) == sorted(gpu_input.OP_ID[n] for n in ("brightness", "contrast", "color"))
    assert len({tuple(order) for order in jitter}) == 6, "colour jitter's op order should be a random permutation"
    factors = np.array([[argument for _, argument in sample[1:]] for sample in slots])
    assert factors.min() >= 0.7 and factors.max() <= 1.3 and abs(factors.mean() - 1.0) < 0.02


def _timm_randaugment_draws(policy: str, count: int) -> dict[str, list[float]]:
    """Run timm's own RandAugment with every op replaced by a recorder: {device op: its arguments, 'skip': [...]}."""
    transform = timm_auto_augment.rand_augment_transform(policy, dict(translate_const=100, img_mean=(124, 116, 104)))
    drawn: dict[str, list[float]] = {}
    for op in transform.ops:
        def record(img, *args, _name=op.name, **_):
            drawn.setdefault(gpu_input._TIMM_TO_DEVICE_OP[_name], []).append(float(args[0]) if args else 0.0)
            return img
        op.aug_fn = record
    random.seed(0)
    np.random.seed(0)
    image = Image.new("RGB", (8, 8))
    for _ in range(count):
        transform(image)
    return drawn


@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "rand-n2-m15"])
def test_randaugment_op_frequencies_and_arguments_follow_timm(policy):
    timm_draws = _timm_randaugment_draws(policy, DRAWS)
    spec = gpu_input.AugSpec(32, auto_augment=policy)
    ours: dict[str, list[float]] = {}
    for s in _seeds(DRAWS):
        for op, argument in gpu_input.sample_params(spec, s, 64, 64)["slots"]:
            if op >= 0:
                ours.setdefault(gpu_input.DEVICE_OPS[op], []).append(argument)
    assert set(ours) == set(timm_draws), f"op sets differ: {sorted(ours)} vs timm {sorted(timm_draws)}"
    layers = 2 * DRAWS
    for op in timm_draws:
        ours_rate, timm_rate = len(ours[op]) / layers, len(timm_draws[op]) / layers
        assert abs(ours_rate - timm_rate) < 0.015, f"{policy}: {op} applied {ours_rate:.3f} vs timm {timm_rate:.3f}"
        # Signed arguments are symmetric about the op's neutral value (rotate/shear/translate 0, the enhance ops'
        # factor 1): compare the quantiles of the distance from it and the share below it.
        neutral = 1.0 if op in ("color", "contrast", "brightness", "sharpness") else 0.0
        ours_args, timm_args = np.array(ours[op]) - neutral, np.array(timm_draws[op]) - neutral
        ours_q, timm_q = (np.quantile(np.abs(a), [0.1, 0.5, 0.9]) for a in (ours_args, timm_args))
        scale = max(1.0, timm_q.max())
        np.testing.assert_allclose(ours_q / scale, timm_q / scale, atol=0.05,
                                   err_msg=f"{policy}: quantiles of |argument - {neutral}| of {op} differ from timm's")
        assert abs(np.mean(ours_args < 0) - np.mean(timm_args < 0)) < 0.12, f"{policy}: {op}'s sign differs"


def test_random_erasing_rate_and_area_follow_timm():
    size = 32
    timm_erasing = RandomErasing(0.25, mode="const", device="cpu")
    random.seed(0)
    timm_areas = []
    for _ in range(DRAWS):
        erased = timm_erasing(torch.ones(3, size, size))
        timm_areas.append(float((erased[0] == 0).float().mean()))
    spec = gpu_input.AugSpec(size, random_erasing=0.25)
    boxes = np.array([gpu_input.sample_params(spec, s, 64, 64)["erase"] for s in _seeds(DRAWS)])
    ours_areas = np.where(boxes[:, 0] == 1, boxes[:, 3] * boxes[:, 4] / size**2, 0.0)
    timm_areas = np.array(timm_areas)
    assert abs(np.mean(ours_areas > 0) - np.mean(timm_areas > 0)) < 0.04, "erasing probability differs from timm's"
    np.testing.assert_allclose(np.quantile(ours_areas[ours_areas > 0], [0.1, 0.5, 0.9]),
                               np.quantile(timm_areas[timm_areas > 0], [0.1, 0.5, 0.9]), atol=0.03)
    assert (boxes[:, 1] + boxes[:, 3] <= size).all() and (boxes[:, 2] + boxes[:, 4] <= size).all()


# ----------------------------------------------------------------------------------------------
# Pixels: the same as the PIL pipeline's
# ----------------------------------------------------------------------------------------------


def test_decoded_jpegs_equal_pil_decode(folder):
    paths = sorted((folder / "train").rglob("*.jpg"))[:6]
    encoded = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths]
    decoded = gpu_input._decode_jpegs(encoded, torch.device("cpu"))
    for path, image in zip(paths, decoded):
        reference = np.array(Image.open(path).convert("RGB")).astype(int)
        difference = np.abs(image.permute(1, 2, 0).numpy().astype(int) - reference)
        assert difference.mean() < 0.5 and difference.max() <= 8, f"{path.name}: decode differs from PIL's"


@pytest.mark.parametrize("interpolation,crop_ratio", [("bicubic", 0.875), ("bilinear", 1.0)])
def test_eval_batches_match_pil_eval_transform(folder, interpolation, crop_ratio):
    spec = gpu_input.AugSpec(32, interpolation=interpolation, crop_ratio=crop_ratio)
    ours = _take(gpu_input.eval_batches(str(folder), spec, global_batch=8, workers=0, device="cpu"), 2)
    transform = augment.eval_transform(32, crop_ratio=crop_ratio, interpolation=interpolation)
    reference = _take(data.eval_batches(str(folder), transform, global_batch=8, workers=0), 2)
    for batch, expected in zip(ours, reference):
        np.testing.assert_array_equal(batch["label"].numpy(), expected["label"])
        difference = np.abs(batch["image"].numpy().astype(int) - expected["image"].astype(int))
        # Measured: mean 0.03, max 1 (PIL's fixed-point rounding vs float matrices).
        assert difference.mean() < 0.2 and difference.max() <= 2, \
            f"mean {difference.mean():.3f}, max {difference.max()}"


def test_train_crops_match_pil_given_the_same_params():
    image = _natural_image(np.random.default_rng(1), 61, 97)
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    for random_crop, seed in itertools.product(("rrc", "src"), range(6)):
        spec = gpu_input.AugSpec(32, random_crop=random_crop)
        geometry = gpu_input.sample_params(spec, seed, 61, 97)["geometry"]
        y0, h, x0, w, out_h, out_w, row0, col0, flip = geometry
        if random_crop == "rrc":
            expected = TF.resized_crop(image, y0, x0, h, w, [32, 32], TF.InterpolationMode.BICUBIC)
        else:  # augment.SimpleRandomCrop: resize, reflect-pad 4, crop at (row0 + 4, col0 + 4) of the padded image
            resized = TF.resize(image, 32, TF.InterpolationMode.BICUBIC)
            assert resized.size == (out_w, out_h)
            expected = TF.crop(TF.pad(resized, 4, padding_mode="reflect"), row0 + 4, col0 + 4, 32, 32)
        if flip:
            expected = TF.hflip(expected)
        ours = gpu_input.crop_resize_flip([tensor], torch.tensor([0]), torch.tensor([geometry]), 32, "bicubic")
        difference = np.abs(ours[0].permute(1, 2, 0).numpy().astype(int) - np.array(expected).astype(int))
        assert difference.max() <= 1, f"{random_crop} seed {seed}: max difference {difference.max()}"


# (timm op, device op, argument, max |difference| allowed, max mean |difference|): colour ops are PIL's arithmetic;
# the affine ops use grid_sample's bicubic (a = -0.75, PIL -0.5) and the blur a true Gaussian (PIL: 3 box blurs).
OP_CASES = [("AutoContrast", "autocontrast", None, 1, 0.01), ("Equalize", "equalize", None, 1, 0.01),
            ("Invert", "invert", None, 0, 0), ("Posterize", "posterize", 2, 0, 0), ("Posterize", "posterize", 0, 0, 0),
            ("Solarize", "solarize", 100, 0, 0), ("SolarizeAdd", "solarize_add", 80, 0, 0),
            ("Color", "color", 1.6, 1, 0.01), ("Color", "color", 0.0, 1, 0.01), ("Contrast", "contrast", 0.4, 1, 0.01),
            ("Contrast", "contrast", 1.6, 1, 0.01), ("Brightness", "brightness", 1.5, 1, 0.01),
            ("Sharpness", "sharpness", 1.8, 1, 0.01), ("Sharpness", "sharpness", 0.2, 1, 0.01),
            ("Rotate", "rotate", -20.0, 8, 1.0), ("ShearX", "shear_x", 0.25, 8, 1.0),
            ("ShearY", "shear_y", -0.2, 8, 1.0),
            ("TranslateXRel", "translate_x", 0.3, 8, 1.0), ("TranslateYRel", "translate_y", -0.3, 8, 1.0),
            ("GaussianBlur", "gaussian_blur", 1.5, 3, 0.6)]


@pytest.mark.parametrize("timm_name,op,argument,max_difference,mean_difference", OP_CASES)
def test_device_ops_match_timm_pil_ops(timm_name, op, argument, max_difference, mean_difference):
    augment._use_zero_bit_posterize()
    rng = np.random.default_rng(2)
    images = [_natural_image(rng, 48, 40) for _ in range(3)]
    batch = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images]).float()
    args = () if argument is None else (argument,)
    expected = np.stack([np.array(timm_auto_augment.NAME_TO_OP[timm_name](
        im, *args, fillcolor=gpu_input.FILL, resample=Image.BICUBIC)) for im in images]).astype(int)
    ours = gpu_input.apply_op(op, batch, torch.full((3,), float(argument or 0)), "bicubic")
    difference = np.abs(ours.permute(0, 2, 3, 1).numpy().astype(int) - expected)
    assert difference.max() <= max_difference and difference.mean() <= mean_difference, \
        f"{timm_name}({argument}): max {difference.max()}, mean {difference.mean():.3f}"


def test_normalised_output_equals_images_to_device(folder):
    spec = gpu_input.AugSpec(32, auto_augment="3a")
    uint8 = next(gpu_input.train_batches(str(folder), spec, global_batch=6, seed=0, workers=0, device="cpu"))
    floats = next(gpu_input.train_batches(str(folder), spec, global_batch=6, seed=0, workers=0, device="cpu",
                                          normalize=(MEAN, STD)))
    expected = torch_run.images_to_device(uint8["image"], torch.device("cpu"), MEAN, STD)
    torch.testing.assert_close(floats["image"], expected, rtol=0, atol=1e-6)


def test_random_erasing_fills_the_drawn_boxes_with_noise(folder):
    spec = gpu_input.AugSpec(32, random_erasing=1.0)
    with pytest.raises(UserError, match="normalise"):
        gpu_input.train_batches(str(folder), spec, global_batch=6, seed=0, workers=0, device="cpu")
    erased = next(gpu_input.train_batches(str(folder), spec, global_batch=6, seed=0, workers=0, device="cpu",
                                          normalize=(MEAN, STD)))
    clean = next(gpu_input.train_batches(str(folder), gpu_input.AugSpec(32), global_batch=6, seed=0, workers=0,
                                         device="cpu", normalize=(MEAN, STD)))
    changed = (erased["image"] != clean["image"]).float().mean(dim=(1, 2, 3))
    assert ((changed > 0.02) & (changed < 0.5)).all(), f"share of each image erased: {changed.tolist()}"


# ----------------------------------------------------------------------------------------------
# Batches: a function of (seed, step), split exactly over processes, bad files skipped
# ----------------------------------------------------------------------------------------------

RANDOM_SPEC = gpu_input.AugSpec(32, auto_augment="rand-m9-mstd0.5-inc1", hflip=0.5)


def _train(folder, **kwargs):
    settings = dict(global_batch=6, seed=3, workers=0, device="cpu", repeats=3) | kwargs
    return gpu_input.train_batches(str(folder), RANDOM_SPEC, **settings)


def test_same_seed_and_step_give_identical_batches_and_resume_continues(folder):
    first = _take(_train(folder), 3)
    again = _take(_train(folder, workers=2), 3)
    resumed = _take(_train(folder, start_step=2), 1)
    for a, b in zip(first, again):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"]), "not reproducible"
    assert torch.equal(resumed[0]["image"], first[2]["image"]), "start_step=2 does not continue the run's step 2"
    assert not torch.equal(first[0]["image"], first[1]["image"])
    copies = first[0]["label"].view(-1, 3)
    assert (copies == copies[:, :1]).all(), "repeats: 3 consecutive copies of one image"
    assert not torch.equal(first[0]["image"][0], first[0]["image"][1]), "each copy has its own augmentation"


def test_two_processes_together_give_the_one_process_global_batch(folder):
    whole = next(_train(folder, repeats=1))
    halves = [next(_train(folder, repeats=1, process_index=p, process_count=2)) for p in range(2)]
    assert torch.equal(torch.cat([h["image"] for h in halves]), whole["image"])
    assert torch.equal(torch.cat([h["label"] for h in halves]), whole["label"])


def test_same_samples_as_the_pil_loader(folder):
    pil = next(data.train_batches(str(folder), augment.eval_transform(32), global_batch=6, seed=3, repeats=3,
                                  workers=0))
    ours = next(_train(folder))
    np.testing.assert_array_equal(ours["label"].numpy(), pil["label"])


def test_corrupt_empty_and_non_image_files_are_skipped_and_counted(tmp_path, capsys):
    rng = np.random.default_rng(4)
    for split in ("train", "val"):
        for label in range(2):
            for i in range(3):
                path = tmp_path / split / f"class_{label}" / f"img_{i}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                _natural_image(rng, 40, 48).save(path, quality=90)
    good = (tmp_path / "train" / "class_0" / "img_0.jpg").read_bytes()
    (tmp_path / "train" / "class_0" / "img_1.jpg").write_bytes(b"")
    (tmp_path / "train" / "class_1" / "img_1.jpg").write_bytes(b"not an image at all")
    truncated = good[:len(good) // 2]  # the header parses; the decoders fail (device, then PIL)
    (tmp_path / "train" / "class_1" / "img_2.jpg").write_bytes(truncated)
    (tmp_path / "val" / "class_1" / "img_0.jpg").write_bytes(truncated)
    data._cached_splits.cache_clear()
    data.forget_named_files()
    spec = gpu_input.AugSpec(32)
    batches = _take(gpu_input.train_batches(str(tmp_path), spec, global_batch=6, seed=0, workers=0, device="cpu"), 3)
    assert sum(b["skipped"] for b in batches) >= 3, [b["skipped"] for b in batches]
    assert all(len(b["label"]) == 6 and (b["label"] >= 0).all() for b in batches)
    evaluated = list(gpu_input.eval_batches(str(tmp_path), spec, global_batch=8, workers=0, device="cpu"))
    labels = torch.cat([b["label"] for b in evaluated])
    assert (labels == -1).sum() == 3 and sum(b["skipped"] for b in evaluated) == 1, labels.tolist()  # 2 pad, 1 bad
    errors = capsys.readouterr().err
    assert "decode failed on the device and in PIL" in errors, "the truncated JPEG should reach the device decoder"
    for name in ("class_0/img_1.jpg", "class_1/img_1.jpg", "class_1/img_2.jpg", "val/class_1/img_0.jpg"):
        assert errors.count(name) == 1, f"{name} should be named once on stderr:\n{errors}"


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory):
    spec = importlib.util.spec_from_file_location("make_shards", REPO / "scripts" / "make_shards.py")
    make_shards = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_shards)
    out = tmp_path_factory.mktemp("gpu_input_shards")
    make_shards.main([str(folder), str(out), "--shard-size", "5"])
    return out


def test_shard_train_batches_read_bytes_and_keep_repeat_groups(shards):
    batches = _take(gpu_input.train_batches(str(shards), RANDOM_SPEC, global_batch=4, seed=0, repeats=3,
                                            workers=0, device="cpu", shuffle_buffer=8), 6)
    labels = torch.cat([b["label"] for b in batches])
    assert all(b["image"].shape == (4, 32, 32, 3) and b["skipped"] == 0 for b in batches)
    assert ((labels >= 0) & (labels < 3)).all()
    # 24 copies = 8 groups of 3 consecutive copies, some split across two batches of 4.
    assert (labels.view(8, 3) == labels.view(8, 3)[:, :1]).all(), labels.tolist()


def test_shard_eval_batches_cover_val_once_over_two_processes(shards, folder):
    spec = gpu_input.AugSpec(32, crop_ratio=1.0)
    processes = [list(gpu_input.eval_batches(str(shards), spec, global_batch=8, workers=0, device="cpu",
                                             process_index=p, process_count=2)) for p in range(2)]
    assert len(processes[0]) == len(processes[1]) == 2  # val shards of 5, 5, 2 images: 7 and 5, batches of 4
    from_shards = sorted(image.numpy().tobytes() for batches in processes for b in batches
                         for image, label in zip(b["image"], b["label"]) if label >= 0)
    from_folder = sorted(image.numpy().tobytes() for b in gpu_input.eval_batches(
        str(folder), spec, global_batch=8, workers=0, device="cpu") for image, label in zip(b["image"], b["label"])
        if label >= 0)
    assert from_shards == from_folder


def test_in_memory_digits_pass_their_arrays():
    spec = gpu_input.AugSpec(32, auto_augment="3a", color_jitter=0.3)
    batch = next(gpu_input.train_batches("digits", spec, global_batch=8, seed=0, workers=0, device="cpu"))
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == torch.uint8
    evaluated = next(gpu_input.eval_batches("digits", gpu_input.AugSpec(32, crop_ratio=1.0), global_batch=8,
                                            workers=0, device="cpu"))
    reference = next(data.eval_batches("digits", augment.eval_transform(32, crop_ratio=1.0), global_batch=8,
                                       workers=0))
    np.testing.assert_array_equal(evaluated["image"].numpy(), reference["image"])


def test_loader_choice_and_unsupported_settings():
    assert gpu_input.loader_choice("auto", "cpu") == "pil"
    assert gpu_input.loader_choice("auto", "cuda") == "gpu"
    assert gpu_input.loader_choice("gpu", "cpu") == "gpu"
    with pytest.raises(UserError):
        gpu_input.loader_choice("dali", "cpu")
    with pytest.raises(UserError, match="pil"):
        gpu_input.AugSpec(32, auto_augment="original")
    with pytest.raises(UserError):
        gpu_input.AugSpec(32, interpolation="nearest")
    assert gpu_input.parse_auto_augment("rand-m9-mstd0.5-inc1") == gpu_input.RandAugmentSpec(
        gpu_input.RAND_INCREASING_OPS, num_layers=2, magnitude=9.0, magnitude_std=0.5)
    assert gpu_input.parse_auto_augment("rand-n3-m15-mstd101").magnitude_std == math.inf


def test_to_jax_shares_the_tensor():
    jnp = pytest.importorskip("jax.numpy")
    tensor = torch.arange(24, dtype=torch.uint8).view(2, 3, 4)
    array = gpu_input.to_jax(tensor)
    assert array.dtype == jnp.uint8 and array.shape == (2, 3, 4)
    np.testing.assert_array_equal(np.asarray(array), tensor.numpy())


def test_benchmark_input_prints_one_json_line(folder, capsys):
    result = gpu_input.benchmark_input(str(folder), gpu_input.AugSpec(32), global_batch=6, workers=0, steps=2,
                                       warmup=1, device="cpu", recipe="test")
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line == result and line["loader"] == "gpu" and list(line)[-1] == "img_per_sec" and line["recipe"] == "test"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_match_cpu_batches_and_repeat(folder):
    """nvJPEG and the CUDA kernels against the CPU path: close (decoders and float resize differ), and repeatable."""
    spec = gpu_input.AugSpec(32, auto_augment="3a", color_jitter=0.3, random_erasing=0.25)
    settings = dict(global_batch=12, seed=5, workers=0, repeats=3, normalize=(MEAN, STD))
    on_cpu = next(gpu_input.train_batches(str(folder), spec, device="cpu", **settings))
    on_cuda = [next(gpu_input.train_batches(str(folder), spec, device="cuda", **settings)) for _ in range(2)]
    assert torch.equal(on_cuda[0]["image"], on_cuda[1]["image"]), "CUDA batches are not repeatable"
    assert torch.equal(on_cuda[0]["label"].cpu(), on_cpu["label"])
    difference = (on_cuda[0]["image"].cpu() - on_cpu["image"]).abs() * 255 * 0.226  # about grey levels
    assert difference.median() < 1.0, f"median difference {difference.median():.2f} grey levels"
    evaluated = next(gpu_input.eval_batches(str(folder), spec, global_batch=8, workers=0, device="cuda"))
    reference = next(data.eval_batches(str(folder), augment.eval_transform(32), global_batch=8, workers=0))
    eval_difference = np.abs(evaluated["image"].cpu().numpy().astype(int) - reference["image"].astype(int))
    assert eval_difference.mean() < 1.0, f"eval mean difference {eval_difference.mean():.2f}"

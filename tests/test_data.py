"""common.data and scripts/make_shards.py on tiny data made in tmp folders (no network)."""

import hashlib
import importlib.util
import io
import itertools
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common import UserError, augment, data, torch_run

REPO = Path(__file__).resolve().parents[1]

COLORS = [(220, 40, 40), (40, 220, 40), (40, 40, 220)]  # class i is mostly COLORS[i]: labels checkable from pixels


def _write_jpeg(path, color, seed, size=40):
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(color) + rng.integers(-30, 30, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95)


def make_folder(root, train_per_class=6, val_per_class=2):
    for s, (split, count) in enumerate((("train", train_per_class), ("val", val_per_class))):
        for c, color in enumerate(COLORS):
            for i in range(count):
                _write_jpeg(root / split / f"class_{c}" / f"img_{i}.jpg", color, seed=1000 * s + 100 * c + i)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("imagenet"))


EVAL = augment.eval_transform(32, crop_ratio=1.0)
RANDOM_AUG = augment.train_transform(32, random_crop="rrc", color_jitter=0.3, auto_augment="3a")


def color_labels(images):
    return images.reshape(len(images), -1, 3).mean(1).argmax(-1) if len(images) else np.zeros(0, int)


def take(iterator, n):
    return list(itertools.islice(iterator, n))


def digest(image):
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


# ----------------------------------------------------------------------------------------------
# Image folders
# ----------------------------------------------------------------------------------------------


def test_describe_image_folder(folder):
    spec = data.describe(str(folder))
    assert spec == data.DataSpec(3, 18, 6, ["class_0", "class_1", "class_2"], "folder")
    assert data.steps_per_epoch(spec.train_size, 6) == 3
    with pytest.raises(UserError, match="5 classes requested"):
        data.describe(str(folder), num_classes=5)


def test_train_batches_shapes_dtypes_and_labels(folder):
    batches = take(data.train_batches(str(folder), EVAL, global_batch=6, seed=0, workers=0), 4)
    for batch in batches:
        assert batch["image"].dtype == np.uint8 and batch["image"].shape == (6, 32, 32, 3)
        assert batch["label"].dtype == np.int32 and batch["label"].shape == (6,)
        assert batch["skipped"] == 0
        np.testing.assert_array_equal(color_labels(batch["image"]), batch["label"])
    epoch = np.concatenate([b["image"] for b in batches[:3]])
    assert len({digest(image) for image in epoch}) == 18, "one epoch (repeats 1) sees every image once"


def test_eval_batches_pad_with_minus_one_and_cover_val_once_over_hosts(folder):
    hosts = [list(data.eval_batches(str(folder), EVAL, global_batch=4, workers=0, process_index=h, process_count=2))
             for h in range(2)]
    assert len(hosts[0]) == len(hosts[1]) == 2, "every host must run the same number of eval batches"
    seen = []
    for batches in hosts:
        for batch in batches:
            assert batch["image"].shape == (2, 32, 32, 3) and batch["image"].dtype == np.uint8
            real = batch["label"] >= 0
            assert (batch["image"][~real] == 0).all()
            np.testing.assert_array_equal(color_labels(batch["image"][real]), batch["label"][real])
            seen += [digest(image) for image in batch["image"][real]]
    expected = [digest(EVAL(data._decode_image(str(p)))) for p in sorted((folder / "val").rglob("*.jpg"))]
    assert sorted(seen) == sorted(expected), "the hosts together must see every val image exactly once"
    assert sum((b["label"] == -1).sum() for batches in hosts for b in batches) == 2


def test_exact_resume_is_independent_of_start_step_workers_and_hosts(folder):
    def run(start_step=0, workers=0, steps=7, **kw):
        batches = data.train_batches(str(folder), RANDOM_AUG, global_batch=6, seed=3, repeats=3,
                                     start_step=start_step, workers=workers, **kw)
        return take(batches, steps)

    reference = run()  # 7 steps cross two epoch boundaries (3 steps per epoch)
    assert not np.array_equal(reference[0]["image"][0], reference[0]["image"][1]), "augmentation is on"
    for a, b in zip(run(start_step=4, steps=3), reference[4:]):
        np.testing.assert_array_equal(a["image"], b["image"], err_msg="resumed batch differs")
        np.testing.assert_array_equal(a["label"], b["label"])
    for a, b in zip(run(workers=2), reference):
        np.testing.assert_array_equal(a["image"], b["image"], err_msg="batch depends on the worker count")
    hosts = [run(steps=3, process_index=h, process_count=2) for h in range(2)]
    for step in range(3):
        np.testing.assert_array_equal(np.concatenate([hosts[0][step]["image"], hosts[1][step]["image"]]),
                                      reference[step]["image"], err_msg="host slices must tile the global batch")


def test_repeats_decode_once_and_augment_each_copy(folder, monkeypatch):
    indices, seeds = data.epoch_stream(18, seed=0, epoch=0, repeats=3)
    assert len(indices) == 18 and len(set(seeds.tolist())) == 18
    groups = indices.reshape(6, 3)
    assert (groups == groups[:, :1]).all() and len(set(groups[:, 0])) == 6, "each image 3 times in a row"

    decoded = []
    real_decode = data._decode_image
    monkeypatch.setattr(data, "_decode_image", lambda path: decoded.append(path) or real_decode(path))
    epoch = take(data.train_batches(str(folder), EVAL, global_batch=6, seed=0, repeats=3, workers=0), 3)
    assert len(decoded) == 6 == len(set(decoded)), f"6 unique images should be decoded once each, got {decoded}"
    images = np.concatenate([b["image"] for b in epoch]).reshape(6, 3, 32, 32, 3)
    assert (images == images[:, :1]).all(), "a deterministic transform gives identical copies"

    decoded.clear()
    random_epoch = take(data.train_batches(str(folder), RANDOM_AUG, global_batch=6, seed=0, repeats=3,
                                           workers=0), 3)
    assert len(decoded) == 6
    copies = np.concatenate([b["image"] for b in random_epoch]).reshape(6, 3, -1)
    assert all(len({digest(c) for c in group}) > 1 for group in copies), "each copy is augmented separately"


def test_corrupt_and_truncated_images_are_skipped_counted_and_warned_once(tmp_path, capsys):
    root = make_folder(tmp_path / "bad", train_per_class=2, val_per_class=1)
    (root / "train" / "class_0" / "corrupt.jpg").write_bytes(b"this is not a jpeg" * 20)
    good = (root / "train" / "class_1" / "img_0.jpg").read_bytes()
    (root / "train" / "class_1" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "val" / "class_2" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    assert data.describe(str(root)).train_size == 8

    batches = take(data.train_batches(str(root), EVAL, global_batch=8, seed=0, workers=0), 3)  # 3 epochs
    assert [b["skipped"] for b in batches] == [2, 2, 2]
    for batch in batches:
        np.testing.assert_array_equal(color_labels(batch["image"]), batch["label"])
    warnings = [line for line in capsys.readouterr().err.splitlines() if "unreadable image" in line]
    assert len(warnings) == 2 and any("corrupt.jpg" in w for w in warnings) and any("truncated" in w for w in warnings)

    val = list(data.eval_batches(str(root), EVAL, global_batch=4, workers=0))
    labels = np.concatenate([b["label"] for b in val])
    assert sum(b["skipped"] for b in val) == 1 and (labels >= 0).sum() == 3 and len(labels) == 4


def test_bad_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        data.describe(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="unknown data source 'imagenet1k'"):
        data.describe("imagenet1k")
    (tmp_path / "no_train" / "val" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="has no train/ subfolder"):
        data.describe(str(tmp_path / "no_train"))
    (tmp_path / "no_classes" / "train").mkdir(parents=True)
    with pytest.raises(UserError, match="has no class subfolders"):
        data.describe(str(tmp_path / "no_classes"))
    _write_jpeg(tmp_path / "empty_class" / "train" / "a" / "x.jpg", COLORS[0], 0)
    (tmp_path / "empty_class" / "train" / "xyz").mkdir()
    with pytest.raises(UserError, match="class folder train/xyz has no images"):
        data.describe(str(tmp_path / "empty_class"))
    with pytest.raises(UserError, match="synthetic"):
        next(data.train_batches("synthetic", EVAL, global_batch=4, seed=0, workers=0))


def test_synthetic_is_described_and_has_no_eval_batches():
    assert data.describe("synthetic") == data.DataSpec(1000, None, None, None, "synthetic")
    assert data.describe("synthetic", num_classes=10).num_classes == 10
    assert list(data.eval_batches("synthetic", EVAL, global_batch=4, workers=0)) == []


# ----------------------------------------------------------------------------------------------
# Webdataset shards
# ----------------------------------------------------------------------------------------------


def _make_shards_module():
    spec = importlib.util.spec_from_file_location("make_shards", REPO / "scripts" / "make_shards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    _make_shards_module().main([str(folder), str(out), "--shard-size", "4"])
    return out


def test_make_shards_writes_info_json(shards):
    info = json.loads((shards / "info.json").read_text())
    assert info["num_classes"] == 3 and info["class_names"] == ["class_0", "class_1", "class_2"]
    assert info["train"] == {"pattern": "train-{000000..000004}.tar", "size": 18, "shard_sizes": [4, 4, 4, 4, 2]}
    assert info["val"] == {"pattern": "val-{000000..000001}.tar", "size": 6, "shard_sizes": [4, 2]}
    assert sorted(p.name for p in shards.glob("*.tar")) == [f"train-{i:06d}.tar" for i in range(5)] + [
        "val-000000.tar", "val-000001.tar"]
    assert data.describe(str(shards)) == data.DataSpec(3, 18, 6, info["class_names"], "shards")


def test_shard_train_batches_have_correct_labels_and_repeats(shards):
    batches = take(data.train_batches(str(shards), EVAL, global_batch=6, seed=0, repeats=3, workers=0,
                                      shuffle_buffer=8), 6)
    for batch in batches:
        assert batch["image"].shape == (6, 32, 32, 3) and batch["image"].dtype == np.uint8
        assert batch["label"].dtype == np.int32 and batch["skipped"] == 0
        np.testing.assert_array_equal(color_labels(batch["image"]), batch["label"])
        copies = batch["image"].reshape(2, 3, -1)
        assert (copies == copies[:, :1]).all(), "decode once, three copies in a row"
    hosts = [next(data.train_batches(str(shards), EVAL, global_batch=6, seed=0, workers=0, process_index=h,
                                     process_count=2)) for h in range(2)]
    assert all(h["image"].shape == (3, 32, 32, 3) for h in hosts)


def test_shard_eval_batches_cover_val_once_with_equal_counts(shards, folder):
    hosts = [list(data.eval_batches(str(shards), EVAL, global_batch=4, workers=w, process_index=h, process_count=2))
             for h, w in ((0, 0), (1, 2))]
    # host 0 reads val shard 0 (4 images), host 1 shard 1 (2 images): 2 batches of 2 each.
    assert len(hosts[0]) == len(hosts[1]) == 2
    seen = []
    for batch in (b for batches in hosts for b in batches):
        real = batch["label"] >= 0
        np.testing.assert_array_equal(color_labels(batch["image"][real]), batch["label"][real])
        seen += [digest(image) for image in batch["image"][real]]
    expected = [digest(EVAL(data._decode_image(str(p)))) for p in (folder / "val").rglob("*.jpg")]
    assert sorted(seen) == sorted(expected)


def test_raw_shard_pattern_needs_num_classes(shards):
    pattern = str(shards / "train-{000000..000004}.tar")
    with pytest.raises(UserError, match="without info.json"):
        data.describe(pattern)
    assert data.describe(pattern, num_classes=3) == data.DataSpec(3, None, None, None, "shards")
    batch = next(data.train_batches(pattern, EVAL, global_batch=4, seed=0, workers=0, shuffle_buffer=4))
    np.testing.assert_array_equal(color_labels(batch["image"]), batch["label"])
    assert list(data.eval_batches(pattern, EVAL, global_batch=4, workers=0)) == []
    with pytest.raises(UserError, match="shards are missing"):
        next(data.train_batches(str(shards / "train-{000000..000009}.tar"), EVAL, global_batch=4, seed=0,
                                workers=0))


def test_pytorch_recipes_train_on_a_raw_shard_pattern(shards):
    """common.torch_run.train_batches takes raw shards (the recipe gave --num-classes; the data cannot say it): only
    the source's kind decides whether batches are made on the device. Asking the data for its classes refused them."""
    env = torch_run.DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    batches = torch_run.train_batches(str(shards / "train-{000000..000004}.tar"), dict(image_size=32), env,
                                      global_batch=4, seed=0, start_step=0, workers=0, num_classes=3, image_size=32,
                                      mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    batch = next(batches)
    assert batch["image"].shape == (4, 3, 32, 32) and set(batch["label"].tolist()) <= {0, 1, 2}


def test_make_shards_missing_source_exits_2(run, tmp_path):
    result = run("scripts/make_shards.py", tmp_path / "nowhere", tmp_path / "out")
    assert result.returncode == 2 and result.stderr.strip().startswith("error:"), result.stderr


def test_make_shards_max_side_shrinks_large_images_keeps_small_ones_and_labels(tmp_path):
    src = tmp_path / "large"
    sizes = [(300, 200), (90, 240), (48, 40)]  # landscape, portrait (both shrunk to 64), small (kept as it is)
    for c, color in enumerate(COLORS):
        for i, (width, height) in enumerate(sizes):
            pixels = np.clip(np.array(color) + np.random.default_rng(10 * c + i).integers(-30, 30, (height, width, 3)),
                             0, 255).astype(np.uint8)
            (src / "train" / f"class_{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(src / "train" / f"class_{c}" / f"img_{i}.png")  # PNG: re-encoding shows
    info = _make_shards_module().main([str(src), str(tmp_path / "out"), "--max-side", "64", "--quality", "85"])
    assert (info["max_side"], info["quality"]) == (64, 85)
    assert json.loads((tmp_path / "out" / "info.json").read_text())["max_side"] == 64
    found = []  # (file name, size, format, extension) of each stored image
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for member, payload in members.items():
        key, extension = member.split(".", 1)
        if extension == "cls":
            continue
        image = Image.open(io.BytesIO(payload))
        label = int(members[f"{key}.cls"])
        assert color_labels(np.asarray(image.convert("RGB"))[None])[0] == label, f"{member} lost its label"
        found.append((key.split("_", 1)[1], image.size, image.format, extension))
    assert len(found) == 9
    for name, size, image_format, extension in found:
        if name == "img_2":  # 48 x 40: small enough, the original PNG bytes
            assert (size, image_format, extension) == ((48, 40), "PNG", "png"), name
        else:
            assert max(size) == 64 and image_format == "JPEG" and extension == "jpg", (name, size, image_format)
    assert {(name, size) for name, size, _, _ in found} == {("img_0", (64, 43)), ("img_1", (24, 64)),
                                                           ("img_2", (48, 40))}, "aspect ratio not kept"


# ----------------------------------------------------------------------------------------------
# digits, cifar
# ----------------------------------------------------------------------------------------------


def test_digits():
    spec = data.describe("digits")
    assert spec.num_classes == 10 and spec.train_size + spec.val_size == 1797 and spec.val_size == 359
    batch = next(data.train_batches("digits", augment.eval_transform(32, crop_ratio=1.0), global_batch=8, seed=0,
                                    workers=0))
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert ((0 <= batch["label"]) & (batch["label"] < 10)).all()


def test_cifar10_from_a_local_pickle_file(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                         "labels": rng.integers(0, 10, 4).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(batches[name], f)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names}, f)
    monkeypatch.setenv("VIT_RECIPES_DATA", str(tmp_path))

    assert data.describe("cifar10") == data.DataSpec(10, 20, 4, names, "cifar10")
    (batch,) = data.eval_batches("cifar10", augment.eval_transform(32, crop_ratio=1.0), global_batch=4, workers=0)
    test = batches["test_batch"]
    np.testing.assert_array_equal(batch["image"], test["data"].reshape(4, 3, 32, 32).transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(batch["label"], test["labels"])


def test_cifar100_from_a_local_pickle_file(tmp_path, monkeypatch):
    """cifar100 through torchvision's CIFAR100: fine labels, the fine class names, the test split as val."""
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    splits = {name: {"data": rng.integers(0, 256, (rows, 3072), dtype=np.uint8),
                     "fine_labels": rng.integers(0, 100, rows).tolist(),
                     "coarse_labels": rng.integers(0, 20, rows).tolist()} for name, rows in (("train", 6), ("test", 2))}
    for name, split in splits.items():
        with open(folder / name, "wb") as f:
            pickle.dump(split, f)
    names = [f"class{i:02d}" for i in range(100)]
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": names, "coarse_label_names": [f"super{i}" for i in range(20)]}, f)
    monkeypatch.setenv("VIT_RECIPES_DATA", str(tmp_path))

    assert data.describe("cifar100") == data.DataSpec(100, 6, 2, names, "cifar100")
    (batch,) = data.eval_batches("cifar100", augment.eval_transform(32, crop_ratio=1.0), global_batch=2, workers=0)
    test = splits["test"]
    np.testing.assert_array_equal(batch["image"], test["data"].reshape(2, 3, 32, 32).transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(batch["label"], test["fine_labels"])

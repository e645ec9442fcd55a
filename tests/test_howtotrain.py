"""howtotrain_vit.py on CPU: the AugReg table, lr schedule, clipping, DDP parity, learning, history, predict, exact
resume, preemption and bad input. Most runs are in-process `main([...])` calls on tiny ViTs (16 px digits, patch 4),
to stay fast; one test launches torchrun."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, assert_user_error, recipe_env
from PIL import Image
from torch import nn

import howtotrain_vit as recipe
from common import augment, data
from common import torch_run as tr
from common.runlog import read_log

TINY = ["--data", "digits", "--model", "vit_tiny_patch16_224", "--image-size", "16", "--patch-size", "4",
        "--depth", "2", "--embed-dim", "32", "--num-heads", "2", "--workers", "0", "--batch-size", "32",
        "--eval-batch-size", "120", "--log-interval", "1", "--augreg", "none", "--random-crop", "none", "--hflip", "0",
        "--test-crop-ratio", "1", "--lr-scaling", "none"]

# The paper's augmentation levels (§3.3; big_vision configs/vit_i1k.py): (RandAugment layers, magnitude, mixup alpha).
PAPER_AUGREG = {"none": (0, 0, 0.0), "light1": (2, 0, 0.0), "light2": (2, 10, 0.2), "medium1": (2, 15, 0.2),
                "medium2": (2, 15, 0.5), "strong1": (2, 20, 0.5), "strong2": (2, 20, 0.8)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models on one thread


def train(*args) -> int:
    return recipe.main(["train", *map(str, args)])


def final_state(run_dir: Path) -> dict:
    return tr.load_checkpoint(tr.find_checkpoint(run_dir))


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_log(run_dir) if "loss" in r}


# ---------------------------------------------------------------------------------------------- the recipe's tables


def test_augreg_levels_match_the_paper_table():
    assert {name: tuple(level) for name, level in recipe.AUGREG_LEVELS.items()} == PAPER_AUGREG
    for name, (layers, magnitude, alpha) in PAPER_AUGREG.items():
        args = recipe.parse_args(["train", "--augreg", name])
        assert (args.randaug_layers, args.randaug_magnitude, args.mixup) == (layers, magnitude, alpha), name
        assert args.dropout == args.drop_path == 0.0
        randaug = [t for t in recipe.train_transform(args).transforms if type(t).__name__ == "RandAugment"]
        if layers == 0:
            assert not randaug, f"{name}: no RandAugment expected"
        else:
            assert randaug[0].num_layers == layers and {op.magnitude for op in randaug[0].ops} == {magnitude}, name
            # timm clips magnitudes at 10 by default; the paper's TF RandAugment does not.
            assert all((op.magnitude_max or 10) >= magnitude for op in randaug[0].ops), name


def test_each_component_overrides_the_level_and_reg_sets_dropout_and_drop_path():
    args = recipe.parse_args(["train", "--augreg", "strong2", "--reg", "0.1", "--mixup", "0", "--randaug-magnitude",
                              "5", "--drop-path", "0.2"])
    assert (args.randaug_layers, args.randaug_magnitude, args.mixup) == (2, 5, 0.0)
    assert (args.dropout, args.drop_path) == (0.1, 0.2)
    model = recipe.create_model("vit_tiny_patch16_224", recipe.model_kwargs(args, 10) | dict(depth=3, img_size=32),
                                pre_logits=True, head_bias=recipe.head_bias("sigmoid", 10))
    assert model.pos_drop.p == 0.1 and model.blocks[0].mlp.drop1.p == 0.1 and model.blocks[0].attn.proj_drop.p == 0.1
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)  # timm: linear from 0 to the rate
    assert torch.allclose(model.head.fc.bias, torch.full((10,), -math.log(10))) and not model.head.fc.weight.any()


def test_light0_is_refused_with_the_valid_levels(capsys):
    assert_user_error(train("--augreg", "light0"), capsys, "light0", "light1", "medium2", "strong2")


def big_vision_lr(step: int, peak: float, total: int, warmup: int, decay: str = "cosine") -> float:
    """big_vision's create_learning_rate_schedule from optax's own schedules: the decay runs over the steps after
    warmup and the warmup multiplies it by min(1, step / warmup) (an independent reference, not the recipe's code)."""
    import optax

    after = optax.cosine_decay_schedule(peak, total - warmup) if decay == "cosine" else \
        optax.linear_schedule(peak, 0.0, total - warmup)
    return float(after(max(step - warmup, 0))) * (min(1.0, step / warmup) if warmup else 1.0)


def test_lr_schedule_matches_its_formula():
    kw = dict(peak_lr=1e-3, total_steps=1000, warmup_steps=100)
    for decay in ("cosine", "linear"):
        for step in (0, 1, 50, 99, 100, 101, 333, 550, 999, 1000):
            assert recipe.warmup_decay_lr(step, decay=decay, **kw) == pytest.approx(
                big_vision_lr(step, 1e-3, 1000, 100, decay), rel=1e-6, abs=1e-9), (decay, step)  # optax: float32
    # Anchors computed by hand: warmup from 0, the peak at the end of warmup, half-way down, and 0 at the end.
    assert recipe.warmup_decay_lr(0, **kw) == 0.0
    assert recipe.warmup_decay_lr(25, **kw) == pytest.approx(2.5e-4)
    assert recipe.warmup_decay_lr(100, **kw) == pytest.approx(1e-3)
    assert recipe.warmup_decay_lr(550, **kw) == pytest.approx(5e-4)
    assert recipe.warmup_decay_lr(775, decay="linear", **kw) == pytest.approx(2.5e-4)
    assert recipe.warmup_decay_lr(1000, **kw) == pytest.approx(0.0, abs=1e-12)


def test_min_lr_and_warmup_epochs_reshape_the_schedule():
    """--min-lr raises the end of the decay (min + (peak - min) * factor: the paper's is min 0); --warmup-epochs gives
    the warmup in epochs of the data."""
    kw = dict(peak_lr=1e-3, total_steps=1000, warmup_steps=100, min_lr=1e-5)
    assert recipe.warmup_decay_lr(1000, **kw) == pytest.approx(1e-5)
    assert recipe.warmup_decay_lr(550, **kw) == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2)
    assert recipe.warmup_decay_lr(50, **kw) == pytest.approx(5e-4)
    args = recipe.parse_args(["train", "--warmup-epochs", "2.5", "--auto-augment", "rand-m9-mstd0.5-inc1"])
    assert args.warmup_epochs == 2.5 and recipe.randaug_policy(args) == "rand-m9-mstd0.5-inc1"
    assert recipe.randaug_policy(recipe.parse_args(["train", "--aa", "none"])) is None
    assert recipe.randaug_policy(recipe.parse_args(["train"])) == "rand-n2-m15-mmax15"  # medium2, the default


def test_cutmix_pastes_the_neighbours_box_and_mixes_targets_by_its_area():
    """timm's batch cutmix against the global batch rolled by one: inside one box every image holds its neighbour's
    pixels, outside its own, and the targets mix by the box's true area (lam = 1 - area / image)."""
    images = torch.arange(4 * 3 * 8 * 8, dtype=torch.float32).reshape(4, 3, 8, 8)
    targets = torch.eye(4)
    rolled = images.roll(1, 0)
    boxes = 0
    for seed in range(50):
        mixed, mixed_targets = recipe.cutmix(images, targets, 1.0, np.random.default_rng(seed))
        from_neighbour = (mixed == rolled) & (mixed != images)
        area = from_neighbour[0, 0].float().mean().item()
        assert ((mixed == images) | from_neighbour).all(), "every pixel is its own or its neighbour's"
        assert from_neighbour.all(0).all(0).float().mean().item() == pytest.approx(area), "one box for all images"
        torch.testing.assert_close(mixed_targets, (1 - area) * targets + area * targets.roll(1, 0))
        boxes += area > 0
    assert boxes > 40, "cutmix pastes a box in nearly every batch"
    args = recipe.parse_args(["train", "--mixup", "0", "--cutmix", "1.0"])
    mixed, _ = recipe.mix(images, targets, args, np.random.default_rng(3))
    assert not torch.equal(mixed, images) and (mixed.unique().numel() == images.unique().numel())


def test_weight_decay_and_lr_follow_the_paper_conventions():
    args = recipe.parse_args(["train", "--batch-size", "4096"])
    assert recipe.peak_lr(args) == pytest.approx(1e-3)
    model = recipe.create_model("vit_tiny_patch16_224", dict(num_classes=10, img_size=32, depth=1), pre_logits=True,
                                head_bias=0.0)
    optimizer = recipe.make_optimizer(model, args, recipe.peak_lr(args), torch.device("cpu"))
    decays = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    # 1e-4 without the lr factor = AdamW weight_decay 0.1 at lr 1e-3, on weight matrices only.
    assert decays[id(names["blocks.0.attn.qkv.weight"])] == pytest.approx(0.1)
    assert decays[id(names["head.fc.weight"])] == pytest.approx(0.1)
    for name in ("pos_embed", "cls_token", "blocks.0.attn.qkv.bias", "blocks.0.norm1.weight"):
        assert decays[id(names[name])] == 0.0, name
    assert recipe.peak_lr(recipe.parse_args(["train", "--batch-size", "1024"])) == pytest.approx(5e-4)  # sqrt rule


def big_vision_mixup(images: torch.Tensor, targets: torch.Tensor, alpha: float, seed: int):
    """The recipe's mixup for one batch; the one line to adapt if its signature changes."""
    return recipe.mixup(images, targets, alpha, np.random.default_rng(seed))


def test_mixup_is_big_vision_mixup():
    """big_vision utils.mixup, from its math: one ratio per batch, lam = max(r, 1 - r) with r ~ Beta(alpha, alpha),
    every image and target mixed with the batch rolled by one (image i with image i - 1). lam is read back from the
    targets (distinct one-hot rows), the images must use the same lam, and over many batches lam follows
    max(r, 1 - r) of torch's Beta sampler (an independent sampler). Mutations that fail: lam = r (not the max),
    the targets rolled the other way."""
    batch, classes, alpha = 6, 6, 0.5
    images = torch.randn(batch, 3, 4, 4)
    targets = torch.eye(classes)[:batch]
    lams = []
    for seed in range(400):
        mixed_images, mixed_targets = big_vision_mixup(images, targets, alpha, seed)
        lam = mixed_targets[0, 0].item()
        assert 0.5 <= lam <= 1.0, lam
        torch.testing.assert_close(mixed_targets, lam * targets + (1 - lam) * targets.roll(1, 0))
        torch.testing.assert_close(mixed_images, lam * images + (1 - lam) * images.roll(1, 0))
        lams.append(lam)
    torch.manual_seed(0)
    r = torch.distributions.Beta(alpha, alpha).sample((20000,))
    expected = torch.maximum(r, 1 - r).numpy()
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        assert np.quantile(lams, q) == pytest.approx(np.quantile(expected, q), abs=0.05), q
    unmixed_images, unmixed_targets = big_vision_mixup(images, targets, 0.0, 0)
    assert torch.equal(unmixed_images, images) and torch.equal(unmixed_targets, targets)


def test_gradient_clipping_bounds_the_global_norm():
    args = recipe.parse_args(["train", *TINY, "--clip-grad", "0.01"])
    torch.manual_seed(0)
    model = recipe.create_model(args.model, recipe.model_kwargs(args, 10), pre_logits=True, head_bias=-math.log(10))
    optimizer = recipe.make_optimizer(model, args, 1e-3, torch.device("cpu"))
    env = tr.DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    batch = {"image": torch.randn(8, 3, 16, 16), "label": torch.arange(8)}
    metrics = recipe.train_step(model, optimizer, tr.grad_scaler(env.device, "fp32"), batch, 0, args, env, 10)
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()
    assert metrics["grad_norm"].item() > 0.01, "make the gradients larger than the clip for this test to mean anything"
    assert clipped == pytest.approx(0.01, rel=1e-4)


# ---------------------------------------------------------------------------------------------- a shared digits run

LEARN = [*TINY, "--embed-dim", "64", "--batch-size", "64", "--epochs", "6", "--warmup-steps", "20", "--lr", "1e-3",
         "--log-interval", "5"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("howtotrain") / "digits"
    assert train(*LEARN, "--output-dir", out) == 0
    return out


def test_digits_learns_beyond_chance(digits_run):
    evals = [r for r in read_log(digits_run) if "val_top1" in r]
    assert len(evals) == 6, "one eval per epoch"
    assert evals[-1]["val_top1"] > 50, f"10 classes, chance is 10%: got {evals[-1]['val_top1']:.1f}%"
    config = json.loads((digits_run / "config.json").read_text())
    assert config["num_classes"] == 10 and config["class_names"] == [str(i) for i in range(10)]
    assert tr.checkpoint_steps(digits_run / "best"), "the best checkpoint is kept"


def test_logged_lr_follows_the_schedule(digits_run):
    config = json.loads((digits_run / "config.json").read_text())
    records = [r for r in read_log(digits_run) if "lr" in r]
    assert len(records) > 10
    for r in records:  # the record of step s holds the lr of the update that made step s (big_vision count s - 1)
        expected = big_vision_lr(r["step"] - 1, config["peak_lr"], config["total_steps"], 20)
        assert r["lr"] == pytest.approx(expected, rel=1e-5, abs=1e-6 * config["peak_lr"]), r


def test_history_writes_a_png_and_a_table(digits_run, capsys):
    assert recipe.main(["history", str(digits_run)]) == 0
    out = capsys.readouterr().out
    with Image.open(digits_run / "history.png") as image:
        assert image.format == "PNG" and image.size[0] > 500
        colors = image.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colors and len(colors) > 20, "the figure draws curves, not a blank canvas"
    rows = [line.split() for line in out.splitlines() if re.match(r"\s*\d+ ", line)]
    evals = [r for r in read_log(digits_run) if "val_top1" in r]
    assert len(rows) == len(evals) == 6, out
    for row, record in zip(rows, evals):  # step, epoch, train loss, val loss, top-1, top-5, lr: the log's values
        assert int(row[0]) == record["step"]
        assert [float(x) for x in row[3:6]] == pytest.approx(
            [record["val_loss"], record["val_top1"], record["val_top5"]], abs=1e-2), (row, record)
    best = max(evals, key=lambda r: r["val_top1"])
    assert f"best val top-1 {best['val_top1']:.2f}% at step {best['step']}" in out


def test_predict_prints_top_k_rows(digits_run, tmp_path, capsys):
    batch = next(data.eval_batches("digits", augment.eval_transform(32, crop_ratio=1.0), global_batch=40, workers=0))
    (tmp_path / "nested").mkdir()
    labels = {}
    for i, (image, label) in enumerate(zip(batch["image"], batch["label"])):
        path = tmp_path / ("nested" if i % 2 else "") / f"{i}.png"
        Image.fromarray(image).save(path)
        labels[str(path)] = str(label)
    (tmp_path / "nested" / "broken.png").write_bytes(b"not a png")
    assert recipe.main(["predict", str(digits_run), str(tmp_path), "--top-k", "3", "--batch-size", "16"]) == 0
    captured = capsys.readouterr()
    rows = [line.split("\t") for line in captured.out.strip().splitlines()]
    assert len(rows) == 40 and "broken.png" in captured.err
    correct = 0
    for path, *pairs in rows:
        names, probs = pairs[0::2], [float(p) for p in pairs[1::2]]
        assert len(names) == 3 and set(names) <= {str(i) for i in range(10)}
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-4
        correct += names[0] == labels[path]
    assert correct >= 20, f"predict agrees with the labels on {correct}/40 images (the model's val top-1 is > 50%)"


# ---------------------------------------------------------------------------------------------- parity and resume


def test_two_process_torchrun_matches_one_process(tmp_path):
    """The global batch split over 2 processes gives the 1-process update, with the data-level draws on: inception
    crop, flip, RandAugment and mixup (its partner is the next image of the global batch, possibly another
    process's). Dropout and drop path stay off: their masks are drawn per process (README)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [*TINY, "--training-steps", "4", "--warmup-steps", "1", "--lr", "1e-3", "--eval-interval", "4",
            "--mixup", "0.5", "--random-crop", "rrc", "--hflip", "0.5", "--randaug-layers", "2",
            "--randaug-magnitude", "10"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                           "howtotrain_vit.py", "train", *args, "--output-dir", str(tmp_path / "ddp")], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=recipe_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert train(*args, "--output-dir", tmp_path / "one") == 0
    ddp, one = final_state(tmp_path / "ddp"), final_state(tmp_path / "one")
    assert ddp["config"]["world_size"] == 2 and ddp["step"] == one["step"] == 4
    torch.manual_seed(0)
    initial = recipe.build_model(one["config"]).state_dict()
    assert max((one["model"][k] - initial[k]).abs().max() for k in initial) > 1e-4, "the weights did not move"
    for key, value in one["model"].items():
        torch.testing.assert_close(ddp["model"][key], value, rtol=0, atol=1e-5, msg=key)
    evals = [[r for r in read_log(tmp_path / run) if "val_images" in r][-1] for run in ("ddp", "one")]
    assert evals[0]["val_images"] == evals[1]["val_images"] == 359
    assert evals[0]["val_top1"] == pytest.approx(evals[1]["val_top1"])


def test_grad_accum_matches_the_full_batch(tmp_path):
    args = [*TINY, "--training-steps", "3", "--warmup-steps", "1", "--lr", "1e-3", "--eval-interval", "100"]
    assert train(*args, "--output-dir", tmp_path / "full") == 0
    assert train(*args, "--grad-accum", "4", "--output-dir", tmp_path / "accum") == 0
    full, accum = final_state(tmp_path / "full")["model"], final_state(tmp_path / "accum")["model"]
    for key, value in full.items():
        torch.testing.assert_close(accum[key], value, rtol=0, atol=1e-5, msg=key)


RESUME = [*TINY, "--training-steps", "8", "--warmup-steps", "2", "--lr", "1e-3", "--augreg", "light2", "--reg", "0.1",
          "--random-crop", "rrc", "--hflip", "0.5", "--eval-interval", "100", "--workers", "1"]


def test_resume_after_stop_equals_uninterrupted_run(tmp_path):
    """RandAugment, mixup, dropout and drop path on: data, augmentation and masks must all continue exactly. One loader
    worker, so that the loader's per-sample seeding cannot stand in for the train step's own RNG."""
    assert train(*RESUME, "--output-dir", tmp_path / "straight") == 0
    assert train(*RESUME, "--stop-after", "3", "--output-dir", tmp_path / "stopped") == 0
    assert tr.checkpoint_steps(tmp_path / "stopped" / "checkpoints") == [3]
    assert train(*RESUME, "--resume", "--output-dir", tmp_path / "stopped") == 0
    straight, resumed = final_state(tmp_path / "straight"), final_state(tmp_path / "stopped")
    assert straight["step"] == resumed["step"] == 8
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), f"{key} differs after resuming"
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "stopped")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert all(a[s] == b[s] for s in a), "the resumed run's losses differ from the uninterrupted run's"


# ---------------------------------------------------------------------------------------------- bad input


def test_predict_refuses_missing_images(digits_run, tmp_path, capsys):
    assert_user_error(recipe.main(["predict", str(digits_run), str(tmp_path / "none.jpg")]), capsys, "none.jpg")


def test_benchmark_prints_throughput(tmp_path, capsys):
    assert train(*TINY, "--benchmark", "--benchmark-steps", "2", "--data", "synthetic", "--num-classes", "10",
                 "--output-dir", tmp_path) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["img_per_sec"] > 0 and result["step_ms"] > 0 and result["train_gflops_per_img"] > 0
    assert set(result) >= {"peak_memory_gib", "mfu"}
    assert not (tmp_path / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------- finetune (transfer)

FINETUNE = ["--data", "digits", "--workers", "0", "--batch-size", "32", "--eval-batch-size", "120", "--log-interval",
            "5", "--random-crop", "none", "--hflip", "0", "--test-crop-ratio", "1", "--lr-scaling", "none",
            "--warmup-steps", "2", "--lr", "0.03"]
# digits_run's architecture as timm names it (LEARN: width 64, 2 blocks, 2 heads, patch 4, 16 px).
TIMM_SHAPE = dict(img_size=16, patch_size=4, depth=2, embed_dim=64, num_heads=2)
TIMM_FLAGS = ["--model", "vit_tiny_patch16_224", "--patch-size", "4", "--depth", "2", "--embed-dim", "64",
              "--num-heads", "2"]


def finetune(*args) -> int:
    return recipe.main(["finetune", *map(str, args)])


@pytest.fixture(scope="module")
def timm_files(digits_run, tmp_path_factory) -> dict[str, Path]:
    """digits_run's trained ViT as a timm checkpoint file, made as timm's released augreg ones are saved locally:
    `timm.create_model(...)` (with a 5-class head of its own) loaded with the run's weights, `.state_dict()` saved
    as .pth and as .safetensors."""
    import timm
    from safetensors.torch import save_file

    model = timm.create_model("vit_tiny_patch16_224", num_classes=5, **TIMM_SHAPE)
    trained = {k: v for k, v in final_state(digits_run)["model"].items() if not k.startswith("head.")}
    assert set(model.load_state_dict(trained, strict=False).missing_keys) == {"head.weight", "head.bias"}
    folder = tmp_path_factory.mktemp("timm")
    torch.save(model.state_dict(), folder / "vit.pth")
    save_file(model.state_dict(), str(folder / "vit.safetensors"))
    return {".pth": folder / "vit.pth", ".safetensors": folder / "vit.safetensors"}


def test_finetune_defaults_are_the_transfer_config():
    """big_vision configs/transfer.py (the ImageNet row): lr 0.01, 20k steps, inception crop; SGD momentum 0.9 with
    no weight decay, on a zero head."""
    args = recipe.parse_args(["finetune", "--init", "random", "--model", "S/16"])
    expected = dict(TRANSFER, lr=0.01, training_steps=20_000, random_crop="rrc", eval_interval=1000)
    assert {key: getattr(args, key) for key in expected} == expected
    model = recipe.create_model(args.model, dict(num_classes=10, img_size=32, depth=1), pre_logits=False,
                                head_bias=recipe.head_bias(args.loss, 10))
    optimizer = recipe.make_optimizer(model, args, recipe.peak_lr(args), torch.device("cpu"))
    assert isinstance(optimizer, torch.optim.SGD) and {g["momentum"] for g in optimizer.param_groups} == {0.9}
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0}
    assert {g["decoupled_weight_decay"] for g in optimizer.param_groups} == {0.0}
    assert not model.head.weight.any() and not model.head.bias.any(), "softmax transfer: a zero head, bias 0"


def test_sgd_weight_decay_is_decoupled_as_adamws():
    """--weight-decay means the same for finetune's SGD as for train's Adam: w *= 1 - wd * lr / peak per step,
    outside the gradient (and the momentum)."""
    args = recipe.parse_args(["finetune", "--init", "random", "--model", "S/16", "--weight-decay", "1e-3"])
    layer = nn.Linear(3, 3)
    nn.init.ones_(layer.weight)
    nn.init.ones_(layer.bias)
    optimizer = recipe.make_optimizer(layer, args, 0.01, torch.device("cpu"))  # peak lr 0.01
    tr.set_lr(optimizer, 0.005)
    layer.weight.grad, layer.bias.grad = torch.zeros(3, 3), torch.zeros(3)
    optimizer.step()
    torch.testing.assert_close(layer.weight.detach(), torch.full((3, 3), 1 - 1e-3 * 0.005 / 0.01))
    assert torch.equal(layer.bias.detach(), torch.ones(3)), "biases are not decayed (big_vision: kernels only)"
    assert not optimizer.state[layer.weight]["momentum_buffer"].any(), "the decay stays out of the momentum"


def test_warmup_start_factor_is_linearlr():
    """torch's LinearLR(start_factor=0.01) then cosine to min_lr, per step: the PyTorch study's schedule."""
    kw = dict(peak_lr=5e-4, total_steps=1000, warmup_steps=100, min_lr=1e-6, warmup_start_factor=0.01)
    assert recipe.warmup_decay_lr(0, **kw) == pytest.approx(5e-6)
    assert recipe.warmup_decay_lr(50, **kw) == pytest.approx(5e-4 * (0.01 + 0.99 * 0.5))
    assert recipe.warmup_decay_lr(100, **kw) == pytest.approx(5e-4)
    assert recipe.warmup_decay_lr(1000, **kw) == pytest.approx(1e-6)


def test_resmall_crop_is_transfer_pys_cifar_crop(capsys):
    """resize_small(image / crop ratio) | random_crop(image): a window of the resized image, anywhere in it; the
    host loader only."""
    args = recipe.parse_args(["finetune", "--init", "random", "--model", "S/16", "--random-crop", "resmall",
                              "--image-size", "24", "--test-crop-ratio", str(24 / 28), "--hflip", "0"])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (10, 20, 3), dtype=np.uint8))
    resized = np.asarray(image.resize((56, 28), Image.BILINEAR))
    windows = {resized[top:top + 24, left:left + 24].tobytes() for top in range(5) for left in range(33)}
    offsets = set()
    for _ in range(20):
        crop = recipe.train_transform(args)(image)
        assert crop.shape == (24, 24, 3) and crop.tobytes() in windows, "not a window of the resized image"
        offsets.add(crop.tobytes())
    assert len(offsets) > 5, "the crop is random"
    assert_user_error(finetune("--init", "random", "--model", "S/16", "--random-crop", "resmall", "--loader", "gpu"),
                      capsys, "--loader pil")


def test_init_position_embedding_is_resized_as_torch_bicubic(timm_files):
    """A 4 x 4 grid (16 px, patch 4) into a 24 px model (6 x 6): F.interpolate(bicubic, align_corners=False) on the
    (1, D, g, g) grid, the class token's row kept; every other tensor as in the file, the head zero."""
    from safetensors.torch import load_file

    weights = load_file(str(timm_files[".safetensors"]))
    model = recipe.create_model("vit_tiny_patch16_224", dict(num_classes=10, **dict(TIMM_SHAPE, img_size=24)),
                                pre_logits=False, head_bias=0.0)
    recipe.load_init_weights(model, dict(weights), "file")
    grid = weights["pos_embed"][:, 1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    loaded = model.state_dict()
    torch.testing.assert_close(loaded["pos_embed"][:, 1:], expected.reshape(1, 36, 64), rtol=0, atol=1e-6)
    assert torch.equal(loaded["pos_embed"][:, :1], weights["pos_embed"][:, :1])
    for key, value in weights.items():
        if key != "pos_embed" and not key.startswith("head."):
            assert torch.equal(loaded[key], value), key
    assert not loaded["head.weight"].any() and not loaded["head.bias"].any()


def test_finetune_from_a_train_run_learns(digits_run, tmp_path):
    out = tmp_path / "ft"
    assert finetune("--init", digits_run, *FINETUNE, "--image-size", 16, "--training-steps", 30, "--output-dir",
                    out) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["trained_by"] == "howtotrain_vit.py finetune" and str(digits_run) in config["init_from"]
    assert config["model_kwargs"]["embed_dim"] == 64 and config["pre_logits"] and config["loss"] == "softmax"
    evals = [r for r in read_log(out) if "val_top1" in r]
    assert evals[-1]["val_top1"] > 35, f"10 classes, chance is 10%: got {evals[-1]['val_top1']:.1f}%"


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_finetune_from_a_timm_file_at_another_size_learns(timm_files, tmp_path, suffix):
    out = tmp_path / "ft"
    assert finetune("--init", timm_files[suffix], *TIMM_FLAGS, *FINETUNE, "--image-size", 24, "--training-steps", 30,
                    "--output-dir", out) == 0
    state = final_state(out)
    assert state["model"]["pos_embed"].shape == (1, 1 + 6 * 6, 64) and state["model"]["head.weight"].shape == (10, 64)
    train_losses = list(losses(out).values())
    evals = [r for r in read_log(out) if "val_top1" in r]
    assert train_losses[-1] < train_losses[0] - 0.3, train_losses
    assert evals[-1]["val_top1"] > 25, f"10 classes, chance is 10%: got {evals[-1]['val_top1']:.1f}%"


def test_finetune_resumes_bitwise(timm_files, tmp_path):
    """Stop after 3 steps and resume (with the upstream file gone: the run's config gives the architecture): the
    weights, the momentum and the log of an uninterrupted run (inception crop, flip and one loader worker on, so that
    the data continue exactly too)."""
    args = ["--init", timm_files[".pth"], *TIMM_FLAGS, *FINETUNE, "--image-size", 24, "--training-steps", 8,
            "--random-crop", "rrc", "--hflip", "0.5", "--workers", 1, "--log-interval", 1, "--eval-interval", 100]
    assert finetune(*args, "--output-dir", tmp_path / "straight") == 0
    assert finetune(*args, "--stop-after", 3, "--output-dir", tmp_path / "stopped") == 0
    upstream = Path(timm_files[".pth"])
    moved = upstream.rename(upstream.with_suffix(".away"))  # the checkpoint holds the weights now
    try:
        assert finetune(*args, "--resume", "--output-dir", tmp_path / "stopped") == 0
    finally:
        moved.rename(upstream)
    straight, resumed = final_state(tmp_path / "straight"), final_state(tmp_path / "stopped")
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), f"{key} differs after resuming"
    for index, buffers in straight["optimizer"]["state"].items():
        assert torch.equal(resumed["optimizer"]["state"][index]["momentum_buffer"], buffers["momentum_buffer"])
    assert losses(tmp_path / "straight") == losses(tmp_path / "stopped")


def test_finetune_refuses_bad_init(digits_run, timm_files, tmp_path, capsys):
    def refused(*args, words=()):
        assert_user_error(finetune(*FINETUNE, "--training-steps", 2, "--output-dir", tmp_path / "run", *args),
                          capsys, *words)
        assert not (tmp_path / "run").exists(), "a refused finetune created its run folder"

    refused(words=["--init"])
    refused("--init", tmp_path / "missing", words=["missing", "does not exist"])
    tr.save_checkpoint(tmp_path / "other" / "checkpoints", 1, {"model": {}, "step": 1,
                                                              "config": {"trained_by": "dvt.py train"}})
    refused("--init", tmp_path / "other", words=["dvt.py train, not of howtotrain_vit.py"])
    refused("--init", timm_files[".pth"], words=["--model"])
    refused("--init", timm_files[".safetensors"], *TIMM_FLAGS, "--embed-dim", 48, words=["does not match"])
    refused("--init", digits_run, "--model", "B/16", words=["--model"])
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    refused("--init", tmp_path / "notes.pth", *TIMM_FLAGS, words=["notes.pth"])


# ---------------------------------------------------------------------------------------------- presets

PRESETS = REPO / "scripts" / "howtotrain"
# The paper's ImageNet-1k grid points: 300 epochs at batch 4096, lr 1e-3, warmup 10k steps, sigmoid loss, no
# dropout / stochastic depth; per model the level of big_vision's configs/vit_i1k.py.
GRID = {"ti16": ("vit_tiny_patch16_224", "light1"), "s32": ("vit_small_patch32_224", "medium1"),
        "s16": ("vit_small_patch16_224", "medium2"), "b32": ("vit_base_patch32_224", "medium2"),
        "b16": ("vit_base_patch16_224", "medium2"), "l16": ("vit_large_patch16_224", "medium2")}
PAPER = dict(epochs=300, batch_size=4096, lr=1e-3, lr_ref_batch=4096, weight_decay=1e-4, clip_grad=1.0,
             warmup_steps=10_000, decay="cosine", loss="sigmoid", label_smoothing=0.0, reg=0.0, image_size=224,
             random_crop="rrc", hflip=0.5, test_crop_ratio=0.875, pre_logits=True, adam_b1=0.9, adam_b2=0.999)
ROWS = {f"in1k_{short}_{level}_300ep": dict(PAPER, model=model, augreg=level) for short, (model, level) in GRID.items()}
ROWS["imagenet_36ep"] = dict(PAPER, model="vit_small_patch16_224", augreg="medium2", epochs=36, batch_size=256)
# ImageNet-21k, 300 epochs: the upstreams of timm's <model>_384.augreg_in21k_ft_in1k, from the names of the released
# files (timm vision_transformer.py / vision_transformer_hybrid.py: {P}-i21k-300ep-lr_0.001-aug_{level}-wd_{AdamW
# wd}-do_{reg}-sd_{reg}--imagenet2012-steps_20k-lr_{transfer lr}-res_384): (model, level, wd as big_vision's = AdamW
# wd x 1e-3, reg, transfer lr). Class token and no pre-logits layer: the released ViTs as timm loads them.
I21K = {"ti16": ("vit_tiny_patch16_224", "none", 3e-5, 0.0, 0.03),
        "s32": ("vit_small_patch32_224", "light1", 3e-5, 0.0, 0.03),
        "s16": ("vit_small_patch16_224", "light1", 3e-5, 0.0, 0.03),
        "b32": ("vit_base_patch32_224", "light1", 1e-4, 0.0, 0.03),
        "b16": ("vit_base_patch16_224", "medium1", 1e-4, 0.0, 0.01),
        "l16": ("vit_large_patch16_224", "medium1", 1e-4, 0.1, 0.01),
        "rti16": ("vit_tiny_r_s16_p8_224", "none", 3e-5, 0.0, 0.03),
        "r26s32": ("vit_small_r26_s32_224", "medium2", 3e-5, 0.0, 0.03),
        "r50l32": ("vit_large_r50_s32_224", "medium2", 1e-4, 0.0, 0.01)}
I21K_PAPER = dict(PAPER, pre_logits=False)
for short, (model, level, wd, reg, _) in I21K.items():
    ROWS[f"i21k_{short}_{level}_300ep"] = dict(I21K_PAPER, model=model, augreg=level, weight_decay=wd, reg=reg)
# ImageNet-21k, 30 epochs: big_vision configs/vit_i21k.py's aug_setting per model, wd 1e-4.
for short, level in {"ti16": "none", "s32": "none", "s16": "light1", "b32": "light2", "b16": "light2",
                     "l16": "medium2"}.items():
    ROWS[f"i21k_{short}_{level}_30ep"] = dict(I21K_PAPER, model=I21K[short][0], augreg=level, epochs=30)
# The transfer recipe (big_vision configs/transfer.py): SGD momentum 0.9, no weight decay, clip 1.0, batch 512,
# 500 warmup steps + cosine, softmax, 384 px, eval resize_small(448) | central_crop(384); ImageNet 20k steps with
# inception crop, CIFAR 10k steps with resmall_crop (the docstring's B/32 rows: lr 0.003 CIFAR-10, 0.01 CIFAR-100).
TRANSFER = dict(image_size=384, test_crop_ratio=384 / 448, augreg="none", reg=0.0, mixup=0.0, loss="softmax",
                label_smoothing=0.0, batch_size=512, lr_ref_batch=512, momentum=0.9, weight_decay=0.0, clip_grad=1.0,
                warmup_steps=500, decay="cosine", min_lr=0.0, hflip=0.5)
for short, (model, level, _, _, lr) in I21K.items():
    ROWS[f"ft_i21k_{short}_in1k_384"] = dict(TRANSFER, model=model, lr=lr, training_steps=20_000, random_crop="rrc",
                                            init=f"runs/howtotrain/i21k_{short}_{level}_300ep")
for dataset, lr in (("cifar10", 0.003), ("cifar100", 0.01)):
    ROWS[f"ft_i21k_b32_{dataset}"] = dict(TRANSFER, model="vit_base_patch32_224", lr=lr, training_steps=10_000,
                                          random_crop="resmall", data=dataset, loader="pil",
                                          init="runs/howtotrain/i21k_b32_light1_300ep")
# The PyTorch study's own run (its README): vit-pytorch ViT(dim 1024, depth 6, heads 16, mlp 2048, dropout 0.1,
# emb_dropout 0.1) at 224/16, batch 256, AdamW lr 5e-4, AdamW weight decay 0.05 (= 0.05 x 5e-4 in big_vision's
# convention), LinearLR warmup from 1% over 10k steps, cosine to 1e-6, RandAugment 2 ops magnitude 9, mixup on.
ROWS["port_lucidrain_vit_36ep"] = dict(
    model="vit_large_patch16_224", patch_size=16, embed_dim=1024, depth=6, num_heads=16, mlp_dim=2048, dropout=0.1,
    emb_dropout=0.1, image_size=224, epochs=36, batch_size=256, lr=5e-4, lr_scaling="none", adam_b1=0.9,
    adam_b2=0.999, weight_decay=0.05 * 5e-4, warmup_steps=10_000, warmup_start_factor=0.01, decay="cosine",
    min_lr=1e-6, randaug_layers=2, randaug_magnitude=9, pre_logits=False, loss="softmax")
# The expected top-1 each header states: timm's results/results-imagenet.csv for the released checkpoints (3
# decimals there, 2 here), transfer.py's docstring for the CIFAR rows; 'not verified' where there is no number.
EXPECTED_TOP1 = {"in1k_s16_medium2_300ep": "78.85", "ft_i21k_b32_cifar10": "98.55", "ft_i21k_b32_cifar100": "91.35"}
EXPECTED_TOP1 |= {f"ft_i21k_{short}_in1k_384": top1 for short, top1 in (
    ("ti16", "78.42"), ("s32", "80.49"), ("s16", "83.80"), ("b32", "83.35"), ("b16", "86.00"), ("l16", "87.08"),
    ("rti16", "75.96"), ("r26s32", "84.05"), ("r50l32", "86.18"))}
for short, (_, level, *_) in I21K.items():  # an upstream's header: its transfer's number
    EXPECTED_TOP1[f"i21k_{short}_{level}_300ep"] = "ImageNet-1k " + EXPECTED_TOP1[f"ft_i21k_{short}_in1k_384"]
SOURCES = {"in1k_": "configs/vit_i1k.py", "i21k_": "i21k-300ep", "ft_": "configs/transfer.py"}


def preset_argv(path: Path) -> tuple[str, list[str]]:
    """The command and the flags after `howtotrain_vit.py COMMAND` in a preset, with ${VAR:-default} substituted."""
    text = path.read_text().replace("\\\n", " ")
    defaults = dict(re.findall(r"^(\w+)=\$\{\w+:-([^}]*)\}", text, re.M))
    line = next(line for line in text.splitlines() if re.search(r"howtotrain_vit\.py (train|finetune)", line))
    words = shlex.split(line, comments=True)
    assert words[-1] == "$@", f"{path.name}: end the command with \"$@\" so that flags can be overridden"
    command = next(w for w in words if w in ("train", "finetune"))
    words = words[words.index(command) + 1:-1]
    return command, [re.sub(r"\$\{?(\w+)\}?", lambda m: defaults[m[1]], word) for word in words]


def preset_header(name: str) -> str:
    return " ".join(line.lstrip("#").strip() for line in (PRESETS / f"{name}.sh").read_text().splitlines()[1:]
                    if line.startswith("#"))


def test_one_preset_per_row_and_a_digits_demo():
    assert {p.stem for p in PRESETS.glob("*.sh")} == set(ROWS) | {"digits_demo"}


@pytest.mark.parametrize("name", sorted(ROWS))
def test_preset_matches_the_paper(name):
    command, argv = preset_argv(PRESETS / f"{name}.sh")
    args = recipe.parse_args([command, *argv])
    expected = ROWS[name]
    assert command == ("finetune" if name.startswith("ft_") else "train")
    got = {key: getattr(args, key) for key in expected}
    assert got == expected, {k: (got[k], v) for k, v in expected.items() if got[k] != v}
    assert args.output_dir == f"runs/howtotrain/{name}"
    header = preset_header(name)
    source = next((text for prefix, text in SOURCES.items() if name.startswith(prefix)), "not a paper row")
    if name.endswith("_30ep"):
        source = "configs/vit_i21k.py"
    assert source in header, f"{name}: the header must name its source ({source})"
    if name.startswith("in1k_"):
        assert f"level {args.augreg}" in header, f"{name}: the header must name its AugReg level"
    assert "Expected top-1:" in header, f"{name}: the header must state the expected top-1"
    stated, top1 = header.split("Expected top-1:", 1)[1].strip(), EXPECTED_TOP1.get(name)
    assert top1 in stated if top1 else stated.startswith("not verified"), \
        f"{name}: the header must state the expected top-1 {top1 or 'not verified'}, not {stated[:80]!r}"
    flags = [w for w in argv if w.startswith("--")]
    assert len(flags) == len(set(flags)), f"{name}: a flag is given twice"


def test_presets_are_executable_bash():
    for path in PRESETS.glob("*.sh"):
        assert os.access(path, os.X_OK) and path.read_text().startswith("#!/usr/bin/env bash\n"), path
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0, path
    args = recipe.parse_args(["train", *preset_argv(PRESETS / "digits_demo.sh")[1]])
    assert (args.data, args.output_dir, args.workers) == ("digits", "runs/howtotrain/digits_demo", 0)


# ---------------------------------------------------------------------------------------------- the PyTorch study's CLI

# The command line of the PyTorch study of the paper (an extension of the PyTorch ImageNet example), unchanged but
# for the data, and a tiny vit-pytorch shape in its own flags.
PORT = ["--data", "digits", "--arch", "lucidrain_vit", "--epochs", "36", "--batch-size", "256", "--mixup"]
PORT_TINY = ["--dim", "32", "--depth", "1", "--heads", "2", "--mlp_dim", "64", "--image_size", "16", "--patch_size",
             "4", "-j", "0", "--training-steps", "2", "--log-interval", "1"]


def test_the_studys_flags_are_aliases_of_the_recipes():
    args = recipe.parse_args(["train", "-a", "B/16", "-o", "out", "-j", "3", "-b", "512", "--learning-rate", "5e-4",
                              "--wd", "0.05", "--warmup_period", "500", "--randaug_num_ops", "3",
                              "--randaug_magnitude", "9", "--seed", "7", "--dummy", "-e", "--resume", "out"])
    assert (args.model, args.output_dir, args.workers, args.batch_size, args.lr, args.weight_decay) == (
        "vit_base_patch16_224", "out", 3, 512, 5e-4, 0.05)
    assert (args.warmup_steps, args.randaug_layers, args.randaug_magnitude, args.seed) == (500, 3, 9, 7)
    assert (args.data, args.eval_only, args.resume) == ("synthetic", True, "out")
    assert recipe.parse_args(["train", "--resume"]).resume is True
    # Bare --mixup (the study's switch): the level's alpha, or 0.2 where the level has none; a value is an alpha.
    assert recipe.parse_args(["train", "--mixup"]).mixup == 0.5  # medium2
    assert recipe.parse_args(["train", "--augreg", "light1", "--mixup"]).mixup == 0.2
    assert recipe.parse_args(["train", "--augreg", "light1", "--mixup", "0.8"]).mixup == 0.8


def test_lucidrain_vit_is_the_studys_vit_pytorch_shape():
    """vit-pytorch ViT(image_size=224, patch_size=16, dim=1024, depth=6, heads=16, mlp_dim=2048, dropout=0.1,
    emb_dropout=0.1) as a timm ViT, built on the meta device (no memory)."""
    args = recipe.parse_args(["train", "--arch", "lucidrain_vit"])
    with torch.device("meta"):
        model = recipe.create_model(args.model, recipe.model_kwargs(args, 1000), pre_logits=False, head_bias=0.0)
    assert (model.patch_embed.patch_size, model.embed_dim, len(model.blocks)) == ((16, 16), 1024, 6)
    block = model.blocks[0]
    assert (block.attn.num_heads, block.mlp.fc1.out_features, block.mlp.drop1.p, model.pos_drop.p) == (16, 2048, 0.1,
                                                                                                      0.1)
    assert model.patch_embed.img_size == (224, 224) and model.head.out_features == 1000


def test_the_studys_command_line_trains_resumes_and_evaluates(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(*PORT, "--output_parent_dir", out, *PORT_TINY, "--stop-after", "1") == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_kwargs"]["mlp_ratio"] == 2.0 and config["mixup"] == 0.5 and config["dropout"] == 0.1
    # The study resumes from a checkpoint's path: this run's last one (or its folder) continues it.
    assert train(*PORT, "-o", out, *PORT_TINY, "--resume", out / "checkpoints" / "1.pt") == 0
    assert tr.checkpoint_steps(out / "checkpoints") == [2]
    assert_user_error(train(*PORT, "-o", out, *PORT_TINY, "--resume", tmp_path), capsys, "--resume", "--output-dir")
    before = {p: p.read_bytes() for p in out.rglob("*.pt")}
    capsys.readouterr()
    assert train(*PORT, "-o", out, *PORT_TINY, "-e") == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    logged = [r for r in read_log(out) if "val_top1" in r]
    assert printed["step"] == 2 and printed["val_top1"] == logged[-1]["val_top1"] == logged[-2]["val_top1"], \
        "-e evaluates the last checkpoint: the metrics of the run's final evaluation"
    assert {p: p.read_bytes() for p in out.rglob("*.pt")} == before, "-e changed a checkpoint"
    assert train(*PORT, "-o", out, *PORT_TINY, "-e", "--resume", out / "best") == 0

"""localmim_freezeout.py on CPU: HOG against a direct computation, stage shapes, FreezeOut's formulas and freezing,
parity with timm's ViT, DDP parity, learning on digits (loss, kNN and linear probe against random init), fine-tuning,
export, exact resume, presets and bad input. Runs are in-process `main([...])` calls on tiny ViTs; one test launches
torchrun."""

from __future__ import annotations

import json
import math
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import REPO, assert_user_error, recipe_env
from PIL import Image

import localmim_freezeout as recipe
from common import convert, data
from common import torch_run as tr
from common.runlog import read_log

ARCH = ["--model", "vit_tiny_patch16", "--image-size", "16", "--patch-size", "4", "--depth", "4", "--embed-dim", "32",
        "--num-heads", "2", "--workers", "0", "--test-crop-ratio", "1"]
TINY = [*ARCH, "--decoder-dim", "32", "--decoder-heads", "2"]
SOBEL_X = ((1, 0, -1), (2, 0, -2), (1, 0, -1))


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models on one thread


def run(*args) -> int:
    return recipe.main([*map(str, args)])


def final_state(run_dir: Path) -> dict:
    return tr.load_checkpoint(tr.find_checkpoint(run_dir))


def tiny_config(**overrides) -> dict:
    args = recipe.parse_args(["pretrain", *TINY])
    config = recipe.pretrain_config(args, tr.DistEnv(0, 0, 1, torch.device("cpu")), None)
    return {**config, **overrides}


# ---------------------------------------------------------------------------------------------- HOG and stages


def reference_hog(image: np.ndarray, nbins: int, cell: int, bias: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """(C, H, W) -> (cells, C * nbins), pixel by pixel: Sobel cross-correlation with reflect padding plus the
    convolution's bias (bias[0] on gx, bias[1] on gy: models_mim.py HOGLayer's nn.Conv2d(1, 2, 3) output channels),
    magnitude, phase atan2(gx, gy), bin floor(phase / pi * nbins) mod nbins, mean over each cell, L2 over the bins per
    channel."""
    channels, height, width = image.shape
    hist = np.zeros((channels, nbins, height // cell, width // cell))
    for c in range(channels):
        padded = np.pad(image[c], 1, mode="reflect")
        for y in range(height):
            for x in range(width):
                window = padded[y:y + 3, x:x + 3]
                gx = sum(SOBEL_X[a][b] * window[a, b] for a in range(3) for b in range(3)) + bias[0]
                gy = sum(SOBEL_X[b][a] * window[a, b] for a in range(3) for b in range(3)) + bias[1]
                orientation = math.floor(math.atan2(gx, gy) / math.pi * nbins) % nbins
                hist[c, orientation, y // cell, x // cell] += math.hypot(gx, gy) / cell**2
        hist[c] /= np.maximum(np.sqrt((hist[c] ** 2).sum(0)), 1e-12)
    return hist.reshape(channels * nbins, -1).T


def test_hog_target_equals_a_direct_computation():
    yy, xx = np.mgrid[0:16, 0:16]
    image = np.stack([(xx >= 7) * 10.0,  # a vertical edge
                      xx + 2.0 * yy,  # a ramp
                      np.random.default_rng(0).integers(0, 9, (16, 16)).astype(float)])  # texture
    hist = recipe.hog_histograms(torch.tensor(image, dtype=torch.float32)[None], 9)
    for cell in (2, 4, 8):
        ours = recipe.hog_target(hist, cell)[0].numpy()
        assert ours.shape == ((16 // cell) ** 2, 27)
        np.testing.assert_allclose(ours, reference_hog(image, 9, cell), atol=1e-5, err_msg=f"cell {cell}")
    # The red channel's vertical edge (columns 6-7 see it) has gx < 0, gy = 0: phase -pi/2, bin floor(-4.5) mod 9 = 4,
    # in the 4 cells of column 1; the other cells are empty.
    red = recipe.hog_target(hist, 4)[0, :, :9]
    crossed = red.sum(-1) > 0
    assert crossed.sum() == 4 and torch.equal(red[crossed], torch.eye(9)[4].expand(4, -1))


def test_hog_bias_enters_the_sobel_responses_before_magnitude_and_phase():
    """--hog-bias (ViT-L): each stage's target is the HOG of Sobel + that stage's bias, computed pixel by pixel; the
    bias moves the target (on a flat region the gradient is the bias alone, so every pixel votes)."""
    yy, xx = np.mgrid[0:16, 0:16]
    image = np.stack([(xx >= 7) * 10.0, xx + 2.0 * yy, np.random.default_rng(1).normal(size=(16, 16))])
    images = torch.tensor(image, dtype=torch.float32)[None]
    config = tiny_config(hog_bias=True, hog_nbins=18)
    torch.manual_seed(0)
    model = recipe.LocalMIM(config)
    assert model.hog_bias.shape == (4, 2) and len(set(model.hog_bias.flatten().tolist())) == 8, "one bias per stage"
    targets = model.targets(images, [0, 1, 2, 3])
    for stage, cell in enumerate((1, 2, 4, 8)):  # patch 4 at scales 4, 2, 1, 0.5
        bias = tuple(model.hog_bias[stage].tolist())
        np.testing.assert_allclose(targets[stage][0].numpy(), reference_hog(image, 18, cell, bias), atol=1e-5,
                                   err_msg=f"stage {stage}")
        unbiased = reference_hog(image, 18, cell)
        assert np.abs(targets[stage][0].numpy() - unbiased).max() > 0.1, f"stage {stage}: the bias changes nothing"
    # The red channel left of the edge is flat: its gradient is the bias (b_x, b_y) itself, in bin
    # floor(atan2(b_x, b_y) / pi * 18) mod 18, with unit norm after the L2 normalisation.
    b_x, b_y = model.hog_bias[2].tolist()
    flat_cell = targets[2][0, 0, :18]  # cell (0, 0), columns 0-3: no Sobel response
    assert flat_cell.argmax().item() == math.floor(math.atan2(b_x, b_y) / math.pi * 18) % 18
    assert flat_cell.max().item() == pytest.approx(1.0)


def test_hog_bias_is_pytorchs_conv_init_drawn_from_the_seed():
    """models_mim.py builds hog_enc (four HOGLayer(bias=True): nn.Conv2d(1, 2, 3)) after the decoders: each draws a
    2x1x3x3 weight (overwritten by Sobel) then a bias U(-1/sqrt(9), 1/sqrt(9)). The same seed gives the same biases,
    another seed others; without --hog-bias nothing is drawn and no buffer is saved."""
    config = tiny_config(hog_bias=True)
    torch.manual_seed(3)
    biased = recipe.LocalMIM(config)
    torch.manual_seed(3)
    plain = recipe.LocalMIM(dict(config, hog_bias=False))
    expected = []
    for _ in range(4):  # continue the generator where the model without the bias left it
        torch.empty(2, 1, 3, 3).uniform_(-1, 1)  # the conv weight's draw (kaiming_uniform_)
        expected.append(torch.empty(2).uniform_(-1 / 3, 1 / 3))
    assert torch.equal(biased.hog_bias, torch.stack(expected))
    assert biased.hog_bias.abs().max() < 1 / 3 and not biased.hog_bias.requires_grad
    assert "hog_bias" in biased.state_dict() and "hog_bias" not in plain.state_dict()
    assert all(torch.equal(v, biased.state_dict()[k]) for k, v in plain.state_dict().items()), \
        "the bias is drawn last: the rest of the model is the same"
    torch.manual_seed(3)
    assert torch.equal(recipe.LocalMIM(config).hog_bias, biased.hog_bias)
    torch.manual_seed(4)
    assert not torch.equal(recipe.LocalMIM(config).hog_bias, biased.hog_bias)


def test_stage_targets_and_predictions_have_the_stage_scales():
    """ViT-B/16 at 224: HOG cells of 4, 8, 16, 32 px -> 56², 28², 14², 7² targets of 3 x 9 bins; each decoder predicts
    exactly its stage's grid (tiny widths, the paper's geometry)."""
    config = tiny_config(image_size=224, patch_size=16, decoder_dim=32, mask_ratio=0.75)
    model = recipe.LocalMIM(config)
    assert model.taps == [1, 3, 1, 3] and model.scales == [4.0, 2.0, 1.0, 0.5]
    images = torch.randn(2, 3, 224, 224)
    targets = model.targets(images, [0, 1, 2, 3])
    latents, mask, ids_restore = model.forward_encoder(images, torch.rand(2, 196), [True] * 4, 0)
    assert mask.sum(1).tolist() == [147, 147] and latents[0].shape == (2, 1 + 49, 32)
    for stage, side in enumerate((56, 28, 14, 7)):
        assert targets[stage].shape == (2, side * side, 27), stage
        assert model.decoders[stage](latents[stage], ids_restore).shape == (2, side * side, 27), stage
        assert recipe.stage_mask(mask, 14, model.scales[stage]).shape == (2, side * side)
    pixels = recipe.LocalMIM(dict(config, target="pixels")).targets(images, [0, 3])
    assert pixels[0].shape == (2, 56 * 56, 3 * 4 * 4) and pixels[3].shape == (2, 49, 3 * 32 * 32)
    assert torch.allclose(pixels[3].mean(-1), torch.zeros(2, 49), atol=1e-4)  # normalised per cell


def test_stage_masks_upsample_and_average_the_patch_mask():
    mask = torch.tensor([[1.0, 0, 0, 1] + [0] * 12])
    up = recipe.stage_mask(mask, 4, 2.0).view(8, 8)
    assert up[:2, :2].eq(1).all() and up[:2, 6:].eq(1).all() and up.sum() == 8
    down = recipe.stage_mask(mask, 4, 0.5).view(2, 2)
    assert down.tolist() == [[0.25, 0.25], [0.0, 0.0]]


def test_all_stages_layout_is_the_studys():
    taps, scales = recipe.stage_layout(12, all_stages=True)
    assert taps == list(range(12)) and scales == [8, 4, 4, 2, 2, 2, 2, 2, 2, 1, 1, 0.5]
    assert [round(16 / s) for s in scales] == [2, 4, 4, 8, 8, 8, 8, 8, 8, 16, 16, 32]  # the study's HOG cells
    assert recipe.stage_layout(12, all_stages=False) == ([1, 3, 9, 11], [4.0, 2.0, 1.0, 0.5])


# ---------------------------------------------------------------------------------------------- FreezeOut formulas

POWERS = {"linear": 1, "squared": 2, "cubic": 3}


@pytest.mark.parametrize("how", sorted(POWERS))
@pytest.mark.parametrize("scale_lr", [True, False])
def test_freezeout_fractions_lrs_and_freeze_steps_follow_the_formulas(how, scale_lr):
    total, warmup, peak, min_lr, t0 = 1000, 100, 1e-3, 1e-6, 0.5
    config = tiny_config(freezeout=True, how_scale=how, t0=t0, not_scale_lr=not scale_lr, peak_lr=peak,
                         min_lr=min_lr, total_steps=total, warmup_steps=warmup)
    plan = recipe.make_plan(config, total, warmup)
    last = 4  # the patch embedding is layer 0, the 4 blocks 1..4
    expected_t = [(t0 + (1 - t0) * i / last) ** POWERS[how] for i in range(last + 1)]
    assert plan.fractions == pytest.approx(expected_t) and plan.fractions[-1] == 1.0
    assert plan.freeze_steps == tuple(warmup + math.ceil(round(t * (total - warmup), 6)) for t in expected_t)
    assert plan.freeze_steps[-1] == total, "the last layer trains to the end"

    model = recipe.LocalMIM(config)
    optimizer = torch.optim.AdamW(recipe.freezeout_param_groups(model, plan, 0.05), lr=peak)
    for step in (0, 50, 100, 101, 250, 400, 600, 800, 999):
        recipe.apply_freezeout(optimizer, step)
        recipe.set_freezeout_lrs(optimizer, step, config)
        lrs = {group["layer"]: group["lr"] for group in optimizer.param_groups}
        assert set(lrs) == {i for i in range(last + 1) if plan.freeze_steps[i] > step}, step
        for layer, lr in lrs.items():
            t = expected_t[layer]
            if step < warmup:
                expected = peak * step / warmup  # the study: every layer warms up to the unscaled lr
            else:
                start = peak / t if scale_lr else peak
                progress = (step - warmup) / (t * (total - warmup))
                expected = min_lr + (start - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
            assert lr == pytest.approx(expected, rel=1e-9), (step, layer)


def test_freezeout_study_anchors():
    """cubic t0 0.8: the first layer freezes at 0.512 of training; mean t over ViT-B's 12 blocks 0.758 (study notes)."""
    fractions = recipe.layer_fractions(13, 0.8, "cubic")
    assert fractions[0] == pytest.approx(0.512)
    assert sum(fractions[1:]) / 12 == pytest.approx(0.758, abs=2e-3)
    non_layerwise = dict(t=0.5, peak_lr=1.0, min_lr=0.0, total_steps=110, warmup_steps=10, layerwise=False)
    assert recipe.layer_lr(60, **non_layerwise) == pytest.approx(0.5), "one cosine for all layers"


def test_parameters_map_to_their_layers_and_stages():
    plan = recipe.make_plan(tiny_config(freezeout=True, how_scale="cubic", t0=0.8), 100, 10)
    assert plan.layer_of("encoder.patch_embed.proj.weight") == plan.layer_of("encoder.cls_token") == 0
    assert plan.layer_of("encoder.blocks.2.mlp.fc1.weight") == 3
    assert plan.layer_of("decoders.0.embed.weight") == plan.layer_of("stage_norms.0.weight") == 2  # tapped block 1
    assert plan.layer_of("encoder.norm.weight") == 4
    kept = recipe.make_plan(tiny_config(freezeout=True, how_scale="cubic", t0=0.8, dont_freeze_pe=True), 100, 10)
    assert kept.layer_of("encoder.blocks.0.attn.qkv.weight") == 0, "--dont-freeze-pe: blocks count from 0"
    assert kept.layer_of("encoder.patch_embed.proj.weight") == 3 and kept.freeze_steps[3] == 100, "never frozen"


# ---------------------------------------------------------------------------------------------- FreezeOut in training


def short_freezeout(dont_freeze_pe: bool = False) -> tuple[dict, recipe.FreezePlan]:
    config = tiny_config(freezeout=True, how_scale="linear", t0=0.2, dont_freeze_pe=dont_freeze_pe, peak_lr=1e-2,
                         total_steps=12, warmup_steps=2)
    return config, recipe.make_plan(config, 12, 2)


def test_frozen_layers_never_change_and_get_no_gradient():
    """Train 12 steps with freezing at steps 4..10: a layer's parameters move until its freeze step and never after;
    they leave the optimizer, get no .grad, and the frozen prefix runs without autograd."""
    config, plan = short_freezeout()
    assert plan.freeze_steps == (4, 6, 8, 10, 12)
    args = recipe.parse_args(["pretrain", *TINY])
    torch.manual_seed(0)
    model = recipe.LocalMIM(config)
    optimizer = torch.optim.AdamW(recipe.freezeout_param_groups(model, plan, 0.05), lr=1e-2, betas=(0.9, 0.95))
    scaler = tr.grad_scaler(torch.device("cpu"), "fp32")
    names = {name: plan.layer_of(name) for name, p in model.named_parameters() if p.requires_grad}
    units = [model.encoder.patch_embed, *model.encoder.blocks]
    grad_flags: list[bool] = []
    hooks = [unit.register_forward_hook(lambda m, i, out: grad_flags.append(out.requires_grad)) for unit in units]
    snapshots = []
    for step in range(12):
        recipe.apply_freezeout(optimizer, step)
        recipe.set_freezeout_lrs(optimizer, step, config)
        grad_flags.clear()
        recipe.pretrain_step(model, optimizer, scaler, torch.randn(8, 3, 16, 16), torch.rand(8, 16),
                             plan.active_stages(step), plan.no_grad_units(step), args)
        prefix = plan.no_grad_units(step)
        assert grad_flags == [False] * prefix + [True] * (len(units) - prefix), (step, grad_flags)
        for name, param in model.named_parameters():
            if name in names and plan.frozen(names[name], step):
                assert param.grad is None and not param.requires_grad, (step, name)
        snapshots.append({name: p.detach().clone() for name, p in model.named_parameters()})
    for hook in hooks:
        hook.remove()
    for name, layer in names.items():
        moves = [not torch.equal(before[name], after[name]) for before, after in zip(snapshots, snapshots[1:])]
        frozen_from = plan.freeze_steps[layer]  # snapshot s is after the update of step s; moves[s-1]: step s
        assert all(moves[: frozen_from - 1]), f"{name} should train until step {frozen_from}"
        assert not any(moves[frozen_from - 1:]), f"{name} changed after its freeze step {frozen_from}"
    assert plan.active_stages(9) == [False, True, False, True], "stages die with their tapped block"


def test_trainable_patch_embedding_still_gets_gradient_through_frozen_blocks():
    config, plan = short_freezeout(dont_freeze_pe=True)
    model = recipe.LocalMIM(config)
    optimizer = torch.optim.AdamW(recipe.freezeout_param_groups(model, plan, 0.05), lr=1e-2)
    recipe.apply_freezeout(optimizer, 7)
    assert plan.no_grad_units(7) == 0, "nothing may run without autograd before a trainable unit"
    loss, _ = model(torch.randn(4, 3, 16, 16), torch.rand(4, 16), plan.active_stages(7), plan.no_grad_units(7))
    loss.backward()
    assert model.encoder.patch_embed.proj.weight.grad is not None
    frozen_weight = model.encoder.blocks[0].attn.qkv.weight
    assert frozen_weight.grad is None and not frozen_weight.requires_grad


# ---------------------------------------------------------------------------------------------- timm parity


def test_encoder_is_timms_vision_transformer():
    """The encoder's weights load strict into timm's VisionTransformer and give the same features: with no masking
    and the identity shuffle the last stage's tokens equal timm's forward_features. ViT-B/16 is vit_base_patch16_224."""
    config = tiny_config(mask_ratio=0.0)
    model = recipe.LocalMIM(config).eval()
    state = {k.removeprefix("encoder."): v for k, v in model.state_dict().items() if k.startswith("encoder.")}
    reference = timm.models.vision_transformer.VisionTransformer(**recipe.vit_kwargs(config, num_classes=0)).eval()
    reference.load_state_dict(state, strict=True)
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        latents, mask, _ = model.forward_encoder(images, torch.arange(16.0).expand(3, -1), [True] * 4, 0)
        expected = reference.forward_features(images)
    assert not mask.any()
    torch.testing.assert_close(latents[3], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reference(images), expected[:, 0])  # CLS features for kNN and the linear probe

    b16 = recipe.pretrain_config(recipe.parse_args(["pretrain", "--model", "MIM_vit_base_patch16"]),
                                 tr.DistEnv(0, 0, 1, torch.device("cpu")), None)
    assert convert.timm_model_name(recipe.vit_kwargs(b16, num_classes=0)) == "vit_base_patch16_224"
    with torch.device("meta"):
        ours = recipe.LocalMIM(b16).encoder.state_dict()
        timms = timm.create_model("vit_base_patch16_224", num_classes=0).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in timms.items()}


# ---------------------------------------------------------------------------------------------- a shared digits run

LEARN = [*TINY, "--embed-dim", "64", "--data", "digits", "--batch-size", "32", "--epochs", "4", "--warmup-epochs", "1",
         "--blr", "1e-2", "--log-interval", "10", "--save-every", "2", "--freezeout"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("localmim") / "pretrain"
    assert run("pretrain", *LEARN, "--output-dir", out) == 0
    return out


def test_pretraining_lowers_the_loss_and_logs_freezeout(digits_run):
    records = read_log(digits_run)
    epochs = [r for r in records if "frozen_layers" in r]
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4]
    assert [r["frozen_layers"] for r in epochs] == sorted(r["frozen_layers"] for r in epochs) and epochs[-1][
        "frozen_layers"] > 0, "the frozen prefix only grows"
    assert all(r["step_ms"] > 0 and r["layers"] == 5 for r in epochs)
    last_stage = [r["loss_stage3"] for r in records if "loss_stage3" in r]  # never dropped
    assert last_stage[-1] < 0.5 * last_stage[0], last_stage
    config = json.loads((digits_run / "config.json").read_text())
    assert config["freeze_steps"][-1] == config["total_steps"] == 4 * 44 and config["effective_batch"] == 32
    command = (digits_run / "command.txt").read_text()
    assert "localmim_freezeout.py pretrain" in command and "--freezeout" in command
    assert tr.checkpoint_steps(digits_run / "epochs") == [2, 4]
    assert tr.checkpoint_steps(digits_run / "checkpoints") == [176]


def knn_top1(source: str, out: Path) -> float:
    assert run("knn", *ARCH, "--embed-dim", "64", "--data", "digits", "--pretrained", source, "--output-dir", out,
               "--batch-size", "256") == 0
    return [r for r in read_log(out) if "knn_top1_k20" in r][-1]["knn_top1_k20"]


def test_knn_beats_random_init(digits_run, tmp_path):
    """Against the encoder the pretraining started from. Measured: 68.0% against 61.8% (k = 20)."""
    pretrained, random_init = knn_top1(str(digits_run), tmp_path / "a"), knn_top1("random", tmp_path / "b")
    assert pretrained > random_init + 3, (pretrained, random_init)
    record = read_log(tmp_path / "a")[-1]
    assert record["val_images"] == 359 and record["bank_images"] == 1280


def linprobe_top1(source: str, out: Path) -> float:
    """MAE's probe (BatchNorm + linear, LARS) on 180 steps of batch 32; no crop or flip (centred 16 px digits)."""
    assert run("linprobe", *ARCH, "--embed-dim", "64", "--data", "digits", "--pretrained", source, "--output-dir", out,
               "--batch-size", "32", "--epochs", "4", "--warmup-epochs", "1", "--blr", "240", "--random-crop", "none",
               "--hflip", "0", "--log-interval", "100") == 0
    return [r for r in read_log(out) if "val_top1" in r][-1]["val_top1"]


def test_linear_probe_beats_random_init(digits_run, tmp_path):
    """'random' is the encoder the pretraining run started from (same seed): a paired comparison. Measured: about 74%
    against 69% (10 classes)."""
    pretrained, random_init = linprobe_top1(str(digits_run), tmp_path / "a"), linprobe_top1("random", tmp_path / "b")
    assert pretrained > random_init + 2 and pretrained > 50, (pretrained, random_init)
    state = final_state(tmp_path / "a")
    encoder = read_encoder(digits_run)
    assert torch.equal(state["model"]["blocks.0.attn.qkv.weight"], encoder["blocks.0.attn.qkv.weight"]), "frozen"
    # export folds the BatchNorm (no affine) into the linear head: a plain timm classifier with the same logits
    assert run("export", tmp_path / "a") == 0
    ours = recipe.build_classifier(state["config"]).eval()
    ours.load_state_dict(state["model"])
    exported = timm.models.vision_transformer.VisionTransformer(**recipe.vit_kwargs(state["config"], 10)).eval()
    exported.load_state_dict(torch.load(tmp_path / "a" / "timm_model.pth"), strict=True)
    images = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(exported(images), ours(images), rtol=1e-4, atol=1e-4)


def read_encoder(run_dir: Path) -> dict:
    return recipe.read_encoder_state(str(run_dir))


def test_finetune_learns_digits_from_the_pretrained_encoder(digits_run, tmp_path):
    """End-to-end fine-tuning of the pretrained encoder (MAE's layer decay 0.75, no mixup/erasing: 132 steps)
    reaches far beyond chance (10%). Measured: 29.8, 51.5, 61.3% after epochs 1-3 (from random init: 77.7%; four
    epochs of tiny FreezeOut pretraining help kNN and the probe, not this short fine-tune)."""
    out = tmp_path / "ft"
    assert run("finetune", *ARCH, "--embed-dim", "64", "--data", "digits", "--pretrained", digits_run, "--output-dir",
               out, "--batch-size", "32", "--epochs", "3", "--warmup-epochs", "0.5", "--lr", "2e-3", "--lr-ref-batch",
               "0", "--mixup", "0", "--cutmix", "0", "--random-erasing", "0", "--label-smoothing", "0",
               "--auto-augment", "none", "--drop-path", "0", "--random-crop", "none", "--hflip", "0", "--log-interval",
               "100") == 0
    top1 = [r["val_top1"] for r in read_log(out) if "val_top1" in r]
    assert len(top1) == 3 and top1[-1] > 40 and top1[-1] > top1[0], top1


def test_encoder_at_a_new_resolution_gets_the_originals_bicubic_pos_embed(digits_run):
    """--pretrained at another image size (16 px -> 24 px: grid 4 -> 6): the patch grid of the position embedding is
    resized as MAE's interpolate_pos_embed does it, F.interpolate(bicubic, align_corners=False) on (1, D, g, g), and
    its cls row is kept."""
    args = recipe.parse_args(["finetune", *ARCH, "--embed-dim", "64", "--image-size", "24",
                              "--pretrained", str(digits_run)])
    config = dict(vars(args), **recipe.arch_config(args), num_classes=10)
    model = recipe.build_classifier(config)
    recipe.load_encoder(model, str(digits_run), config)
    source = read_encoder(digits_run)["pos_embed"]
    grid = source[:, 1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    loaded = model.pos_embed.detach()
    assert loaded.shape == (1, 37, 64)
    torch.testing.assert_close(loaded[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 36, 64), rtol=0, atol=1e-6)
    torch.testing.assert_close(loaded[:, :1], source[:, :1], rtol=0, atol=0)


def test_training_steps_set_the_length_and_the_last_step_evaluates_and_saves(tmp_path):
    """--training-steps 7 (inside the first epoch of 45 steps): the schedule ends at step 7, the last
    step is evaluated and checkpointed although no epoch ended."""
    out = tmp_path / "ft"
    assert run("linprobe", *ARCH, "--data", "digits", "--pretrained", "random", "--output-dir", out, "--batch-size",
               "32", "--training-steps", "7", "--warmup-epochs", "0", "--log-interval", "100") == 0
    records = read_log(out)
    assert [r["step"] for r in records if "val_top1" in r] == [7]
    assert records[-1]["step"] == 7 and final_state(out)["step"] == 7
    peak = 0.1 * 32 / 256  # MAE linprobe: blr 0.1, min lr 0
    last_lr = [r["lr"] for r in records if "lr" in r][-1]  # the lr of step index 6 of 7: the cosine's last value
    assert last_lr == pytest.approx(peak * (1 + math.cos(math.pi * 6 / 7)) / 2, rel=1e-6)


def test_finetune_loads_the_encoder_with_layer_decay(digits_run, tmp_path, capsys):
    """One epoch with MAE's regularisers on (RandAugment, mixup/cutmix, random erasing, drop path, smoothing)."""
    out = tmp_path / "ft"
    assert run("finetune", *ARCH, "--embed-dim", "64", "--data", "digits", "--pretrained", digits_run, "--output-dir",
               out, "--batch-size", "64", "--epochs", "1", "--warmup-epochs", "0.2", "--lr", "1e-3", "--lr-ref-batch",
               "0", "--layer-decay", "0.5", "--log-interval", "5") == 0
    assert f"encoder from {digits_run}" in capsys.readouterr().err
    evals = [r for r in read_log(out) if "val_top1" in r]
    assert len(evals) == 1 and evals[0]["val_images"] == 359 and evals[0]["max_accuracy"] == evals[0]["val_top1"]
    tuned, pretrained = final_state(out)["model"], read_encoder(digits_run)
    assert "norm.weight" not in tuned and "fc_norm.weight" in tuned and tuned["head.weight"].shape == (10, 64)
    assert not torch.equal(tuned["blocks.3.mlp.fc1.weight"], pretrained["blocks.3.mlp.fc1.weight"]), "trained"
    # Loaded: the patch embedding (lr x 0.5^5) stays nearer the pretrained one than pretraining moved it from its
    # init (mutation: finetune starting from that init, ignoring --pretrained, fails here).
    init = recipe.initial_encoder_state(final_state(out)["config"], final_state(out)["config"]["seed"])
    key = "patch_embed.proj.weight"
    moved, pretraining_moved = (tuned[key] - pretrained[key]).norm(), (pretrained[key] - init[key]).norm()
    assert moved < 0.25 * pretraining_moved, (float(moved), float(pretraining_moved))
    # exported to timm from this real run: the plain timm classifier gives the fine-tuned model's logits
    assert run("export", out) == 0
    state = final_state(out)
    ours = recipe.build_classifier(state["config"]).eval()
    ours.load_state_dict(state["model"])
    exported = timm.models.vision_transformer.VisionTransformer(**recipe.vit_kwargs(state["config"], 10, "avg"))
    exported.eval().load_state_dict(torch.load(out / "timm_model.pth"), strict=True)
    images = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(exported(images), ours(images), rtol=1e-5, atol=1e-5)
    args = recipe.parse_args(["finetune", *ARCH, "--pretrained", "random", "--layer-decay", "0.5"])
    model = recipe.build_classifier(dict(vars(args), **recipe.arch_config(args), num_classes=10))
    optimizer = recipe.make_supervised_optimizer(model, args, 1.0, torch.device("cpu"))
    scales = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    # MAE param_groups_lrd: decay^(depth + 1 - layer), embeddings layer 0, block i layer i + 1, head depth + 1.
    assert scales[id(names["patch_embed.proj.weight"])] == pytest.approx(0.5**5)
    assert scales[id(names["blocks.0.attn.qkv.weight"])] == pytest.approx(0.5**4)
    assert scales[id(names["blocks.3.mlp.fc2.weight"])] == pytest.approx(0.5)
    assert scales[id(names["head.weight"])] == scales[id(names["fc_norm.weight"])] == 1.0


def test_export_writes_timm_state_dicts(digits_run, tmp_path, capsys):
    assert run("export", digits_run, "--out", tmp_path / "enc.pth") == 0
    assert "VisionTransformer" in capsys.readouterr().out
    tensors = torch.load(tmp_path / "enc.pth")
    config = json.loads((digits_run / "config.json").read_text())
    model = timm.models.vision_transformer.VisionTransformer(**recipe.vit_kwargs(config, num_classes=0))
    model.load_state_dict(tensors, strict=True)
    saved = final_state(digits_run)["model"]  # the pretraining checkpoint's own encoder tensors
    assert all(torch.equal(value, saved[f"encoder.{key}"]) for key, value in tensors.items())
    reference = timm.models.vision_transformer.VisionTransformer(**recipe.vit_kwargs(config, num_classes=0)).eval()
    reference.load_state_dict({k.removeprefix("encoder."): v for k, v in saved.items() if k.startswith("encoder.")})
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().forward_features(images), reference.forward_features(images))
    from safetensors.torch import load_file
    assert set(load_file(str(tmp_path / "enc.safetensors"))) == set(tensors)


def test_mismatched_pretrained_encoder_is_refused(digits_run, tmp_path, capsys):
    assert_user_error(run("knn", *ARCH, "--embed-dim", "48", "--data", "digits", "--pretrained", digits_run,
                          "--output-dir", tmp_path), capsys, "does not match")


# ---------------------------------------------------------------------------------------------- parity and resume


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    """48 train and 16 val digits as PNG files in ImageNet layout: 3 steps per epoch at batch 16."""
    root = tmp_path_factory.mktemp("folder")
    transform = recipe.augment.eval_transform(32, crop_ratio=1.0)
    for split, count in (("train", 48), ("val", 16)):
        batch = next(data.eval_batches("digits", transform, global_batch=count, workers=0))
        for i, (image, label) in enumerate(zip(batch["image"], batch["label"])):
            (root / split / str(label % 3)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / split / str(label % 3) / f"{i}.png")
    return root


def short_run(folder: Path) -> list[str]:
    return [*TINY, "--data", str(folder), "--epochs", "3", "--warmup-epochs", "1", "--blr", "1e-2", "--log-interval",
            "1", "--how-scale", "linear", "--t0", "0.3"]


def test_two_process_torchrun_matches_one_process(small_folder, tmp_path):
    """Global batch 16 as 2 processes x 8 and as 1 process x 8 x 2 accumulation: the same masks and updates,
    across FreezeOut's freezing (the DDP wrapper is rebuilt)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = short_run(small_folder)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                           "localmim_freezeout.py", "pretrain", *args, "--batch-size", "16", "--output-dir",
                           str(tmp_path / "ddp")], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=recipe_env(OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert run("pretrain", *args, "--batch-size", "16", "--grad-accum", "2", "--output-dir", tmp_path / "one") == 0
    ddp, one = final_state(tmp_path / "ddp"), final_state(tmp_path / "one")
    assert ddp["config"]["world_size"] == 2 and ddp["step"] == one["step"] == 9
    assert ddp["config"]["effective_batch"] == one["config"]["effective_batch"] == 16
    assert sum(s <= 9 for s in one["config"]["freeze_steps"]) >= 2, "some layers freeze during the run"
    for key, value in one["model"].items():
        torch.testing.assert_close(ddp["model"][key], value, rtol=0, atol=2e-5, msg=key)
    assert "torchrun --nproc_per_node=2" in (tmp_path / "ddp" / "command.txt").read_text()


def test_two_process_finetune_with_mixup_matches_one_process(small_folder, tmp_path):
    """Fine-tuning with mixup, cutmix, random erasing and drop path: 2 processes x batch 8 make the update of
    1 process x batch 8 x 2 accumulation, global batch 16 (each micro-batch draws by its place in the global batch)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["finetune", *ARCH, "--data", str(small_folder), "--epochs", "1", "--warmup-epochs", "0", "--pretrained",
            "random", "--mixup", "0.8", "--cutmix", "1.0", "--random-erasing", "0.5", "--drop-path", "0.2",
            "--batch-size", "16"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                           "localmim_freezeout.py", *args, "--output-dir", str(tmp_path / "ddp")], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=recipe_env(OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert run(*args, "--grad-accum", "2", "--output-dir", tmp_path / "one") == 0
    ddp, one = final_state(tmp_path / "ddp"), final_state(tmp_path / "one")
    assert ddp["config"]["world_size"] == 2 and ddp["step"] == one["step"] == 3
    for key, value in one["model"].items():
        torch.testing.assert_close(ddp["model"][key], value, rtol=0, atol=2e-5, msg=key)


def test_resume_after_stop_equals_uninterrupted_run(small_folder, tmp_path):
    args = [*short_run(small_folder), "--batch-size", "16"]
    assert run("pretrain", *args, "--output-dir", tmp_path / "straight") == 0
    assert run("pretrain", *args, "--stop-after", "4", "--output-dir", tmp_path / "stopped") == 0
    assert tr.checkpoint_steps(tmp_path / "stopped" / "checkpoints") == [4]
    assert run("pretrain", *args, "--resume", "--output-dir", tmp_path / "stopped") == 0
    straight, resumed = final_state(tmp_path / "straight"), final_state(tmp_path / "stopped")
    assert straight["step"] == resumed["step"] == 9
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), f"{key} differs after resuming"
    losses = [{r["step"]: r["loss"] for r in read_log(tmp_path / d) if "loss" in r} for d in ("straight", "stopped")]
    assert losses[0] == losses[1] and sorted(losses[0]) == list(range(1, 10))
    assert (tmp_path / "stopped" / "command.txt").read_text().count("pretrain") == 2, "each invocation is recorded"


def test_hog_bias_run_resumes_bitwise_and_exports_without_the_bias(small_folder, tmp_path, capsys):
    """A --hog-bias run stopped and resumed equals the uninterrupted one (the bias is in the checkpoint); its export
    holds the encoder only and loads strict into timm."""
    args = [*TINY, "--data", str(small_folder), "--epochs", "2", "--warmup-epochs", "1", "--blr", "1e-2",
            "--log-interval", "1", "--batch-size", "16", "--hog-bias", "--hog-nbins", "18"]
    assert run("pretrain", *args, "--output-dir", tmp_path / "straight") == 0
    assert run("pretrain", *args, "--stop-after", "2", "--output-dir", tmp_path / "stopped") == 0
    assert torch.equal(final_state(tmp_path / "stopped")["model"]["hog_bias"],
                       final_state(tmp_path / "straight")["model"]["hog_bias"])
    assert run("pretrain", *args, "--resume", "--output-dir", tmp_path / "stopped") == 0
    straight, resumed = final_state(tmp_path / "straight"), final_state(tmp_path / "stopped")
    assert straight["step"] == resumed["step"] == 6 and straight["config"]["hog_bias"]
    assert straight["model"]["hog_bias"].shape == (4, 2)
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), f"{key} differs after resuming"
    assert run("export", tmp_path / "stopped", "--out", tmp_path / "enc.pth") == 0
    tensors = torch.load(tmp_path / "enc.pth")
    assert not any("hog" in key for key in tensors), "the HOG bias is not an encoder tensor"
    model = timm.models.vision_transformer.VisionTransformer(**recipe.vit_kwargs(resumed["config"], num_classes=0))
    model.load_state_dict(tensors, strict=True)


def test_finetune_resume_equals_uninterrupted_run(small_folder, tmp_path):
    """RandAugment, random erasing, mixup/cutmix and drop path on: their draws follow (seed, step)."""
    args = [*ARCH, "--data", str(small_folder), "--pretrained", "random", "--batch-size", "16", "--epochs", "3",
            "--warmup-epochs", "1", "--lr", "1e-3", "--lr-ref-batch", "0", "--log-interval", "1"]
    assert run("finetune", *args, "--output-dir", tmp_path / "straight") == 0
    assert run("finetune", *args, "--stop-after", "4", "--output-dir", tmp_path / "stopped") == 0
    assert run("finetune", *args, "--resume", "--output-dir", tmp_path / "stopped") == 0
    straight, resumed = final_state(tmp_path / "straight"), final_state(tmp_path / "stopped")
    assert straight["step"] == resumed["step"] == 9
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), f"{key} differs after resuming"


def test_non_finite_loss_stops_without_saving(small_folder, tmp_path, capsys, monkeypatch):
    """The loss turns NaN in the second epoch, after epoch 1's checkpoint: the run stops with one error line and
    the checkpoint on disk is epoch 1's finite one (before, a NaN from the first step left no checkpoint, and the
    finiteness check passed vacuously)."""
    forward, calls = recipe.LocalMIM.forward, []

    def nan_from_step_5(self, *args, **kwargs):
        calls.append(1)
        loss, stage_losses = forward(self, *args, **kwargs)
        return (loss * float("nan") if len(calls) >= 5 else loss), stage_losses

    monkeypatch.setattr(recipe.LocalMIM, "forward", nan_from_step_5)
    out = tmp_path / "run"
    code = run("pretrain", *short_run(small_folder), "--batch-size", "16", "--save-every", "1", "--output-dir", out)
    assert_user_error(code, capsys, "diverged")
    assert tr.checkpoint_steps(out / "checkpoints") == [3], "epoch 1 (3 steps) is the last good checkpoint"
    assert all(torch.isfinite(v).all() for v in final_state(out)["model"].values())


# ---------------------------------------------------------------------------------------------- benchmark, bad input


def test_benchmark_prints_throughput_and_the_freezeout_saving(tmp_path, capsys):
    assert run("pretrain", *TINY, "--data", "synthetic", "--benchmark", "--benchmark-steps", "2", "--batch-size", "8",
               "--benchmark-frozen", "0", "0.5", "--output-dir", tmp_path) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["frozen_blocks"] for r in lines] == [0, 2] and lines[1]["frozen_pe"]
    assert all(r["img_per_sec"] > 0 and r["step_ms"] > 0 and "peak_memory_gib" in r and "mfu" in r for r in lines)
    assert lines[0]["theoretical_saving"] == 0 and 0.2 < lines[1]["theoretical_saving"] < 0.9
    assert "measured_saving_vs_first" in lines[1] and not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("argv, words", [
    (["pretrain", "--model", "vit_giant_patch99"], ["vit_giant_patch99"]),
    (["pretrain", "--t0", "0"], ["--t0"]),
    (["pretrain", "--image-size", "30"], ["patch size"]),
    (["pretrain", *TINY, "--benchmark", "--benchmark-frozen", "1"], ["--benchmark-frozen"]),
    (["pretrain", *TINY, "--depth", "3"], ["4 blocks"]),
    (["finetune", *ARCH], ["--pretrained"]),
    (["knn", *ARCH, "--pretrained", "/nowhere/run"], ["/nowhere/run"]),
    (["pretrain", *TINY, "--data", "/nowhere/data"], ["/nowhere/data"]),
    (["pretrain", *TINY, "--target", "pixels", "--hog-bias"], ["--hog-bias", "--target"]),
])
def test_bad_input_is_one_error_line(argv, words, tmp_path, capsys):
    assert_user_error(recipe.main([*argv, "--output-dir", str(tmp_path)]), capsys, *words)


# ---------------------------------------------------------------------------------------------- presets

PRESETS = REPO / "scripts" / "localmim"
# Reference table (LocalMIM README / paper): ViT-B pretraining 256 x 8 GPUs, blr 2e-4, wd 0.05, mask 0.75, 9 bins;
# warmup 10 epochs for 100-epoch runs, 40 otherwise. Fine-tuning 1024, 100 epochs, warmup 20, dp 0.1, RE 0.25,
# mixup 0.8, cutmix 1.0, wd 0.05; lr / layer decay / min lr 4e-3 / 0.75 / 1e-6 (100 ep) or 2e-3 / 0.65 / 1e-5 (1600 ep).
# ViT-L 800 epochs: pretraining 128 x 4 accumulation x 8 GPUs = 4096, blr 1.5e-4, warmup 40, 18 bins + bias;
# fine-tuning 64 x 2 accumulation x 8 = 1024, 50 epochs, warmup 5, lr 3e-3, layer decay 0.75, min lr 1e-6, dp 0.2.
# (Accumulation at the L presets' default GPUS=8; test_study_presets_keep_the_effective_batch checks other counts.)
PRETRAIN = dict(model="vit_base_patch16", image_size=224, batch_size_per_process=256, lr=2e-4, lr_ref_batch=256,
                weight_decay=0.05, mask_ratio=0.75, hog_nbins=9, hog_bias=False, target="hog", min_lr=1e-6,
                freezeout=False)
FINETUNE = dict(model="vit_base_patch16", image_size=224, batch_size_per_process=128, epochs=100, warmup_epochs=20,
                drop_path=0.1, random_erasing=0.25, mixup=0.8, cutmix=1.0, weight_decay=0.05, label_smoothing=0.1,
                dist_eval=True, auto_augment="rand-m9-mstd0.5-inc1", lr_ref_batch=0)
ROWS = {f"pretrain_b16_{e}ep": dict(PRETRAIN, epochs=e, warmup_epochs=10 if e == 100 else 40)
        for e in (100, 400, 800, 1600)}
ROWS["finetune_b16_100ep"] = dict(FINETUNE, lr=4e-3, layer_decay=0.75, min_lr=1e-6)
ROWS["finetune_b16_1600ep"] = dict(FINETUNE, lr=2e-3, layer_decay=0.65, min_lr=1e-5)
ROWS["linprobe_b16"] = dict(model="vit_base_patch16", batch_size_per_process=512, lr=0.1, weight_decay=0.0, epochs=90,
                            warmup_epochs=10)
ROWS["knn_b16"] = dict(model="vit_base_patch16", nb_knn=[10, 20, 100, 200], temperature=0.07)
ROWS["freezeout_pretrain_b16_100ep"] = dict(PRETRAIN, epochs=100, warmup_epochs=10, freezeout=True,
                                            how_scale="cubic", t0=0.8, not_scale_lr=False)
ROWS["freezeout_finetune_b16_100ep"] = ROWS["finetune_b16_100ep"]
ROWS["pretrain_l16_800ep"] = dict(PRETRAIN, model="vit_large_patch16", batch_size_per_process=128, grad_accum=4,
                                  lr=1.5e-4, hog_nbins=18, hog_bias=True, epochs=800, warmup_epochs=40)
ROWS["finetune_l16_800ep"] = dict(FINETUNE, model="vit_large_patch16", batch_size_per_process=64, grad_accum=2,
                                  epochs=50, warmup_epochs=5, lr=3e-3, layer_decay=0.75, min_lr=1e-6, drop_path=0.2)


def preset_argv(path: Path, **env: str) -> list[str]:
    """The flags after `localmim_freezeout.py <command>` in a preset, with ${VAR:-default} and $((8 / GPUS))
    evaluated by bash (the launcher is replaced by `echo`)."""
    script = path.read_text().replace('$LAUNCH ', 'echo ')
    out = subprocess.run(["bash", "-c", script, str(path)], capture_output=True, text=True, timeout=30,
                         env=dict(os.environ, LAUNCH="echo", DATA="/data/imagenet", **env), cwd=REPO)
    assert out.returncode == 0, out.stderr
    words = shlex.split(out.stdout.strip().splitlines()[-1])
    return words[words.index("localmim_freezeout.py") + 1:]


def test_one_preset_per_setting_and_a_digits_demo():
    assert {p.stem for p in PRESETS.glob("*.sh")} == set(ROWS) | {"digits_demo"}
    for path in PRESETS.glob("*.sh"):
        assert os.access(path, os.X_OK) and path.read_text().startswith("#!/usr/bin/env bash\n"), path
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0, path


@pytest.mark.parametrize("name", sorted(ROWS))
def test_preset_matches_the_paper(name):
    argv = preset_argv(PRESETS / f"{name}.sh")
    if argv[0] in ("finetune", "linprobe", "knn"):
        assert "--pretrained" in argv or "--finetune" in argv
    args = recipe.parse_args(argv)
    got = {key: getattr(args, key) for key in ROWS[name]}
    assert got == ROWS[name], {k: (got[k], v) for k, v in ROWS[name].items() if got[k] != v}
    assert args.output_dir.startswith("runs/localmim/")


@pytest.mark.parametrize("name, batch", [("freezeout_pretrain_b16_100ep", 2048),
                                         ("freezeout_finetune_b16_100ep", 1024),
                                         ("pretrain_l16_800ep", 4096), ("finetune_l16_800ep", 1024)])
@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
def test_study_presets_keep_the_effective_batch(name, batch, gpus):
    args = recipe.parse_args(preset_argv(PRESETS / f"{name}.sh", GPUS=str(gpus)))
    assert recipe.effective_batch(args, gpus) == batch


def test_vit_l_presets_have_the_papers_lr_taps_and_expected_top1():
    """ViT-L: lr 1.5e-4 x 4096 / 256 = 2.4e-3 for pretraining, 3e-3 absolute for fine-tuning; taps
    [1, 3, depth - 3, depth - 1] = blocks 1, 3, 21, 23 (0-based); both headers state 85.8 and their source."""
    pretrain = recipe.parse_args(preset_argv(PRESETS / "pretrain_l16_800ep.sh"))
    assert recipe.peak_lr(pretrain, 8) == pytest.approx(2.4e-3)
    assert recipe.stage_layout(pretrain.arch["layers"], pretrain.all_stages)[0] == [1, 3, 21, 23]
    finetune = recipe.parse_args(preset_argv(PRESETS / "finetune_l16_800ep.sh", GPUS="2"))
    assert recipe.peak_lr(finetune, 2) == 3e-3
    for name in ("pretrain_l16_800ep", "finetune_l16_800ep"):
        header = (PRESETS / f"{name}.sh").read_text().split("set -euo")[0]
        assert "85.8" in header and "official README" in header, name


def test_the_studys_underscore_command_lines_run_unchanged():
    study = ("pretrain --batch_size 256 --accum_iter 8 --model MIM_vit_base_patch16 --hog_nbins 9 --mask_ratio 0.75 "
             "--epochs 100 --warmup_epochs 10 --blr 2e-4 --weight_decay 0.05 --data_path /data/imagenet "
             "--output_dir runs/x --how_scale cubic --t_0 0.8 --not_scale_lr --non_layerwise_lr --all_stages "
             "--dont_freeze_pe --num_workers 10")
    args = recipe.parse_args(shlex.split(study))
    assert (args.freezeout, args.how_scale, args.t0, args.grad_accum, args.model) == (True, "cubic", 0.8, 8,
                                                                                         "vit_base_patch16")
    assert args.not_scale_lr and args.non_layerwise_lr and args.all_stages and args.dont_freeze_pe
    finetune = ("finetune --batch_size 128 --model vit_base_patch16 --finetune ckpt.pth --epochs 100 "
                "--warmup_epochs 20 --lr 4e-3 --min_lr 1e-6 --layer_decay 0.75 --weight_decay 0.05 --drop_path 0.1 "
                "--reprob 0.25 --mixup 0.8 --cutmix 1.0 --dist_eval --data_path /data/imagenet --output_dir runs/y")
    args = recipe.parse_args(shlex.split(finetune))
    assert (args.pretrained, args.layer_decay, args.drop_path, args.dist_eval) == ("ckpt.pth", 0.75, 0.1, True)
    assert recipe.peak_lr(args, 8) == 4e-3, "MAE's --lr is absolute: 4e-3 whatever the batch"
    finetune_at_1024 = ["finetune", "--pretrained", "random", "--batch-size", "1024"]
    assert recipe.peak_lr(recipe.parse_args([*finetune_at_1024, "--blr", "1e-3"]), 8) == pytest.approx(4e-3), \
        "MAE's --blr is the lr at 256"
    assert recipe.peak_lr(recipe.parse_args(finetune_at_1024), 8) == pytest.approx(4e-3), \
        "the default (MAE's blr 1e-3) is a base lr"


@pytest.mark.parametrize("command", ["pretrain", "finetune", "linprobe", "knn", "export"])
def test_help_prints(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        recipe.main([command, "--help"])
    assert exit_info.value.code == 0 and "usage:" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- the study's command line

# The FreezeOut study's pretraining line, verbatim (MAE-style flags, --world_size, --log_dir; the legacy launcher adds
# --local-rank=0). The test changes only the values that make it tiny and adds the tiny model's overrides.
STUDY_PRETRAIN = ("pretrain --epochs 100 --batch_size 256 --warmup_epochs 10 --blr 2e-4 --world_size 4 --accum_iter 2 "
                  "--model MIM_vit_base_patch16 --data_path DIR --output_dir OUT --log_dir OUT --how_scale cubic "
                  "--t_0 0.85 --not_scale_lr --non_layerwise_lr --all_stages --dont_freeze_pe --hog_nbins 9 "
                  "--mask_ratio 0.75 --weight_decay 0.05")
TINY_STUDY = ["--depth", "4", "--embed-dim", "32", "--num-heads", "2", "--patch-size", "8", "--input_size", "16",
              "--decoder-dim", "16", "--decoder-heads", "2", "--num_workers", "0", "--stop-after", "2"]


def study_line(out: Path, world_size: int = 1) -> list[str]:
    words = shlex.split(STUDY_PRETRAIN.replace("DIR", "digits").replace("OUT", str(out)))
    tiny = {"--epochs": "1", "--batch_size": "8", "--world_size": str(world_size)}
    return [tiny.get(flag, word) for flag, word in zip(["", *words], words)] + TINY_STUDY


def assert_study_run(out: Path) -> None:
    state = final_state(out)
    config = state["config"]
    assert state["step"] == 2 and tr.checkpoint_steps(out / "checkpoints") == [2]
    assert (config["effective_batch"], config["grad_accum"], config["world_size"]) == (16, 2, 1)
    assert config["peak_lr"] == pytest.approx(2e-4 * 16 / 256), "--blr is MAE's base lr at batch 256"
    assert config["freezeout"] and config["t0"] == 0.85 and config["how_scale"] == "cubic"
    assert config["not_scale_lr"] and config["non_layerwise_lr"] and config["all_stages"] and config["dont_freeze_pe"]
    assert config["tensorboard"] == str(out), "--log_dir is TensorBoard's folder"


def test_the_studys_pretraining_line_runs_unchanged(tmp_path):
    assert run(*study_line(tmp_path / "run")) == 0
    assert_study_run(tmp_path / "run")


def test_the_studys_line_under_the_legacy_launcher(tmp_path):
    """`python -m torch.distributed.launch --nproc_per_node=1` sets RANK/WORLD_SIZE/LOCAL_RANK and appends
    --local-rank=0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node=1",
                           f"--master_port={port}", "localmim_freezeout.py", *study_line(tmp_path / "run")], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=recipe_env(OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_study_run(tmp_path / "run")


def test_world_size_that_disagrees_with_the_processes_is_refused(tmp_path, capsys):
    assert_user_error(run(*study_line(tmp_path / "run", world_size=4)), capsys, "--world-size 4", "1 process")
    assert not (tmp_path / "run").exists()


def test_batch_is_global_or_per_process_and_lr_scales_with_it():
    def parsed(*flags: str):
        return recipe.parse_args(["pretrain", *flags])

    global_batch = parsed("--batch-size", "2048", "--blr", "2e-4")
    assert recipe.effective_batch(global_batch, 8) == 2048 and recipe.micro_batch(global_batch, 8) == 256
    per_process = parsed("--batch_size", "256", "--grad-accum", "2", "--blr", "2e-4")
    assert recipe.effective_batch(per_process, 4) == 2048 and recipe.micro_batch(per_process, 4) == 256
    assert recipe.peak_lr(global_batch, 1) == recipe.peak_lr(per_process, 4) == pytest.approx(1.6e-3)
    assert recipe.peak_lr(parsed("--lr", "4e-3", "--lr-ref-batch", "0"), 8) == 4e-3, "--lr-ref-batch 0: absolute"
    assert recipe.effective_batch(parsed(), 2) == 2 * recipe.DEFAULT_BATCH_PER_PROCESS


@pytest.mark.parametrize("flags, words", [
    (["--batch-size", "16", "--batch_size", "8"], ["--batch-size"]),
    (["--batch-size", "16", "--grad-accum", "3"], ["--batch-size 16", "--grad-accum 3"]),
    (["--batch-size-per-process", "0"], ["--batch-size-per-process"]),
])
def test_batch_flags_that_cannot_work_are_refused(flags, words, capsys):
    assert_user_error(recipe.main(["pretrain", *flags]), capsys, *words)


def test_eval_only_evaluates_the_pretrained_encoder_and_writes_nothing(tmp_path, capsys):
    assert run("linprobe", *ARCH, "--data", "digits", "--pretrained", "random", "--eval-only", "--output-dir",
               tmp_path / "none") == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["val_images"] == 359 and 0 <= result["val_top1"] <= 100
    assert not (tmp_path / "none").exists()

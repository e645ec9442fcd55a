"""dvt.py on CPU: the paper's configurations, each exit against a plain timm ViT, the reuse paths' gradients, the
resizing of reused maps, the budget procedure against the official code, real early exit against the simulation and
its FLOPs, a digits run (losses, budget, eval, curve), exact resume, DDP parity, benchmark, bad input and presets.
Runs are in-process `main([...])` calls on tiny models (32 px digits, 2x2 / 3x3 / 4x4 tokens, width 32); one test
launches torchrun."""

from __future__ import annotations

import csv
import functools
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
from timm.data import Mixup
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import dvt
from common import torch_run as tr
from common.runlog import read_log

TINY = ["--data", "digits", "--image-size", "32", "--grids", "2,3,4", "--embed-dim", "32", "--depth", "2",
        "--num-heads", "2", "--token-dim", "16", "--workers", "0", "--batch-size", "32", "--eval-batch-size", "360",
        "--log-interval", "1", "--auto-augment", "none", "--random-crop", "none", "--hflip", "0",
        "--random-erasing", "0", "--mixup", "0", "--cutmix", "0", "--test-crop-ratio", "1", "--warmup-epochs", "0",
        "--cooldown-epochs", "0", "--model-ema-decay", "0", "--drop-path", "0", "--lr", "2e-3"]


def tiny_config(model: str = "dvt_t2t_vit_12", **overrides) -> dict:
    config = dict(model=model, image_size=32, grids=[2, 3, 4], num_classes=10, drop_path=0.0, feature_reuse=True,
                  relation_reuse=True, embed_dim=32, depth=2, num_heads=2, token_dim=16)
    return config | overrides


def tiny_model(model: str = "dvt_t2t_vit_12", seed: int = 0, **overrides) -> dvt.DVT:
    torch.manual_seed(seed)
    return dvt.build_model(tiny_config(model, **overrides))


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models on one thread


def train(*args) -> int:
    return dvt.main(["train", *map(str, args)])


def final_state(run_dir: Path) -> dict:
    return tr.load_checkpoint(tr.find_checkpoint(run_dir))


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- the model


def test_named_models_match_the_paper():
    """T2T-ViT-12: D 256, 12 blocks, 4 heads, MLP ratio 2 (6.9M params); T2T-ViT-14: D 384, 14 blocks, 6 heads, MLP 3
    (21.5M); DeiT-S: D 384, 12 blocks, 6 heads, MLP 4, qkv bias (timm's deit_small_patch16_224, 22,050,664). Each
    exit alone is the plain backbone; exits read 7x7, 10x10, 14x14 tokens of a 224 image."""
    expected = {"dvt_t2t_vit_12": (256, 12, 4, 512, 6.9e6), "dvt_t2t_vit_14": (384, 14, 6, 1152, 21.5e6),
                "dvt_deit_s": (384, 12, 6, 1536, 22_050_664)}
    for name, (dim, depth, heads, hidden, params) in expected.items():
        config = dict(model=name, image_size=224, grids=[7, 10, 14], num_classes=1000, drop_path=0.1,
                      feature_reuse=True, relation_reuse=True)
        with torch.device("meta"):
            model = dvt.build_model(config)
            alone = dvt.plain_backbone(config)
        count = sum(p.numel() for p in alone.parameters())
        assert count == params if name == "dvt_deit_s" else count == pytest.approx(params, rel=0.005), (name, count)
        for stage, grid in zip(model.stages, (7, 10, 14)):
            assert len(stage.blocks) == depth and stage.pos_embed.shape == (1, grid * grid + 1, dim), name
            attn = stage.blocks[0].attn
            assert attn.num_heads == heads and (attn.qkv.bias is not None) == (name == "dvt_deit_s"), name
            assert stage.blocks[0].mlp.fc1.out_features == hidden, name
        assert model.stages[0].blocks[0].feature_reuse is None and model.stages[0].relation_reuse is None
        assert model.stages[2].blocks[5].mlp.fc1.in_features == dim + 48  # [h; f]: 48 reused channels
        assert model.stages[2].relation_reuse[0].in_channels == depth * heads
    assert dvt.MODELS["dvt_t2t_vit_14"].learned_pos_embed is False  # fixed 1-D sinusoid
    with torch.device("meta"):
        t2t = dvt.build_model(dict(config, model="dvt_t2t_vit_14"))
        deit = dvt.build_model(config)
    splits = [(s.patch_embed.soft_split0.kernel_size, s.patch_embed.soft_split0.stride,
               s.patch_embed.soft_split0.padding) for s in t2t.stages]
    assert splits == [(14, 8, 3), (11, 6, 5), (7, 4, 2)]  # official performer_less_less_token / less_token / normal
    assert [(s.patch_embed.proj.kernel_size[0], s.patch_embed.proj.padding[0]) for s in deit.stages] == \
        [(32, 0), (23, 3), (16, 0)]


def test_sinusoid_position_embedding_matches_t2t_vit():
    table = dvt.sinusoid_pos_embed(5, 6)[0]
    for pos in range(5):
        for j in range(6):
            angle = pos / 10000 ** (2 * (j // 2) / 6)
            assert table[pos, j].item() == pytest.approx(math.sin(angle) if j % 2 == 0 else math.cos(angle), abs=1e-6)


@pytest.mark.parametrize("img_size, grid", [(224, 7), (224, 10), (224, 14), (32, 2), (32, 3), (32, 4), (32, 8),
                                            (31, 5), (384, 12), (96, 6)])
def test_soft_split_and_patch_give_each_grid(img_size, grid):
    kernel, stride, padding = dvt.t2t_soft_split(img_size, grid)
    side = dvt.unfold_size(img_size, kernel, stride, padding)
    assert dvt.unfold_size(dvt.unfold_size(side, 3, 2, 1), 3, 2, 1) == grid
    patch, padding = dvt.deit_patch(img_size, grid)
    assert dvt.unfold_size(img_size, patch, patch, padding) == grid


def timm_vit(stage: dvt.Stage, arch: dvt.Backbone, grid: int, img_size: int) -> nn.Module:
    """timm's VisionTransformer with `stage`'s weights: DeiT with its own patch embedding (on the image padded as
    the stage's conv pads it); T2T-ViT with the stage's tokens-to-token module in place of the patch embedding."""
    norm = functools.partial(nn.LayerNorm, eps=arch.norm_eps)
    kwargs = dict(embed_dim=arch.embed_dim, depth=arch.depth, num_heads=arch.num_heads, mlp_ratio=arch.mlp_ratio,
                  qkv_bias=arch.qkv_bias, norm_layer=norm, num_classes=10)
    if arch.embed == "patch":
        patch, padding = dvt.deit_patch(img_size, grid)
        vit = VisionTransformer(img_size=img_size + 2 * padding, patch_size=patch, **kwargs)
        vit.load_state_dict(stage.state_dict())
        return nn.Sequential(nn.ZeroPad2d(padding), vit).eval()
    vit = VisionTransformer(img_size=grid, patch_size=1, **kwargs)
    vit.patch_embed = stage.patch_embed
    vit.load_state_dict(stage.state_dict())
    return vit.eval()


@pytest.mark.parametrize("model_name", ["dvt_t2t_vit_12", "dvt_deit_s"])
def test_without_reuse_each_exit_equals_a_plain_timm_vit(model_name):
    """Every weight, bias and norm perturbed first (zero biases, unit norms and a zero head would hide a swap)."""
    model = tiny_model(model_name, feature_reuse=False, relation_reuse=False).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    arch = dvt.arch_of(tiny_config(model_name))
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        outputs = model(images)
        for stage, grid, logits in zip(model.stages, [2, 3, 4], outputs):
            expected = timm_vit(stage, arch, grid, 32)(images)
            torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5, msg=f"exit {grid}x{grid}")
    assert all(not s.export_features and not s.export_relations for s in model.stages)


def reference_stage(stage: dvt.Stage, images: torch.Tensor, upstream_features, upstream_relations, eps: float):
    """A stage written out from the DVT paper (§3.2-3.3) with einsums over its parameters: each block's attention
    logits get the upstream relations (all upstream maps through conv1x1 -> GELU -> conv1x1, resized), and its MLP
    reads [h; f] with f the upstream tokens through LN -> MLP (cls row dropped, resized, a zero cls row). Returns
    the logits, the last block's tokens before the final norm and every block's pre-softmax logits."""
    def linear(x, layer):
        return x @ layer.weight.T + (0 if layer.bias is None else layer.bias)

    def layer_norm(x, norm):
        return F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, eps)

    def mlp(x, module):
        return linear(F.gelu(linear(x, module.fc1)), module.fc2)

    x = torch.cat([stage.cls_token.expand(len(images), -1, -1), stage.patch_embed(images)], dim=1) + stage.pos_embed
    batch, tokens, dim = x.shape
    heads = stage.blocks[0].attn.num_heads
    reused = None
    if upstream_relations is not None:
        conv1, conv2 = stage.relation_reuse[0], stage.relation_reuse[2]
        hidden = F.gelu(torch.einsum("oc,bcqk->boqk", conv1.weight[:, :, 0, 0], upstream_relations)
                        + conv1.bias[:, None, None])
        maps = torch.einsum("oc,bcqk->boqk", conv2.weight[:, :, 0, 0], hidden) + conv2.bias[:, None, None]
        reused = dvt.resize_relations(maps, stage.upstream_grid, stage.grid)
    all_logits = []
    for index, block in enumerate(stage.blocks):
        qkv = linear(layer_norm(x, block.norm1), block.attn.qkv).reshape(batch, tokens, 3, heads, dim // heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * (dim // heads) ** -0.5
        if reused is not None:
            logits = logits + reused[:, index * heads:(index + 1) * heads]
        all_logits.append(logits)
        attended = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v).reshape(batch, tokens, dim)
        x = x + linear(attended, block.attn.proj)
        mlp_in = x
        if upstream_features is not None:
            f = mlp(layer_norm(upstream_features, block.feature_reuse[0]), block.feature_reuse[1])[:, 1:]
            f = dvt.resize_grid(f.transpose(1, 2), stage.upstream_grid, stage.grid).transpose(1, 2)
            mlp_in = torch.cat([x, torch.cat([torch.zeros_like(f[:, :1]), f], dim=1)], dim=-1)
        x = x + mlp(layer_norm(mlp_in, block.norm2), block.mlp)
    return linear(layer_norm(x, stage.norm)[:, 0], stage.head), x, torch.cat(all_logits, dim=1)


@pytest.mark.parametrize("features, relations", [(True, False), (False, True), (True, True)])
def test_reuse_paths_give_the_values_of_the_papers_equations(features, relations):
    """Every exit of the cascade (weights, biases and norms perturbed) equals `reference_stage` fed with the previous
    reference stage's tokens and attention logits. Mutations that fail: f from the upstream rows [:-1] (cls kept, last
    patch dropped), half the reused relations added, the last exit's fused attention without the reused mask."""
    model = tiny_model(feature_reuse=features, relation_reuse=relations).eval()
    torch.manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    eps = dvt.arch_of(tiny_config()).norm_eps
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        outputs = model(images)
        tokens = attention = None
        for k, (stage, logits) in enumerate(zip(model.stages, outputs)):
            expected, tokens, attention = reference_stage(stage, images, tokens if features and k else None,
                                                          attention if relations and k else None, eps)
            torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5, msg=f"exit {k + 1}")


def stage_grads(model: dvt.DVT, loss_exit: int, images: torch.Tensor, labels: torch.Tensor) -> list[dict]:
    model.zero_grad()
    F.cross_entropy(model(images)[loss_exit], labels).backward()
    return [{name: (p.grad is not None and p.grad.abs().sum().item() > 0) for name, p in stage.named_parameters()}
            for stage in model.stages]


@pytest.mark.parametrize("features, relations", [(False, False), (True, False), (False, True), (True, True)])
def test_gradients_reach_earlier_exits_only_through_the_reuse_paths(features, relations):
    """Feature reuse reads the upstream last block's output before the final norm; relationship reuse reads every
    upstream block's attention logits. Nothing is detached: the last exit's loss reaches both earlier exits."""
    model = tiny_model(feature_reuse=features, relation_reuse=relations).train()
    images, labels = torch.randn(6, 3, 32, 32), torch.arange(6)
    grads = stage_grads(model, 2, images, labels)
    # The head reads the cls token, whose reused-feature row is zero: the last block's feature-reuse MLP of the last
    # exit gets no gradient (as in the official code); everything else of the last exit does.
    unused = {k for k in grads[2] if k.startswith("blocks.1.feature_reuse.")}
    assert bool(unused) == features and not any(grads[2][k] for k in unused)
    assert all(v for k, v in grads[2].items() if k not in unused), [k for k, v in grads[2].items() if not v]
    for k in (0, 1):
        got = grads[k]
        if not (features or relations):
            assert not any(got.values()), f"exit {k + 1} gets gradients from the last exit without reuse"
            continue
        for name in ("norm.weight", "head.weight"):  # not on any reuse path
            assert not got[name], f"exit {k + 1} {name}: reuse reads the blocks' output before the final norm"
        assert got["patch_embed.project.weight"] and got["blocks.0.attn.qkv.weight"]
        # The last block's MLP feeds the reused features only; the logits are computed before it.
        assert got["blocks.1.mlp.fc2.weight"] == features, f"exit {k + 1}: last MLP"
        assert got["blocks.1.attn.qkv.weight"] == (relations or features), f"exit {k + 1}"
    assert not any(stage_grads(model, 0, images, labels)[1].values()), "exit 1's loss must not reach exit 2"
    if relations:  # exit 3 sees exit 1's relations through exit 2's logits (stage 2 adds the maps it received)
        with_conv = stage_grads(model, 2, images, labels)[1]
        assert with_conv["relation_reuse.0.weight"]


def reference_relation_resize(relations: torch.Tensor, side_in: int, side_out: int) -> torch.Tensor:
    """The official forward_features' relation resizing (models/t2t_vit.py), written out as it is there."""
    up = nn.Upsample(size=(side_in * math.ceil(side_out / side_in),) * 2, mode="nearest")
    pool = nn.AdaptiveAvgPool2d((side_out, side_out))
    new_hw = side_out * side_out
    temp = relations[:, :, :, 1:]
    b, h, n, hw = temp.shape
    temp = pool(up(temp.reshape(-1, n, side_in, side_in))).reshape(-1, n, new_hw)
    temp = torch.cat((relations[:, :, :, 0].reshape(-1, n, 1), temp), dim=2).transpose(1, 2)
    cls_temp, temp = temp[:, :, 0:1], temp[:, :, 1:]
    temp = pool(up(temp.reshape(-1, new_hw + 1, side_in, side_in))).reshape(-1, new_hw + 1, new_hw)
    return torch.cat((cls_temp, temp), dim=2).transpose(1, 2).reshape(b, -1, new_hw + 1, new_hw + 1)


@pytest.mark.parametrize("side_in, side_out", [(7, 10), (10, 14), (2, 3), (3, 4)])
def test_relation_and_feature_resizing_match_the_official_code(side_in, side_out):
    relations = torch.randn(2, 6, side_in**2 + 1, side_in**2 + 1)
    torch.testing.assert_close(dvt.resize_relations(relations, side_in, side_out),
                               reference_relation_resize(relations, side_in, side_out))
    features = torch.randn(2, 48, side_in, side_in)  # transformer_block.py: interpolate nearest, adaptive avg pool
    expected = F.adaptive_avg_pool2d(F.interpolate(features, (side_in * math.ceil(side_out / side_in),) * 2),
                                     side_out).flatten(2)
    torch.testing.assert_close(dvt.resize_grid(features.flatten(2), side_in, side_out), expected)


def test_token_performer_is_the_random_feature_attention_of_t2t_vit():
    torch.manual_seed(0)
    performer = dvt.TokenPerformer(27, 16).eval()
    x = torch.randn(2, 9, 27)
    y = performer.norm1(x)
    k, q, v = performer.kqv(y).split(16, dim=-1)
    w = performer.random_features
    assert w.shape == (8, 16) and torch.allclose(w @ w.t(), 8 * torch.eye(8), atol=1e-4)  # orthogonal rows x sqrt(m)

    def phi(t):
        return torch.exp(torch.einsum("bti,mi->btm", t, w) - (t * t).sum(-1, keepdim=True) / 2) / math.sqrt(8)

    kp, qp = phi(k), phi(q)
    d = torch.einsum("bti,bi->bt", qp, kp.sum(1)).unsqueeze(2)
    attn = torch.einsum("bti,bni->btn", qp, torch.einsum("bin,bim->bnm", v, kp)) / (d + 1e-8)
    out = v + performer.proj(attn)
    out = out + performer.mlp(performer.norm2(out))
    torch.testing.assert_close(performer(x), out)


# ---------------------------------------------------------------------------------------------- adaptive inference


def official_find_threshold(confidences: torch.Tensor, p: torch.Tensor) -> list[float]:
    """dynamic_find_threshold of the official inference.py, loop for loop."""
    n_stage, n_sample = confidences.shape
    _, sorted_idx = confidences.sort(dim=1, descending=True)
    filtered = torch.zeros(n_sample)
    thresholds = torch.full((n_stage,), 1e8)
    for k in range(n_stage - 1):
        count, out_n = 0, math.floor(n_sample * p[k])
        for i in range(n_sample):
            index = sorted_idx[k][i]
            if filtered[index] == 0:
                count += 1
                if count == out_n:
                    thresholds[k] = confidences[k][index]
                    break
        filtered.add_(confidences[k].ge(thresholds[k]).type_as(filtered))
    return thresholds[:-1].tolist()


def test_budget_thresholds_follow_the_official_procedure():
    torch.manual_seed(0)
    confidences = torch.rand(3, 500)
    for p in (1, 7, 20, 33, 59):
        q = p / 20
        shares = torch.tensor([q, q**2, q**3], dtype=torch.float64)
        shares /= shares.sum()
        ours = dvt.budget_thresholds(confidences, q)
        official = official_find_threshold(confidences, shares)
        assert [t if t < 2 else 1e8 for t in ours] == pytest.approx(official), p
        exits = dvt.simulate_exits(confidences, ours)
        counts = torch.bincount(exits, minlength=3).tolist()
        assert counts[:2] == [math.floor(500 * s) for s in shares[:2].tolist()], p  # exactly floor(n pi_k) leave at k


def test_budget_search_lands_within_2_percent_and_refuses_the_impossible():
    torch.manual_seed(1)
    confidences = torch.rand(3, 400)
    cumulative = [1e9, 3e9, 7e9]
    for target in (1.2e9, 2.5e9, 4e9, 6.5e9):
        q, thresholds = dvt.search_budget(confidences, cumulative, target)
        got = dvt.average_flops(dvt.simulate_exits(confidences, thresholds), cumulative)
        assert got == pytest.approx(target, rel=0.02), (target, q)
    with pytest.raises(dvt.UserError, match="outside"):
        dvt.search_budget(confidences, cumulative, 9e9)


def test_early_exit_extremes_and_equality_with_the_simulation():
    """Thresholds 0: every image leaves at exit 1; above 1: every image reaches the last exit. In between, the real
    early exit (each exit on the remaining rows only, with those rows' reuse tensors) predicts exactly what running
    every exit on every image and picking the first confident one predicts, and costs per image exactly the FLOPs of
    the exits it ran."""
    model = tiny_model(seed=3).eval()
    config = tiny_config()
    images = torch.randn(64, 3, 32, 32)
    with torch.no_grad():
        full = model(images)
    logits, exits = dvt.early_exit(model, images, [0.0, 0.0])
    assert (exits == 0).all() and torch.allclose(logits, full[0], atol=1e-5)
    logits, exits = dvt.early_exit(model, images, [1.01, 1.01])
    assert (exits == 2).all() and torch.allclose(logits, full[2], atol=1e-5)

    confidences = torch.stack([o.softmax(-1).amax(-1) for o in full])
    thresholds = [confidences[0].quantile(0.6).item() + 1e-6, confidences[1].quantile(0.5).item() + 1e-6]
    expected_exits = dvt.simulate_exits(confidences, thresholds)
    assert set(expected_exits.tolist()) == {0, 1, 2}, "the thresholds should split the batch over all exits"
    # The math SDPA backend: FlopCounterMode has no formula for the CPU flash-attention kernel (it has the GPU ones).
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        logits, exits = dvt.early_exit(model, images, thresholds)
    assert torch.equal(exits, expected_exits)
    picked = torch.stack(full)[expected_exits, torch.arange(64)]
    torch.testing.assert_close(logits, picked, rtol=1e-4, atol=1e-5)
    assert torch.equal(logits.argmax(-1), picked.argmax(-1))
    cumulative = dvt.cumulative_flops(config)
    assert counter.get_total_flops() == pytest.approx(sum(cumulative[k] for k in exits.tolist()), rel=1e-9)
    per_exit = dvt.exit_flops(config)
    assert all(f > 0 for f in per_exit) and per_exit == sorted(per_exit)


# ---------------------------------------------------------------------------------------------- a shared digits run

LEARN = [*TINY, "--model", "dvt_deit_s", "--batch-size", "32", "--epochs", "2", "--log-interval", "11"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dvt") / "digits"
    assert train(*LEARN, "--output-dir", out) == 0
    return out


def test_training_lowers_every_exits_loss(digits_run):
    records = [r for r in read_log(digits_run) if "loss" in r]
    evals = [r for r in read_log(digits_run) if "val_top1" in r]
    assert len(evals) == 2, "one eval per epoch"
    for k in (1, 2, 3):
        first, last = records[0][f"loss_exit{k}"], records[-1][f"loss_exit{k}"]
        assert last < first - 0.05, f"exit {k}: loss {first:.3f} -> {last:.3f}"
    assert records[-1]["loss"] == pytest.approx(sum(records[-1][f"loss_exit{k}"] for k in (1, 2, 3)), rel=1e-5)
    assert evals[-1]["val_top1_exit1"] > 40, f"10 classes, chance is 10%: {evals[-1]}"
    assert evals[-1]["val_top1"] == evals[-1]["val_top1_exit3"]
    config = json.loads((digits_run / "config.json").read_text())
    assert config["num_classes"] == 10 and len(config["params_per_exit"]) == 3
    assert tr.checkpoint_steps(digits_run / "best")


def test_budget_meets_its_target_and_eval_runs_the_real_early_exit(digits_run, capsys):
    common = [str(digits_run), "--workers", "0", "--batch-size", "200", "--calib-images", "600"]
    cumulative = dvt.cumulative_flops(json.loads((digits_run / "config.json").read_text()))
    target = (cumulative[0] + cumulative[2]) / 2 / 1e9
    assert dvt.main(["budget", *common, "--target-gflops", str(target)]) == 0
    budget = json.loads((digits_run / "budget.json").read_text())
    assert budget == last_json(capsys.readouterr().out)
    assert budget["calib_gflops"] == pytest.approx(target, rel=0.02) and budget["calib_images"] == 600
    assert len(budget["thresholds"]) == 2 and (digits_run / dvt.CALIB_CACHE).exists()
    assert dvt.main(["budget", *common, "--target-gmacs", str(target / 2), "--output", str(digits_run / "b2.json")]) \
        == 0
    assert json.loads((digits_run / "b2.json").read_text())["thresholds"] == budget["thresholds"]  # GMACs = GFLOPs/2

    assert dvt.main(["eval", *common]) == 0
    result = last_json(capsys.readouterr().out)
    assert result["images"] == 359 and result["thresholds"] == budget["thresholds"]
    assert sum(result["exit_share"]) == pytest.approx(1.0) and min(result["exit_share"]) > 0
    assert result["gflops"] == pytest.approx(sum(s * c for s, c in zip(result["exit_share"], cumulative)) / 1e9)
    assert result["gflops"] == pytest.approx(target, rel=0.25), "val images behave roughly like the calibration ones"
    assert result["img_per_sec"] > 0

    # The extremes of the real early exit give the training log's per-exit accuracies (bf16 here, fp32 there: a
    # few images may differ); between them lies the budget's accuracy, well above chance (10%).
    logged = max((r for r in read_log(digits_run) if "val_top1" in r), key=lambda r: r["val_top1"])
    extremes = {}
    for thresholds in ("0,0", "2,2"):
        assert dvt.main(["eval", *common, "--thresholds", thresholds]) == 0
        extremes[thresholds] = last_json(capsys.readouterr().out)
    assert extremes["0,0"]["exit_share"] == [1, 0, 0] and extremes["2,2"]["exit_share"] == [0, 0, 1]
    assert extremes["0,0"]["top1"] == pytest.approx(logged["val_top1_exit1"], abs=1.5)
    assert extremes["2,2"]["top1"] == pytest.approx(logged["val_top1_exit3"], abs=1.5)
    assert result["top1"] > 25 and result["top1"] >= min(logged[f"val_top1_exit{k}"] for k in (1, 2, 3)) - 3, \
        (result["top1"], logged)


def test_eval_curve_writes_a_csv_and_a_png(digits_run, capsys):
    assert dvt.main(["eval", str(digits_run), "--workers", "0", "--batch-size", "200", "--calib-images", "600",
                     "--curve", "--thresholds", "0.5,0.5"]) == 0
    result = last_json(capsys.readouterr().out)
    assert result["curve"]["points"] == 59 and result["thresholds"] == [0.5, 0.5]
    with open(digits_run / "curve.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["q"]) for r in rows] == pytest.approx([p / 20 for p in range(1, 60)])
    gflops = [float(r["calib_gflops"]) for r in rows]
    one_image = json.loads((digits_run / "config.json").read_text())  # floors move single images between exits
    one_image = dvt.cumulative_flops(one_image)[-1] / 1e9 / 600
    assert gflops[0] < gflops[-1] and all(b >= a - 2 * one_image for a, b in zip(gflops, gflops[1:]))
    assert all(0 <= float(r["top1"]) <= 100 for r in rows)
    with Image.open(digits_run / "curve.png") as image:
        assert image.format == "PNG" and image.size[0] >= 500


def test_eval_without_thresholds_and_bad_threshold_counts_are_refused(digits_run, tmp_path, capsys):
    assert_user_error(dvt.main(["eval", str(digits_run), "--budget", str(tmp_path / "none.json")]), capsys, "budget")
    assert_user_error(dvt.main(["eval", str(digits_run), "--thresholds", "0.5"]), capsys, "2 thresholds")
    assert_user_error(dvt.main(["budget", str(digits_run), "--workers", "0", "--calib-images", "100",
                                "--target-gflops", "1000"]), capsys, "outside")


def test_transfer_starts_from_a_run_with_new_heads(digits_run, tmp_path):
    """T2T-ViT's CIFAR transfer: SGD, heads at the full lr, the rest at 0.01x; weights from another run."""
    args = dvt.parse_args(["train", *LEARN, "--init-from", str(digits_run), "--num-classes", "10", "--optimizer",
                           "sgd", "--backbone-lr-scale", "0.01", "--weight-decay", "5e-4"])
    torch.manual_seed(0)
    model = dvt.build_model(dict(vars(args), num_classes=10))
    dvt.init_weights_from(model, str(digits_run))
    reported = tr.load_checkpoint(tr.find_checkpoint(digits_run / "best"))["model"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, reported[key]), key
    seven = dvt.build_model(dict(vars(args), num_classes=7))
    head = seven.stages[0].head.weight.clone()
    dvt.init_weights_from(seven, str(digits_run))  # another class count: fresh heads, the rest transferred
    assert torch.equal(seven.stages[0].head.weight, head)
    assert torch.equal(seven.stages[2].blocks[1].mlp.fc2.weight, reported["stages.2.blocks.1.mlp.fc2.weight"])
    optimizer = dvt.make_optimizer(model, args, torch.device("cpu"))
    peaks = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert peaks[id(names["stages.0.head.weight"])] == (args.lr, 5e-4)
    assert peaks[id(names["stages.2.blocks.0.norm1.bias"])] == (0.01 * args.lr, 5e-4)  # SGD decays every parameter
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["momentum"] == 0.9


# ---------------------------------------------------------------------------------------------- schedule, optimizer


def test_lr_schedule_is_timms_per_epoch_cosine():
    """T2T-ViT's main.py: timm's CosineLRScheduler stepped once per epoch: linear warmup from --warmup-lr over
    --warmup-epochs, cosine to --min-lr over --epochs (warmup included), --min-lr in the cooldown; each group from
    its own peak (the backbone's is --lr x --backbone-lr-scale, CosineAnnealingLR-style: the same floor)."""
    args = dvt.parse_args(["train", "--epochs", "30", "--cooldown-epochs", "3", "--warmup-epochs", "5",
                           "--warmup-lr", "1e-6", "--min-lr", "1e-5", "--lr", "2e-3", "--backbone-lr-scale", "0.5"])
    optimizer = dvt.make_optimizer(tiny_model(), args, torch.device("cpu"))
    scheduler = dvt.make_scheduler(optimizer, args)
    assert sorted({g["initial_lr"] for g in optimizer.param_groups}) == [1e-3, 2e-3]
    for epoch in range(33):
        scheduler.step(epoch)
        for group in optimizer.param_groups:
            peak = group["initial_lr"]
            if epoch < 5:
                expected = 1e-6 + epoch * (peak - 1e-6) / 5
            elif epoch < 30:
                expected = 1e-5 + 0.5 * (peak - 1e-5) * (1 + math.cos(math.pi * epoch / 30))
            else:
                expected = 1e-5
            assert group["lr"] == pytest.approx(expected), (epoch, peak)
    assert {g["lr"] for g in optimizer.param_groups} == {1e-5}  # cooldown at the minimum


def test_weight_decay_skips_biases_and_norms_only_as_the_official_code():
    """DVT's wrapper has no `no_weight_decay()`, so timm's create_optimizer decays its class tokens and the DeiT
    variant's learned position embeddings; only 1-D parameters are exempt."""
    args = dvt.parse_args(["train", "--model", "dvt_deit_s"])
    model = tiny_model("dvt_deit_s")
    optimizer = dvt.make_optimizer(model, args, torch.device("cpu"))
    decays = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    for name in ("stages.1.blocks.0.norm1.weight", "stages.1.blocks.0.attn.qkv.bias", "stages.2.relation_reuse.0.bias"):
        assert decays[id(names[name])] == 0.0, name
    for name in ("stages.1.cls_token", "stages.1.pos_embed", "stages.1.blocks.0.attn.qkv.weight",
                 "stages.2.relation_reuse.0.weight", "stages.0.head.weight",
                 "stages.2.blocks.1.feature_reuse.1.fc1.weight"):
        assert decays[id(names[name])] == 0.05, name


# ---------------------------------------------------------------------------------------------- parity and resume


def test_augmenter_mixes_as_timm_and_erases_each_image_by_its_global_index():
    """One process: mixup/cutmix are timm's `Mixup` (batch mode, its numpy draws seeded by seed and step); random
    erasing of an image depends on its index in the global batch, not on which process's shard holds it."""
    torch.manual_seed(0)
    images, labels = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    mixing = dvt.Augmenter(dict(num_classes=10, label_smoothing=0.1, random_erasing=0.0, mixup=0.8, cutmix=1.0),
                           torch.device("cpu"))
    timm_mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)
    for step in range(4):
        mixed, targets = mixing(images, labels, seed=0, step=step, first_index=0)
        np.random.seed(tr.step_seed(0, step))
        expected, expected_targets = timm_mixup(images.clone(), labels)
        torch.testing.assert_close(mixed, expected, rtol=0, atol=1e-6, msg=f"images at step {step}")
        torch.testing.assert_close(targets, expected_targets, rtol=0, atol=1e-6, msg=f"targets at step {step}")
    erasing = dvt.Augmenter(dict(num_classes=10, label_smoothing=0.0, random_erasing=1.0, mixup=0.0, cutmix=0.0),
                            torch.device("cpu"))
    whole, _ = erasing(images, labels, seed=0, step=3, first_index=0)
    shards = [erasing(images[start:start + 4], labels[start:start + 4], seed=0, step=3, first_index=start)[0]
              for start in (0, 4)]
    assert (whole != images).any(dim=(1, 2, 3)).all(), "reprob 1.0 must erase every image"
    torch.testing.assert_close(torch.cat(shards), whole, rtol=0, atol=0, msg="erasing depends on the shard")


def test_two_process_torchrun_matches_one_process(tmp_path):
    """2 processes give the 1-process update (here in 2 micro-batches) with the data-level draws on: crop, flip,
    mixup/cutmix (paired across the global batch) and random erasing (seeded per global sample). Drop path stays
    off: its masks are drawn per process (README)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [*TINY, "--model", "dvt_deit_s", "--training-steps", "3", "--eval-interval", "3", "--mixup", "0.8",
            "--cutmix", "1.0", "--random-erasing", "0.5", "--random-crop", "rrc", "--hflip", "0.5"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                           "dvt.py", "train", *args, "--output-dir", str(tmp_path / "ddp")], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=recipe_env(OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert train(*args, "--grad-accum", "2", "--output-dir", tmp_path / "one") == 0
    ddp, one = final_state(tmp_path / "ddp"), final_state(tmp_path / "one")
    assert ddp["config"]["world_size"] == 2 and ddp["step"] == one["step"] == 3
    torch.manual_seed(0)
    initial = dvt.build_model(one["config"]).state_dict()
    assert max((one["model"][k] - initial[k]).abs().max() for k in initial) > 1e-4, "the weights did not move"
    for key, value in one["model"].items():
        torch.testing.assert_close(ddp["model"][key], value, rtol=0, atol=2e-5, msg=key)
    evals = [[r for r in read_log(tmp_path / run) if "val_images" in r][-1] for run in ("ddp", "one")]
    assert evals[0]["val_images"] == evals[1]["val_images"] == 359
    assert evals[0]["val_top1"] == pytest.approx(evals[1]["val_top1"])


RESUME = [*TINY, "--model", "dvt_t2t_vit_12", "--batch-size", "16", "--training-steps", "6", "--eval-interval", "100",
          "--drop-path", "0.1", "--mixup", "0.8", "--cutmix", "1.0", "--random-erasing", "0.25", "--model-ema-decay",
          "0.9", "--random-crop", "rrc", "--hflip", "0.5", "--workers", "1"]


def test_resume_after_stop_equals_uninterrupted_run(tmp_path):
    """Mixup/cutmix, random erasing, drop path, the T2T performers' dropout and the EMA on: all continue exactly."""
    assert train(*RESUME, "--output-dir", tmp_path / "straight") == 0
    assert train(*RESUME, "--stop-after", "2", "--output-dir", tmp_path / "stopped") == 0
    assert tr.checkpoint_steps(tmp_path / "stopped" / "checkpoints") == [2]
    assert train(*RESUME, "--resume", "--output-dir", tmp_path / "stopped") == 0
    straight, resumed = final_state(tmp_path / "straight"), final_state(tmp_path / "stopped")
    assert straight["step"] == resumed["step"] == 6
    for part in ("model", "ema"):
        for key, value in straight[part].items():
            assert torch.equal(resumed[part][key], value), f"{part} {key} differs after resuming"
    a, b = ({r["step"]: r["loss"] for r in read_log(tmp_path / run) if "loss" in r} for run in ("straight", "stopped"))
    assert sorted(a) == sorted(b) == list(range(1, 7)) and all(a[s] == b[s] for s in a)


# ---------------------------------------------------------------------------------------------- bad input, benchmark


def test_unknown_model_and_bad_grids(tmp_path, capsys):
    assert_user_error(train("--model", "dvt_vit_huge", "--output-dir", tmp_path), capsys, "dvt_vit_huge")
    assert_user_error(train(*TINY, "--grids", "4,3", "--output-dir", tmp_path), capsys, "increasing")
    assert_user_error(train(*TINY, "--random-crop", "pad", "--auto-augment", "rand-m9", "--output-dir", tmp_path),
                      capsys, "--auto-augment none")


def test_benchmark_times_training_and_adaptive_inference(tmp_path, capsys):
    assert train(*TINY, "--model", "dvt_deit_s", "--benchmark", "--benchmark-steps", "1", "--data", "synthetic",
                 "--num-classes", "10", "--eval-batch-size", "64", "--output-dir", tmp_path) == 0
    result = last_json(capsys.readouterr().out)
    assert result["img_per_sec"] > 0 and result["train_gflops_per_img"] > 0
    assert {"mfu", "peak_memory_gib", "step_ms"} <= set(result)
    names = [r["name"] for r in result["inference"]]
    assert names == ["exit 4x4 backbone alone", "no early exit (all exits)", "q=0.05", "q=1.0", "q=2.95"]
    lowest = result["inference"][2]
    assert lowest["exit_share"][0] > 0.9 and lowest["img_per_sec"] > 0  # pi_1 = 1 / (1 + q + q^2) = 0.95
    gflops = [r["gflops"] for r in result["inference"][1:]]
    assert gflops[1] < gflops[2] < gflops[3] < gflops[0]
    assert not (tmp_path / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------- the DVT study's lines

# The DVT study's training command lines (main.py's positional data path and flags, the repository's model names),
# as `python -m torch.distributed.launch --nproc_per_node=1 dvt.py LINE` runs them.
OFFICIAL_LINES = {
    "DVT_T2t_vit_12": "train PATH_TO_DATASET --model DVT_T2t_vit_12 --batch-size 128 --lr 2e-3 --weight-decay .03 "
                      "--amp --img-size 224",
    "DVT_T2t_vit_14": "train PATH_TO_DATASET --model DVT_T2t_vit_14 --batch-size 64 --lr 5e-4 --weight-decay .05 "
                      "--amp --img-size 224",
}
OFFICIAL_ARGS = {"DVT_T2t_vit_12": dict(model="dvt_t2t_vit_12", batch_size=128, lr=2e-3, weight_decay=0.03),
                 "DVT_T2t_vit_14": dict(model="dvt_t2t_vit_14", batch_size=64, lr=5e-4, weight_decay=0.05)}
# Appended so that a line runs on a CPU in seconds: a narrow one-block model on 32 px (2x2, 3x3, 4x4 tokens), 2 steps.
CPU_OVERRIDE = ["--image-size", "32", "--grids", "2,3,4", "--embed-dim", "32", "--depth", "1", "--num-heads", "2",
                "--token-dim", "16", "--workers", "0", "--stop-after", "2"]


def official_line(name: str, data: str = "digits") -> list[str]:
    return OFFICIAL_LINES[name].replace("PATH_TO_DATASET", data).split()


@pytest.mark.parametrize("name", sorted(OFFICIAL_LINES))
def test_the_dvt_studys_command_lines_run_unchanged(name, tmp_path):
    """torch.distributed.launch (without --use-env) puts --local-rank=0 before the command."""
    argv = ["--local-rank=0", *official_line(name)]
    args = dvt.parse_args(argv)
    expected = dict(OFFICIAL_ARGS[name], data="digits", image_size=224, precision="bf16", local_rank=0)
    assert {key: getattr(args, key) for key in expected} == expected
    assert dvt.main([*argv, *CPU_OVERRIDE, "--output-dir", str(tmp_path)]) == 0
    state = final_state(tmp_path)
    assert state["step"] == 2 and state["config"]["model"] == expected["model"]
    assert state["config"]["lr"] == expected["lr"] and state["config"]["batch_size"] == expected["batch_size"]


def test_the_legacy_launcher_runs_a_line_of_the_study(tmp_path):
    """The line as it is, in a fresh folder (the run goes to the default --output-dir runs/dvt), under the launcher:
    --local-rank=0 before the command, LOCAL_RANK / RANK / WORLD_SIZE in the environment."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node=1", str(REPO / "dvt.py"),
                           *official_line("DVT_T2t_vit_12"), *CPU_OVERRIDE], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=recipe_env(OMP_NUM_THREADS="1", PET_MASTER_PORT=str(port)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = final_state(tmp_path / "runs" / "dvt")
    assert state["step"] == 2 and state["config"]["model"] == "dvt_t2t_vit_12" and state["config"]["local_rank"] == 0


def test_amp_and_the_positional_data_path(tmp_path, capsys):
    """--amp is main.py's mixed-precision switch (bf16, float32 on CPUs); the data path is DATA or --data, once."""
    assert dvt.parse_args(["train", "--precision", "fp32", "--amp"]).precision == "bf16"
    assert dvt.parse_args(["train", "--amp", "--precision", "fp32"]).precision == "fp32"
    assert dvt.parse_args(["train"]).data == "digits"
    assert dvt.parse_args(["train", "--data", "cifar10"]).data == "cifar10"
    assert dvt.parse_args(["eval", "runs/x", "cifar10"]).data == "cifar10"
    assert dvt.parse_args(["budget", "runs/x", "--q", "1"]).data is None  # the run's own
    assert_user_error(train("digits", "--data", "cifar10", "--output-dir", tmp_path / "run"), capsys, "twice")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- presets

PRESETS = REPO / "scripts" / "dvt"
T2T = dict(optimizer="adamw", epochs=300, cooldown_epochs=10, warmup_epochs=20, warmup_lr=1e-6, min_lr=1e-5,
           auto_augment="rand-m9-mstd0.5-inc1", random_erasing=0.25, mixup=0.8, cutmix=1.0, label_smoothing=0.1,
           drop_path=0.1, model_ema_decay=0.99996, image_size=224, grids=[7, 10, 14], random_crop="rrc",
           feature_reuse=True, relation_reuse=True, clip_grad=0.0, test_crop_ratio=0.875, repeats=1,
           interpolation="bicubic")
CIFAR = dict(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, backbone_lr_scale=0.01, batch_size=64,
             epochs=60, cooldown_epochs=0, warmup_epochs=0, min_lr=2e-4, image_size=224, random_crop="pad",
             auto_augment=None, mixup=0.0, cutmix=0.0, random_erasing=0.0, label_smoothing=0.0, model_ema_decay=0.0,
             test_crop_ratio=1.0, grids=[7, 10, 14], interpolation="bilinear", drop_path=0.1)
ROWS = {
    "in1k_dvt_t2t_vit_12": dict(T2T, model="dvt_t2t_vit_12", batch_size=1024, lr=2e-3, weight_decay=0.03),
    "in1k_dvt_t2t_vit_14": dict(T2T, model="dvt_t2t_vit_14", batch_size=512, lr=5e-4, weight_decay=0.05),
    # DeiT (Touvron et al. 2021, Table 9): lr 5e-4 x 1024 / 512, wd 0.05, warmup 5, repeated augmentation x3, no
    # cooldown (DeiT's loop stops at --epochs), raw weights reported (no EMA).
    "in1k_dvt_deit_s": dict(T2T, model="dvt_deit_s", batch_size=1024, lr=1e-3, weight_decay=0.05, warmup_epochs=5,
                            cooldown_epochs=0, repeats=3, model_ema_decay=0.0),
    "cifar10_dvt_t2t_vit_12": dict(CIFAR, model="dvt_t2t_vit_12", data="cifar10"),
    "cifar10_dvt_t2t_vit_14": dict(CIFAR, model="dvt_t2t_vit_14", data="cifar10"),
    "cifar100_dvt_t2t_vit_12": dict(CIFAR, model="dvt_t2t_vit_12", data="cifar100"),
    "cifar100_dvt_t2t_vit_14": dict(CIFAR, model="dvt_t2t_vit_14", data="cifar100"),
}


def preset_argv(path: Path) -> list[str]:
    """The flags after `dvt.py train` in a preset, with ${VAR:-default} substituted."""
    text = path.read_text().replace("\\\n", " ")
    defaults = dict(re.findall(r"^(\w+)=\$\{\w+:-([^}]*)\}", text, re.M))
    command = next(line for line in text.splitlines() if "dvt.py train" in line)
    words = shlex.split(command, comments=True)
    assert words[-1] == "$@", f"{path.name}: end the command with \"$@\" so that flags can be overridden"
    words = words[words.index("train") + 1:-1]
    return [re.sub(r"\$\{?(\w+)\}?", lambda m: defaults[m[1]], word) for word in words]


def test_one_preset_per_paper_run_and_the_demos():
    assert {p.stem for p in PRESETS.glob("*.sh")} == set(ROWS) | {"digits_demo", "cifar_32px"}


@pytest.mark.parametrize("name", sorted(ROWS))
def test_preset_matches_the_paper(name):
    args = dvt.parse_args(["train", *preset_argv(PRESETS / f"{name}.sh")])
    expected = ROWS[name]
    got = {key: getattr(args, key) for key in expected}
    assert got == expected, {k: (got[k], v) for k, v in expected.items() if got[k] != v}
    assert args.output_dir == f"runs/dvt/{name}"
    flags = [w for w in preset_argv(PRESETS / f"{name}.sh") if w.startswith("--")]
    assert len(flags) == len(set(flags)), f"{name}: a flag is given twice"
    if name.startswith("cifar"):
        assert args.init_from, "the paper fine-tunes its ImageNet DVT on CIFAR"
    header = " ".join(line.lstrip("#").strip() for line in (PRESETS / f"{name}.sh").read_text().splitlines()[1:]
                      if line.startswith("#"))
    assert "Wang et al. 2021" in header and "Expected top-1: DVT reports" in header, \
        f"{name}: the header must name the DVT paper and state what DVT itself reports for this row"


def test_presets_are_executable_bash():
    for path in PRESETS.glob("*.sh"):
        assert os.access(path, os.X_OK) and path.read_text().startswith("#!/usr/bin/env bash\n"), path
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0, path
        dvt.parse_args(["train", *preset_argv(path)])
    args = dvt.parse_args(["train", *preset_argv(PRESETS / "digits_demo.sh")])
    assert (args.data, args.output_dir, args.workers) == ("digits", "runs/dvt/digits_demo", 0)

"""common.convert and scripts/convert_flax_to_timm.py: Flax ViTs of this repo <-> timm VisionTransformer.

Tiny float32 models on CPU. Weights are random and pushed away from their init (LayerScale gammas near 1,
non-zero biases), so that a wrong transpose, a dropped LayerScale or a misplaced position embedding
changes the logits.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from timm.layers import resample_abs_pos_embed  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

import deit3_jax  # noqa: E402
from common import UserError, convert  # noqa: E402

SCRIPT = REPO / "scripts" / "convert_flax_to_timm.py"
TOLERANCE = 1e-4


def run_config(**overrides) -> dict:
    """A run config as deit3_jax saves it (its flags plus the resolved num_classes), for a tiny model."""
    config = dict(image_size=32, patch_size=8, layers=2, dim=64, heads=4, labels=10, num_classes=10,
                  layerscale=True, layerscale_init=1e-4, posemb="learnable", pooling="cls",
                  dropout=0.0, drop_path=0.0, grad_ckpt=False, precision="float32")
    config.update(overrides)
    return config


def flax_model(config: dict) -> deit3_jax.VisionTransformer:
    return deit3_jax.VisionTransformer(deit3_jax.model_config(argparse.Namespace(**config), config["num_classes"]))


def random_params(model, config: dict, seed: int = 0) -> dict:
    """Initialised params, each leaf moved well away from its init."""
    images = jnp.zeros((1, config["image_size"], config["image_size"], 3))
    params = model.init(jax.random.PRNGKey(seed), images)["params"]
    rng = np.random.default_rng(seed)

    def perturb(path, leaf):
        leaf = np.asarray(leaf)
        if path[-1].key == "gamma":  # LayerScale: from 1e-4 to order 1, so that dropping it shows
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        return (leaf + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(perturb, params)


def random_images(config: dict, batch: int = 3, seed: int = 1) -> np.ndarray:
    size = config["image_size"]
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)  # NHWC


def flax_logits(model, params, images: np.ndarray) -> np.ndarray:
    forward = jax.jit(lambda params, images: model.apply({"params": params}, images, train=False))
    return np.asarray(forward(params, jnp.asarray(images)))


def timm_model(kwargs: dict, state: dict) -> VisionTransformer:
    model = VisionTransformer(**kwargs).eval()
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, strict=True)
    return model


def timm_logits(model: VisionTransformer, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()  # NHWC -> NCHW


def assert_same_logits(flax_out: np.ndarray, timm_out: np.ndarray, what: str) -> None:
    diff = np.abs(flax_out - timm_out).max()
    assert diff <= TOLERANCE, f"{what}: Flax and timm logits differ by {diff:.2e} (tolerance {TOLERANCE})"


def assert_trees_equal(a: dict, b: dict, path: str = "") -> None:
    assert set(a) == set(b), f"{path or 'top level'}: keys {sorted(a)} != {sorted(b)}"
    for key in a:
        if isinstance(a[key], dict):
            assert_trees_equal(a[key], b[key], f"{path}/{key}")
        else:
            left, right = np.asarray(a[key]), np.asarray(b[key])
            assert left.dtype == right.dtype and np.array_equal(left, right), f"{path}/{key} changed"


# ----------------------------------------------------------------------------------------------
# Flax -> timm gives the same model
# ----------------------------------------------------------------------------------------------

VARIANTS = {
    "layerscale_cls": dict(),  # DeiT-III: LayerScale, cls pooling, pos-emb on patches (timm deit3_*)
    "plain_vit": dict(layerscale=False),
    "gap_pooling": dict(pooling="gap", patch_size=4),
    "sincos_posemb": dict(posemb="sincos2d"),
    "sincos_gap": dict(posemb="sincos2d", pooling="gap", layers=3),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_flax_model_converted_to_timm_gives_the_same_logits(variant):
    config = run_config(**VARIANTS[variant])
    model = flax_model(config)
    params = random_params(model, config)
    grid = config["image_size"] // config["patch_size"]
    fixed = convert.sincos_2d_pos_embed(grid, config["dim"]) if config["posemb"] == "sincos2d" else None

    state = convert.flax_to_timm(params, pos_embed=fixed)
    kwargs = convert.timm_kwargs(config)
    images = random_images(config)
    assert_same_logits(flax_logits(model, params, images), timm_logits(timm_model(kwargs, state), images), variant)
    assert kwargs["init_values"] == (1e-4 if config["layerscale"] else None)
    assert kwargs["global_pool"] == ("token" if config["pooling"] == "cls" else "avg")


def test_export_to_vit_layout_with_a_zero_cls_row_gives_the_same_logits():
    config = run_config()
    model = flax_model(config)
    params = random_params(model, config)
    state = convert.flax_to_timm(params, cls_rows_in_pos_embed=1)
    kwargs = convert.timm_kwargs(config, no_embed_class=False)
    assert state["pos_embed"].shape == (1, 1 + 16, 64) and not state["pos_embed"][0, 0].any()
    images = random_images(config)
    expected = flax_logits(model, params, images)
    assert_same_logits(expected, timm_logits(timm_model(kwargs, state), images), "vit_* layout")

    # Control: the logit check notices the pos-emb layout (a non-zero cls row changes the model).
    state["pos_embed"][0, 0] = np.random.default_rng(2).standard_normal(64)  # not constant: LayerNorm removes that
    wrong = timm_logits(timm_model(kwargs, state), images)
    assert np.abs(expected - wrong).max() > 1e-2, "a non-zero cls pos-emb row went unnoticed"


def test_timm_kwargs_name_the_matching_timm_presets():
    s16 = dict(image_size=224, patch_size=16, layers=12, dim=384, heads=6, num_classes=1000)
    deit3 = convert.timm_kwargs(run_config(**s16))
    assert convert.timm_model_name(deit3) == "deit3_small_patch16_224"
    vit = convert.timm_kwargs(run_config(**s16, layerscale=False), no_embed_class=False)
    assert convert.timm_model_name(vit) == "vit_small_patch16_224"
    assert convert.timm_model_name(convert.timm_kwargs(run_config(**s16, pooling="gap"))) is None
    assert convert.timm_model_name(convert.timm_kwargs(run_config())) is None  # 32 px: no preset


def test_timm_kwargs_needs_a_class_count():
    with pytest.raises(ValueError, match="num_classes"):
        convert.timm_kwargs(run_config(num_classes=None, labels=-1))
    assert convert.timm_kwargs(run_config(num_classes=None, labels=7))["num_classes"] == 7


# ----------------------------------------------------------------------------------------------
# Round trips
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_timm_to_flax_to_timm_is_bit_exact(dtype):
    config = run_config()
    kwargs = convert.timm_kwargs(config)
    torch.manual_seed(0)
    original = {k: v.to(dtype) for k, v in VisionTransformer(**kwargs).state_dict().items()}
    back = convert.flax_to_timm(convert.timm_to_flax(original))
    assert set(back) == set(original)
    for key, value in original.items():
        restored = torch.from_numpy(back[key].view(np.int16)).view(dtype) if dtype == torch.bfloat16 \
            else torch.from_numpy(back[key])
        assert restored.dtype == dtype and torch.equal(restored, value), f"{key} changed in the round trip"


def test_flax_to_timm_to_flax_is_exact():
    for variant in VARIANTS:
        config = run_config(**VARIANTS[variant])
        params = random_params(flax_model(config), config)
        assert_trees_equal(convert.timm_to_flax(convert.flax_to_timm(params)), params)


def test_timm_weights_load_into_the_flax_model():
    config = run_config()
    kwargs = convert.timm_kwargs(config)
    torch.manual_seed(0)
    reference = VisionTransformer(**kwargs).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.1 * torch.randn_like(p))
    params = convert.timm_to_flax(reference.state_dict())
    images = random_images(config)
    assert_same_logits(flax_logits(flax_model(config), params, images), timm_logits(reference, images), "timm->flax")


# ----------------------------------------------------------------------------------------------
# Position embeddings
# ----------------------------------------------------------------------------------------------


def mae_sincos(embed_dim: int, grid_size: int, cls_token: bool) -> np.ndarray:
    """facebookresearch/mae util/pos_embed.py get_2d_sincos_pos_embed, transcribed."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])

    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb


@pytest.mark.parametrize("cls_rows", [0, 1])
def test_sincos_pos_embed_follows_mae(cls_rows):
    ours = convert.sincos_2d_pos_embed(7, 32, cls_rows=cls_rows)
    assert ours.shape == (1, cls_rows + 49, 32) and ours.dtype == np.float32
    np.testing.assert_allclose(ours[0], mae_sincos(32, 7, cls_token=bool(cls_rows)), rtol=0, atol=1e-6)
    # The first half encodes the column: tokens of one column share it, tokens of one row do not.
    grid = ours[0, cls_rows:].reshape(7, 7, 32)
    assert np.array_equal(grid[0, 3, :16], grid[5, 3, :16]) and np.array_equal(grid[3, 0, 16:], grid[3, 5, 16:])


@pytest.mark.parametrize("prefix_rows", [0, 1])
@pytest.mark.parametrize("new_grid", [12, 6])
def test_resize_pos_embed_is_the_originals_bicubic_interpolate(prefix_rows, new_grid):
    """MAE interpolate_pos_embed / DeiT --finetune: F.interpolate(bicubic, align_corners=False) on (1, D, g, g)."""
    pos_embed = np.random.default_rng(0).standard_normal((1, prefix_rows + 8 * 8, 32)).astype(np.float32)
    grid = torch.from_numpy(pos_embed[:, prefix_rows:]).reshape(1, 8, 8, 32).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    expected = expected.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, 32).numpy()
    resized = convert.resize_pos_embed(pos_embed, new_grid, prefix_rows=prefix_rows)
    assert resized.shape == (1, prefix_rows + new_grid**2, 32) and resized.dtype == np.float32
    np.testing.assert_array_equal(resized[:, prefix_rows:], expected)
    np.testing.assert_array_equal(resized[:, :prefix_rows], pos_embed[:, :prefix_rows])
    antialiased = resample_abs_pos_embed(torch.from_numpy(pos_embed), [new_grid, new_grid],
                                         num_prefix_tokens=prefix_rows).numpy()
    assert not np.allclose(resized, antialiased, atol=1e-3), "timm's default (antialiased) kernel is not the originals'"


def test_model_finetuned_at_a_new_resolution_matches_timm_loading_it():
    """Flax fine-tune at 48 px from a 32 px model == timm loading the 32 px weights resized as the originals do
    (bicubic without antialiasing: timm's checkpoint_filter_fn with its antialias default would differ)."""
    low = run_config(patch_size=4)  # grid 8
    params = random_params(flax_model(low), low)
    high = run_config(patch_size=4, image_size=48)  # grid 12
    resized = dict(params, pos_embed=convert.resize_pos_embed(params["pos_embed"], 12))
    images = random_images(high)
    flax_out = flax_logits(flax_model(high), resized, images)

    # timm's loading path with the originals' kernel: resample_abs_pos_embed(antialias=False) is
    # F.interpolate(bicubic, align_corners=False) on the (1, D, g, g) grid.
    low_state = {k: torch.from_numpy(v) for k, v in convert.flax_to_timm(params).items()}
    low_state["pos_embed"] = resample_abs_pos_embed(low_state["pos_embed"], [12, 12], antialias=False,
                                                    num_prefix_tokens=0)
    target = VisionTransformer(**convert.timm_kwargs(high)).eval()
    target.load_state_dict(low_state, strict=True)
    assert_same_logits(flax_out, timm_logits(target, images), "fine-tune at 48 px")
    assert_same_logits(flax_out, timm_logits(timm_model(convert.timm_kwargs(high), convert.flax_to_timm(resized)),
                                             images), "converted 48 px model")


# ----------------------------------------------------------------------------------------------
# scripts/convert_flax_to_timm.py
# ----------------------------------------------------------------------------------------------


def load_script():
    spec = importlib.util.spec_from_file_location("convert_flax_to_timm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_rejects_a_missing_checkpoint(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "nope")], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "does not exist" in lines[0], result.stderr


@pytest.mark.parametrize("arch,posemb,preset_rows", [(None, "learnable", 16), ("vit", "learnable", 17),
                                                     ("vit", "sincos2d", 17)])
def test_flax_params_export_as_loadable_timm_weights(tmp_path, capsys, arch, posemb, preset_rows):
    """convert.flax_params_to_timm + write_timm_export (what every JAX recipe's rule returns and the exporter
    writes): files written, the same weights, the same logits, the model reported."""
    config = run_config(posemb=posemb)
    model = flax_model(config)
    params = random_params(model, config)
    convert.write_timm_export(convert.flax_params_to_timm(params, config, arch), tmp_path / "timm_model.pth")
    assert "timm model: VisionTransformer(**{" in capsys.readouterr().out
    from safetensors.torch import load_file

    saved = torch.load(tmp_path / "timm_model.pth")
    safetensors = load_file(tmp_path / "timm_model.safetensors")
    assert set(saved) == set(safetensors) and all(torch.equal(saved[k], safetensors[k]) for k in saved)
    assert saved["pos_embed"].shape[1] == preset_rows
    kwargs = convert.timm_kwargs(config, no_embed_class=preset_rows == 16)
    images = random_images(config)
    model_out = timm_logits(timm_model(kwargs, {k: v.numpy() for k, v in saved.items()}), images)
    assert_same_logits(flax_logits(model, params, images), model_out, f"export --arch {arch}")


def test_script_on_a_real_checkpoint(tmp_path):
    from common import checkpoint  # an import error is a failure, not a skip

    config = run_config()
    params = random_params(flax_model(config), config)
    saver = checkpoint.Checkpointer(tmp_path)
    saver.save(1, {"params": params, "step": np.int32(1)}, {"config": config}, best=True)
    saver.wait()
    saver.close()

    # A bare checkpoint folder (no config.json names its recipe): the old name reads it as a DeiT-III ViT.
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--out", str(tmp_path / "export/m.pth")],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "export/m.pth").is_file() and (tmp_path / "export/m.safetensors").is_file()
    saved = torch.load(tmp_path / "export/m.pth")
    expected = convert.flax_to_timm(params)
    assert set(saved) == set(expected) and all(np.array_equal(saved[k].numpy(), expected[k]) for k in expected)


def test_an_unreadable_state_dict_is_one_error_line(tmp_path):
    """torch.load's reasons run over many lines (weights_only's advice); the fault contract prints one."""
    pickled = tmp_path / "object.pth"
    torch.save({"model": object()}, pickled)  # refused by weights_only=True, with a long multi-line reason
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    for path in (pickled, garbage):
        with pytest.raises(UserError) as error:
            convert.read_torch_state_dict(str(path), "--init")
        assert "\n" not in str(error.value) and "\x1b" not in str(error.value) and "--init" in str(error.value), \
            str(error.value)

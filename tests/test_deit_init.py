"""deit_jax.py --init (DeiT main.py --finetune): a run's weights at another resolution, the position embedding's
patch grid resized as the original does it, torch.nn.functional.interpolate(mode="bicubic", align_corners=False)
on the (1, D, g, g) grid with the cls / distillation rows kept."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_deit import TINY

import deit_jax
from common import UserError, checkpoint


def tiny_params(image_size: int, num_classes: int, distilled: bool, seed: int) -> tuple[deit_jax.ViTConfig, dict]:
    config = deit_jax.ViTConfig(num_classes=num_classes, image_size=image_size, patch_size=4, layers=2, dim=32,
                                heads=2, distilled=distilled)
    images = jnp.zeros((1, image_size, image_size, 3))
    params = deit_jax.VisionTransformer(config).init(jax.random.PRNGKey(seed), images)["params"]
    return config, jax.tree_util.tree_map(np.asarray, params)


def torch_bicubic(pos_embed: np.ndarray, prefix_rows: int, new_grid: int) -> np.ndarray:
    """DeiT main.py --finetune: prefix rows kept, the (1, D, g, g) grid through F.interpolate bicubic."""
    dim, grid = pos_embed.shape[2], int((pos_embed.shape[1] - prefix_rows) ** 0.5)
    patches = torch.from_numpy(np.array(pos_embed[:, prefix_rows:])).reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim).numpy()
    return np.concatenate([pos_embed[:, :prefix_rows], patches], axis=1)


@pytest.mark.parametrize("distilled", [False, True], ids=["cls", "cls+dist"])
def test_init_resizes_the_pos_embed_as_torch_bicubic_and_copies_the_rest(distilled, tmp_path, monkeypatch):
    _, source = tiny_params(16, 10, distilled, seed=0)  # a 4 x 4 grid, as a 224 run
    config, fresh = tiny_params(24, 10, distilled, seed=1)  # a 6 x 6 grid, as the 384 fine-tune
    source_config = {"script": "deit_jax.py", "pooling": "cls", "distilled": distilled}
    monkeypatch.setattr(deit_jax.checkpoint, "load_params_and_config", lambda path: (source, source_config))

    loaded = deit_jax.load_init(fresh, str(tmp_path), config)

    prefix = 1 + distilled
    expected = torch_bicubic(source["pos_embed"], prefix, 6)
    np.testing.assert_allclose(loaded["pos_embed"], expected, rtol=1e-6, atol=1e-7,
                               err_msg="the pos-emb grid is not F.interpolate(bicubic, align_corners=False)")
    np.testing.assert_array_equal(loaded["pos_embed"][:, :prefix], source["pos_embed"][:, :prefix])
    for name in ("cls_token", "head", "blocks_1", "patch_embed", "norm") + (("dist_token", "head_dist") * distilled):
        jax.tree_util.tree_map(np.testing.assert_array_equal, loaded[name], source[name])


def test_init_keeps_a_fresh_head_for_other_classes(tmp_path, monkeypatch):
    _, source = tiny_params(16, 10, True, seed=0)
    config, fresh = tiny_params(16, 7, True, seed=1)
    monkeypatch.setattr(deit_jax.checkpoint, "load_params_and_config",
                        lambda path: (source, {"script": "deit_jax.py", "pooling": "cls", "distilled": True}))
    loaded = deit_jax.load_init(fresh, str(tmp_path), config)
    for head in ("head", "head_dist"):
        jax.tree_util.tree_map(np.testing.assert_array_equal, loaded[head], fresh[head])
    np.testing.assert_array_equal(loaded["pos_embed"], source["pos_embed"])  # same grid: copied as it is


def test_init_refuses_a_model_of_other_tokens(tmp_path, monkeypatch):
    _, source = tiny_params(16, 10, False, seed=0)
    config, fresh = tiny_params(16, 10, True, seed=1)
    monkeypatch.setattr(deit_jax.checkpoint, "load_params_and_config",
                        lambda path: (source, {"script": "deit_jax.py", "pooling": "cls", "distilled": False}))
    with pytest.raises(UserError, match="--distill"):
        deit_jax.load_init(fresh, str(tmp_path), config)


def test_a_run_starts_from_a_run_at_another_resolution(tmp_path, capsys):
    """A 16 px run, then a 24 px run from it whose one step has lr 0: its checkpoint holds the loaded weights."""
    first, second = tmp_path / "at16", tmp_path / "at24"
    steps = ["--training-steps", "2", "--warmup-steps", "1", "--eval-interval", "1000"]
    assert deit_jax.main([*TINY, *steps, "--output-dir", str(first)]) == 0
    frozen = ["--training-steps", "1", "--warmup-steps", "0", "--learning-rate", "0", "--warmup-lr", "0",
              "--min-lr", "0", "--eval-interval", "1000"]
    assert deit_jax.main([*TINY, *frozen, "--image-size", "24", "--init", str(first), "--output-dir", str(second)]) == 0
    source, _ = checkpoint.load_params_and_config(first)
    loaded, _ = checkpoint.load_params_and_config(second)
    np.testing.assert_allclose(loaded["pos_embed"], torch_bicubic(source["pos_embed"], 1, 6), rtol=1e-6, atol=1e-7)
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded["blocks_0"], source["blocks_0"])
    assert deit_jax.main([*TINY, "--init", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "x")]) != 0
    assert "--init" in capsys.readouterr().err

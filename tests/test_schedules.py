"""Schedules against optax's, and layer-wise lr decay against the BEiT/MAE rule."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common import schedules


@pytest.mark.parametrize("step", [0, 1, 5, 9, 10, 11, 50, 99, 100, 120])
def test_warmup_cosine_matches_optax(step):
    """DeiT-III's schedule as its JAX code writes it (optax.warmup_cosine_decay_schedule, decay_steps counting the
    warmup): linear warmup from warmup_lr, half-cosine to min_lr, then min_lr."""
    peak, total, warmup, warmup_lr, min_lr = 3e-3, 100, 10, 1e-6, 1e-5
    schedule = schedules.warmup_cosine(peak, total, warmup, warmup_lr=warmup_lr, min_lr=min_lr)
    reference = optax.warmup_cosine_decay_schedule(init_value=warmup_lr, peak_value=peak, warmup_steps=warmup,
                                                   decay_steps=total, end_value=min_lr)
    assert float(schedule(step)) == pytest.approx(float(reference(step)), rel=1e-5, abs=1e-9)


def test_warmup_cosine_without_warmup_starts_at_peak():
    schedule = schedules.warmup_cosine(1.0, 10, 0, min_lr=0.1)
    assert float(schedule(0)) == pytest.approx(1.0)
    assert float(schedule(10)) == pytest.approx(0.1)


def test_linear_lr_scaling_rule():
    assert schedules.scaled_lr(5e-4, 1024, 512) == pytest.approx(1e-3)  # DeiT: lr * bs / 512
    assert schedules.scaled_lr(3e-3, 1024, 0) == 3e-3  # DeiT-III: absolute


@pytest.mark.parametrize("name, expected", [
    ("cls_token", 0), ("pos_embed", 0), ("patch_embed/proj/kernel", 0), ("patch_embed.proj.weight", 0),
    ("blocks_0/attn/qkv/kernel", 1), ("blocks.11.mlp.fc2.bias", 12), ("norm/scale", 13), ("fc_norm.weight", 13),
    ("head/kernel", 13)])
def test_layer_id_follows_beit_mae_rule(name, expected):
    assert schedules.layer_id(name, depth=12) == expected


def test_layer_decay_scales_and_transform():
    depth, decay = 3, 0.65
    params = {"pos_embed": jnp.ones((1, 4, 2)), "blocks_0": {"w": jnp.ones(2)}, "blocks_2": {"w": jnp.ones(2)},
              "head": {"kernel": jnp.ones((2, 2))}}
    scales = schedules.layer_decay_scales(params, depth, decay)
    assert scales["pos_embed"] == pytest.approx(decay ** 4)
    assert scales["blocks_0"]["w"] == pytest.approx(decay ** 3)
    assert scales["blocks_2"]["w"] == pytest.approx(decay ** 1)
    assert scales["head"]["kernel"] == pytest.approx(1.0)
    updates, _ = schedules.scale_by_tree(scales).update(params, optax.EmptyState())
    np.testing.assert_allclose(updates["blocks_0"]["w"], decay ** 3)

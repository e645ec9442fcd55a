"""Learning-rate schedules (per optimizer step, as optax schedules) and layer-wise lr decay."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import optax


def warmup_cosine(peak_lr: float, total_steps: int, warmup_steps: int, *, warmup_lr: float = 0.0,
                  min_lr: float = 0.0) -> optax.Schedule:
    """Linear warmup from `warmup_lr` to `peak_lr` over `warmup_steps`, then half-cosine to `min_lr`.

    lr(t) = warmup_lr + (peak_lr - warmup_lr) * t / warmup_steps                    for t < warmup_steps
    lr(t) = min_lr + (peak_lr - min_lr) * (1 + cos(pi * (t - w) / (total - w))) / 2   afterwards
    (the per-iteration schedule of DeiT/MAE's code; timm steps it per epoch by default). It is optax's
    `warmup_cosine_decay_schedule`, as deit3-jax calls it; its decay_steps count the warmup too.
    """
    warmup_steps = max(0, min(warmup_steps, total_steps))
    decay_steps = max(1, total_steps - warmup_steps)
    return optax.warmup_cosine_decay_schedule(init_value=warmup_lr, peak_value=peak_lr, warmup_steps=warmup_steps,
                                              decay_steps=warmup_steps + decay_steps, end_value=min_lr)


def scaled_lr(lr: float, batch_size: int, ref_batch: int) -> float:
    """Linear lr scaling rule (Goyal et al. 2017): lr * batch_size / ref_batch; `ref_batch` <= 0 leaves lr as is."""
    return lr * batch_size / ref_batch if ref_batch > 0 else lr


def layer_id(name: str, depth: int) -> int:
    """Layer index of a parameter for layer-wise lr decay (BEiT/MAE `get_layer_id_for_vit`).

    Embeddings (patch_embed, cls/dist tokens, pos_embed) are layer 0, block i is i + 1, everything after
    the blocks (final norm, head) is depth + 1. Accepts timm names (`blocks.3.attn`) and Flax paths
    (`blocks_3/attn`).
    """
    first = re.split(r"[./]", name)[0]
    if first in ("cls_token", "dist_token", "pos_embed", "patch_embed", "mask_token", "reg_token"):
        return 0
    match = re.match(r"blocks[._](\d+)", name)
    if match:
        return int(match.group(1)) + 1
    return depth + 1


def layer_decay_scales(params: Mapping[str, Any], depth: int, decay: float) -> Any:
    """Pytree like `params` holding lr multipliers decay ** (depth + 1 - layer_id) (MAE fine-tuning, §A.1)."""
    def scale(path, _):
        name = "/".join(str(getattr(key, "key", key)) for key in path)
        return decay ** (depth + 1 - layer_id(name, depth))

    return jax.tree_util.tree_map_with_path(scale, params)


def scale_by_tree(scales: Any) -> optax.GradientTransformation:
    """Multiply each update by a fixed per-parameter factor (e.g. `layer_decay_scales`)."""
    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map(lambda u, s: u * s, updates, scales), state

    return optax.GradientTransformation(init, update)

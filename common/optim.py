"""Optimizers as the PyTorch recipes define them, built from optax pieces (the JAX recipes share these)."""

from __future__ import annotations

from typing import Any

import jax
import optax

from common import schedules


def decay_mask(params: Any) -> Any:
    """True for weight matrices and conv kernels: the parameters that get weight decay (and LAMB's trust ratio).

    Biases, norms, LayerScale gammas, cls/dist tokens and position embeddings get none, as timm's
    `param_groups_weight_decay` (1-D parameters and `no_weight_decay()` names).
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def make_optimizer(name: str, learning_rate: optax.Schedule | float, params: Any, *, weight_decay: float,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, clip_norm: float = 0.0,
                   layer_decay: float = 1.0, depth: int = 0, decay: Any = None) -> optax.GradientTransformation:
    """AdamW or LAMB as in PyTorch/timm, with decoupled weight decay on `decay_mask(params)` only.

    - adamw: torch.optim.AdamW (decay multiplied by the lr). Note: optax.adamw defaults to weight decay 1e-4.
    - lamb: timm/apex LAMB (DeiT-III): Adam moments, decay and trust ratio ||w|| / ||update|| only on the
      decayed parameters; optax.lamb instead puts the trust ratio on every leaf.
    clip_norm > 0 clips the gradients to that global norm first (timm's LAMB clips to 1.0 internally).
    layer_decay < 1 multiplies each parameter's update by layer_decay ** (depth + 1 - layer_id) (BEiT/MAE).
    decay: a pytree of booleans to use instead of `decay_mask(params)`.
    """
    mask = decay_mask(params) if decay is None else decay
    chain = [optax.clip_by_global_norm(clip_norm)] if clip_norm > 0 else []
    chain += [optax.scale_by_adam(b1, b2, eps), optax.add_decayed_weights(weight_decay, mask)]
    if name == "lamb":
        chain.append(optax.masked(optax.scale_by_trust_ratio(), mask))
    elif name != "adamw":
        raise ValueError(f"unknown optimizer {name!r}; expected 'adamw' or 'lamb'")
    if layer_decay < 1.0:
        chain.append(schedules.scale_by_tree(schedules.layer_decay_scales(params, depth, layer_decay)))
    chain.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*chain)


def lars(learning_rate: optax.Schedule | float, *, weight_decay: float = 0.0, momentum: float = 0.9,
         trust_coefficient: float = 0.001) -> optax.GradientTransformation:
    """LARS as MAE's linear probe (util/lars.py, from MoCo v3) and timm's `Lars`.

    For parameters with more than one dimension: g += wd * w, then g *= trust_coefficient * ||w|| / ||g||
    (1 where either norm is 0); 1-D parameters (biases, norms) get neither. Then heavy-ball momentum
    mu = momentum * mu + g and w -= lr * mu. (optax.lars applies the lr before the momentum, which differs
    while the lr changes.)
    """
    def matrices(params):
        return jax.tree_util.tree_map(lambda x: x.ndim > 1, params)

    return optax.chain(optax.add_decayed_weights(weight_decay, matrices),
                       optax.masked(optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient), matrices),
                       optax.trace(decay=momentum), optax.scale_by_learning_rate(learning_rate))

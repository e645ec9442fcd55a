"""common/optim.py against the PyTorch optimizers it reproduces, step by step on the same parameters and gradients."""

import jax
import numpy as np
import optax
import pytest
import torch

from common import optim


def toy_params(seed: int = 0) -> dict:
    """A ViT-like tree: weight matrices ("kernel", decayed and trust-ratio scaled) and 1-D / token leaves."""
    rng = np.random.default_rng(seed)
    tree = {"embed": {"kernel": rng.normal(size=(6, 4)), "bias": rng.normal(size=4)},
            "norm": {"scale": 1 + 0.1 * rng.normal(size=4), "bias": 0.1 * rng.normal(size=4)},
            "head": {"kernel": 0.02 * rng.normal(size=(4, 3)), "bias": np.zeros(3)},
            "cls": rng.normal(size=(1, 1, 4))}
    return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), tree)


@pytest.mark.parametrize("clip_norm", [1.0, 0.0])
def test_lamb_follows_timms_lamb(clip_norm):
    """optim.make_optimizer('lamb') and timm.optim.Lamb (DeiT-III's optimizer) as DeiT-III's `create_optimizer`
    builds it: weight decay only on the decayed group, trust ratio only where there is weight decay
    (always_adapt=False), bias correction, global clipping `max_grad_norm`, eps 1e-8: the same parameters after
    each of six steps with a changing lr and gradients whose global norm is now above, now below the clip.
    Mutations that fail: the trust ratio on every leaf (optax.lamb), no clipping, weight decay on every leaf."""
    from timm.optim import Lamb

    lrs, weight_decay, eps = [1e-2, 3e-2, 2e-2, 5e-3, 4e-2, 1e-2], 0.05, 1e-8
    params = toy_params()
    decayed = optim.decay_mask(params)
    optimizer = optim.make_optimizer("lamb", lambda step: np.asarray(lrs)[step], params, weight_decay=weight_decay,
                                     eps=eps, clip_norm=clip_norm)
    names = [("embed", "kernel"), ("embed", "bias"), ("norm", "scale"), ("norm", "bias"), ("head", "kernel"),
             ("head", "bias"), ("cls",)]

    def leaf(tree, name):
        for key in name:
            tree = tree[key]
        return tree

    torch_params = {name: torch.nn.Parameter(torch.tensor(leaf(params, name), dtype=torch.float32)) for name in names}
    groups = [{"params": [p for n, p in torch_params.items() if leaf(decayed, n)], "weight_decay": weight_decay},
              {"params": [p for n, p in torch_params.items() if not leaf(decayed, n)], "weight_decay": 0.0}]
    reference = Lamb(groups, lr=lrs[0], eps=eps, max_grad_norm=clip_norm or None)
    assert len(groups[0]["params"]) == 2  # the two kernels

    state = optimizer.init(params)
    rng = np.random.default_rng(1)
    norms = []
    for lr, scale in zip(lrs, [1.0, 0.05, 1.0, 0.1, 0.05, 1.0]):
        grads = {name: (scale * rng.normal(size=np.shape(leaf(params, name)))).astype(np.float32) for name in names}
        norms.append(np.sqrt(sum((g ** 2).sum() for g in grads.values())))
        tree = toy_params()  # the structure, refilled with the gradients
        for name, grad in grads.items():
            parent = leaf(tree, name[:-1]) if len(name) > 1 else tree
            parent[name[-1]] = grad
        updates, state = optimizer.update(tree, state, params)
        params = optax.apply_updates(params, updates)
        for group in reference.param_groups:
            group["lr"] = lr
        for name, p in torch_params.items():
            p.grad = torch.tensor(grads[name], dtype=torch.float32)
        reference.step()
        for name, p in torch_params.items():
            np.testing.assert_allclose(np.asarray(leaf(params, name)), p.detach().numpy(), rtol=1e-5, atol=2e-6,
                                       err_msg=f"{'/'.join(name)} after {len(norms)} steps")
    assert min(norms) < 1 < max(norms), norms  # clipping both on and off during the run

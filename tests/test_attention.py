"""common.attention: which attention runs where, and that the CPU numbers are the old call's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import attention as attn

# (platform, dtype, head_dim) -> implementation; head dims of the presets are 32 (MAE decoder) and 64.
BACKEND_TABLE = [
    ("gpu", jnp.bfloat16, 64, "cudnn"),
    ("gpu", jnp.float16, 64, "cudnn"),
    ("cuda", jnp.bfloat16, 32, "cudnn"),
    ("gpu", jnp.bfloat16, 128, "cudnn"),
    ("gpu", jnp.float32, 64, "xla"),  # cuDNN flash attention is bf16/fp16 only
    ("gpu", jnp.bfloat16, 60, "xla"),  # head dim not a multiple of 8
    ("gpu", jnp.bfloat16, 256, "xla"),  # over 128 (only Hopper with cuDNN >= 9.5 takes it)
    ("rocm", jnp.bfloat16, 64, "xla"),
    ("cpu", jnp.bfloat16, 64, "xla"),
    ("cpu", jnp.float32, 64, "xla"),
    ("tpu", jnp.bfloat16, 64, "xla"),
]


@pytest.mark.parametrize("platform,dtype,head_dim,expected", BACKEND_TABLE)
def test_attention_backend_picks_cudnn_only_on_gpus_for_half_precision_and_fitting_head_dims(
        platform, dtype, head_dim, expected):
    got = attn.attention_backend(platform, dtype, head_dim)
    assert got == expected, f"{platform} {jnp.dtype(dtype).name} head dim {head_dim}: got {got}, want {expected}"


def _qkv(dtype, tokens=197, heads=3, head_dim=64):
    keys = jax.random.split(jax.random.key(0), 3)
    return [jax.random.normal(k, (2, tokens, heads, head_dim), jnp.float32).astype(dtype) for k in keys]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_attention_on_cpu_equals_the_plain_dot_product_attention_call(dtype):
    q, k, v = _qkv(dtype)
    got, want = jax.jit(attn.attention)(q, k, v), jax.jit(jax.nn.dot_product_attention)(q, k, v)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                  err_msg="attention on CPU must be XLA's, the numbers of the call it replaced")


def test_attention_falls_back_to_xla_when_cudnn_refuses(monkeypatch):
    # Pretend to be a GPU: the selection picks cuDNN, jax raises while tracing (no cuDNN on this machine, as for
    # a refused shape), and the result must be XLA's, gradients included.
    monkeypatch.setattr(attn.jax, "default_backend", lambda: "gpu")
    q, k, v = _qkv(jnp.bfloat16, tokens=50)
    assert attn.attention_backend("gpu", q.dtype, q.shape[-1]) == "cudnn"

    def loss(fn, q):
        return fn(q, k, v).astype(jnp.float32).sum()

    got = jax.jit(jax.value_and_grad(lambda q: loss(attn.attention, q)))(q)
    want = jax.jit(jax.value_and_grad(lambda q: loss(jax.nn.dot_product_attention, q)))(q)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                      err_msg="the fallback must give XLA's numbers")

"""Multi-head attention for the JAX recipes: cuDNN flash attention on NVIDIA GPUs, XLA's attention elsewhere.

`jax.nn.dot_product_attention(q, k, v)` without `implementation=` runs XLA's attention in jax 0.10/0.11 (it
materialises the float32 score matrix), not cuDNN's. `attention` asks for cuDNN where it can run:
- NVIDIA GPU, bf16/fp16, head dim a multiple of 8 and at most 128 (cuDNN 9 flash attention; Hopper also takes
  256, but every preset here uses 32 or 64): `implementation="cudnn"`. Any token count works without a bias
  or mask (197, 50, 257, 577, ... are fine). If cuDNN still refuses (another GPU generation, no cuDNN, ROCm),
  jax raises while tracing, and we fall back to XLA.
- CPU, TPU, float32 anywhere: `implementation="xla"` (XLA's fused attention on TPU; the same numbers as the
  plain call on CPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_MAX_HEAD_DIM = 128  # cuDNN >= 9.5 on Hopper takes 256; 128 holds on Ampere too


def attention_backend(platform: str, dtype: jnp.dtype, head_dim: int) -> str:
    """The `implementation=` of `jax.nn.dot_product_attention` for inputs of `dtype` with `head_dim` channels
    per head on `platform` (a JAX platform name: "gpu", "cuda", "rocm", "cpu", "tpu"): "cudnn" or "xla"."""
    on_gpu = platform in ("gpu", "cuda")
    fits = head_dim % 8 == 0 and head_dim <= CUDNN_MAX_HEAD_DIM
    return "cudnn" if on_gpu and jnp.dtype(dtype) in CUDNN_DTYPES and fits else "xla"


def attention(query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
    """Softmax attention over (batch, tokens, heads, head_dim) inputs -> (batch, tokens, heads, head_dim),
    scaled by 1 / sqrt(head_dim), no mask: cuDNN flash attention where `attention_backend` picks it, else XLA."""
    if attention_backend(jax.default_backend(), query.dtype, query.shape[-1]) == "cudnn":
        try:
            return jax.nn.dot_product_attention(query, key, value, implementation="cudnn")
        except (NotImplementedError, ValueError, RuntimeError):
            # jax checks cuDNN's limits while tracing (check_is_flash_attention raises NotImplementedError or
            # ValueError; no cuDNN raises RuntimeError), so a refused shape or build lands here, not at run time.
            pass
    return jax.nn.dot_product_attention(query, key, value, implementation="xla")

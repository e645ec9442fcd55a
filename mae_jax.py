"""Masked Autoencoders Are Scalable Vision Learners (He et al., CVPR 2022): pretraining, fine-tuning and
linear probing, in JAX/Flax.

    python mae_jax.py pretrain --model b16 --data /path/to/imagenet --output-dir runs/mae/b16_pretrain
    python mae_jax.py finetune --model b16 --init runs/mae/b16_pretrain --data ... --output-dir runs/mae/b16_ft
    python mae_jax.py linprobe --model b16 --init mae_pretrain_vit_base.pth --data ...  # official / timm weights
    python mae_jax.py pretrain --output-dir runs/mae/b16_pretrain --visualize 8   # original | masked | reconstruction

The recipe in one paragraph (paper §3-4 and Appendix A.1, facebookresearch/mae). Pretraining: each image is
cut into patches, 75% of them are removed at random, a ViT encoder sees only the visible 25% (plus a cls
token), and a light decoder (8 blocks of width 512) gets the encoded patches back in place with a shared mask
token at every removed position and predicts the pixels of the removed patches, each patch normalised by its
own mean and variance; the loss is the MSE on removed patches only. AdamW (0.9, 0.95), wd 0.05, lr 1.5e-4 x
batch / 256 at batch 4096, 40 warmup epochs then cosine, 800 or 1600 epochs, RandomResizedCrop(0.2-1) + flip
and nothing else. Fine-tuning (FINETUNE.md, the commands behind the paper's Table 3 numbers; Table 9 lists
slightly different values): the encoder with global average pooling +
fc_norm and a new head, layer-wise lr decay 0.65 (B) / 0.75 (L, H), drop path, RandAugment, mixup / cutmix,
label smoothing, random erasing. Linear probing (Table 10): the frozen encoder's cls token, BatchNorm without
affine, a linear head, LARS at lr 0.1 x batch / 256 with batch 16384. Presets for the paper's rows are in
`scripts/mae/`.

Checkpoints convert to timm with `scripts/convert_flax_to_timm.py`: the pretrained encoder to
`vit_*_patch16_224.mae`, fine-tuned and probed models to `vit_*` (GAP / cls-token heads); `--init` reads this
script's pretraining runs and the official MAE or timm PyTorch files.

File order: flags and presets, model, masking and loss, data, optimizers and steps, loading pretrained
weights, the loop, visualisation, main.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import sys
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from common import UserError, augment, checkpoint, convert, data, dist, jax_augment, loop, optim, schedules
from common.attention import attention
from common.run import ArgumentParser, due, eval_line, exit_status, run_record, say, stopping
from common.runlog import RunLog

# ----------------------------------------------------------------------------------------------
# Flags and presets
# ----------------------------------------------------------------------------------------------

# The ViT paper's sizes, as MAE uses them (layers, dim, heads, patch size).
MODEL_PRESETS = {
    "b16": dict(layers=12, dim=768, heads=12, patch_size=16),
    "l16": dict(layers=24, dim=1024, heads=16, patch_size=16),
    "h14": dict(layers=32, dim=1280, heads=16, patch_size=14),
}

STAGES = {
    # Appendix A.1 "ImageNet Experiments", Table 8 (pretraining) and main_pretrain.py.
    "pretrain": dict(batch_size=4096, lr=1.5e-4, lr_ref_batch=256,  # lr = blr * batch / 256
                     adam_b1=0.9, adam_b2=0.95, weight_decay=0.05, epochs=800, warmup_epochs=40, min_lr=0.0),
    # FINETUNE.md's commands (main_finetune.py) for the released norm-pix 1600-epoch weights, which reproduce the
    # paper's Table 3 (83.6 / 85.9 / 86.9); ViT-B values, L/H in SIZE_OVERRIDES. The paper's Table 9 lists
    # other values: blr 1e-3, layer decay 0.75, drop path 0.1 (B/L) / 0.2 (H).
    "finetune": dict(batch_size=1024, lr=5e-4, lr_ref_batch=256, adam_b1=0.9, adam_b2=0.999,
                     weight_decay=0.05, epochs=100, warmup_epochs=5, min_lr=1e-6, layer_decay=0.65, drop_path=0.1),
    # Table 10 (linear probing) and main_linprobe.py: LARS, no weight decay, batch 16384.
    "linprobe": dict(batch_size=16384, lr=0.1, lr_ref_batch=256, weight_decay=0.0, epochs=90,
                     warmup_epochs=10, min_lr=0.0),
}
# FINETUNE.md: L and H fine-tune 50 epochs at blr 1e-3 with layer decay 0.75 and drop path 0.2 (L) / 0.3 (H);
# the official linear-probe runs use 50 epochs for L and H (90 for B).
SIZE_OVERRIDES = {
    "finetune": {"l16": dict(epochs=50, lr=1e-3, layer_decay=0.75, drop_path=0.2),
                 "h14": dict(epochs=50, lr=1e-3, layer_decay=0.75, drop_path=0.3)},
    "linprobe": {"l16": dict(epochs=50), "h14": dict(epochs=50)},
}
# Table 9 / FINETUNE.md: the fine-tuning augmentation and regularisation (DeiT's); random erasing 0.25 is
# FINETUNE.md's ("following DeiT"), not in Table 9.
FINETUNE_AUGMENTATION = dict(auto_augment="rand-m9-mstd0.5-inc1", random_erasing=0.25, mixup=0.8, cutmix=1.0,
                             label_smoothing=0.1)


def _common_flags() -> argparse.ArgumentParser:
    p = ArgumentParser(add_help=False)
    loop.add_run_flags(p, output_dir=None)  # default runs/mae/STAGE

    g = p.add_argument_group("model (defaults: the --model preset)")
    g.add_argument("--model", default="b16", help="preset: " + " ".join(MODEL_PRESETS))
    g.add_argument("--layers", type=int)
    g.add_argument("--dim", type=int)
    g.add_argument("--heads", type=int)
    g.add_argument("--patch-size", type=int)
    g.add_argument("--image-size", "--img-size", "--input-size", "--input_size", type=int, default=224)
    g.add_argument("--random-crop", choices=["rrc", "none"], default="rrc",
                   help="RandomResizedCrop (the paper's), or none: resize + center crop (tiny images, e.g. digits)")
    g.add_argument("--grad-ckpt", action="store_true", help="rematerialise each block in the backward pass")
    g.add_argument("--precision", "--dtype", type=loop.compute_dtype, choices=["bfloat16", "float32"],
                   default="bfloat16", help="compute dtype (or bf16, fp32); parameters and optimizer state: float32")

    g = p.add_argument_group("optimizer and schedule (defaults: the stage's preset)")
    g.add_argument("--batch-size", "--train-batch-size", type=int, help="global batch over all devices and hosts")
    g.add_argument("--eval-batch-size", "--valid-batch-size", type=int, default=256)
    g.add_argument("--lr", "--learning-rate", "--blr", type=float,
                   help="base lr (MAE's blr) at --lr-ref-batch, scaled to --batch-size")
    g.add_argument("--lr-ref-batch", type=int, help="the batch the base lr is given for (0: lr is absolute)")
    g.add_argument("--min-lr", "--min_lr", type=float)
    g.add_argument("--weight-decay", "--weight_decay", type=float)
    g.add_argument("--epochs", type=float)
    g.add_argument("--warmup-epochs", "--warmup_epochs", type=float)
    g.add_argument("--training-steps", type=int, default=0, help="if > 0, overrides --epochs")
    g.add_argument("--warmup-steps", type=int, default=-1, help="if >= 0, overrides --warmup-epochs")

    g = p.add_argument_group("seeds")
    g.add_argument("--seed", type=int, default=0, help="default for the seeds below")
    g.add_argument("--init-seed", type=int)
    g.add_argument("--shuffle-seed", type=int)
    g.add_argument("--noise-seed", type=int, help="masking (pretrain), mixup / erasing / drop path (finetune)")
    return p


def _adam_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adam-b1", type=float)
    p.add_argument("--adam-b2", type=float)
    p.add_argument("--grad-accum", "--accum-iter", "--accum_iter", type=int, default=1,
                   help="micro-batches per optimizer step")


def _init_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--init", help="pretrained encoder: a run dir / checkpoint of `mae_jax.py pretrain`, or an official "
                                  "MAE or timm .pth / .safetensors file (vit_*_patch16_224.mae layout)")
    p.add_argument("--num-classes", "--labels", "--nb_classes", type=int, default=-1,
                   help="number of classes (-1: from the data)")
    p.add_argument("--eval-only", action="store_true", help="evaluate the last checkpoint in --output-dir, then exit")
    p.add_argument("--test-crop-ratio", "--crop-pct", type=float, default=0.875,
                   help="eval: resize 256, center crop 224")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    stages = p.add_subparsers(dest="stage", required=True, metavar="{pretrain,finetune,linprobe}")
    common = _common_flags()

    s = stages.add_parser("pretrain", parents=[common], help="masked autoencoder pretraining",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _adam_flags(s)
    s.add_argument("--mask-ratio", type=float, default=0.75, help="share of patches removed (§4, Fig. 5: 75%%)")
    s.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=True,
                   help="targets are each patch's pixels normalised by its mean and std (Table 1c)")
    s.add_argument("--decoder-layers", type=int, default=8, help="Table 1a: depth 8")
    s.add_argument("--decoder-dim", type=int, default=512, help="Table 1b: width 512")
    s.add_argument("--decoder-heads", type=int, default=16)
    s.add_argument("--min-crop-scale", type=float, default=0.2, help="RandomResizedCrop scale (0.2, 1) (Table 1e)")
    s.add_argument("--visualize", type=int, default=0, metavar="N",
                   help="write N val images as original | masked | reconstruction from the last checkpoint "
                        "in --output-dir to reconstructions.png, then exit")

    s = stages.add_parser("finetune", parents=[common], help="end-to-end fine-tuning (GAP + fc_norm head)",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _adam_flags(s)
    _init_flags(s)
    s.add_argument("--layer-decay", type=float, help="layer-wise lr decay (FINETUNE.md: 0.65 B, 0.75 L/H)")
    s.add_argument("--drop-path", "--droppath", "--drop_path", type=float,
                   help="stochastic depth of the last block (linear ramp from 0)")
    s.add_argument("--clip-grad", type=float, default=0.0, help="global-norm clip (0: off, as the paper)")
    s.add_argument("--auto-augment", "--aa", default=FINETUNE_AUGMENTATION["auto_augment"],
                   help="timm string, 'none' off")
    s.add_argument("--random-erasing", "--reprob", type=float, default=FINETUNE_AUGMENTATION["random_erasing"])
    s.add_argument("--mixup", type=float, default=FINETUNE_AUGMENTATION["mixup"], help="mixup alpha (0: off)")
    s.add_argument("--cutmix", type=float, default=FINETUNE_AUGMENTATION["cutmix"], help="cutmix alpha (0: off)")
    s.add_argument("--label-smoothing", "--smoothing", type=float, default=FINETUNE_AUGMENTATION["label_smoothing"])

    s = stages.add_parser("linprobe", parents=[common], help="linear probe on the frozen encoder's cls token",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _init_flags(s)
    s.add_argument("--lars-momentum", type=float, default=0.9, help="main_linprobe.py: LARS momentum 0.9")
    s.add_argument("--pooling", choices=["cls", "gap"], default="cls",
                   help="features: the cls token after the final norm (the paper's), or main_linprobe.py "
                        "--global_pool: the mean of the patch tokens, then a LayerNorm (fc_norm, identity at init)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags, then the --model preset, then the stage's values (and per-size overrides) for unset flags."""
    args = build_parser().parse_args(argv)
    if args.model not in MODEL_PRESETS:
        raise UserError(f"unknown model {args.model!r}; choose one of {', '.join(MODEL_PRESETS)}")
    defaults = {**MODEL_PRESETS[args.model], **STAGES[args.stage],
                **SIZE_OVERRIDES.get(args.stage, {}).get(args.model, {})}
    args.output_dir = args.output_dir or f"runs/mae/{args.stage}"
    loop.complete_flags(args, defaults, seeds=("init_seed", "shuffle_seed", "noise_seed"))
    if args.stage == "pretrain":
        if not 0 <= args.mask_ratio < 1:
            raise UserError(f"--mask-ratio must be in [0, 1), got {args.mask_ratio}")
        if args.decoder_dim % args.decoder_heads:
            raise UserError(f"--decoder-dim {args.decoder_dim} is not divisible by --decoder-heads "
                            f"{args.decoder_heads}")
        if int((args.image_size // args.patch_size) ** 2 * (1 - args.mask_ratio)) < 1:
            raise UserError(f"--mask-ratio {args.mask_ratio} leaves no visible patch")
    return args


# ----------------------------------------------------------------------------------------------
# Model: timm's VisionTransformer parameter names (`vit_*_patch16_224.mae` for the encoder), and MAE's
# decoder with the names of models_mae.py (decoder_embed, mask_token, decoder_blocks, decoder_norm,
# decoder_pred), so that both directions of common.convert work on the official checkpoints.
# ----------------------------------------------------------------------------------------------

# models_mae.py `_init_weights`: xavier-uniform linears (the patch embedding on its flattened (D, 3p^2) view,
# hence the fan axes), zero biases, LayerNorm 1/0, tokens normal(0.02).
xavier = nn.initializers.xavier_uniform()
patch_xavier = nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3)
token_init = nn.initializers.normal(0.02)
layer_norm = functools.partial(nn.LayerNorm, epsilon=1e-6)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    image_size: int = 224
    patch_size: int = 16
    layers: int = 12
    dim: int = 768
    heads: int = 12
    mlp_ratio: int = 4
    droppath: float = 0.0  # rate of the last block; block i gets droppath * i / (layers - 1) (timm)
    grad_ckpt: bool = False
    dtype: str = "float32"

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


class Attention(nn.Module):
    heads: int
    dtype: Any

    @nn.compact
    def __call__(self, x):
        batch, tokens, dim = x.shape
        qkv = nn.Dense(3 * dim, dtype=self.dtype, kernel_init=xavier, name="qkv")(x)
        qkv = qkv.reshape(batch, tokens, 3, self.heads, dim // self.heads)
        out = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])  # cuDNN flash on NVIDIA GPUs in bf16, else XLA
        return nn.Dense(dim, dtype=self.dtype, kernel_init=xavier, name="proj")(out.reshape(batch, tokens, dim))


class Mlp(nn.Module):
    hidden: int
    dtype: Any

    @nn.compact
    def __call__(self, x):
        dim = x.shape[-1]
        x = nn.gelu(nn.Dense(self.hidden, dtype=self.dtype, kernel_init=xavier, name="fc1")(x), approximate=False)
        return nn.Dense(dim, dtype=self.dtype, kernel_init=xavier, name="fc2")(x)


class Block(nn.Module):
    """timm's pre-norm block (qkv bias, LayerNorm eps 1e-6, exact GELU) with drop path on both branches."""

    heads: int
    mlp_ratio: int
    droppath: float
    dtype: Any

    @nn.compact
    def __call__(self, x, train: bool):
        # Stochastic depth drops a sample's whole residual branch (timm DropPath), scaled by 1/keep.
        drop_path = nn.Dropout(self.droppath, broadcast_dims=(1, 2), rng_collection="droppath")
        y = Attention(self.heads, self.dtype, name="attn")(layer_norm(dtype=self.dtype, name="norm1")(x))
        x = x + drop_path(y, deterministic=not train)
        y = Mlp(x.shape[-1] * self.mlp_ratio, self.dtype, name="mlp")(layer_norm(dtype=self.dtype, name="norm2")(x))
        return x + drop_path(y, deterministic=not train)


class PatchEmbed(nn.Module):
    patch_size: int
    dim: int
    dtype: Any

    @nn.compact
    def __call__(self, images):
        p = self.patch_size
        x = nn.Conv(self.dim, (p, p), strides=p, padding="VALID", dtype=self.dtype, kernel_init=patch_xavier,
                    name="proj")(images)
        return x.reshape(x.shape[0], -1, self.dim)  # (batch, grid*grid, dim), row-major as timm


def droppath_rates(c: ViTConfig) -> list[float]:
    return [c.droppath * i / max(c.layers - 1, 1) for i in range(c.layers)]


class VisionTransformer(nn.Module):
    """The MAE encoder / classifier in timm's `VisionTransformer` layout: cls token, position embedding
    (1, 1 + grid^2, dim) whose cls row is added to the cls token, pre-norm blocks, then

        pooling "cls": final `norm` on all tokens, the cls token's features (pretraining, linear probe);
        pooling "gap": the mean of the patch tokens, then `fc_norm` (fine-tuning, models_vit.py global_pool).

    fixed_pos_embed: pretraining's fixed 2-D sin-cos embedding (not a parameter); otherwise a parameter
    initialised with the same values (fine-tuning loads the pretrained one into it, as timm does).
    """

    config: ViTConfig
    num_classes: int = 0  # 0: return the pooled features
    pooling: str = "cls"
    fixed_pos_embed: bool = False
    head_init_std: float = 2e-5  # main_finetune.py: trunc_normal_(head.weight, std=2e-5)

    def setup(self):
        c = self.config
        dtype = jnp.dtype(c.dtype)
        self.patch_embed = PatchEmbed(c.patch_size, c.dim, dtype)
        self.cls_token = self.param("cls_token", token_init, (1, 1, c.dim))
        sincos = convert.sincos_2d_pos_embed(c.grid, c.dim, cls_rows=1)
        self.pos_embed = jnp.asarray(sincos) if self.fixed_pos_embed else \
            self.param("pos_embed", lambda *_: jnp.asarray(sincos))
        block = nn.remat(Block, static_argnums=(2,)) if c.grad_ckpt else Block
        self.blocks = [block(c.heads, c.mlp_ratio, rate, dtype) for rate in droppath_rates(c)]
        if self.pooling == "gap":
            self.fc_norm = layer_norm(dtype=dtype)
        else:
            self.norm = layer_norm(dtype=dtype)
        if self.num_classes:
            self.head = nn.Dense(self.num_classes, dtype=dtype,
                                 kernel_init=nn.initializers.truncated_normal(self.head_init_std))

    def tokens(self, images, train: bool = False, mask_key=None, mask_ratio: float = 0.0):
        """timm's `forward_features` (normed tokens for cls pooling), optionally on a random subset of the
        patches: with `mask_key`, MAE's random masking keeps int(N (1 - mask_ratio)) patches (§3, "Masking").
        Returns (tokens (B, 1 + kept, dim), mask (B, N) with 1 = removed or None, ids_restore or None)."""
        dtype = jnp.dtype(self.config.dtype)
        x = self.patch_embed(images.astype(dtype))
        pos_embed = jnp.asarray(self.pos_embed).astype(dtype)
        x = x + pos_embed[:, 1:]  # models_mae.py: position embedding added before masking
        mask = ids_restore = None
        if mask_key is not None:
            x, mask, ids_restore = random_masking(mask_key, x, mask_ratio)
        cls = jnp.broadcast_to(self.cls_token.astype(dtype) + pos_embed[:, :1], (x.shape[0], 1, x.shape[2]))
        x = jnp.concatenate([cls, x], axis=1)
        for block in self.blocks:
            x = block(x, train)
        if self.pooling == "cls":
            x = self.norm(x)
        return x, mask, ids_restore

    def __call__(self, images, train: bool = False):
        x, _, _ = self.tokens(images, train)
        features = self.fc_norm(x[:, 1:].mean(axis=1)) if self.pooling == "gap" else x[:, 0]
        return (self.head(features) if self.num_classes else features).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    layers: int = 8
    dim: int = 512
    heads: int = 16
    mask_ratio: float = 0.75


class MaskedAutoencoder(nn.Module):
    """MAE (§3): the encoder runs on the visible patches; the decoder embeds them to its width, puts them back
    in place among mask tokens, adds its own fixed sin-cos position embedding and predicts every patch's
    p*p*3 pixels (the loss uses the removed ones only). The encoder's params sit under `encoder`."""

    config: ViTConfig
    decoder: DecoderConfig

    def setup(self):
        c, d = self.config, self.decoder
        dtype = jnp.dtype(c.dtype)
        self.encoder = VisionTransformer(c, fixed_pos_embed=True)
        self.decoder_embed = nn.Dense(d.dim, dtype=dtype, kernel_init=xavier)
        self.mask_token = self.param("mask_token", token_init, (1, 1, d.dim))
        self.decoder_blocks = [Block(d.heads, 4, 0.0, dtype) for _ in range(d.layers)]
        self.decoder_norm = layer_norm(dtype=dtype)
        self.decoder_pred = nn.Dense(c.patch_size**2 * 3, dtype=dtype, kernel_init=xavier)

    def __call__(self, images, mask_key, train: bool = False):
        """(predicted patches (B, N, p*p*3) float32, mask (B, N) with 1 = removed)."""
        c, d = self.config, self.decoder
        latent, mask, ids_restore = self.encoder.tokens(images, train, mask_key, d.mask_ratio)
        x = self.decoder_embed(latent)
        batch, patches = mask.shape
        mask_tokens = jnp.broadcast_to(self.mask_token.astype(x.dtype), (batch, patches + 1 - x.shape[1], d.dim))
        x_patches = jnp.concatenate([x[:, 1:], mask_tokens], axis=1)
        x_patches = jnp.take_along_axis(x_patches, ids_restore[:, :, None], axis=1)  # unshuffle
        x = jnp.concatenate([x[:, :1], x_patches], axis=1)
        x = x + jnp.asarray(convert.sincos_2d_pos_embed(c.grid, d.dim, cls_rows=1)).astype(x.dtype)
        for block in self.decoder_blocks:
            x = block(x, train)
        pred = self.decoder_pred(self.decoder_norm(x))
        return pred[:, 1:].astype(jnp.float32), mask


# ----------------------------------------------------------------------------------------------
# Masking and the reconstruction loss (§3, models_mae.py random_masking / forward_loss)
# ----------------------------------------------------------------------------------------------


def random_masking(key: jax.Array, x: jax.Array, mask_ratio: float):
    """Keep int(N (1 - mask_ratio)) patches per sample, chosen by sorting per-sample uniform noise.

    Returns (kept patches (B, keep, D) in shuffled order, mask (B, N) in the original order with 1 = removed,
    ids_restore (B, N): the permutation that puts [kept, removed] back in the original order).
    """
    batch, patches, _ = x.shape
    keep = int(patches * (1 - mask_ratio))
    noise = jax.random.uniform(key, (batch, patches))
    ids_shuffle = jnp.argsort(noise, axis=1)  # ascending: small noise is kept
    ids_restore = jnp.argsort(ids_shuffle, axis=1)
    kept = jnp.take_along_axis(x, ids_shuffle[:, :keep, None], axis=1)
    mask = jnp.ones((batch, patches), jnp.float32).at[:, :keep].set(0.0)
    return kept, jnp.take_along_axis(mask, ids_restore, axis=1), ids_restore


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """(B, H, W, 3) -> (B, N, p*p*3), each patch's pixels in (row, column, channel) order as models_mae.py."""
    batch, height, width, channels = images.shape
    p = patch_size
    x = images.reshape(batch, height // p, p, width // p, p, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, (height // p) * (width // p), p * p * channels)


def unpatchify(patches: jax.Array, patch_size: int) -> jax.Array:
    batch, count, _ = patches.shape
    grid, p = int(round(count**0.5)), patch_size
    x = patches.reshape(batch, grid, grid, p, p, 3).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, grid * p, grid * p, 3)


def patch_targets(images: jax.Array, patch_size: int, norm_pix: bool) -> jax.Array:
    """The pixels to predict; with norm_pix each patch is normalised by its mean and unbiased variance."""
    target = patchify(images, patch_size)
    if norm_pix:
        mean = target.mean(axis=-1, keepdims=True)
        var = target.var(axis=-1, keepdims=True, ddof=1)  # torch .var(): unbiased
        target = (target - mean) / jnp.sqrt(var + 1e-6)
    return target


def per_sample_loss(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean squared error per patch, averaged over each sample's removed patches (§3, "Reconstruction target")."""
    per_patch = ((pred - target) ** 2).mean(axis=-1)
    return (per_patch * mask).sum(axis=-1) / mask.sum(axis=-1)


def reconstruction_loss(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """models_mae.py forward_loss: sum over removed patches of the per-patch MSE / the number of removed patches."""
    per_patch = ((pred - target) ** 2).mean(axis=-1)
    return (per_patch * mask).sum() / mask.sum()


def train_flops_per_image(stage: str, c: ViTConfig, d: DecoderConfig | None = None, num_classes: int = 0) -> float:
    """Matmul FLOPs of one training image: 2 per multiply-add, x3 for forward + backward (x1 for the frozen
    encoder of a linear probe). Pretraining runs the encoder on the visible patches only."""
    def blocks(layers: int, tokens: int, dim: int) -> float:
        return layers * (tokens * 12 * dim * dim + 2 * tokens * tokens * dim)  # qkv, proj, mlp; q@k, attn@v

    patches = c.grid**2
    embed = patches * 3 * c.patch_size**2 * c.dim
    if stage == "pretrain":
        visible = int(patches * (1 - d.mask_ratio)) + 1
        macs = embed + blocks(c.layers, visible, c.dim) + visible * c.dim * d.dim
        macs += blocks(d.layers, patches + 1, d.dim) + (patches + 1) * d.dim * 3 * c.patch_size**2
        return 6.0 * macs
    macs = embed + blocks(c.layers, patches + 1, c.dim)
    if stage == "linprobe":
        return 2.0 * macs + 6.0 * c.dim * num_classes
    return 6.0 * (macs + c.dim * num_classes)


# ----------------------------------------------------------------------------------------------
# Data: uint8 batches from PyTorch DataLoaders (timm transforms) or webdataset shards, normalised on the device.
# ----------------------------------------------------------------------------------------------


def train_augmentation(args: argparse.Namespace) -> dict:
    """The stage's augmentation, for either --loader."""
    crop = dict(image_size=args.image_size, random_crop=args.random_crop)
    if args.stage == "pretrain":  # Table 1e: RandomResizedCrop (0.2, 1) + flip only
        return dict(crop, scale=(args.min_crop_scale, 1.0))
    if args.stage == "linprobe":  # main_linprobe.py: RandomResizedCrop + flip
        return crop
    return dict(crop, auto_augment=args.auto_augment)  # DeiT's, Table 9


def eval_transform(args: argparse.Namespace):
    return augment.eval_transform(args.image_size, crop_ratio=getattr(args, "test_crop_ratio", 0.875))


# ----------------------------------------------------------------------------------------------
# Optimizers and steps
# ----------------------------------------------------------------------------------------------


def make_optimizer(args: argparse.Namespace, schedule: optax.Schedule, params) -> optax.GradientTransformation:
    if args.stage == "linprobe":
        # main_linprobe.py: LARS (momentum 0.9, trust coefficient 0.001), wd 0 (Table 10).
        return optim.lars(schedule, weight_decay=args.weight_decay, momentum=args.lars_momentum)
    if args.stage == "finetune":
        # Table 9: AdamW with layer-wise lr decay (BEiT), decay on weight matrices only (models_vit.py
        # no_weight_decay: pos_embed and cls_token are exempt, as biases and norms).
        return optim.make_optimizer("adamw", schedule, params, weight_decay=args.weight_decay, b1=args.adam_b1,
                                    b2=args.adam_b2, clip_norm=args.clip_grad, layer_decay=args.layer_decay,
                                    depth=args.layers)
    # main_pretrain.py uses timm's add_weight_decay: every parameter with more than one dimension is decayed,
    # which includes the cls and mask tokens (the position embeddings are fixed buffers there).
    decay = jax.tree_util.tree_map(lambda x: x.ndim > 1, params)
    return optim.make_optimizer("adamw", schedule, params, weight_decay=args.weight_decay, b1=args.adam_b1,
                                b2=args.adam_b2, decay=decay)


def make_pretrain_step(args: argparse.Namespace, model: MaskedAutoencoder, optimizer, schedule, noise_key):
    def step_fn(state, batch):
        step = state["step"]
        images = jax_augment.normalize(batch["image"])

        def micro_loss(params, micro_images, micro_index):
            mask_key = jax.random.fold_in(jax.random.fold_in(noise_key, step), micro_index)
            pred, mask = model.apply({"params": params}, micro_images, mask_key, train=True)
            target = patch_targets(micro_images, args.patch_size, args.norm_pix_loss)
            return reconstruction_loss(pred, target, mask)

        loss, grads = loop.accumulate_gradients(jax.value_and_grad(micro_loss), state["params"], (images,),
                                                args.grad_accum)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": schedule(step)}
        return {"params": params, "opt_state": opt_state, "step": step + 1}, metrics

    return step_fn


def make_finetune_step(args: argparse.Namespace, model: VisionTransformer, optimizer, schedule, num_classes: int,
                       noise_key):
    def step_fn(state, batch):
        step = state["step"]
        mix_key, erase_key, dropout_key = jax.random.split(jax.random.fold_in(noise_key, step), 3)
        images = jax_augment.normalize(batch["image"])
        if args.mixup > 0 or args.cutmix > 0:
            images, targets = jax_augment.mixup_cutmix(mix_key, images, batch["label"], num_classes,
                                                   mixup_alpha=args.mixup, cutmix_alpha=args.cutmix,
                                                   label_smoothing=args.label_smoothing)
        else:
            targets = jax_augment.smooth_one_hot(batch["label"], num_classes, args.label_smoothing)
        if args.random_erasing > 0:
            images = jax_augment.random_erasing(erase_key, images, args.random_erasing)

        def micro_loss(params, micro_images, micro_targets, micro_index):
            logits = model.apply({"params": params}, micro_images, train=True,
                                 rngs={"droppath": jax.random.fold_in(dropout_key, micro_index)})
            return optax.softmax_cross_entropy(logits, micro_targets).mean()

        loss, grads = loop.accumulate_gradients(jax.value_and_grad(micro_loss), state["params"], (images, targets),
                                                args.grad_accum)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": schedule(step)}
        return {"params": params, "opt_state": opt_state, "step": step + 1}, metrics

    return step_fn


class ProbeHead(nn.Module):
    """main_linprobe.py: BatchNorm1d(D, affine=False, eps=1e-6) then Linear(D, classes) (trunc-normal 0.01).
    BatchNorm statistics are over the global batch (one jitted step over the mesh: synchronised)."""

    num_classes: int

    @nn.compact
    def __call__(self, features, train: bool):
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-6, use_bias=False, use_scale=False,
                         name="bn")(features)
        return nn.Dense(self.num_classes, kernel_init=nn.initializers.truncated_normal(0.01), name="head")(x)


def make_linprobe_step(encoder: VisionTransformer, head: ProbeHead, optimizer, schedule):
    def step_fn(state, batch):
        images = jax_augment.normalize(batch["image"])
        features = encoder.apply({"params": state["encoder"]}, images)  # frozen: no gradient, no drop path

        def loss_fn(params):
            logits, updates = head.apply({"params": params, "batch_stats": state["batch_stats"]}, features,
                                         train=True, mutable=["batch_stats"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
            return loss, updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": schedule(state["step"])}
        return dict(state, params=params, batch_stats=batch_stats, opt_state=opt_state, step=state["step"] + 1), \
            metrics

    return step_fn


def make_eval_step(args: argparse.Namespace, model, head: ProbeHead | None = None):
    """(weights, batch) -> summed totals: the masked reconstruction loss for pretraining (a fixed mask per batch
    position), else loss / top-1 / top-5."""
    def pretrain_eval(params, batch):
        images = jax_augment.normalize(batch["image"])
        pred, mask = model.apply({"params": params}, images, jax.random.PRNGKey(0))
        loss = per_sample_loss(pred, patch_targets(images, args.patch_size, args.norm_pix_loss), mask)
        valid = batch["label"] >= 0
        return {"count": valid.sum(), "loss": jnp.where(valid, loss, 0.0).sum()}

    def classify_eval(weights, batch):
        images = jax_augment.normalize(batch["image"])
        if head is None:
            logits = model.apply({"params": weights["params"]}, images)
        else:
            features = model.apply({"params": weights["encoder"]}, images)
            logits = head.apply({"params": weights["params"], "batch_stats": weights["batch_stats"]}, features,
                                train=False)
        return loop.classification_totals(logits, batch["label"])

    return pretrain_eval if args.stage == "pretrain" else classify_eval


# ----------------------------------------------------------------------------------------------
# Pretrained weights for fine-tuning and probing: a pretraining run of this script, or the official MAE /
# timm PyTorch files (the same names: the decoder's are dropped, the rest maps one to one).
# ----------------------------------------------------------------------------------------------


# MAE's pretraining decoder (models_mae.py): dropped when the encoder is loaded for fine-tuning or exported.
DECODER_PARAMS = ("decoder_embed", "decoder_pos_embed", "decoder_blocks", "decoder_norm", "decoder_pred", "mask_token")


def is_encoder_param(name: str) -> bool:
    """False for the decoder's parameters in a timm-style name ('decoder_blocks.0.attn.qkv.weight')."""
    return re.split(r"[./]", name)[0] not in DECODER_PARAMS


def read_encoder(path: str, config: ViTConfig) -> dict:
    """The pretrained encoder's params (Flax layout, timm names) with a position embedding of this model's grid."""
    if os.path.isfile(path):
        state = convert.read_torch_state_dict(path, "--init")
        params = convert.timm_to_flax({name: value for name, value in state.items() if is_encoder_param(name)})
    elif os.path.isdir(path):
        params, source = checkpoint.load_params_and_config(path)
        if source.get("script") != "mae_jax.py" or source.get("stage") != "pretrain":
            raise UserError(f"--init {path} is not a checkpoint of `mae_jax.py pretrain`")
        grid = source["image_size"] // source["patch_size"]
        params = dict(params["encoder"], pos_embed=convert.sincos_2d_pos_embed(grid, source["dim"], cls_rows=1))
    else:
        raise UserError(f"--init {path} does not exist")
    pos_embed = params.get("pos_embed")
    if pos_embed is not None and pos_embed.shape[1] != 1 + config.grid**2:
        # main_finetune.py interpolate_pos_embed: bicubic resize of the patch grid, the cls row kept.
        params["pos_embed"] = convert.resize_pos_embed(np.asarray(pos_embed, np.float32), config.grid, prefix_rows=1)
    return params


def load_encoder(template: dict, path: str, config: ViTConfig) -> dict:
    """`template` (freshly initialised params) with every encoder entry taken from `path`. The head and fc_norm
    stay new (main_finetune.py; the pretrained final `norm` is not used under global pooling)."""
    source = read_encoder(path, config)
    loaded = dict(template)
    for name, fresh in template.items():
        if name in ("head", "fc_norm"):
            continue
        if name not in source:
            raise UserError(f"--init {path} has no {name!r}: not a ViT encoder of this layout")
        fresh_shapes = jax.tree_util.tree_map(np.shape, fresh)
        source_shapes = jax.tree_util.tree_map(np.shape, source[name])
        if fresh_shapes != source_shapes:
            raise UserError(f"--init {path} does not fit this model: {name} is {source_shapes} there and "
                            f"{fresh_shapes} here (check --model / --layers / --dim / --patch-size)")
        loaded[name] = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), source[name])
    return loaded


# ----------------------------------------------------------------------------------------------
# The loop: one Mesh over all devices of all hosts, state replicated, batches sharded on 'data'.
# ----------------------------------------------------------------------------------------------


def vit_config(args: argparse.Namespace) -> ViTConfig:
    return ViTConfig(image_size=args.image_size, patch_size=args.patch_size, layers=args.layers, dim=args.dim,
                     heads=args.heads, droppath=getattr(args, "drop_path", 0.0), grad_ckpt=args.grad_ckpt,
                     dtype=args.precision)


def decoder_config(args: argparse.Namespace) -> DecoderConfig:
    return DecoderConfig(layers=args.decoder_layers, dim=args.decoder_dim, heads=args.decoder_heads,
                         mask_ratio=args.mask_ratio)


def init_state(args: argparse.Namespace, num_classes: int):
    """(model, probe head or None, initial state) of the stage."""
    config = vit_config(args)
    key = jax.random.PRNGKey(args.init_seed)
    images = jnp.zeros((1, args.image_size, args.image_size, 3), jnp.float32)
    if args.stage == "pretrain":
        model = MaskedAutoencoder(config, decoder_config(args))
        return model, None, {"params": jax.jit(model.init)(key, images, key)["params"]}
    if args.stage == "finetune":
        model = VisionTransformer(config, num_classes=num_classes, pooling="gap")
        params = jax.jit(model.init)(key, images)["params"]
        return model, None, {"params": load_encoder(params, args.init, config) if args.init else params}
    model = VisionTransformer(config, pooling=args.pooling)  # the frozen encoder
    encoder = jax.jit(model.init)(key, images)["params"]
    head = ProbeHead(num_classes)
    variables = jax.jit(lambda k, x: head.init(k, x, train=False))(key, jnp.zeros((2, args.dim)))
    return model, head, {"params": variables["params"], "batch_stats": variables["batch_stats"],
                         "encoder": load_encoder(encoder, args.init, config) if args.init else encoder}


def setup(args: argparse.Namespace):
    """Mesh, model, probe head, lr schedule and initial state (replicated on every device) of a run."""
    dist.initialize()
    mesh = dist.data_mesh()
    mixing = args.stage == "finetune" and (args.mixup > 0 or args.cutmix > 0)
    loop.check_batch_sizes(args.batch_size, args.eval_batch_size, mixing=mixing)
    spec = data.describe(args.data, num_classes=getattr(args, "num_classes", -1))
    num_classes = 0 if args.stage == "pretrain" else spec.num_classes
    steps_per_epoch, total_steps, warmup_steps = loop.run_length(
        spec, args.batch_size, epochs=args.epochs, warmup_epochs=args.warmup_epochs,
        training_steps=args.training_steps, warmup_steps=args.warmup_steps, benchmark=args.benchmark)
    peak_lr = schedules.scaled_lr(args.lr, args.batch_size, args.lr_ref_batch)
    schedule = schedules.warmup_cosine(peak_lr, total_steps, warmup_steps, min_lr=args.min_lr)

    model, head, state = init_state(args, num_classes)
    if args.stage == "linprobe" and not args.init and dist.is_main_process():
        print("note: no --init, probing a randomly initialised encoder (a baseline)", file=sys.stderr)
    optimizer = make_optimizer(args, schedule, state["params"])
    state.update(opt_state=optimizer.init(state["params"]), step=jnp.zeros((), jnp.int32))
    state = jax.device_put(state, dist.replicated(mesh))
    count = lambda tree: sum(x.size for x in jax.tree_util.tree_leaves(tree))  # noqa: E731
    run_config = dict(vars(args), **run_record(f"mae_jax.py {args.stage}", args), script="mae_jax.py",
                      num_classes=num_classes, peak_lr=peak_lr, total_steps=total_steps, warmup_steps=warmup_steps,
                      steps_per_epoch=steps_per_epoch,
                      pooling={"pretrain": "cls", "finetune": "gap"}.get(args.stage, getattr(args, "pooling", "cls")),
                      class_token=True, no_embed_class=False,
                      devices=jax.device_count(), processes=jax.process_count(),
                      device_kind=jax.devices()[0].device_kind,
                      params=count(state["params"]) + count(state.get("encoder", {})))
    if args.stage == "pretrain":
        run_config["posemb"] = "sincos2d"  # fixed: convert_flax_to_timm writes it as timm's pos_embed
    return mesh, model, head, optimizer, schedule, state, run_config


def make_step(args: argparse.Namespace, model, head, optimizer, schedule, num_classes: int):
    noise_key = jax.random.PRNGKey(args.noise_seed)
    if args.stage == "pretrain":
        return make_pretrain_step(args, model, optimizer, schedule, noise_key)
    if args.stage == "finetune":
        return make_finetune_step(args, model, optimizer, schedule, num_classes, noise_key)
    return make_linprobe_step(model, head, optimizer, schedule)


def eval_weights(args: argparse.Namespace, state: dict):
    if args.stage == "pretrain":
        return state["params"]
    return {key: state[key] for key in ("params", "batch_stats", "encoder") if key in state}


def run(args: argparse.Namespace) -> dict:
    if args.benchmark_input:  # the host input pipeline alone: no model, nothing written
        return loop.benchmark_input(args.data, train_augmentation(args), global_batch=args.batch_size,
                                    workers=args.workers, steps=args.benchmark_steps, seed=args.shuffle_seed,
                                    repeats=1, loader=args.loader, stage=args.stage, model=args.model,
                                    image_size=args.image_size)
    mesh, model, head, optimizer, schedule, state, run_config = setup(args)
    loader = loop.loader_choice(args.loader, train_augmentation(args))
    num_classes, total_steps = run_config["num_classes"], run_config["total_steps"]
    state_sharding = jax.tree_util.tree_map(lambda x: x.sharding, state)
    train_step = jax.jit(make_step(args, model, head, optimizer, schedule, num_classes),
                         out_shardings=(state_sharding, dist.replicated(mesh)), donate_argnums=0)
    config = vit_config(args)

    stream = functools.partial(loop.train_stream, args.data, train_augmentation(args), mesh,
                               global_batch=args.batch_size, seed=args.shuffle_seed, repeats=1, workers=args.workers,
                               image_size=args.image_size, num_classes=max(num_classes, 1),
                               loader=loader)  # batches from a given step
    if args.benchmark:
        batch = loop.synthetic_batch(mesh, args.batch_size, args.image_size, max(num_classes, 1), 0)
        real = None if args.data == "synthetic" else stream(start_step=0)  # end to end, beside the device alone
        flops = train_flops_per_image(args.stage, config, decoder_config(args) if args.stage == "pretrain" else None,
                                      num_classes)
        return loop.benchmark(train_step, state, batch, steps=args.benchmark_steps, global_batch=args.batch_size,
                              batches=real, train_flops_per_image=flops, stage=args.stage, model=args.model,
                              image_size=args.image_size, dtype=args.precision)
    if args.stage == "pretrain" and args.visualize:
        return {"png": visualize(args, model, state, args.visualize)}

    eval_step = jax.jit(make_eval_step(args, model, head), out_shardings=dist.replicated(mesh))

    def evaluate(state) -> dict:
        batches = loop.eval_stream(args.data, image_size=args.image_size,
                                   crop_ratio=getattr(args, "test_crop_ratio", 0.875),
                                   global_batch=args.eval_batch_size, workers=args.workers, loader=loader)
        return loop.evaluate(eval_step, {"val_": eval_weights(args, state)}, batches, mesh)

    if getattr(args, "eval_only", False):  # an existing run's config.json and checkpoints stay as they are
        with checkpoint.Checkpointer(args.output_dir) as ckpt:
            state, _ = ckpt.restore(state)
            return loop.report_eval(args.output_dir, int(state["step"]), evaluate(state), wandb=args.wandb,
                                    tensorboard=args.tensorboard)
    with loop.open_run(args.output_dir, resume=args.resume, recipe=run_config["trained_by"],
                       settings=vars(args)) as ckpt:  # waits for pending writes, also on errors
        state, meta = loop.restore_or_start(ckpt, state, resume=args.resume)
        log = RunLog(args.output_dir, run_config, start_step=int(state["step"]), wandb_project=args.wandb,
                     tensorboard=args.tensorboard)
        start_step, steps_per_epoch = int(state["step"]), run_config["steps_per_epoch"]
        say(f"mae {args.stage}, {run_config['params'] / 1e6:.1f}M params, {total_steps} steps "
            f"({steps_per_epoch}/epoch), peak lr {run_config['peak_lr']:g}, {jax.device_count()} device(s) on "
            f"{jax.process_count()} host(s), starting at step {start_step}", main=dist.is_main_process())
        batches = stream(start_step=start_step)
        eval_interval = args.eval_interval or steps_per_epoch or total_steps
        save_interval = args.save_interval or eval_interval
        best_top1 = meta.get("best_top1", -1.0)
        progress = loop.progress_bar(start_step, total_steps)
        meter = loop.Meter(args.batch_size, steps_per_epoch, progress, skipped=meta.get("unlogged_skips", 0))
        with loop.Preemption() as preemption:  # SIGTERM: save and exit 0
            for step in progress:
                batch, skipped = next(batches)
                state, metrics = train_step(state, batch)
                meter.count(skipped)
                done = step + 1
                if due(done, args.log_interval, total_steps):
                    log.write(done, **meter.record(done, metrics, args.output_dir))
                results = evaluate(state) if due(done, eval_interval, total_steps) else None
                if results:
                    top1 = results.get("val_top1", -1.0)  # pretraining reports val_loss only
                    is_best, best_top1 = top1 > best_top1, max(best_top1, top1)
                    log.write(done, **results, best_top1=best_top1)
                    say(eval_line(done, results))
                stop = (preemption.stop_after(done, every=args.log_interval, last=total_steps)
                        or stopping(args.stop_after, start_step, done))
                if results is not None or stop or due(done, save_interval, total_steps):
                    loop.save(ckpt, state, done, config=run_config, best_top1=best_top1, unlogged_skips=meter.skipped,
                              loss=metrics["loss"], eval_metrics=results, best=bool(results) and is_best)
                if results is not None:
                    meter.restart()  # img/s times the train steps only
                if stop:
                    say(f"{'SIGTERM' if preemption.requested else '--stop-after'}: saved a checkpoint at step {done} "
                        f"in {args.output_dir}; exiting")
                    break
        log.close()
        return dict(meter.last, best_top1=best_top1)


# ----------------------------------------------------------------------------------------------
# Export to timm (scripts/convert_to_timm.py): the layout of each stage's checkpoint.
# ----------------------------------------------------------------------------------------------


def timm_export(path: Path, *, which: str = "last", ema: bool = False, arch: str | None = None) -> convert.TimmExport:
    """scripts/convert_to_timm.py's rule: the pretraining encoder (timm `vit_*.mae`), the fine-tuned model (`vit_*`
    with global_pool='avg') or the linear probe (BatchNorm folded into the head), MAE's pos_embed with its cls row."""
    if ema:
        raise UserError("MAE keeps no EMA of its weights")
    state, config = checkpoint.load_state_and_config(path, which=which)
    return convert.flax_params_to_timm(timm_params(state, config), config, arch or "vit")


def timm_params(state: dict, config: dict) -> dict:
    """The timm-layout params of a checkpoint: the pretraining encoder without the decoder (timm `vit_*.mae`, no
    head), the fine-tuned GAP model as is, or the probed encoder with its BatchNorm folded into the linear head
    (timm has no BatchNorm head; the fold is exact up to float rounding)."""
    if config.get("stage") == "pretrain":
        return state["params"]["encoder"]
    if config.get("stage") == "linprobe":
        stats = state["batch_stats"]["bn"]
        return {**state["encoder"], "head": fold_batchnorm(state["params"]["head"], stats["mean"], stats["var"])}
    return state["params"]


def fold_batchnorm(head: dict, mean: np.ndarray, var: np.ndarray, epsilon: float = 1e-6) -> dict:
    """The probe's BatchNorm without affine (eps 1e-6, `ProbeHead`) and dense head as one dense layer:
    W((x - mean) / sqrt(var + eps)) + b = (W / s) x + (b - W mean / s), s = sqrt(var + eps) per input."""
    kernel, bias = np.asarray(head["kernel"], np.float64), np.asarray(head["bias"], np.float64)
    inv_std = 1.0 / np.sqrt(np.asarray(var, np.float64) + epsilon)
    folded = kernel * inv_std[:, None]
    return {"kernel": folded.astype(np.float32),
            "bias": (bias - np.asarray(mean, np.float64) @ folded).astype(np.float32)}


# ----------------------------------------------------------------------------------------------
# Visualisation (the paper's Fig. 2-3): original | masked | reconstruction with the visible patches |
# reconstruction alone, one row per val image.
# ----------------------------------------------------------------------------------------------


def visualize(args: argparse.Namespace, model: MaskedAutoencoder, template: dict, count: int) -> str:
    from PIL import Image

    with checkpoint.Checkpointer(args.output_dir) as ckpt:
        state, _ = ckpt.restore(template)
    batch = next(iter(data.eval_batches(args.data, eval_transform(args), global_batch=count, workers=0)))
    images = jax_augment.normalize(jnp.asarray(batch["image"][:count]))
    pred, mask = jax.jit(model.apply)({"params": state["params"]}, images, jax.random.PRNGKey(args.noise_seed))
    target = patchify(images, args.patch_size)
    if args.norm_pix_loss:  # predictions are normalised patches: undo with each patch's own statistics
        mean = target.mean(-1, keepdims=True)
        pred = pred * jnp.sqrt(target.var(-1, keepdims=True, ddof=1) + 1e-6) + mean
    removed = mask[:, :, None] > 0
    columns = [target, jnp.where(removed, 0.0, target), jnp.where(removed, pred, target), pred]
    mean_std = [jnp.asarray(v, jnp.float32)
                for v in (jax_augment.IMAGENET_DEFAULT_MEAN, jax_augment.IMAGENET_DEFAULT_STD)]
    tiles = [unpatchify(c, args.patch_size) * mean_std[1] + mean_std[0] for c in columns]
    grid = jnp.concatenate([jnp.concatenate(list(t), axis=0) for t in tiles], axis=1)  # rows: images
    pixels = np.asarray(jnp.clip(grid * 255, 0, 255)).astype(np.uint8)
    zoom = max(1, 96 // args.image_size)
    path = os.path.join(args.output_dir, "reconstructions.png")
    Image.fromarray(pixels).resize((pixels.shape[1] * zoom, pixels.shape[0] * zoom), Image.NEAREST).save(path)
    print(f"wrote {path}: {count} images, columns original | masked | reconstruction + visible | reconstruction",
          file=sys.stderr)
    return path


def main(argv: list[str] | None = None) -> int:
    return exit_status(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

"""DeiT: data-efficient image transformers & distillation through attention (Touvron et al., ICML 2021), and
the supervised-from-scratch ViT recipe of the MAE paper (He et al., CVPR 2022, Appendix A.2), in JAX/Flax.

    python deit_jax.py --model b16 --data /path/to/imagenet                              # DeiT-B, 300 epochs
    python deit_jax.py --model b16 --distill hard --teacher regnety_160 --teacher-ckpt regnety_160.pth ...
    python deit_jax.py --recipe mae --model l16 --data /path/to/imagenet                 # MAE's ViT-L from scratch
    python deit_jax.py --model b16 --image-size 384 --init runs/deit/deit_b16 ...        # DeiT-B↑384 (§6)

The two recipes train the same plain ViT (pre-norm blocks, position embedding on the cls token and the
patches, drop path rising linearly with depth) and differ only in their hyperparameters, which `RECIPES`
lists side by side with their sources:

                      DeiT (paper Table 9, deit/main.py)    MAE from scratch (MAE Table 11)
    lr                5e-4 * batch / 512                     1e-4 * batch / 256
    batch             1024                                   4096
    AdamW betas, wd   (0.9, 0.999), 0.05                     (0.9, 0.95), 0.3
    warmup, epochs    5, 300                                 20, 300 (B) / 200 (L, H)
    drop path         0.1                                    0.1 (B) / 0.2 (L, H)
    EMA               0.99996, kept but not reported         0.9999, the reported weights
    repeated aug.     3                                      1
    random erasing    0.25                                   0
    pooling, head     cls token, trunc-normal head           global average + fc_norm, zero-init head

Both use RandAugment m9-mstd0.5-inc1, mixup 0.8 / cutmix 1.0 and label smoothing 0.1; DeiT adds random erasing
0.25, which MAE's Table 11 does not list (Appendix A.2: the regularisations not in the table are disabled).
DeiT's distillation (§4) adds a distillation token and a second head trained against a teacher's output:
a timm model run by PyTorch on the same accelerators (arrays cross by DLPack, no host copies) or a Flax
checkpoint of this script (runs in JAX, also on TPU). Presets for the papers' rows are in `scripts/deit/`.

File order: flags and recipes, model, data, teacher and losses, train and eval steps, loop, main.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import os
import sys
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from common import UserError, checkpoint, convert, data, dist, jax_augment, loop, optim, schedules
from common.attention import attention
from common.run import ArgumentParser, due, eval_line, exit_status, run_record, say, stopping
from common.runlog import RunLog

# ----------------------------------------------------------------------------------------------
# Flags and recipes
# ----------------------------------------------------------------------------------------------

# The ViT paper's sizes (DeiT Table 1 for Ti/S/B): (layers, dim, heads, patch size).
MODEL_PRESETS = {
    "t16": dict(layers=12, dim=192, heads=3, patch_size=16),
    "s16": dict(layers=12, dim=384, heads=6, patch_size=16),
    "b16": dict(layers=12, dim=768, heads=12, patch_size=16),
    "l16": dict(layers=24, dim=1024, heads=16, patch_size=16),
    "h14": dict(layers=32, dim=1280, heads=16, patch_size=14),
}

RECIPES = {
    # DeiT, Table 9 and facebookresearch/deit main.py defaults (the paper's "ours" column).
    "deit": dict(
        batch_size=1024, lr=5e-4, lr_ref_batch=512,  # §6: lr = 5e-4 * batch / 512
        adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8, weight_decay=0.05, clip_grad=0.0,
        epochs=300, warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5,
        drop_path=0.1,  # Table 9 "stoch. depth 0.1", a linear ramp over depth as in timm
        ema_decay=0.99996, ema_eval=False,  # main.py keeps an EMA (--model-ema) but reports the raw weights
        augment_repeats=3,  # repeated augmentation (Hoffer et al.), Table 9 / §6
        random_erasing=0.25,  # Table 9 "Rand Erasing 0.25"
        pooling="cls", head_init="trunc_normal",  # Table 9 "Initialization: trunc. normal"
    ),
    # MAE paper, Appendix A.2 and Table 11 ("supervised training ViT-L/H from scratch"): "a wd of 0.3, a large
    # batch size of 4096, and a long warmup, following the original ViT; beta2 = 0.95"; EMA 0.9999.
    "mae": dict(
        batch_size=4096, lr=1e-4, lr_ref_batch=256,  # lr = base lr 1e-4 * batch / 256
        adam_b1=0.9, adam_b2=0.95, adam_eps=1e-8, weight_decay=0.3, clip_grad=0.0,
        epochs=300, warmup_epochs=20, warmup_lr=0.0, min_lr=1e-6,  # MAE's code: warmup from 0, min lr 1e-6
        drop_path=0.1,
        ema_decay=0.9999, ema_eval=True,  # Table 11 reports the EMA weights
        augment_repeats=1,
        random_erasing=0.0,  # not in Table 11; A.2: regularisations other than the table's are disabled
        # Trained with MAE's fine-tuning code (main_finetune.py): global average pooling + fc_norm, and the
        # ViT-JAX convention of a zero-initialised head kernel.
        pooling="gap", head_init="zero",
    ),
}
# Per-size overrides. MAE Table 11: drop path 0.1 (B) / 0.2 (L/H), 300 epochs for B and 200 for L/H (0.3 for H is
# MAE's fine-tuning value, FINETUNE.md, not the from-scratch one).
SIZE_OVERRIDES = {
    "mae": {"l16": dict(drop_path=0.2, epochs=200), "h14": dict(drop_path=0.2, epochs=200)},
}
# Shared by both recipes (DeiT Table 9; MAE Table 11 lists the same, without random erasing).
AUGMENTATION = dict(auto_augment="rand-m9-mstd0.5-inc1", mixup=0.8, cutmix=1.0, label_smoothing=0.1,
                    test_crop_ratio=0.875)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = loop.add_run_flags(p, output_dir="runs/deit")
    g.add_argument("--recipe", default="deit", help="hyperparameter set: " + " ".join(RECIPES))
    g.add_argument("--eval-only", action="store_true", help="evaluate the last checkpoint in --output-dir, then exit")
    g.add_argument("--init", "--finetune", help="start from the weights of this deit_jax.py run (its last checkpoint), "
                   "as DeiT main.py --finetune: the position embedding resized bicubically to --image-size, a head "
                   "of another number of classes started afresh (DeiT-B at 384 from the 224 run)")

    g = p.add_argument_group("model (defaults: --model preset, then --recipe)")
    g.add_argument("--model", default="s16", help="preset: " + " ".join(MODEL_PRESETS))
    g.add_argument("--layers", type=int)
    g.add_argument("--dim", type=int)
    g.add_argument("--heads", type=int)
    g.add_argument("--patch-size", type=int)
    g.add_argument("--image-size", "--img-size", "--input-size", "--input_size", type=int, default=224)
    g.add_argument("--num-classes", "--labels", type=int, default=-1, help="number of classes (-1: from the data)")
    g.add_argument("--pooling", choices=["cls", "gap"])
    g.add_argument("--head-init", choices=["trunc_normal", "zero"])
    g.add_argument("--dropout", type=float, default=0.0)
    g.add_argument("--drop-path", "--droppath", "--drop_path", type=float,
                   help="stochastic depth of the last block (linear ramp from 0)")
    g.add_argument("--grad-ckpt", action="store_true", help="rematerialise each block in the backward pass")
    g.add_argument("--precision", "--dtype", type=loop.compute_dtype, choices=["bfloat16", "float32"],
                   default="bfloat16", help="compute dtype (or bf16, fp32); parameters and optimizer state: float32")

    g = p.add_argument_group("distillation (DeiT §4)")
    g.add_argument("--distill", choices=["none", "soft", "hard"], default="none",
                   help="add a distillation token and head trained against the teacher (the paper's best: hard)")
    g.add_argument("--teacher", default="flax",
                   help="a timm model name (e.g. regnety_160, the paper's RegNetY-16GF) run by PyTorch, or 'flax' "
                        "for a checkpoint of this script")
    g.add_argument("--teacher-ckpt", help="the teacher's weights: a .pth/.safetensors file for a timm teacher, a run "
                                          "dir or checkpoint of deit_jax.py for 'flax'")
    g.add_argument("--distill-alpha", type=float,
                   help="weight of the distillation term (default 0.5 for hard, 0.1 for soft: §5.1)")
    g.add_argument("--distill-tau", type=float, default=3.0, help="soft distillation temperature (§5.1: 3.0)")

    g = p.add_argument_group("data and augmentation")
    g.add_argument("--batch-size", "--train-batch-size", type=int, help="global batch over all devices and hosts")
    g.add_argument("--eval-batch-size", "--valid-batch-size", type=int, default=256)
    g.add_argument("--random-crop", choices=["rrc", "none"], default="rrc",
                   help="RandomResizedCrop (the papers'), or none: resize + center crop (tiny images, e.g. digits)")
    g.add_argument("--color-jitter", type=float, default=0.0,
                   help="DeiT's code passes 0.3, which timm ignores whenever RandAugment is on")
    g.add_argument("--auto-augment", "--aa", default=AUGMENTATION["auto_augment"],
                   help="timm auto-augment string, 'none' off")
    g.add_argument("--random-erasing", "--reprob", type=float,
                   help="random erasing probability (default: --recipe; 0: off)")
    g.add_argument("--augment-repeats", type=int, help="repeated augmentation: decode once, augment n times")
    g.add_argument("--test-crop-ratio", "--crop-pct", type=float, default=AUGMENTATION["test_crop_ratio"])
    g.add_argument("--mixup", type=float, default=AUGMENTATION["mixup"], help="mixup alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=AUGMENTATION["cutmix"], help="cutmix alpha (0: off)")
    g.add_argument("--label-smoothing", "--smoothing", type=float, default=AUGMENTATION["label_smoothing"])

    g = p.add_argument_group("optimizer (defaults: --recipe)")
    g.add_argument("--lr", "--learning-rate", "--blr", type=float,
                   help="peak lr at --lr-ref-batch, scaled linearly to --batch-size")
    g.add_argument("--lr-ref-batch", type=int, help="the batch the base lr is given for (0: lr is absolute)")
    g.add_argument("--warmup-lr", type=float)
    g.add_argument("--min-lr", "--min_lr", type=float)
    g.add_argument("--weight-decay", "--weight_decay", type=float)
    g.add_argument("--adam-b1", type=float)
    g.add_argument("--adam-b2", type=float)
    g.add_argument("--adam-eps", type=float)
    g.add_argument("--clip-grad", type=float, help="global-norm clip (0: off)")
    g.add_argument("--grad-accum", "--accum-iter", "--accum_iter", type=int, default=1,
                   help="micro-batches per optimizer step")
    g.add_argument("--epochs", type=float)
    g.add_argument("--warmup-epochs", "--warmup_epochs", type=float)
    g.add_argument("--training-steps", type=int, default=0, help="if > 0, overrides --epochs")
    g.add_argument("--warmup-steps", type=int, default=-1, help="if >= 0, overrides --warmup-epochs")
    g.add_argument("--ema-decay", type=float, help="EMA of the weights, updated every step (0: off)")
    g.add_argument("--ema-eval", action=argparse.BooleanOptionalAction,
                   help="report (and keep the best by) the EMA weights' accuracy")

    g = p.add_argument_group("seeds")
    g.add_argument("--seed", type=int, default=0, help="default for the four seeds below")
    g.add_argument("--init-seed", type=int)
    g.add_argument("--mixup-seed", type=int)
    g.add_argument("--dropout-seed", type=int)
    g.add_argument("--shuffle-seed", type=int)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags, then the --model preset, then the --recipe's values (and its per-size overrides) for unset flags."""
    args = build_parser().parse_args(argv)
    if args.recipe not in RECIPES:
        raise UserError(f"unknown recipe {args.recipe!r}; choose one of {', '.join(RECIPES)}")
    if args.model not in MODEL_PRESETS:
        raise UserError(f"unknown model {args.model!r}; choose one of {', '.join(MODEL_PRESETS)}")
    defaults = {**MODEL_PRESETS[args.model], **RECIPES[args.recipe],
                **SIZE_OVERRIDES.get(args.recipe, {}).get(args.model, {})}
    loop.complete_flags(args, defaults, seeds=("init_seed", "mixup_seed", "dropout_seed", "shuffle_seed"))
    if args.distill_alpha is None:
        args.distill_alpha = 0.1 if args.distill == "soft" else 0.5
    if args.distill != "none" and args.pooling != "cls":
        raise UserError("distillation needs the cls and distillation tokens: use --pooling cls")
    if args.distill != "none" and not args.teacher_ckpt:
        raise UserError(f"--distill {args.distill} needs a teacher: give --teacher-ckpt")
    return args


# ----------------------------------------------------------------------------------------------
# Model: timm's VisionTransformer (and VisionTransformerDistilled) with the same parameter names, so that
# common.convert maps a checkpoint to `vit_*` / `deit_*_distilled_patch16_224` one to one.
# ----------------------------------------------------------------------------------------------

trunc_normal = nn.initializers.truncated_normal(0.02)  # DeiT Table 9: truncated normal init
layer_norm = functools.partial(nn.LayerNorm, epsilon=1e-6)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    num_classes: int
    image_size: int = 224
    patch_size: int = 16
    layers: int = 12
    dim: int = 768
    heads: int = 12
    mlp_ratio: int = 4
    pooling: str = "cls"  # or "gap": mean of patch tokens, then fc_norm; no cls token
    distilled: bool = False  # DeiT's distillation token and second head
    head_init: str = "trunc_normal"  # or "zero"
    dropout: float = 0.0
    droppath: float = 0.0  # rate of the last block; block i gets droppath * i / (layers - 1)
    grad_ckpt: bool = False
    dtype: str = "float32"

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def prefix_tokens(self) -> int:
        return (self.pooling == "cls") + self.distilled


def droppath_rates(c: ViTConfig) -> list[float]:
    """Stochastic depth per block: a linear ramp from 0 to `droppath` (DeiT's code, timm `linspace(0, rate, depth)`)."""
    return [c.droppath * i / max(c.layers - 1, 1) for i in range(c.layers)]


class Attention(nn.Module):
    heads: int
    dtype: Any

    @nn.compact
    def __call__(self, x):
        batch, tokens, dim = x.shape
        dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=trunc_normal)
        qkv = dense(3 * dim, name="qkv")(x).reshape(batch, tokens, 3, self.heads, dim // self.heads)
        out = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])  # cuDNN flash on NVIDIA GPUs in bf16, else XLA
        return dense(dim, name="proj")(out.reshape(batch, tokens, dim))


class Mlp(nn.Module):
    hidden: int
    dropout: float
    dtype: Any

    @nn.compact
    def __call__(self, x, train: bool):
        dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=trunc_normal)
        dim = x.shape[-1]
        x = nn.gelu(dense(self.hidden, name="fc1")(x), approximate=False)  # exact GELU, as timm
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        return nn.Dropout(self.dropout)(dense(dim, name="fc2")(x), deterministic=not train)


class PatchEmbed(nn.Module):
    patch_size: int
    dim: int
    dtype: Any

    @nn.compact
    def __call__(self, images):
        p = self.patch_size
        x = nn.Conv(self.dim, (p, p), strides=p, padding="VALID", dtype=self.dtype, kernel_init=trunc_normal,
                    name="proj")(images)
        return x.reshape(x.shape[0], -1, self.dim)  # (batch, grid*grid, dim), row-major as timm


class Block(nn.Module):
    config: ViTConfig
    droppath: float

    @nn.compact
    def __call__(self, x, train: bool):
        c = self.config
        dtype = jnp.dtype(c.dtype)
        # Stochastic depth drops a sample's whole residual branch (timm DropPath): dropout broadcast over
        # tokens and channels, scaled by 1/keep.
        drop_path = nn.Dropout(self.droppath, broadcast_dims=(1, 2), rng_collection="droppath")
        y = Attention(c.heads, dtype, name="attn")(layer_norm(dtype=dtype, name="norm1")(x))
        x = x + drop_path(y, deterministic=not train)
        y = Mlp(c.dim * c.mlp_ratio, c.dropout, dtype, name="mlp")(layer_norm(dtype=dtype, name="norm2")(x), train)
        return x + drop_path(y, deterministic=not train)


class VisionTransformer(nn.Module):
    """ViT as timm's `vit_*` / `deit_*`: cls (and distillation) token first, then the position embedding
    (1, prefix + grid^2, dim) added to all tokens. Returns the class logits, or with `distilled` the pair
    (class-token logits, distillation-token logits)."""

    config: ViTConfig

    @nn.compact
    def __call__(self, images, train: bool = False):
        c = self.config
        dtype = jnp.dtype(c.dtype)
        x = PatchEmbed(c.patch_size, c.dim, dtype, name="patch_embed")(images.astype(dtype))
        prefix = [self.param(name, trunc_normal, (1, 1, c.dim))
                  for name in ("cls_token", "dist_token")[:c.prefix_tokens]]
        x = jnp.concatenate([jnp.broadcast_to(t.astype(dtype), (x.shape[0], 1, c.dim)) for t in prefix] + [x], 1)
        x = x + self.param("pos_embed", trunc_normal, (1, c.prefix_tokens + c.grid**2, c.dim)).astype(dtype)
        x = nn.Dropout(c.dropout)(x, deterministic=not train)
        block = nn.remat(Block, static_argnums=(2,)) if c.grad_ckpt else Block
        for i, rate in enumerate(droppath_rates(c)):
            x = block(c, rate, name=f"blocks_{i}")(x, train)
        head_init = nn.initializers.zeros if c.head_init == "zero" else trunc_normal
        head = functools.partial(nn.Dense, c.num_classes, dtype=dtype, kernel_init=head_init)
        if c.pooling == "gap":
            return head(name="head")(layer_norm(dtype=dtype, name="fc_norm")(x.mean(axis=1))).astype(jnp.float32)
        x = layer_norm(dtype=dtype, name="norm")(x)
        logits = head(name="head")(x[:, 0]).astype(jnp.float32)
        if not c.distilled:
            return logits
        return logits, head(name="head_dist")(x[:, 1]).astype(jnp.float32)


def model_config(args: argparse.Namespace, num_classes: int) -> ViTConfig:
    return ViTConfig(num_classes=num_classes, image_size=args.image_size, patch_size=args.patch_size,
                     layers=args.layers, dim=args.dim, heads=args.heads, pooling=args.pooling,
                     distilled=args.distill != "none", head_init=args.head_init, dropout=args.dropout,
                     droppath=args.drop_path, grad_ckpt=args.grad_ckpt, dtype=args.precision)


def train_flops_per_image(c: ViTConfig) -> float:
    """Matmul FLOPs of one training image: 3 passes (forward, 2x backward) x 2 FLOPs per multiply-add."""
    tokens = c.grid * c.grid + c.prefix_tokens
    macs = c.grid * c.grid * 3 * c.patch_size**2 * c.dim  # patch embedding
    macs += c.layers * tokens * (4 * c.dim * c.dim + 2 * c.mlp_ratio * c.dim * c.dim)  # qkv, proj, mlp
    macs += c.layers * 2 * tokens * tokens * c.dim  # q @ k and attn @ v
    macs += c.dim * c.num_classes * (1 + c.distilled)
    return 6.0 * macs


def predict(outputs) -> jax.Array:
    """Test-time logits. A distilled model averages its two heads (§4, "classification with our approach")."""
    return (outputs[0] + outputs[1]) / 2 if isinstance(outputs, tuple) else outputs


# ----------------------------------------------------------------------------------------------
# Data: uint8 batches from PyTorch DataLoaders (timm transforms) or webdataset shards; normalisation,
# mixup/cutmix and random erasing run on the device.
# ----------------------------------------------------------------------------------------------


def train_augmentation(args: argparse.Namespace) -> dict:
    """DeiT Table 9: RandomResizedCrop (bicubic) + flip + RandAugment m9-mstd0.5-inc1; for either --loader. The eval
    resizes to 256 and crops 224 (--test-crop-ratio 0.875)."""
    return dict(image_size=args.image_size, random_crop=args.random_crop, color_jitter=args.color_jitter,
                auto_augment=args.auto_augment)


# ----------------------------------------------------------------------------------------------
# Teachers and the distillation loss (DeiT §4; facebookresearch/deit losses.py).
# ----------------------------------------------------------------------------------------------


def distillation_loss(outputs: tuple, targets: jax.Array, teacher_logits: jax.Array, kind: str, alpha: float,
                      tau: float) -> jax.Array:
    """(1 - alpha) * CE(class head, mixed targets) + alpha * distillation term on the distillation head.

    hard (eq. 3): CE of the distillation head against the teacher's argmax (not smoothed).
    soft (eq. 2): tau^2 * KL(softmax(teacher / tau) || softmax(student / tau)), summed and divided by the
        number of logits, as losses.py does.
    """
    class_logits, dist_logits = outputs
    base = optax.softmax_cross_entropy(class_logits, targets).mean()
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    if kind == "hard":
        distill = optax.softmax_cross_entropy_with_integer_labels(dist_logits, teacher_logits.argmax(-1)).mean()
    else:
        teacher_log_probs = jax.nn.log_softmax(teacher_logits / tau)
        kl = jnp.exp(teacher_log_probs) * (teacher_log_probs - jax.nn.log_softmax(dist_logits / tau))
        distill = kl.sum() * tau * tau / dist_logits.size
    return (1 - alpha) * base + alpha * distill


class TimmTeacher:
    """A timm model (the paper's RegNetY-16GF: `regnety_160`) run by PyTorch on the devices that hold the JAX
    batch. Each device's rows go to PyTorch and the logits come back through DLPack: no host copies on GPU."""

    def __init__(self, name: str, weights: str, num_classes: int, mesh):
        import timm
        import torch

        if not timm.is_model(name):
            raise UserError(f"unknown timm teacher {name!r} (give --teacher flax for a checkpoint of this script)")
        model = timm.create_model(name, pretrained=False, num_classes=num_classes)
        state = convert.read_torch_state_dict(weights, "--teacher-ckpt")
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:  # missing / unexpected keys or shapes
            problem = " ".join(str(e).split())[:300]
            raise UserError(f"--teacher-ckpt {weights} does not fit {name} with {num_classes} classes: "
                            f"{problem}") from None
        model.eval().requires_grad_(False)
        self.torch, self.mesh = torch, mesh
        self.models = {}  # one replica per local device
        for device in jax.local_devices():
            if device.platform == "gpu":
                self.models[device] = copy.deepcopy(model).to(torch.device("cuda", device.local_hardware_id))
            elif device.platform == "cpu":
                self.models[device] = model
            else:
                raise UserError(f"a timm teacher runs on GPUs or CPUs, not {device.platform}: use --teacher flax")

    def __call__(self, images: jax.Array) -> jax.Array:
        torch = self.torch
        shards = []
        for shard in images.addressable_shards:
            x = torch.from_dlpack(shard.data).permute(0, 3, 1, 2)  # NHWC view -> NCHW (channels-last strides)
            with torch.no_grad(), torch.autocast(x.device.type, torch.bfloat16, enabled=x.is_cuda):
                logits = self.models[shard.device](x).float().contiguous()
            shards.append(jax.device_put(jax.dlpack.from_dlpack(logits), shard.device))
        return jax.make_array_from_single_device_arrays((images.shape[0], shards[0].shape[1]),
                                                        dist.batch_sharded(self.mesh), shards)


class FlaxTeacher:
    """A checkpoint of this script as the teacher: runs in JAX (on TPU too), the two heads averaged if distilled."""

    def __init__(self, path: str, args: argparse.Namespace, num_classes: int, mesh):
        params, config = checkpoint.load_params_and_config(path)
        if config.get("script") != "deit_jax.py":
            raise UserError(f"--teacher-ckpt {path} is not a checkpoint of deit_jax.py (for a timm model give "
                            "its name with --teacher)")
        teacher_args = argparse.Namespace(**{**config, "drop_path": 0.0, "dropout": 0.0, "grad_ckpt": False,
                                             "precision": args.precision})
        if config["num_classes"] != num_classes or config["image_size"] != args.image_size:
            raise UserError(f"teacher {path} has {config['num_classes']} classes at {config['image_size']} px; "
                            f"this run {num_classes} at {args.image_size}")
        model = VisionTransformer(model_config(teacher_args, num_classes))
        self.params = jax.device_put(params, dist.replicated(mesh))
        self.apply = jax.jit(lambda p, x: predict(model.apply({"params": p}, x, train=False)))

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.apply(self.params, images)


def make_teacher(args: argparse.Namespace, num_classes: int, mesh):
    if args.distill == "none":
        return None
    if args.teacher == "flax":
        return FlaxTeacher(args.teacher_ckpt, args, num_classes, mesh)
    return TimmTeacher(args.teacher, args.teacher_ckpt, num_classes, mesh)


# ----------------------------------------------------------------------------------------------
# Optimizer, train step and eval step.
# ----------------------------------------------------------------------------------------------


def make_optimizer(args: argparse.Namespace, schedule: optax.Schedule, params) -> optax.GradientTransformation:
    # AdamW with decoupled weight decay on weight matrices only (timm's add_weight_decay skips biases, norms,
    # tokens and the position embedding).
    return optim.make_optimizer("adamw", schedule, params, weight_decay=args.weight_decay, b1=args.adam_b1,
                                b2=args.adam_b2, eps=args.adam_eps, clip_norm=args.clip_grad)


def make_inputs(args: argparse.Namespace, num_classes: int, mixup_key: jax.Array):
    """(step, uint8 batch) -> (normalised, mixed and erased images; soft targets), the same for the student and
    the teacher (DeiT §4: the teacher sees the student's exact input)."""
    def inputs(step, batch):
        mix_key, erase_key = jax.random.split(jax.random.fold_in(mixup_key, step))
        images = jax_augment.normalize(batch["image"])
        if args.mixup > 0 or args.cutmix > 0:
            images, targets = jax_augment.mixup_cutmix(mix_key, images, batch["label"], num_classes,
                                                   mixup_alpha=args.mixup, cutmix_alpha=args.cutmix,
                                                   label_smoothing=args.label_smoothing)
        else:
            targets = jax_augment.smooth_one_hot(batch["label"], num_classes, args.label_smoothing)
        if args.random_erasing > 0:
            images = jax_augment.random_erasing(erase_key, images, args.random_erasing)
        return images, targets

    return inputs


def make_train_step(args: argparse.Namespace, model: VisionTransformer, optimizer, schedule, inputs,
                    dropout_key: jax.Array):
    """(state, batch, teacher logits or None) -> (state, metrics): one AdamW step, then the EMA update."""
    def step_fn(state, batch, teacher_logits):
        step = state["step"]
        images, targets = inputs(step, batch)

        def micro_loss(params, micro_images, micro_targets, micro_teacher, micro_index):
            keys = jax.random.split(jax.random.fold_in(jax.random.fold_in(dropout_key, step), micro_index))
            outputs = model.apply({"params": params}, micro_images, train=True,
                                  rngs={"dropout": keys[0], "droppath": keys[1]})
            if args.distill == "none":
                return optax.softmax_cross_entropy(outputs, micro_targets).mean()
            return distillation_loss(outputs, micro_targets, micro_teacher, args.distill, args.distill_alpha,
                                     args.distill_tau)

        if teacher_logits is None:
            teacher_logits = jnp.zeros((images.shape[0], 1))  # unused, keeps one code path
        loss, grads = loop.accumulate_gradients(jax.value_and_grad(micro_loss), state["params"],
                                                (images, targets, teacher_logits), args.grad_accum)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = {"params": params, "opt_state": opt_state, "step": step + 1}
        if "ema_params" in state:  # timm ModelEma: ema = decay * ema + (1 - decay) * params, every step
            new_state["ema_params"] = optax.incremental_update(params, state["ema_params"], 1 - args.ema_decay)
        return new_state, {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": schedule(step)}

    return step_fn


def make_eval_step(model: VisionTransformer):
    def eval_fn(params, batch):
        outputs = model.apply({"params": params}, jax_augment.normalize(batch["image"]), train=False)
        return loop.classification_totals(predict(outputs), batch["label"])

    return eval_fn


def timm_export(path: Path, *, which: str = "last", ema: bool = False, arch: str | None = None) -> convert.TimmExport:
    """scripts/convert_to_timm.py's rule: a run's params (or, with `ema`, their EMA) as timm's vit_* / deit_* model
    (with the distillation token: `VisionTransformerDistilled`)."""
    params, config = checkpoint.load_params_and_config(path, which=which, key="ema_params" if ema else "params")
    if config.get("ema_eval") and config.get("ema_decay") and not ema:
        say("note: this run reported its EMA weights; pass --ema to export those")
    return convert.flax_params_to_timm(params, config, arch)


# ----------------------------------------------------------------------------------------------
# Initialisation from another run (DeiT §6 "Fine-tuning at different resolution"; main.py --finetune).
# ----------------------------------------------------------------------------------------------


def load_init(params: dict, path: str, config: ViTConfig) -> dict:
    """`params` with every entry taken from the deit_jax.py run at `path`, as DeiT main.py --finetune: the patch
    grid of the position embedding resized bicubically to this model's (cls / distillation rows kept), a head
    whose number of classes differs left as initialised."""
    if not os.path.exists(path):
        raise UserError(f"--init {path} does not exist")
    source, source_config = checkpoint.load_params_and_config(path)
    if source_config.get("script") != "deit_jax.py":
        raise UserError(f"--init {path} is not a run of deit_jax.py")
    source = dict(source)
    source_prefix = (source_config.get("pooling") == "cls") + bool(source_config.get("distilled"))
    if source_prefix != config.prefix_tokens:
        raise UserError(f"--init {path} has {source_prefix} cls/distillation tokens and this model "
                        f"{config.prefix_tokens}: match its --pooling and --distill")
    if source["pos_embed"].shape != params["pos_embed"].shape:
        source["pos_embed"] = convert.resize_pos_embed(source["pos_embed"], config.grid,
                                                       prefix_rows=config.prefix_tokens)
    for head in ("head", "head_dist"):
        if head in source and head in params and source[head]["kernel"].shape != params[head]["kernel"].shape:
            say(f"note: --init {path}: its {head} has other classes than this run's; it starts from scratch")
            source[head] = params[head]

    def take(key_path, new):
        name, old = "/".join(k.key for k in key_path), source
        for key in key_path:
            old = old.get(key.key) if isinstance(old, dict) else None
        if old is None or old.shape != new.shape:
            found = "no such parameter" if old is None else f"shape {old.shape}"
            raise UserError(f"--init {path} does not fit this model: {name} has {found} there, {new.shape} here "
                            f"(check --model / --layers / --dim / --patch-size)")
        return jnp.asarray(old, new.dtype)

    return jax.tree_util.tree_map_with_path(take, params)


# ----------------------------------------------------------------------------------------------
# The loop: one Mesh over all devices of all hosts, state replicated, batches sharded on 'data'.
# ----------------------------------------------------------------------------------------------


def setup(args: argparse.Namespace):
    """Mesh, model, teacher, lr schedule and initial state (replicated on every device) of a run."""
    if args.distill != "none" and args.teacher != "flax":
        # JAX takes most of the accelerator's memory by default; leave room for the PyTorch teacher.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    dist.initialize()
    mesh = dist.data_mesh()
    loop.check_batch_sizes(args.batch_size, args.eval_batch_size, mixing=args.mixup > 0 or args.cutmix > 0)
    spec = data.describe(args.data, num_classes=args.num_classes)
    config = model_config(args, spec.num_classes)
    model = VisionTransformer(config)
    teacher = make_teacher(args, spec.num_classes, mesh)

    steps_per_epoch, total_steps, warmup_steps = loop.run_length(
        spec, args.batch_size, epochs=args.epochs, warmup_epochs=args.warmup_epochs,
        training_steps=args.training_steps, warmup_steps=args.warmup_steps, benchmark=args.benchmark)
    peak_lr = schedules.scaled_lr(args.lr, args.batch_size, args.lr_ref_batch)
    schedule = schedules.warmup_cosine(peak_lr, total_steps, warmup_steps, warmup_lr=args.warmup_lr,
                                       min_lr=args.min_lr)

    images = jnp.zeros((1, args.image_size, args.image_size, 3), jnp.float32)
    params = jax.jit(model.init)(jax.random.PRNGKey(args.init_seed), images)["params"]
    if args.init:  # before the EMA copy: main.py builds its EMA from the loaded weights
        params = load_init(params, args.init, config)
    optimizer = make_optimizer(args, schedule, params)
    state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}
    if args.ema_decay > 0:
        state["ema_params"] = jax.tree_util.tree_map(jnp.copy, params)  # own buffers: the step donates both
    state = jax.device_put(state, dist.replicated(mesh))
    run_config = dict(vars(args), **run_record("deit_jax.py", args), script="deit_jax.py", num_classes=spec.num_classes,
                      peak_lr=peak_lr,
                      total_steps=total_steps, warmup_steps=warmup_steps, steps_per_epoch=steps_per_epoch,
                      distilled=config.distilled, no_embed_class=False, devices=jax.device_count(),
                      processes=jax.process_count(), device_kind=jax.devices()[0].device_kind,
                      params=sum(x.size for x in jax.tree_util.tree_leaves(params)))
    return mesh, model, teacher, config, optimizer, schedule, state, run_config


def run(args: argparse.Namespace) -> dict:
    if args.benchmark_input:  # the host input pipeline alone: no model, nothing written
        return loop.benchmark_input(args.data, train_augmentation(args), global_batch=args.batch_size,
                                    workers=args.workers, steps=args.benchmark_steps, seed=args.shuffle_seed,
                                    repeats=args.augment_repeats, loader=args.loader, model=args.model,
                                    recipe=args.recipe, image_size=args.image_size)
    mesh, model, teacher, config, optimizer, schedule, state, run_config = setup(args)
    loader = loop.loader_choice(args.loader, train_augmentation(args))
    num_classes, total_steps = config.num_classes, run_config["total_steps"]
    inputs = make_inputs(args, num_classes, jax.random.PRNGKey(args.mixup_seed))
    state_sharding = jax.tree_util.tree_map(lambda x: x.sharding, state)
    update = jax.jit(make_train_step(args, model, optimizer, schedule, inputs, jax.random.PRNGKey(args.dropout_seed)),
                     out_shardings=(state_sharding, dist.replicated(mesh)), donate_argnums=0)
    teacher_inputs = jax.jit(lambda step, batch: inputs(step, batch)[0])

    def train_step(state, batch):
        # The teacher runs outside the student's compiled step (a PyTorch model cannot be traced); it sees the
        # same images, which the step recomputes from (step, batch) instead of receiving them.
        teacher_logits = teacher(teacher_inputs(state["step"], batch)) if teacher else None
        return update(state, batch, teacher_logits)

    stream = functools.partial(loop.train_stream, args.data, train_augmentation(args), mesh,
                               global_batch=args.batch_size, seed=args.shuffle_seed, repeats=args.augment_repeats,
                               workers=args.workers, image_size=args.image_size, num_classes=num_classes,
                               loader=loader)  # batches from a given step
    if args.benchmark:
        batch = loop.synthetic_batch(mesh, args.batch_size, args.image_size, num_classes, 0)
        real = None if args.data == "synthetic" else stream(start_step=0)  # end to end, beside the device alone
        return loop.benchmark(train_step, state, batch, steps=args.benchmark_steps, global_batch=args.batch_size,
                              batches=real, train_flops_per_image=train_flops_per_image(config), model=args.model,
                              recipe=args.recipe, distill=args.distill, image_size=args.image_size,
                              dtype=args.precision)

    eval_step = jax.jit(make_eval_step(model), out_shardings=dist.replicated(mesh))

    def evaluate(state) -> dict:
        """val_* of the trained weights, ema_val_* of the EMA weights; `best_metric` picks the reported one."""
        weights = {"val_": state["params"]}
        if "ema_params" in state:
            weights["ema_val_"] = state["ema_params"]
        batches = loop.eval_stream(args.data, image_size=args.image_size, crop_ratio=args.test_crop_ratio,
                                   global_batch=args.eval_batch_size, workers=args.workers, loader=loader)
        return loop.evaluate(eval_step, weights, batches, mesh)

    best_metric = "ema_val_top1" if args.ema_eval and args.ema_decay > 0 else "val_top1"
    if args.eval_only:  # an existing run's config.json and checkpoints stay as they are
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
        say(f"{args.recipe} recipe, {run_config['params'] / 1e6:.1f}M params, {total_steps} steps "
            f"({steps_per_epoch}/epoch), peak lr {run_config['peak_lr']:g}, distillation {args.distill}, "
            f"{jax.device_count()} device(s) on {jax.process_count()} host(s), starting at step {start_step}",
            main=dist.is_main_process())
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
                    top1 = results.get(best_metric, -1.0)  # the EMA weights' with --ema-eval
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


def main(argv: list[str] | None = None) -> int:
    return exit_status(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

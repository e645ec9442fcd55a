"""DeiT III: Revenge of the ViT (Touvron, Cord, Jegou, ECCV 2022), in JAX/Flax.

    python deit3_jax.py --model b16 --data /path/to/imagenet        # one host, all its devices
    python deit3_jax.py --data digits --model t16 --image-size 32 --patch-size 4 --layers 4 ...

The recipe in one paragraph (paper §3, Tables 1 and 9 and the official README): a plain ViT with
LayerScale (init 1e-4) and the same stochastic-depth rate in every block; 3-Augment (one of
grayscale / solarize / gaussian blur, plus color jitter 0.3) on top of a random resized crop on
ImageNet-1k or a simple random crop on ImageNet-21k; mixup 0.8 / cutmix 1.0; binary cross-entropy
on binarised mixed targets; LAMB at batch 2048 with gradient clipping 1.0; 3 repeated
augmentations; low-resolution pretraining (192 px for B/L) and a short fine-tune at 224.
The paper's table rows are full command lines in `scripts/deit3/`.

File order: flags and presets, model, data, optimizer, train and eval steps, loop, main.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from common import UserError, checkpoint, convert, data, dist, jax_augment, loop, optim, schedules
from common.attention import attention
from common.run import ArgumentParser, due, eval_line, exit_status, run_record, say, stopping
from common.runlog import RunLog

# ----------------------------------------------------------------------------------------------
# Flags and presets: the repo's one spelling first, then deit3-jax's (the JAX reimplementation users come
# from), so that its command lines run unchanged.
# ----------------------------------------------------------------------------------------------

# DeiT-III Table 9 / the ViT paper: (layers, dim, heads, patch size). ViT-M is the official README's (models_v2.py
# `deit_medium_patch16_LS`, timm `deit3_medium_patch16_224`).
MODEL_PRESETS = {
    "t16": dict(layers=12, dim=192, heads=3, patch_size=16),
    "s16": dict(layers=12, dim=384, heads=6, patch_size=16),
    "m16": dict(layers=12, dim=512, heads=8, patch_size=16),
    "b16": dict(layers=12, dim=768, heads=12, patch_size=16),
    "l16": dict(layers=24, dim=1024, heads=16, patch_size=16),
    "h14": dict(layers=32, dim=1280, heads=16, patch_size=14),
}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = loop.add_run_flags(p, output_dir="runs/deit3")
    g.add_argument("--valid-dataset-shards", help="deit3-jax's val shards (see `check_data`)")
    g.add_argument("--eval-only", action="store_true",
                   help="evaluate --pretrained-ckpt (or the last checkpoint), then exit")

    g = p.add_argument_group("model")
    g.add_argument("--model", default="s16", help="preset: " + " ".join(MODEL_PRESETS))
    g.add_argument("--layers", type=int, help="override the preset's depth")
    g.add_argument("--dim", type=int, help="override the preset's width")
    g.add_argument("--heads", type=int, help="override the preset's number of heads")
    g.add_argument("--patch-size", type=int, help="override the preset's patch size")
    g.add_argument("--image-size", "--img-size", "--input-size", "--input_size", type=int, default=224)
    g.add_argument("--num-classes", "--labels", type=int, default=-1, help="number of classes (-1: from the data)")
    g.add_argument("--layerscale", action=argparse.BooleanOptionalAction, default=True,
                   help="LayerScale on both residual branches (DeiT-III §3)")
    g.add_argument("--layerscale-init", type=float, default=1e-4,
                   help="LayerScale init; 1e-4 for all sizes in the original code (timm's deit3 says 1e-6)")
    g.add_argument("--posemb", choices=["learnable", "sincos2d"], default="learnable")
    g.add_argument("--pooling", choices=["cls", "gap"], default="cls")
    g.add_argument("--dropout", type=float, default=0.0)
    g.add_argument("--drop-path", "--droppath", type=float, default=0.1,
                   help="stochastic depth, the same rate in every block")
    g.add_argument("--grad-ckpt", action="store_true", help="rematerialise each block in the backward pass")
    g.add_argument("--precision", "--dtype", type=loop.compute_dtype, choices=["bfloat16", "float32"],
                   default="bfloat16", help="compute dtype (or bf16, fp32); parameters and optimizer state: float32")

    g = p.add_argument_group("data and augmentation")
    g.add_argument("--batch-size", "--train-batch-size", type=int, default=2048,
                   help="global batch over all devices and hosts")
    g.add_argument("--eval-batch-size", "--valid-batch-size", type=int, default=256)
    g.add_argument("--random-crop", choices=["none", "rrc", "src"], default="rrc",
                   help="random resized crop (in1k) or simple random crop (in21k)")
    g.add_argument("--color-jitter", type=float, default=0.3)
    g.add_argument("--auto-augment", "--aa", default="3a",
                   help="timm auto-augment string; '3a' is 3-Augment, 'none' off")
    g.add_argument("--random-erasing", "--reprob", type=float, default=0.0)
    g.add_argument("--augment-repeats", type=int, default=3,
                   help="repeated augmentation: decode once, augment n times")
    g.add_argument("--test-crop-ratio", "--crop-pct", type=float, default=1.0)
    g.add_argument("--mixup", type=float, default=0.8, help="mixup alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha (0: off)")

    g = p.add_argument_group("loss and optimizer")
    g.add_argument("--criterion", choices=["ce", "bce"], default="bce")
    g.add_argument("--label-smoothing", "--smoothing", type=float, default=0.0)
    g.add_argument("--optimizer", choices=["adamw", "lamb"], default="lamb")
    g.add_argument("--lr", "--learning-rate", type=float, default=3e-3,
                   help="peak lr, absolute (DeiT-III gives it at batch 2048 and disables lr scaling)")
    g.add_argument("--lr-ref-batch", type=int, default=0,
                   help="if > 0, scale the lr linearly: lr * batch-size / lr-ref-batch")
    g.add_argument("--warmup-lr", type=float, default=1e-6)
    g.add_argument("--min-lr", "--min_lr", type=float, default=1e-5)
    g.add_argument("--weight-decay", "--weight_decay", type=float, default=0.05)
    g.add_argument("--adam-b1", type=float, default=0.9)
    g.add_argument("--adam-b2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--lr-decay", type=float, default=1.0, help="layer-wise lr decay (1.0: off)")
    g.add_argument("--clip-grad", type=float, default=1.0, help="global-norm clip (0: off)")
    g.add_argument("--grad-accum", "--accum-iter", "--accum_iter", type=int, default=1,
                   help="micro-batches per optimizer step")
    g.add_argument("--epochs", type=float, default=800)
    g.add_argument("--warmup-epochs", "--warmup_epochs", type=float, default=5)
    g.add_argument("--training-steps", type=int, default=0, help="if > 0, overrides --epochs")
    g.add_argument("--warmup-steps", type=int, default=-1, help="if >= 0, overrides --warmup-epochs")

    g = p.add_argument_group("seeds and checkpoints")
    g.add_argument("--seed", type=int, default=0, help="default for the four seeds below")
    g.add_argument("--init-seed", type=int)
    g.add_argument("--mixup-seed", type=int)
    g.add_argument("--dropout-seed", type=int)
    g.add_argument("--shuffle-seed", type=int)
    g.add_argument("--pretrained-ckpt", help="initialise from this checkpoint (pos-emb resized to --image-size)")
    g.add_argument("--label-mapping", help="JSON list of [src, dst] class pairs to map a pretrained head")

    # deit3-jax's command lines also name its W&B run and its val loader: accepted, not used here.
    for flag in ("--name", "--ipaddr", "--hostname", "--valid-loader-workers"):
        p.add_argument(flag, dest=f"unused_{flag[2:].replace('-', '_')}", help=argparse.SUPPRESS)
    return p


def check_data(args: argparse.Namespace) -> None:
    """deit3-jax names its train and val webdataset shards apart (`--train-dataset-shards "pipe:curl -s -L
    URL/imagenet1k-train-{0000..1023}.tar" --valid-dataset-shards ...`); here one --data names both. Shards in a
    folder that holds scripts/make_shards.py's info.json become that folder (train and val, sizes known); raw
    train shards (a pattern, `pipe:` commands) train as they are, and common.data has no exact evaluation of raw
    val shards (their sizes are unknown): then the run is not evaluated."""
    valid = args.__dict__.pop("valid_dataset_shards")
    if not valid:
        return
    folder = os.path.dirname(args.data)
    if folder and os.path.dirname(valid) == folder and os.path.isfile(os.path.join(folder, "info.json")):
        args.data = folder
    else:
        print(f"note: --valid-dataset-shards {valid}: raw val shards are not evaluated; write the shards with "
              "scripts/make_shards.py and give their folder as --data to evaluate", file=sys.stderr)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    for name in [name for name in vars(args) if name.startswith("unused_")]:
        delattr(args, name)
    check_data(args)
    if args.model not in MODEL_PRESETS:
        raise UserError(f"unknown model {args.model!r}; choose one of {', '.join(MODEL_PRESETS)}")
    loop.complete_flags(args, MODEL_PRESETS[args.model], seeds=("init_seed", "mixup_seed", "dropout_seed",
                                                                "shuffle_seed"))
    return args


# ----------------------------------------------------------------------------------------------
# Model: a ViT whose parameter names follow timm's VisionTransformer (blocks_0/attn/qkv <->
# blocks.0.attn.qkv), so that common.convert maps it to timm's `deit3_*` models one to one.
# ----------------------------------------------------------------------------------------------


trunc_normal = nn.initializers.truncated_normal(0.02)  # DeiT/timm init for weights, tokens, pos-emb
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
    layerscale_init: float | None = 1e-4  # None: no LayerScale
    posemb: str = "learnable"  # or "sincos2d" (fixed)
    pooling: str = "cls"  # or "gap" (mean of patch tokens, then fc_norm; no cls token)
    dropout: float = 0.0
    droppath: float = 0.0
    grad_ckpt: bool = False
    dtype: str = "float32"

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


class LayerScale(nn.Module):
    init_value: float

    @nn.compact
    def __call__(self, x):
        gamma = self.param("gamma", nn.initializers.constant(self.init_value), (x.shape[-1],))
        return x * gamma.astype(x.dtype)


class Attention(nn.Module):
    heads: int
    dtype: Any

    @nn.compact
    def __call__(self, x):
        batch, tokens, dim = x.shape
        dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=trunc_normal)
        qkv = dense(3 * dim, name="qkv")(x).reshape(batch, tokens, 3, self.heads, dim // self.heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        out = attention(q, k, v)  # cuDNN flash attention on NVIDIA GPUs in bf16, else XLA's
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
        x = dense(dim, name="fc2")(x)
        return nn.Dropout(self.dropout)(x, deterministic=not train)


class PatchEmbed(nn.Module):
    patch_size: int
    dim: int
    dtype: Any

    @nn.compact
    def __call__(self, images):
        p = self.patch_size
        x = nn.Conv(self.dim, (p, p), strides=p, padding="VALID", dtype=self.dtype,
                    kernel_init=trunc_normal, name="proj")(images)
        return x.reshape(x.shape[0], -1, self.dim)  # (batch, grid*grid, dim), row-major as timm


class Block(nn.Module):
    config: ViTConfig

    @nn.compact
    def __call__(self, x, train: bool):
        c = self.config
        dtype = jnp.dtype(c.dtype)
        # Stochastic depth drops a sample's whole residual branch: dropout broadcast over tokens
        # and channels, scaled by 1/keep, as timm's DropPath.
        drop_path = nn.Dropout(c.droppath, broadcast_dims=(1, 2), rng_collection="droppath")
        scale = (lambda name: LayerScale(c.layerscale_init, name=name)) if c.layerscale_init else (
            lambda name: lambda y: y)
        y = Attention(c.heads, dtype, name="attn")(layer_norm(dtype=dtype, name="norm1")(x))
        x = x + drop_path(scale("ls1")(y), deterministic=not train)
        y = Mlp(c.dim * c.mlp_ratio, c.dropout, dtype, name="mlp")(layer_norm(dtype=dtype, name="norm2")(x), train)
        return x + drop_path(scale("ls2")(y), deterministic=not train)


class VisionTransformer(nn.Module):
    """DeiT-III ViT = timm `VisionTransformer(no_embed_class=True, init_values=1e-4)`:
    the position embedding covers the patches only and is added before the cls token is joined."""

    config: ViTConfig

    @nn.compact
    def __call__(self, images, train: bool = False):
        c = self.config
        dtype = jnp.dtype(c.dtype)
        x = PatchEmbed(c.patch_size, c.dim, dtype, name="patch_embed")(images.astype(dtype))
        if c.posemb == "learnable":
            pos_embed = self.param("pos_embed", trunc_normal, (1, c.grid * c.grid, c.dim))
        else:
            pos_embed = convert.sincos_2d_pos_embed(c.grid, c.dim)  # fixed 2-D sin-cos, as MAE
        x = x + jnp.asarray(pos_embed, dtype)
        if c.pooling == "cls":
            cls_token = self.param("cls_token", trunc_normal, (1, 1, c.dim))
            x = jnp.concatenate([jnp.broadcast_to(cls_token.astype(dtype), (x.shape[0], 1, c.dim)), x], axis=1)
        x = nn.Dropout(c.dropout)(x, deterministic=not train)
        block = nn.remat(Block, static_argnums=(2,)) if c.grad_ckpt else Block
        for i in range(c.layers):
            x = block(c, name=f"blocks_{i}")(x, train)
        if c.pooling == "cls":
            x = layer_norm(dtype=dtype, name="norm")(x)[:, 0]
        else:
            x = layer_norm(dtype=dtype, name="fc_norm")(x.mean(axis=1))
        logits = nn.Dense(c.num_classes, dtype=dtype, kernel_init=trunc_normal, name="head")(x)
        return logits.astype(jnp.float32)


def model_config(args: argparse.Namespace, num_classes: int) -> ViTConfig:
    return ViTConfig(num_classes=num_classes, image_size=args.image_size, patch_size=args.patch_size,
                     layers=args.layers, dim=args.dim, heads=args.heads,
                     layerscale_init=args.layerscale_init if args.layerscale else None, posemb=args.posemb,
                     pooling=args.pooling, dropout=args.dropout, droppath=args.drop_path, grad_ckpt=args.grad_ckpt,
                     dtype=args.precision)


def train_flops_per_image(c: ViTConfig) -> float:
    """Matmul FLOPs of one training image: 3 passes (forward, 2x backward) x 2 FLOPs per multiply-add."""
    tokens = c.grid * c.grid + (c.pooling == "cls")
    macs = c.grid * c.grid * 3 * c.patch_size**2 * c.dim  # patch embedding
    macs += c.layers * tokens * (4 * c.dim * c.dim + 2 * c.mlp_ratio * c.dim * c.dim)  # qkv, proj, mlp
    macs += c.layers * 2 * tokens * tokens * c.dim  # q @ k and attn @ v
    macs += c.dim * c.num_classes
    return 6.0 * macs


# ----------------------------------------------------------------------------------------------
# Data: uint8 batches from PyTorch DataLoaders (timm transforms) or webdataset shards; normalisation,
# mixup/cutmix and random erasing run on the device inside the train step.
# ----------------------------------------------------------------------------------------------


def train_augmentation(args: argparse.Namespace) -> dict:
    """DeiT-III §3: 3-Augment + color jitter 0.3 on RRC (in1k) or simple random crop (in21k); for either --loader."""
    return dict(image_size=args.image_size, random_crop=args.random_crop, color_jitter=args.color_jitter,
                auto_augment=args.auto_augment)


# ----------------------------------------------------------------------------------------------
# Optimizer: LAMB as in timm/apex (the paper's), or AdamW; decoupled weight decay on weight matrices only.
# ----------------------------------------------------------------------------------------------


def make_optimizer(args: argparse.Namespace, schedule: optax.Schedule, params) -> optax.GradientTransformation:
    # LAMB as timm/apex (the paper's, §3: clip 1.0, trust ratio on weight matrices) or AdamW for fine-tuning.
    return optim.make_optimizer(args.optimizer, schedule, params, weight_decay=args.weight_decay, b1=args.adam_b1,
                                b2=args.adam_b2, eps=args.adam_eps, clip_norm=args.clip_grad,
                                layer_decay=args.lr_decay, depth=args.layers)


# ----------------------------------------------------------------------------------------------
# Loss, train step and eval step.
# ----------------------------------------------------------------------------------------------


def loss_fn(logits, targets, criterion: str):
    if criterion == "bce":
        return optax.sigmoid_binary_cross_entropy(logits, targets).mean()
    return optax.softmax_cross_entropy(logits, targets).mean()


def make_targets(args: argparse.Namespace, rng, images, labels, num_classes: int):
    """Mixup/cutmix on the device; DeiT-III's BCE takes the binarised mixed targets (every class in the mix is 1)."""
    bce = args.criterion == "bce"
    smoothing = 0.0 if bce else args.label_smoothing
    if args.mixup > 0 or args.cutmix > 0:
        images, targets = jax_augment.mixup_cutmix(rng, images, labels, num_classes, mixup_alpha=args.mixup,
                                               cutmix_alpha=args.cutmix, label_smoothing=smoothing)
    else:
        targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)
    if bce:
        targets = (targets > 0).astype(jnp.float32)
        if args.label_smoothing > 0:
            targets = targets * (1 - args.label_smoothing) + args.label_smoothing / num_classes
    return images, targets


def make_train_step(args: argparse.Namespace, model: VisionTransformer, optimizer, schedule, num_classes: int,
                    base_keys: dict):
    def step_fn(state, batch):
        step = state["step"]
        mix_key, erase_key = jax.random.split(jax.random.fold_in(base_keys["mixup"], step))
        images = jax_augment.normalize(batch["image"])
        images, targets = make_targets(args, mix_key, images, batch["label"], num_classes)
        if args.random_erasing > 0:
            images = jax_augment.random_erasing(erase_key, images, args.random_erasing)

        def micro_loss(params, micro_images, micro_targets, micro_index):
            keys = jax.random.split(jax.random.fold_in(jax.random.fold_in(base_keys["dropout"], step), micro_index))
            logits = model.apply({"params": params}, micro_images, train=True,
                                 rngs={"dropout": keys[0], "droppath": keys[1]})
            return loss_fn(logits, micro_targets, args.criterion)

        loss, grads = loop.accumulate_gradients(jax.value_and_grad(micro_loss), state["params"], (images, targets),
                                                args.grad_accum)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": schedule(step)}
        return {"params": params, "opt_state": opt_state, "step": step + 1}, metrics

    return step_fn


def make_eval_step(model: VisionTransformer):
    def eval_fn(params, batch):
        logits = model.apply({"params": params}, jax_augment.normalize(batch["image"]), train=False)
        return loop.classification_totals(logits, batch["label"])

    return eval_fn


# ----------------------------------------------------------------------------------------------
# Initialisation: from scratch, or from a pretrained checkpoint at a new resolution / label set.
# ----------------------------------------------------------------------------------------------


def init_params(model: VisionTransformer, args: argparse.Namespace):
    images = jnp.zeros((1, args.image_size, args.image_size, 3), jnp.float32)
    return jax.jit(model.init)(jax.random.PRNGKey(args.init_seed), images)["params"]


def load_pretrained(params, args: argparse.Namespace):
    """Copy a pretrained checkpoint into `params`: pos-emb resized bicubically to the new grid (DeiT-III
    fine-tuning at 224 after pretraining at 192), head remapped with --label-mapping (in21k -> in1k) or
    left freshly initialised when the number of classes differs."""
    if args.pretrained_ckpt.endswith(".msgpack"):
        source, _ = read_deit3_jax_checkpoint(args.pretrained_ckpt)
    else:
        source, _ = checkpoint.load_params_and_config(args.pretrained_ckpt, which="last")
    source = dict(source)
    target_grid = args.image_size // args.patch_size
    num_classes = np.shape(params["head"]["kernel"])[1]
    if "pos_embed" in source and "pos_embed" in params and source["pos_embed"].shape != params["pos_embed"].shape:
        source["pos_embed"] = convert.resize_pos_embed(source["pos_embed"], target_grid)
    if args.label_mapping:
        source["head"] = map_head(source["head"], params["head"], args.label_mapping)
    elif np.shape(source["head"]["kernel"]) != np.shape(params["head"]["kernel"]):
        print(f"note: the pretrained head has {np.shape(source['head']['kernel'])[1]} classes and this run "
              f"{num_classes}: the head starts from scratch", file=sys.stderr)
        source["head"] = params["head"]

    def take(path, new):
        name, old = "/".join(k.key for k in path), source
        for key in path:
            old = old.get(key.key) if isinstance(old, dict) else None
        if old is None:
            raise UserError(f"--pretrained-ckpt {args.pretrained_ckpt} has no parameter {name}")
        if np.shape(old) != np.shape(new):
            raise UserError(f"--pretrained-ckpt {args.pretrained_ckpt}: {name} has shape {np.shape(old)}, "
                            f"this model {np.shape(new)}")
        return jnp.asarray(old, new.dtype)

    return jax.tree_util.tree_map_with_path(take, params)


def map_head(source_head: dict, target_head: dict, mapping_file: str) -> dict:
    """Reuse the classifier columns of a pretrained head (in21k -> in1k). The file holds [[src, dst], ...] or
    deit3-jax's {"src": [...], "dst": [...]}; unmapped columns get kernel 0 and bias -10 (deit3-jax)."""
    try:
        with open(mapping_file) as f:
            mapping = json.load(f)
        pairs = list(zip(mapping["src"], mapping["dst"])) if isinstance(mapping, dict) else [tuple(p) for p in mapping]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--label-mapping {mapping_file} is not a list of [src, dst] pairs: {e}") from None
    source_kernel, source_bias = np.asarray(source_head["kernel"]), np.asarray(source_head["bias"])
    kernel = np.zeros(np.shape(target_head["kernel"]), np.float32)
    bias = np.full(np.shape(target_head["bias"]), -10.0, np.float32)
    for src, dst in pairs:
        if not (0 <= src < source_bias.shape[0] and 0 <= dst < bias.shape[0]):
            raise UserError(f"--label-mapping pair [{src}, {dst}] is out of range for heads of "
                            f"{source_bias.shape[0]} and {bias.shape[0]} classes")
        kernel[:, dst] = source_kernel[:, src]
        bias[dst] = source_bias[src]
    return {"kernel": kernel, "bias": bias}


def read_deit3_jax_checkpoint(path: str) -> tuple[dict, dict]:
    """A deit3-jax `.msgpack` checkpoint (flax.serialization of its params: model/embed/wte, model/layer_3/attn/wq,
    ...) as this model's params (timm's names), and the architecture it implies (the config that
    scripts/convert_flax_to_timm.py needs). deit3-jax's qkv are three (dim, heads, head_dim) kernels, its MLP uses
    the tanh GELU (here and in timm the exact one: logits differ by ~1e-3), and its gap pooling normalises before
    the mean (here fc_norm after it), so only its cls-token models are taken."""
    from flax import serialization

    try:
        with open(path, "rb") as f:
            tree = serialization.msgpack_restore(f.read())
        model = tree.get("model", tree)
        embed, layers = model["embed"], sorted(int(k.split("_")[1]) for k in model if k.startswith("layer_"))
        if "cls_token" not in embed or "wpe" not in embed:
            raise UserError(f"{path}: only deit3-jax models with --pooling cls and --posemb learnable load here")
        kernel = np.asarray(embed["wte"]["kernel"])
        patch_size, dim = kernel.shape[0], kernel.shape[-1]
        params = {"patch_embed": {"proj": embed["wte"]}, "cls_token": embed["cls_token"],
                  "pos_embed": np.reshape(embed["wpe"], (1, -1, dim)), "norm": model["norm"]}
        for i in layers:
            layer, attn = model[f"layer_{i}"], model[f"layer_{i}"]["attn"]
            qkv = [attn[name] for name in ("wq", "wk", "wv")]
            params[f"blocks_{i}"] = {
                "norm1": layer["norm1"], "norm2": layer["norm2"],
                "mlp": {"fc1": layer["ff"]["w1"], "fc2": layer["ff"]["w2"]},
                "attn": {"qkv": {"kernel": np.concatenate([np.reshape(w["kernel"], (dim, dim)) for w in qkv], axis=1),
                                 "bias": np.concatenate([np.ravel(w["bias"]) for w in qkv])},
                         "proj": {"kernel": np.reshape(attn["wo"]["kernel"], (dim, dim)), "bias": attn["wo"]["bias"]}}}
            if "scale1" in layer:
                params[f"blocks_{i}"].update(ls1={"gamma": layer["scale1"]}, ls2={"gamma": layer["scale2"]})
        if "head" in model:
            params["head"] = model["head"]
        config = dict(image_size=int(np.shape(embed["wpe"])[0] * patch_size), patch_size=int(patch_size), dim=int(dim),
                      layers=len(layers), heads=int(np.shape(model["layer_0"]["attn"]["wq"]["kernel"])[1]),
                      num_classes=len(model["head"]["bias"]) if "head" in model else 0, pooling="cls",
                      layerscale="scale1" in model["layer_0"], layerscale_init=1e-4, no_embed_class=True)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise UserError(f"{path} is not a deit3-jax checkpoint: {type(e).__name__}: {e}") from None
    return jax.tree_util.tree_map(np.asarray, params), config


def timm_export(path: Path, *, which: str = "last", ema: bool = False, arch: str | None = None) -> convert.TimmExport:
    """scripts/convert_to_timm.py's rule: a run's params (or a deit3-jax .msgpack) as timm's deit3_* / vit_* model."""
    if ema:
        raise UserError("DeiT-III keeps no EMA of its weights")
    if Path(path).suffix == ".msgpack":
        params, config = read_deit3_jax_checkpoint(str(path))
    else:
        params, config = checkpoint.load_params_and_config(path, which=which)
    return convert.flax_params_to_timm(params, config, arch)


# ----------------------------------------------------------------------------------------------
# The loop: one Mesh over all devices of all hosts, state replicated, batches sharded on 'data'.
# ----------------------------------------------------------------------------------------------


def setup(args: argparse.Namespace):
    """Mesh, model, lr schedule and initial state (replicated on every device) of a run."""
    dist.initialize()
    mesh = dist.data_mesh()
    loop.check_batch_sizes(args.batch_size, args.eval_batch_size, mixing=args.mixup > 0 or args.cutmix > 0)
    spec = data.describe(args.data, num_classes=args.num_classes)
    config = model_config(args, spec.num_classes)
    model = VisionTransformer(config)

    steps_per_epoch, total_steps, warmup_steps = loop.run_length(
        spec, args.batch_size, epochs=args.epochs, warmup_epochs=args.warmup_epochs,
        training_steps=args.training_steps, warmup_steps=args.warmup_steps, benchmark=args.benchmark)
    peak_lr = schedules.scaled_lr(args.lr, args.batch_size, args.lr_ref_batch)
    schedule = schedules.warmup_cosine(peak_lr, total_steps, warmup_steps, warmup_lr=args.warmup_lr,
                                       min_lr=args.min_lr)

    params = init_params(model, args)
    if args.pretrained_ckpt and not args.eval_only:
        params = load_pretrained(params, args)
    optimizer = make_optimizer(args, schedule, params)
    state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}
    state = jax.device_put(state, dist.replicated(mesh))
    run_config = dict(vars(args), **run_record("deit3_jax.py", args), num_classes=spec.num_classes, peak_lr=peak_lr,
                      total_steps=total_steps, warmup_steps=warmup_steps, steps_per_epoch=steps_per_epoch,
                      devices=jax.device_count(), processes=jax.process_count(),
                      device_kind=jax.devices()[0].device_kind,
                      params=sum(x.size for x in jax.tree_util.tree_leaves(params)))
    return mesh, model, config, optimizer, schedule, state, run_config


def run(args: argparse.Namespace) -> dict:
    if args.benchmark_input:  # the host input pipeline alone: no model, nothing written
        return loop.benchmark_input(args.data, train_augmentation(args), global_batch=args.batch_size,
                                    workers=args.workers, steps=args.benchmark_steps, seed=args.shuffle_seed,
                                    repeats=args.augment_repeats, loader=args.loader, model=args.model,
                                    image_size=args.image_size)
    mesh, model, config, optimizer, schedule, state, run_config = setup(args)
    loader = loop.loader_choice(args.loader, train_augmentation(args))
    num_classes, total_steps = config.num_classes, run_config["total_steps"]
    base_keys = {"mixup": jax.random.PRNGKey(args.mixup_seed), "dropout": jax.random.PRNGKey(args.dropout_seed)}
    state_sharding = jax.tree_util.tree_map(lambda x: x.sharding, state)
    train_step = jax.jit(make_train_step(args, model, optimizer, schedule, num_classes, base_keys),
                         out_shardings=(state_sharding, dist.replicated(mesh)), donate_argnums=0)
    stream = functools.partial(loop.train_stream, args.data, train_augmentation(args), mesh,
                               global_batch=args.batch_size, seed=args.shuffle_seed, repeats=args.augment_repeats,
                               workers=args.workers, image_size=args.image_size, num_classes=num_classes,
                               loader=loader)  # batches from a given step
    if args.benchmark:
        batch = loop.synthetic_batch(mesh, args.batch_size, args.image_size, num_classes, 0)
        real = None if args.data == "synthetic" else stream(start_step=0)  # end to end, beside the device alone
        return loop.benchmark(train_step, state, batch, steps=args.benchmark_steps, global_batch=args.batch_size,
                              batches=real, train_flops_per_image=train_flops_per_image(config), model=args.model,
                              image_size=args.image_size, dtype=args.precision)

    eval_step = jax.jit(make_eval_step(model), out_shardings=dist.replicated(mesh))

    def evaluate(state) -> dict:
        batches = loop.eval_stream(args.data, image_size=args.image_size, crop_ratio=args.test_crop_ratio,
                                   global_batch=args.eval_batch_size, workers=args.workers, loader=loader)
        return loop.evaluate(eval_step, {"val_": state["params"]}, batches, mesh)

    if args.eval_only:  # an existing run's config.json and checkpoints stay as they are
        with checkpoint.Checkpointer(args.output_dir) as ckpt:
            if args.pretrained_ckpt:
                state["params"] = jax.device_put(load_pretrained(state["params"], args), dist.replicated(mesh))
            else:
                state, _ = ckpt.restore(state)
            return loop.report_eval(args.output_dir, int(state["step"]), evaluate(state), wandb=args.wandb,
                                    tensorboard=args.tensorboard)
    with loop.open_run(args.output_dir, resume=args.resume, recipe=run_config["trained_by"],
                       settings=vars(args)) as ckpt:  # waits for pending writes, also on errors
        state, meta = loop.restore_or_start(ckpt, state, resume=args.resume)
        log = RunLog(args.output_dir, run_config, start_step=int(state["step"]), wandb_project=args.wandb,
                     tensorboard=args.tensorboard)
        start_step, steps_per_epoch = int(state["step"]), run_config["steps_per_epoch"]
        say(f"{run_config['params'] / 1e6:.1f}M params, {total_steps} steps ({steps_per_epoch}/epoch), peak lr "
            f"{run_config['peak_lr']:g}, {jax.device_count()} device(s) on {jax.process_count()} host(s), starting at "
            f"step {start_step}", main=dist.is_main_process())
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
                    top1 = results.get("val_top1", -1.0)
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

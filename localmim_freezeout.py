"""LocalMIM (Wang et al., CVPR 2023, "Masked Image Modeling with Local Multi-Scale Reconstruction") with FreezeOut
(Brock et al. 2017, "FreezeOut: Accelerate Training by Progressively Freezing Layers"), plus MAE's fine-tuning and
linear probing and DINO's kNN evaluation, in PyTorch on timm's VisionTransformer.

    python localmim_freezeout.py pretrain --data /path/to/imagenet --output-dir runs/localmim/b16_100ep
    torchrun --nproc_per_node=8 localmim_freezeout.py pretrain ... --how-scale cubic --t0 0.8   # with FreezeOut
    python localmim_freezeout.py finetune --pretrained runs/localmim/b16_100ep --data ... --output-dir ...
    python localmim_freezeout.py linprobe --pretrained runs/localmim/b16_100ep --data ... --output-dir ...
    python localmim_freezeout.py knn --pretrained runs/localmim/b16_100ep --data ... --output-dir ...
    python localmim_freezeout.py export runs/localmim/b16_100ep       # -> timm_model.pth / .safetensors
    python localmim_freezeout.py pretrain --data synthetic --benchmark --benchmark-frozen 0 0.25 0.5 0.75

The recipe in one paragraph (paper §3-4 and the official models_mim.py): MAE's encoder (sin-cos position embedding,
75% of the patches masked, cls token) with a LayerNorm on the outputs of blocks 2, 4, 10 and 12 (ViT-B), each
followed by its own light decoder (one 256-d transformer block) that reconstructs the masked regions at its own
scale: HOG histograms of 4, 8, 16 and 32 px cells (56², 28², 14², 7² targets; 9 bins, ViT-L 18 bins and an untrained
random bias in the HOG convolution, `--hog-bias`). The four losses are summed with equal weights. MAE's optimiser:
AdamW (0.9, 0.95), wd 0.05 except biases and norms, lr = blr · batch / 256, linear warmup then half-cosine per
iteration, mixed precision, no gradient clipping.

FreezeOut (paper §2; the study notes in shared/reference/pytorch_recipes.md): layer i (patch embedding 0, block b at
b + 1) trains with its own cosine over the first t_i of the post-warmup iterations, t_i = scale(t0 + (1 - t0) i / L),
then leaves the optimizer. The frozen prefix of the encoder runs under `torch.no_grad()` (the cls token freezes with
the patch embedding, so no gradient has to flow back through it), and a stage whose tapped block is frozen is dropped
with its decoder and target: the backward pass and the optimizer step really shrink.

Batch and lr: `--batch-size` is the global batch (all processes x `--grad-accum`); MAE's per-process `--batch_size`
(= `--batch-size-per-process`) is accepted instead, and `--lr` is MAE's base lr at batch 256 (`--blr`), so the
study's command lines (underscore flags, `--world_size`, `--log_dir`, the launcher's `--local_rank`) run unchanged.
File order: flags and presets, model, FreezeOut, data, loss and train steps, loops, evaluation (kNN), benchmark,
export, main.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.random_erasing import RandomErasing
from timm.layers import LayerNorm2d, trunc_normal_
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models.vision_transformer import Block, VisionTransformer
from timm.optim import Lars, param_groups_layer_decay
from torch import nn

from common import UserError, augment, convert, data, gpu_input, run
from common import torch_run as tr
from common.run import ArgumentParser, exit_status, make_output_dir, run_record, saved_config
from common.runlog import RunLog

RECIPE = "localmim_freezeout.py"

# ----------------------------------------------------------------------------------------------
# Flags and presets.
# ----------------------------------------------------------------------------------------------

# MAE / LocalMIM model names (models_mim.py, models_vit.py): width, depth, heads, patch size. MLP ratio 4.
MODELS = {
    "vit_tiny_patch16": dict(dim=192, layers=12, heads=3, patch_size=16),
    "vit_small_patch16": dict(dim=384, layers=12, heads=6, patch_size=16),
    "vit_base_patch16": dict(dim=768, layers=12, heads=12, patch_size=16),
    "vit_large_patch16": dict(dim=1024, layers=24, heads=16, patch_size=16),
    "vit_huge_patch14": dict(dim=1280, layers=32, heads=16, patch_size=14),
}
# LocalMIM models_mim.py: blocks [1, 3, depth - 3, depth - 1] (0-based) reconstruct at scales 4, 2, 1, 0.5 of the
# patch grid (ViT-B/16 at 224: 56², 28², 14², 7² targets, HOG cells of 4, 8, 16, 32 px).
STAGE_SCALES = (4.0, 2.0, 1.0, 0.5)
FREEZEOUT_SCALINGS = {"linear": lambda x: x, "squared": lambda x: x**2, "cubic": lambda x: x**3}
MEAN, STD = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # the targets are computed on the normalised image, as upstream
# Flags that switch FreezeOut on when given (the study's command lines have no separate switch).
FREEZEOUT_FLAGS = ("how_scale", "t0", "not_scale_lr", "non_layerwise_lr", "dont_freeze_pe")
DEFAULT_BATCH_PER_PROCESS = 64
MAE_LR_REF_BATCH = 256  # MAE: lr = blr x effective batch / 256


class AbsoluteLr(argparse.Action):
    """--lr X: MAE's absolute lr, unless --lr-ref-batch (given before) says at which batch it is."""

    def __call__(self, parser, namespace, value, option_string=None):
        namespace.lr = value
        if namespace.lr_ref_batch is None:
            namespace.lr_ref_batch = 0


class BaseLr(argparse.Action):
    """--blr X (MAE's base lr): --lr X at batch 256, scaled linearly to the global batch (lr = blr x batch / 256)."""

    def __call__(self, parser, namespace, value, option_string=None):
        namespace.lr, namespace.lr_ref_batch = value, MAE_LR_REF_BATCH


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="LocalMIM with FreezeOut, fine-tuning, linear probe and kNN",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    tr.add_launcher_flags(parser)  # torch.distributed.launch puts --local-rank=N before the command
    commands = parser.add_subparsers(dest="command", required=True)
    helps = {"pretrain": "LocalMIM pretraining (optionally with FreezeOut)",
             "finetune": "MAE fine-tuning of a pretrained encoder (layer decay, mixup/cutmix, RandAugment)",
             "linprobe": "MAE linear probing of a frozen encoder (BatchNorm + linear head, LARS)",
             "knn": "DINO's weighted kNN on L2-normalised CLS features"}
    for name, text in helps.items():
        p = commands.add_parser(name, help=text, description=text,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        add_run_flags(p, name)
        add_model_flags(p, name)
        if name == "pretrain":
            add_pretrain_flags(p)
        elif name == "knn":
            add_knn_flags(p)
        else:
            add_supervised_flags(p, name)
    p = commands.add_parser("export", help="write a run's encoder (or classifier) as a timm state dict")
    p.add_argument("run_dir", help="a run's --output-dir or one checkpoint file")
    p.add_argument("--out", help="output .pth path (default RUN_DIR/timm_model.pth); .safetensors is written beside it")
    return parser


def add_run_flags(p: argparse.ArgumentParser, command: str) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--data", "--data-path", "--data_path", default="digits",
                   help="ImageNet-layout folder, webdataset shards, cifar10, cifar100, digits or synthetic")
    g.add_argument("--output-dir", "--output_dir", default=f"runs/localmim/{command}",
                   help="config.json, log.jsonl, command.txt and checkpoints go here")
    g.add_argument("--workers", "--num_workers", type=int, default=tr.default_workers(),
                   help="data loader processes per process")
    g.add_argument("--seed", type=int, default=0, help="initial weights, data order, augmentation, masks")
    g.add_argument("--precision", choices=list(tr.AUTOCAST_DTYPES), default="bf16",
                   help="autocast dtype on GPUs; fp16 (the papers' V100 setting) adds the loss scaler; CPUs compute "
                        "in float32")
    batch = g.add_mutually_exclusive_group()
    batch.add_argument("--batch-size", type=int, default=None,
                       help="global batch: all processes x --grad-accum (or give --batch-size-per-process)")
    batch.add_argument("--batch-size-per-process", "--batch_size", type=int, default=None,
                       help=f"MAE's --batch_size: per process and micro-batch, so that the global batch is it x "
                            f"processes x --grad-accum (default {DEFAULT_BATCH_PER_PROCESS} without --batch-size)")
    g.add_argument("--world-size", "--world_size", type=int, default=None,
                   help="MAE's: the number of processes, refused when the launcher started another number")
    g.add_argument("--test-crop-ratio", "--crop-pct", type=float, default=224 / 256,
                   help="eval: resize to size / ratio, center crop")
    if command != "knn":  # kNN reads both splits with the eval transform on the host
        tr.add_loader_flag(p)
    tr.add_launcher_flags(p)
    if command == "knn":
        return
    g.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    g.add_argument("--stop-after", type=int, default=0,
                   help="save and exit after this many optimizer steps of this invocation (0: run to the end)")
    g.add_argument("--save-every", type=int, default=50 if command == "pretrain" else 20,
                   help="also keep the weights every this many epochs in epochs/<epoch>.pt (MAE: 50 pretraining, "
                        "20 fine-tuning); checkpoints/ always holds the last epoch, for --resume")
    g.add_argument("--log-interval", type=int, default=50, help="optimizer steps between log lines")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on with CUDA; --no-compile: eager)")
    g.add_argument("--random-crop", choices=["rrc", "none"], default="rrc",
                   help=f"rrc: RandomResizedCrop, area {20 if command == 'pretrain' else 8}-100%% (MAE); none: resize "
                        "+ center crop (tiny images such as digits)")
    g.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability")
    g.add_argument("--wandb", default=None, metavar="PROJECT", help="also log to Weights & Biases (if installed)")
    g.add_argument("--tensorboard", "--log_dir", "--log-dir", nargs="?", const=True, default=None, metavar="DIR",
                   help="also log to TensorBoard (if installed): into OUTPUT_DIR/tensorboard, or DIR (LocalMIM's "
                        "--log_dir DIR)")
    g.add_argument("--benchmark-input", action="store_true",
                   help="time the input pipeline alone (--data, --workers, the global batch) over --benchmark-steps "
                        "batches, print JSON and exit")
    g.add_argument("--benchmark-steps", type=int, default=20, help="batches or steps timed by a benchmark")

    g = p.add_argument_group("optimizer and schedule")
    defaults = {"pretrain": (1.5e-4, 0.05, 400, 40, 1e-6), "finetune": (1e-3, 0.05, 100, 5, 1e-6),
                "linprobe": (0.1, 0.0, 90, 10, 0.0)}[command]  # MAE main_pretrain / main_finetune / main_linprobe
    g.add_argument("--grad-accum", "--accum-iter", "--accum_iter", type=int, default=1,
                   help="micro-batches per optimizer step")
    g.add_argument("--epochs", type=int, default=defaults[2])
    g.add_argument("--training-steps", type=int, default=0,
                   help="if > 0, the run's length in steps instead of --epochs (the schedule follows it; epoch records "
                        "and epochs/ weights stay at the ends of whole epochs)")
    g.add_argument("--warmup-epochs", "--warmup_epochs", type=float, default=defaults[3],
                   help="linear warmup from 0, per iteration")
    g.add_argument("--lr", type=float, default=defaults[0], action=AbsoluteLr,
                   help="peak lr at batch --lr-ref-batch: the lr used is LR x global batch / --lr-ref-batch. Given "
                        "alone it is absolute, as MAE's --lr; the default is MAE's base lr, at 256")
    g.add_argument("--blr", type=float, action=BaseLr, help="MAE's base lr: --blr X is --lr X --lr-ref-batch 256")
    g.add_argument("--lr-ref-batch", type=int, help="the batch --lr is given at; 0: absolute (default: 256 for the "
                                                    "default lr and --blr, 0 for --lr)")
    g.add_argument("--min-lr", "--min_lr", type=float, default=defaults[4], help="end of the half-cosine")
    g.add_argument("--weight-decay", "--weight_decay", "--wd", type=float, default=defaults[1],
                   help="not on biases and norm parameters")


def add_model_flags(p: argparse.ArgumentParser, command: str) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="vit_base_patch16",
                   help=f"{', '.join(MODELS)} (LocalMIM's MIM_ prefix is accepted)")
    g.add_argument("--image-size", "--input-size", "--input_size", type=int, default=224)
    g.add_argument("--patch-size", type=int, help="override the model's patch size")
    g.add_argument("--depth", type=int, help="override the model's number of blocks")
    g.add_argument("--embed-dim", type=int, help="override the model's width")
    g.add_argument("--num-heads", type=int, help="override the model's number of heads")
    if command != "pretrain":
        g.add_argument("--pretrained", "--finetune", default=None,
                       help="encoder weights: a pretrain run dir or checkpoint of this script, a timm state dict "
                            "(.pth / .safetensors, e.g. from `export`), an official MAE/LocalMIM checkpoint, or "
                            "'random' (MAE's initialisation: the random-features baseline)")


def add_pretrain_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LocalMIM")
    g.add_argument("--mask-ratio", "--mask_ratio", type=float, default=0.75)
    g.add_argument("--target", choices=["hog", "pixels"], default="hog",
                   help="hog: per-cell histograms of oriented gradients (the paper's); pixels: the cell's pixels, "
                        "normalised per cell (MAE's norm_pix_loss)")
    g.add_argument("--hog-nbins", "--hog_nbins", type=int, default=9,
                   help="orientation bins per colour channel (paper: 9 for ViT-B, 18 for ViT-L)")
    g.add_argument("--hog-bias", "--hog_bias", action="store_true",
                   help="ViT-L's HOG (official README): each stage's Sobel convolution has a bias, drawn once from "
                        "--seed with PyTorch's Conv2d init U(-1/3, 1/3) and never trained, added to gx and gy before "
                        "the magnitude and phase (models_mim.py HOGLayer(bias=True))")
    g.add_argument("--decoder-dim", type=int, default=256, help="paper: 256")
    g.add_argument("--decoder-heads", type=int, default=8, help="paper: 8")
    g.add_argument("--all-stages", "--all_stages", action="store_true",
                   help="the study's variant: a decoder on every block, scales [8,4,4,2,2,2,2,2,2,1,1,0.5] for 12 "
                        "blocks (each block takes the scale of the last paper tap at or before it)")

    g = p.add_argument_group("FreezeOut (on when --freezeout or any of these flags is given)")
    g.add_argument("--freezeout", action="store_true", help="progressively freeze the encoder")
    g.add_argument("--how-scale", "--how_scale", choices=list(FREEZEOUT_SCALINGS), default=None,
                   help="t_i = scale(t0 + (1 - t0) i / L) (default cubic)")
    g.add_argument("--t0", "--t_0", type=float, default=None,
                   help="given 'pre-scaled': cubic 0.8 freezes the first layer at 0.512 of training (default 0.8, "
                        "0.5 for linear)")
    g.add_argument("--scale-lr", "--scale_lr", dest="not_scale_lr", action="store_const", const=False, default=None,
                   help="layer i starts at lr / t_i: equal integrated lr (FreezeOut's default)")
    g.add_argument("--not-scale-lr", "--not_scale_lr", dest="not_scale_lr", action="store_const", const=True,
                   help="every layer starts at the base lr")
    g.add_argument("--non-layerwise-lr", "--non_layerwise_lr", action="store_const", const=True, default=None,
                   help="one cosine for all layers; layers still freeze at their t_i")
    g.add_argument("--dont-freeze-pe", "--dont_freeze_pe", action="store_const", const=True, default=None,
                   help="the patch embedding and cls token never freeze and blocks count from 0; gradients must then "
                        "flow back through frozen blocks, so only their weight gradients and optimizer work are saved")

    g = p.add_argument_group("benchmark")
    g.add_argument("--benchmark", action="store_true", help="time pretraining steps on device-made batches and exit")
    g.add_argument("--benchmark-frozen", type=float, nargs="+", default=[0.0],
                   help="fractions of the blocks to freeze (with the patch embedding), one timing each")


def add_supervised_flags(p: argparse.ArgumentParser, command: str) -> None:
    if command == "finetune":
        g = p.add_argument_group("fine-tuning (MAE main_finetune.py)")
        g.add_argument("--layer-decay", "--layer_decay", type=float, default=0.75)
        g.add_argument("--drop-path", "--drop_path", type=float, default=0.1, help="stochastic depth rate")
        g.add_argument("--clip-grad", "--clip_grad", type=float, default=None, help="global norm clip (default off)")
        g.add_argument("--label-smoothing", "--smoothing", type=float, default=0.1)
        g.add_argument("--mixup", type=float, default=0.8, help="mixup alpha (0: off)")
        g.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha (0: off)")
        g.add_argument("--auto-augment", "--aa", default="rand-m9-mstd0.5-inc1",
                       help="timm auto-augment policy ('none': off)")
        g.add_argument("--random-erasing", "--reprob", type=float, default=0.25,
                       help="random erasing probability (pixel mode)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--dist-eval", "--dist_eval", action="store_true",
                   help="each process evaluates its shard of the val set (default: every process evaluates all)")
    g.add_argument("--eval-only", action="store_true",
                   help="evaluate on val and exit: the last checkpoint of the run in --output-dir, else the model "
                        "--pretrained initialises; appends a record to the run's log.jsonl and writes nothing else")


def add_knn_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("kNN (DINO eval_knn.py)")
    g.add_argument("--nb-knn", "--nb_knn", type=int, nargs="+", default=[20], help="k values (DINO: 10 20 100 200)")
    g.add_argument("--temperature", type=float, default=0.07)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.command != "export":
        resolve_args(args, processes=int(os.environ.get("WORLD_SIZE", "1")))
    return args


def resolve_args(args: argparse.Namespace, processes: int) -> None:
    """Model name -> architecture, the batch over `processes`, FreezeOut defaults, sanity checks."""
    name = args.model.removeprefix("MIM_")
    if name not in MODELS:
        raise UserError(f"unknown model {args.model!r}; choose one of {', '.join(MODELS)}")
    args.model = name
    arch = dict(MODELS[name])
    for flag, key in (("patch_size", "patch_size"), ("depth", "layers"), ("embed_dim", "dim"), ("num_heads", "heads")):
        if getattr(args, flag) is not None:
            arch[key] = getattr(args, flag)
    args.arch = arch
    if args.world_size is not None and args.world_size != processes:
        raise UserError(f"--world-size {args.world_size} disagrees with the {processes} process(es) the launcher "
                        "started (WORLD_SIZE)")
    if args.batch_size is None and args.batch_size_per_process is None:
        args.batch_size_per_process = DEFAULT_BATCH_PER_PROCESS
    if getattr(args, "lr_ref_batch", 0) is None:  # the default lr is a base lr, as MAE's --blr
        args.lr_ref_batch = MAE_LR_REF_BATCH
    for name in ("batch_size", "batch_size_per_process", "image_size", "workers", "seed", "grad_accum", "epochs",
                 "log_interval", "save_every", "benchmark_steps", "decoder_dim", "hog_nbins"):
        value = getattr(args, name, 1)
        if value is not None and value < (0 if name in ("workers", "seed") else 1):
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.batch_size and args.batch_size % (processes * grad_accum(args)):
        raise UserError(f"--batch-size {args.batch_size} does not split over {processes} process(es) x --grad-accum "
                        f"{grad_accum(args)}")
    if args.image_size % arch["patch_size"]:
        raise UserError(f"--image-size {args.image_size} is not a multiple of the patch size {arch['patch_size']}")
    if args.command == "pretrain":
        resolve_pretrain_args(args)
    if args.command in ("finetune", "linprobe", "knn") and not args.pretrained and not getattr(args, "eval_only", 0):
        raise UserError(f"{args.command} needs --pretrained (a run dir, a checkpoint, or 'random')")


def resolve_pretrain_args(args: argparse.Namespace) -> None:
    args.freezeout = args.freezeout or any(getattr(args, name) is not None for name in FREEZEOUT_FLAGS)
    for name in ("not_scale_lr", "non_layerwise_lr", "dont_freeze_pe"):
        setattr(args, name, bool(getattr(args, name)))
    args.how_scale = args.how_scale or "cubic"
    if args.t0 is None:
        args.t0 = 0.5 if args.how_scale == "linear" else 0.8  # the study's defaults
    if not 0 < args.t0 <= 1:
        raise UserError(f"--t0 must be in (0, 1], got {args.t0}")
    if not 0 <= args.mask_ratio < 1:
        raise UserError(f"--mask-ratio must be in [0, 1), got {args.mask_ratio}")
    if args.hog_bias and args.target != "hog":
        raise UserError(f"--hog-bias is a bias of the HOG target's convolution: it needs --target hog, got "
                        f"--target {args.target}")
    if any(not 0 <= round(f * args.arch["layers"]) < args.arch["layers"] for f in args.benchmark_frozen):
        raise UserError("--benchmark-frozen takes fractions in [0, 1) that leave at least the last block trainable")
    grid = args.image_size // args.arch["patch_size"]
    for scale in stage_layout(args.arch["layers"], args.all_stages)[1]:  # raises on a depth without a layout
        cell = args.arch["patch_size"] / scale
        if cell != int(cell) or grid * scale != int(grid * scale):
            raise UserError(f"stage scale {scale} needs a patch size divisible by {1 / scale:g} and a patch grid "
                            f"divisible by {1 / scale:g} (patch {args.arch['patch_size']}, grid {grid})")


def stage_layout(depth: int, all_stages: bool) -> tuple[list[int], list[float]]:
    """(tapped blocks, scales): the paper's four stages, or the study's decoder on every block (--all-stages)."""
    if depth < 4:
        raise UserError(f"LocalMIM taps blocks 1, 3, depth-3 and depth-1: it needs at least 4 blocks, got {depth}")
    taps = [1, 3, depth - 3, depth - 1]
    if not all_stages:
        return taps, list(STAGE_SCALES)
    scales = []
    for block in range(depth):
        earlier = [s for t, s in zip(taps, STAGE_SCALES) if t <= block]
        scales.append(earlier[-1] if earlier else 2 * STAGE_SCALES[0])
    return list(range(depth)), scales


def grad_accum(args: argparse.Namespace) -> int:
    return getattr(args, "grad_accum", 1)  # kNN has no accumulation


def effective_batch(args: argparse.Namespace, processes: int) -> int:
    """The global batch of an optimizer step: --batch-size, or MAE's per-process batch x processes x --grad-accum."""
    return args.batch_size or args.batch_size_per_process * processes * grad_accum(args)


def micro_batch(args: argparse.Namespace, processes: int) -> int:
    """Images per process and micro-batch (MAE's --batch_size)."""
    return args.batch_size_per_process or args.batch_size // (processes * grad_accum(args))


def peak_lr(args: argparse.Namespace, processes: int) -> float:
    """MAE's rule lr = blr x global batch / 256 (--lr-ref-batch), or the absolute --lr with --lr-ref-batch 0."""
    return args.lr * effective_batch(args, processes) / args.lr_ref_batch if args.lr_ref_batch else args.lr


# ----------------------------------------------------------------------------------------------
# Model: timm's VisionTransformer as the encoder (its parameter names are the export format), MAE's initialisation,
# LocalMIM's per-stage norms and decoders, HOG and pixel targets.
# ----------------------------------------------------------------------------------------------


def vit_kwargs(config: dict[str, Any], num_classes: int, pooling: str = "cls") -> dict[str, Any]:
    """timm VisionTransformer kwargs from `common.convert.timm_kwargs`: qkv bias, LayerNorm eps 1e-6, a position
    embedding over the cls token too (MAE's layout, timm's vit_*). pooling 'avg' keeps the cls token and averages the
    patch tokens into fc_norm (MAE's global_pool fine-tuning)."""
    return convert.timm_kwargs(dict(config, num_classes=num_classes, pooling="gap" if pooling == "avg" else "cls",
                                    class_token=True), no_embed_class=False)


def arch_config(args: argparse.Namespace) -> dict[str, Any]:
    return dict(model=args.model, image_size=args.image_size, mlp_ratio=4.0, **args.arch)


def mae_init_(vit: VisionTransformer) -> None:
    """MAE's encoder init (models_mae.py initialize_weights): fixed sin-cos position embedding (zero cls row), xavier
    on the patch projection as a linear map and on every Linear, cls token N(0, 0.02), LayerNorm (1, 0)."""
    grid = vit.patch_embed.grid_size[0]
    with torch.no_grad():
        vit.pos_embed.copy_(torch.tensor(convert.sincos_2d_pos_embed(grid, vit.embed_dim, cls_rows=1)))
    weight = vit.patch_embed.proj.weight
    nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
    nn.init.normal_(vit.cls_token, std=0.02)
    vit.apply(_xavier_linear_init)


def _xavier_linear_init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def prediction_head(dim: int, out_dim: int, scale: float) -> nn.Sequential:
    """models_mim.py MAE_Decoder.pred: x4 = ConvT, channels-first LayerNorm, GELU, ConvT; x2 = ConvT; x1 = nothing;
    x0.5 = average pooling; then a 1x1 conv to the target channels. Convs keep PyTorch's default init."""
    if scale == 4:
        layers, hidden = [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), LayerNorm2d(dim // 2, eps=1e-6), nn.GELU(),
                          nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2)], dim // 4
    elif scale == 2:
        layers, hidden = [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2)], dim // 2
    elif scale == 1:
        layers, hidden = [], dim
    elif scale < 1:
        layers, hidden = [nn.AvgPool2d(round(1 / scale))], dim
    else:  # the study's x8 stage: one more upsampling step than x4
        layers, hidden = [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), LayerNorm2d(dim // 2, eps=1e-6), nn.GELU(),
                          nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2), LayerNorm2d(dim // 4, eps=1e-6),
                          nn.GELU(), nn.ConvTranspose2d(dim // 4, dim // 8, 2, stride=2)], dim // 8
    return nn.Sequential(*layers, nn.Conv2d(hidden, out_dim, 1))


class StageDecoder(nn.Module):
    """One LocalMIM decoder (models_mim.py MAE_Decoder, depth 1): Linear(D -> d), mask tokens, fixed sin-cos position
    embedding, one transformer block, LayerNorm, then the scale's prediction head over the patch grid."""

    def __init__(self, in_dim: int, dim: int, heads: int, out_dim: int, scale: float, grid: int):
        super().__init__()
        self.grid = grid
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", torch.tensor(convert.sincos_2d_pos_embed(grid, dim, cls_rows=1)),
                             persistent=False)
        self.block = Block(dim, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = prediction_head(dim, out_dim, scale)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(_xavier_linear_init)

    def forward(self, tokens: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        batch, patches = ids_restore.shape
        masked = self.mask_token.expand(batch, patches + 1 - x.shape[1], -1)
        x_patches = torch.cat([x[:, 1:], masked], dim=1)
        x_patches = x_patches.gather(1, ids_restore[..., None].expand(-1, -1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :1], x_patches], dim=1) + self.pos_embed
        x = self.norm(self.block(x))
        x = x[:, 1:].transpose(1, 2).reshape(batch, -1, self.grid, self.grid)
        return self.pred(x).flatten(2).transpose(1, 2)  # (B, cells, out_dim), cells in row-major order


SOBEL = ((1.0, 0.0, -1.0), (2.0, 0.0, -2.0), (1.0, 0.0, -1.0))


def hog_histograms(images: torch.Tensor, nbins: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, nbins, H, W): each pixel's gradient magnitude in its orientation bin, per channel.

    models_mim.py HOGLayer: 3x3 Sobel filters with reflect padding (gx = [[1,0,-1],[2,0,-2],[1,0,-1]] as a
    cross-correlation, gy its transpose) plus the convolution's bias (bias[0] on gx, bias[1] on gy; --hog-bias),
    magnitude ||(gx, gy)||, phase atan2(gx, gy), hard unsigned binning floor(phase / pi * nbins) mod nbins."""
    batch, channels, height, width = images.shape
    x = F.pad(images.reshape(batch * channels, 1, height, width).float(), (1, 1, 1, 1), mode="reflect")
    kernel = torch.tensor(SOBEL, device=images.device)
    gxy = F.conv2d(x, torch.stack([kernel, kernel.t()])[:, None], bias)  # (BC, 2, H, W)
    gx, gy = gxy[:, 0], gxy[:, 1]
    magnitude = (gx * gx + gy * gy).sqrt()[:, None]
    phase = torch.atan2(gx, gy)
    bins = torch.floor(phase / math.pi * nbins).long().remainder(nbins)[:, None]
    hist = torch.zeros(batch * channels, nbins, height, width, device=images.device).scatter_(1, bins, magnitude)
    return hist.view(batch, channels, nbins, height, width)


def hog_conv_bias() -> torch.Tensor:
    """The bias of models_mim.py's HOGLayer(bias=True) convolution, nn.Conv2d(1, 2, 3): PyTorch's default init
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = 1 x 3 x 3, drawn from the global generator as that layer draws it
    (its weight first, then overwritten by the Sobel filters), never trained. (2,): the gx and gy biases."""
    return nn.Conv2d(1, 2, 3).bias.detach().clone()


def hog_target(hist: torch.Tensor, cell: int) -> torch.Tensor:
    """Per-pixel histograms -> (B, cells, C * nbins): mean over each cell x cell block (kernel = stride = cell),
    L2-normalised over the bins of each colour channel, channels concatenated (R bins, G bins, B bins)."""
    batch, channels, nbins, height, width = hist.shape
    pooled = F.avg_pool2d(hist.view(batch, channels * nbins, height, width), cell)
    pooled = F.normalize(pooled.view(batch, channels, nbins, *pooled.shape[-2:]), dim=2)
    return pooled.flatten(1, 2).flatten(2).transpose(1, 2)


def pixel_target(images: torch.Tensor, cell: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, cells, cell * cell * C), each cell's pixels normalised to zero mean and unit variance
    (MAE patchify + norm_pix_loss)."""
    batch, channels, height, width = images.shape
    x = images.float().reshape(batch, channels, height // cell, cell, width // cell, cell)
    x = x.permute(0, 2, 4, 3, 5, 1).reshape(batch, (height // cell) * (width // cell), cell * cell * channels)
    return (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True) + 1e-6).sqrt()


def random_masking(x: torch.Tensor, noise: torch.Tensor, keep: int) -> tuple[torch.Tensor, ...]:
    """MAE's per-sample shuffle: keep the `keep` patches of lowest noise. Returns kept tokens, the mask (1 = removed)
    in patch order, and the indices that undo the shuffle."""
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    kept = x.gather(1, ids_shuffle[:, :keep, None].expand(-1, -1, x.shape[-1]))
    mask = torch.ones_like(noise)
    mask[:, :keep] = 0
    return kept, mask.gather(1, ids_restore), ids_restore


def stage_mask(mask: torch.Tensor, grid: int, scale: float) -> torch.Tensor:
    """The patch mask at a stage's resolution (models_mim.py recal_mask): nearest upsampling for scale >= 1, the mean
    over scale^-1 x scale^-1 patches below (fractional weights)."""
    m = mask.view(-1, grid, grid)
    if scale >= 1:
        s = int(scale)
        return m.repeat_interleave(s, 1).repeat_interleave(s, 2).flatten(1)
    s = round(1 / scale)
    return m.view(-1, grid // s, s, grid // s, s).mean((2, 4)).flatten(1)


class LocalMIM(nn.Module):
    """Encoder (`encoder`: timm's VisionTransformer, no head, its `norm` being the last stage's), the other stages'
    LayerNorms (`stage_norms`), one decoder per stage (`decoders`) and, with --hog-bias, each stage's HOG bias
    (`hog_bias`, (stages, 2))."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.encoder = VisionTransformer(**vit_kwargs(config, num_classes=0))
        mae_init_(self.encoder)
        self.encoder.pos_embed.requires_grad_(False)  # fixed sin-cos
        self.taps, self.scales = stage_layout(config["layers"], config["all_stages"])
        self.grid = config["image_size"] // config["patch_size"]
        self.keep = int(self.grid**2 * (1 - config["mask_ratio"]))
        self.target, self.nbins, self.patch_size = config["target"], config["hog_nbins"], config["patch_size"]
        dim = config["dim"]
        self.stage_norms = nn.ModuleList([nn.LayerNorm(dim, eps=1e-6) for _ in self.taps[:-1]])
        self.decoders = nn.ModuleList([
            StageDecoder(dim, config["decoder_dim"], config["decoder_heads"], self.target_dim(scale), scale,
                         self.grid) for scale in self.scales])
        # models_mim.py builds one HOGLayer per stage after the decoders (hog_enc), each with its own random bias
        # under --hog_bias. Drawn here from the run's seed and kept as a buffer: saved in every checkpoint and
        # restored on --resume; not an encoder tensor, so `export` and --pretrained leave it out. Runs from before
        # --hog-bias have no key in their config.
        hog_bias = [hog_conv_bias() for _ in self.scales] if config.get("hog_bias") else None
        self.register_buffer("hog_bias", torch.stack(hog_bias) if hog_bias else None)

    def cell(self, scale: float) -> int:
        return round(self.patch_size / scale)

    def target_dim(self, scale: float) -> int:
        return 3 * self.nbins if self.target == "hog" else 3 * self.cell(scale) ** 2

    def norm_of(self, stage: int) -> nn.Module:
        return self.encoder.norm if stage == len(self.taps) - 1 else self.stage_norms[stage]

    def forward_encoder(self, images: torch.Tensor, noise: torch.Tensor, active: list[bool],
                        no_grad_units: int) -> tuple[dict[int, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Masked encoder. Units: 0 = patch embedding + cls token, b + 1 = block b; the first `no_grad_units` run
        without autograd (the frozen prefix). Returns {stage: normalised tokens} of the active stages, the mask and
        the unshuffle indices."""
        encoder, grad = self.encoder, torch.is_grad_enabled()
        with torch.set_grad_enabled(grad and no_grad_units < 1):
            x = encoder.patch_embed(images) + encoder.pos_embed[:, 1:]
            x, mask, ids_restore = random_masking(x, noise, self.keep)
            cls = (encoder.cls_token + encoder.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
            x = torch.cat([cls, x], dim=1)
        latents = {}
        for index, block in enumerate(encoder.blocks):
            with torch.set_grad_enabled(grad and no_grad_units < index + 2):
                x = block(x)
            for stage, tap in enumerate(self.taps):
                if tap == index and active[stage]:
                    latents[stage] = self.norm_of(stage)(x)
        return latents, mask, ids_restore

    def targets(self, images: torch.Tensor, stages: list[int]) -> dict[int, torch.Tensor]:
        """Targets of the given stages, in float32 outside autocast, without gradient."""
        no_autocast = torch.autocast("cuda", enabled=False) if images.is_cuda else contextlib.nullcontext()
        with torch.no_grad(), no_autocast:
            if self.target == "pixels":
                return {k: pixel_target(images, self.cell(self.scales[k])) for k in stages}
            if self.hog_bias is None:  # one histogram for every stage; only the cell size differs
                hist = hog_histograms(images, self.nbins)
                return {k: hog_target(hist, self.cell(self.scales[k])) for k in stages}
            return {k: hog_target(hog_histograms(images, self.nbins, self.hog_bias[k]), self.cell(self.scales[k]))
                    for k in stages}

    def forward(self, images: torch.Tensor, noise: torch.Tensor, active: list[bool] | None = None,
                no_grad_units: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Total loss (the active stages' losses summed, equal weights as upstream) and the per-stage losses (0 for
        dropped stages). Stage loss = sum_i mean_d (pred - target)^2_i M_i / sum_i M_i over the stage's cells."""
        active = [True] * len(self.taps) if active is None else active
        latents, mask, ids_restore = self.forward_encoder(images, noise, active, no_grad_units)
        targets = self.targets(images, list(latents))
        losses = [torch.zeros((), device=images.device) for _ in self.taps]
        for stage, tokens in latents.items():
            pred = self.decoders[stage](tokens, ids_restore).float()
            weights = stage_mask(mask, self.grid, self.scales[stage])
            per_cell = (pred - targets[stage]).pow(2).mean(-1)
            losses[stage] = (per_cell * weights).sum() / weights.sum()
        losses = torch.stack(losses)
        return losses.sum(), losses


def build_pretrain_model(config: dict[str, Any]) -> LocalMIM:
    return LocalMIM(config)


def build_classifier(config: dict[str, Any]) -> VisionTransformer:
    """Fine-tuning: GAP + fc_norm, drop path (MAE models_vit.py). Linear probe: the CLS token after the pretrained
    final norm, then BatchNorm without affine and a linear layer (MAE main_linprobe.py)."""
    if config["command"] == "finetune":
        model = VisionTransformer(**vit_kwargs(config, config["num_classes"], "avg"),
                                  drop_path_rate=config["drop_path"])
        trunc_normal_(model.head.weight, std=2e-5)  # MAE main_finetune.py
    else:
        model = VisionTransformer(**vit_kwargs(config, config["num_classes"], "cls"))
        trunc_normal_(model.head.weight, std=0.01)  # MAE main_linprobe.py
        model.head = nn.Sequential(nn.BatchNorm1d(config["dim"], affine=False, eps=1e-6), model.head)
    nn.init.zeros_(model.head[-1].bias if isinstance(model.head, nn.Sequential) else model.head.bias)
    return model


def read_encoder_state(source: str) -> dict[str, torch.Tensor]:
    """Encoder weights in timm's layout from a pretrain run/checkpoint of this script, a timm state dict (.pth or
    .safetensors) or an official MAE / LocalMIM checkpoint ({'model': ...}; LocalMIM's norm.{k} -> the last one)."""
    path = Path(source)
    if not path.exists():
        raise UserError(f"--pretrained {source} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = tr.load_checkpoint(tr.find_checkpoint(path, subdirs=("checkpoints",)) if path.is_dir() else path)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if any(k.startswith("encoder.") for k in state):  # this script's pretraining checkpoint
        state = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    stage_norms = sorted({int(m[1]) for k in state if (m := re.match(r"norm\.(\d+)\.", k))})
    if stage_norms and "norm.weight" not in state:  # official models_mim.py: one norm per stage
        last = stage_norms[-1]
        state = dict(state, **{f"norm.{p}": state[f"norm.{last}.{p}"] for p in ("weight", "bias")})
    keep = re.compile(r"^(patch_embed\.|cls_token$|pos_embed$|blocks\.|norm\.(weight|bias)$)")
    state = {k: v for k, v in state.items() if keep.match(k)}
    if not any(k.startswith("blocks.") for k in state):
        raise UserError(f"{source} holds no ViT encoder weights (no blocks.*)")
    return state


def initial_encoder_state(config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """The encoder a pretraining run with this seed starts from (LocalMIM builds its encoder first, right after
    seeding): the random-init baseline of kNN and the linear probe is paired with the pretrained weights."""
    torch.manual_seed(seed)
    encoder = VisionTransformer(**vit_kwargs(config, num_classes=0))
    mae_init_(encoder)
    return encoder.state_dict()


def load_encoder(model: VisionTransformer, source: str, config: dict[str, Any]) -> str:
    """Initialise `model`'s encoder from `source` (see read_encoder_state), or with the initial encoder of a
    pretraining run of the same --seed ('random', MAE's init). The position embedding is resized bicubically to the
    model's grid. Returns a line describing what was loaded."""
    if source == "random":
        state = initial_encoder_state(config, config["seed"])
    else:
        state = read_encoder_state(source)
    if "norm.weight" in state and isinstance(model.norm, nn.Identity):
        state = {k: v for k, v in state.items() if not k.startswith("norm.")}  # GAP models use a fresh fc_norm
    own = model.state_dict()
    if "pos_embed" in state and state["pos_embed"].shape != own["pos_embed"].shape:
        resized = convert.resize_pos_embed(state["pos_embed"].float().numpy(), model.patch_embed.grid_size[0], 1)
        state["pos_embed"] = torch.from_numpy(resized)
    for key, value in state.items():
        if key not in own or own[key].shape != value.shape:
            raise UserError(f"--pretrained {source} does not match --model: {key} is {tuple(value.shape)} there and "
                            f"{tuple(own[key].shape) if key in own else 'missing'} here")
    missing = set(own) - set(state)
    unexpected_missing = sorted(k for k in missing if not k.startswith(("head.", "fc_norm.", "norm.")))
    if unexpected_missing:
        raise UserError(f"--pretrained {source} lacks {unexpected_missing[0]}")
    model.load_state_dict(state, strict=False)
    what = "random initialisation (MAE's, seed {})".format(config["seed"]) if source == "random" else source
    return f"encoder from {what} ({len(state)} tensors; fresh: {', '.join(sorted(missing)) or 'none'})"


# ----------------------------------------------------------------------------------------------
# FreezeOut: per-layer fractions t_i, learning rates and freeze steps; moving layers out of the optimizer.
# ----------------------------------------------------------------------------------------------


def layer_fractions(num_layers: int, t0: float, how_scale: str) -> list[float]:
    """FreezeOut §2: t_i = scale(t0 + (1 - t0) i / L) for layers i = 0..L (the last layer trains to the end)."""
    last = num_layers - 1
    return [FREEZEOUT_SCALINGS[how_scale](t0 + (1 - t0) * i / last) for i in range(num_layers)]


def freeze_step(t: float, total_steps: int, warmup_steps: int) -> int:
    """The first optimizer step a layer no longer takes part in: warmup + ceil(t (total - warmup)) (rounded to 1e-6
    first, so that float noise in t cannot add a step). The study counts the annealing after the warmup; t = 1 gives
    total_steps (never frozen)."""
    return warmup_steps + math.ceil(round(t * (total_steps - warmup_steps), 6))


def layer_lr(step: int, *, t: float, peak_lr: float, min_lr: float, total_steps: int, warmup_steps: int,
             scale_lr: bool = True, layerwise: bool = True) -> float:
    """lr of a layer with fraction t at optimizer step `step` (0 for the first update).

    Warmup: peak * step / warmup for every layer (the study's: the unscaled lr; at the end of the warmup a layer
    jumps to peak / t_i with scale_lr). After it, FreezeOut's own cosine over the layer's J_i = t (total - warmup)
    steps: min_lr + (a_i - min_lr) (1 + cos(pi (step - warmup) / J_i)) / 2, a_i = peak / t with scale_lr, else peak.
    layerwise=False: every layer follows the full-length cosine from peak (it still freezes at its t). With t = 1 this
    is MAE's schedule (util/lr_sched.py) per iteration."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    span = (total_steps - warmup_steps) * (t if layerwise else 1.0)
    start = peak_lr / t if scale_lr and layerwise else peak_lr
    progress = min((step - warmup_steps) / span, 1.0) if span > 0 else 1.0
    return min_lr + (start - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclasses.dataclass(frozen=True)
class FreezePlan:
    """Which layer index each part of the model belongs to, and when each layer index freezes."""

    fractions: tuple[float, ...]  # t_i per layer index
    freeze_steps: tuple[int, ...]  # first step without layer i (total_steps: never)
    freeze_pe: bool  # layer 0 is the patch embedding + cls token; else blocks start at 0 and the PE never freezes
    taps: tuple[int, ...]

    @property
    def offset(self) -> int:
        return 1 if self.freeze_pe else 0

    def layer_of(self, name: str) -> int:
        """Layer index of a LocalMIM parameter: PE 0, block b at b + offset, a stage (norm + decoder) at its block."""
        last = len(self.fractions) - 1
        if name.startswith(("encoder.patch_embed.", "encoder.cls_token")):
            return 0 if self.freeze_pe else last
        if match := re.match(r"encoder\.blocks\.(\d+)\.", name):
            return int(match[1]) + self.offset
        if match := re.match(r"(stage_norms|decoders)\.(\d+)\.", name):
            return self.taps[int(match[2])] + self.offset
        if name.startswith("encoder.norm."):
            return last
        raise ValueError(f"no FreezeOut layer for parameter {name}")

    def frozen(self, layer: int, step: int) -> bool:
        return self.freeze_steps[layer] <= step

    def frozen_layers(self, step: int) -> int:
        return sum(self.frozen(i, step) for i in range(len(self.fractions)))

    def active_stages(self, step: int) -> list[bool]:
        """A stage is dropped with its decoder and target once its tapped block is frozen (the study's rule)."""
        return [not self.frozen(tap + self.offset, step) for tap in self.taps]

    def no_grad_units(self, step: int) -> int:
        """Leading encoder units (0 = PE, b + 1 = block b) that are frozen and have no trainable unit before them:
        they run without autograd. With a trainable PE nothing can, since its gradient passes through every block."""
        if not self.freeze_pe or not self.frozen(0, step):
            return 0
        units = 1
        while units < len(self.fractions) and self.frozen(units, step):
            units += 1
        return units


def make_plan(config: dict[str, Any], total_steps: int, warmup_steps: int) -> FreezePlan:
    """FreezeOut's plan for a run; without FreezeOut every layer has t = 1 and never freezes."""
    taps = tuple(stage_layout(config["layers"], config["all_stages"])[0])
    freeze_pe = not config["dont_freeze_pe"]
    num_layers = config["layers"] + int(freeze_pe)
    fractions = (layer_fractions(num_layers, config["t0"], config["how_scale"]) if config["freezeout"]
                 else [1.0] * num_layers)
    steps = tuple(freeze_step(t, total_steps, warmup_steps) for t in fractions)
    return FreezePlan(tuple(fractions), steps, freeze_pe, taps)


def forced_plan(config: dict[str, Any], frozen_fraction: float) -> FreezePlan:
    """--benchmark-frozen: the first round(fraction x depth) blocks (and the PE, unless --dont-freeze-pe) frozen from
    step 0, the rest never."""
    plan = make_plan(dict(config, freezeout=False), 1, 0)
    blocks = round(frozen_fraction * config["layers"])
    frozen = blocks + plan.offset if blocks else 0
    return dataclasses.replace(plan, freeze_steps=tuple(0 if i < frozen else 1 for i in range(len(plan.fractions))))


def freezeout_param_groups(model: LocalMIM, plan: FreezePlan, weight_decay: float) -> list[dict[str, Any]]:
    """One group per (layer, decay): MAE's weight decay (not on biases or 1-D parameters), and the layer's t and
    freeze step, which the loop reads to set its lr and to take it out of the optimizer."""
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = plan.layer_of(name)
        decay = not (param.ndim <= 1 or name.endswith(".bias"))
        group = groups.setdefault((layer, decay), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                                   "layer": layer, "t": plan.fractions[layer],
                                                   "freeze_step": plan.freeze_steps[layer]})
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def apply_freezeout(optimizer: torch.optim.Optimizer, step: int) -> list[int]:
    """Take the groups whose freeze step has come out of the optimizer (state freed), stop their parameters'
    gradients for good. Returns the layers frozen now (empty: nothing changed)."""
    frozen = []
    for group in list(optimizer.param_groups):
        if group["freeze_step"] <= step:
            optimizer.param_groups.remove(group)
            for param in group["params"]:
                optimizer.state.pop(param, None)
                param.requires_grad_(False)
                param.grad = None
            frozen.append(group["layer"])
    return sorted(set(frozen))


def set_freezeout_lrs(optimizer: torch.optim.Optimizer, step: int, config: dict[str, Any]) -> float:
    """Each group's lr for this step; returns the base lr (t = 1)."""
    kwargs = dict(peak_lr=config["peak_lr"], min_lr=config["min_lr"], total_steps=config["total_steps"],
                  warmup_steps=config["warmup_steps"], scale_lr=not config["not_scale_lr"],
                  layerwise=not config["non_layerwise_lr"])
    for group in optimizer.param_groups:
        group["lr"] = layer_lr(step, t=group["t"], **kwargs)
    return layer_lr(step, t=1.0, **kwargs)


# ----------------------------------------------------------------------------------------------
# Data: uint8 batches from common.data (a step's batch depends on the seed and the step only); normalisation,
# random erasing and mixup on the device.
# ----------------------------------------------------------------------------------------------


def train_augmentation(args: argparse.Namespace) -> dict[str, Any]:
    """MAE's: pretraining RandomResizedCrop(20-100%) + flip; fine-tuning RRC(8-100%) + flip + RandAugment (random
    erasing runs on the device); linear probe RRC(8-100%) + flip. Bicubic. For either loader (`tr.train_batches`)."""
    policy = args.auto_augment if args.command == "finetune" and args.auto_augment != "none" else None
    return dict(image_size=args.image_size, random_crop=args.random_crop, hflip=args.hflip,
                scale=(0.2, 1.0) if args.command == "pretrain" else (0.08, 1.0), auto_augment=policy)


def eval_transform(args: argparse.Namespace):
    return augment.eval_transform(args.image_size, crop_ratio=args.test_crop_ratio)


def train_batches(args: argparse.Namespace, env: tr.DistEnv, config: dict[str, Any], start_step: int):
    return tr.train_batches(args.data, train_augmentation(args), env, global_batch=config["effective_batch"],
                            seed=args.seed, start_step=start_step, workers=args.workers, image_size=args.image_size,
                            num_classes=config.get("num_classes") or 1, mean=MEAN, std=STD, loader=args.loader)


def val_batches(args: argparse.Namespace, env: tr.DistEnv) -> Iterator[dict]:
    """The val split on the device: this process's shard with --dist-eval, else all of it (MAE's default)."""
    processes = env.world_size if args.dist_eval else 1
    return tr.eval_batches(args.data, env, image_size=args.image_size, crop_ratio=args.test_crop_ratio,
                           interpolation="bicubic", global_batch=micro_batch(args, env.world_size) * processes,
                           workers=args.workers, mean=MEAN, std=STD, loader=args.loader, shard=args.dist_eval)


def mask_noise(seed: int, step: int, rows: int, patches: int, env: tr.DistEnv) -> torch.Tensor:
    """This process's rows of the step's masking noise, drawn for the whole effective batch from (seed, step): the
    masks do not depend on how the batch is split over processes and micro-batches (or on resuming). Drawn by the
    device's generator: on CPUs the numbers are those of the earlier host draw; CUDA's generator gives others
    (the same in every process), so a GPU run started before this change gets other masks after a resume."""
    generator = torch.Generator(env.device).manual_seed(tr.step_seed(seed, step))
    noise = torch.rand(rows, patches, generator=generator, device=env.device)  # on the device: no blocking copy
    local_rows = rows // env.world_size
    return noise[env.rank * local_rows:(env.rank + 1) * local_rows]


# ----------------------------------------------------------------------------------------------
# Loss and train steps.
# ----------------------------------------------------------------------------------------------


def no_sync(model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """DDP all-reduces on the last micro-batch only."""
    return model.no_sync() if not last and hasattr(model, "no_sync") else contextlib.nullcontext()


def pretrain_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                  images: torch.Tensor, noise: torch.Tensor, active: list[bool], no_grad_units: int,
                  args: argparse.Namespace) -> torch.Tensor:
    """One optimizer step over --grad-accum micro-batches; no gradient clipping (MAE/LocalMIM pretraining). Returns
    the per-stage losses summed over the micro-batches (a device tensor, no host sync)."""
    optimizer.zero_grad(set_to_none=True)
    stage_sums = torch.zeros(len(active), device=images.device)
    chunks = list(zip(images.chunk(args.grad_accum), noise.chunk(args.grad_accum)))
    for index, (micro_images, micro_noise) in enumerate(chunks):
        with no_sync(model, index == len(chunks) - 1), tr.autocast(images.device, args.precision):
            loss, stage_losses = model(micro_images, micro_noise, active, no_grad_units)
            scaler.scale(loss / args.grad_accum).backward()
        stage_sums += stage_losses.detach()
    scaler.step(optimizer)
    scaler.update()
    return stage_sums


def supervised_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, batch: dict,
                    step: int, args: argparse.Namespace, env: tr.DistEnv, regularisers: dict) -> torch.Tensor:
    """Fine-tuning / linear-probe step: random erasing and mixup/cutmix (per micro-batch, as MAE's loader batches) on
    the device, loss scaled by 1/accum, optional clipping. Returns the summed loss over the local samples."""
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=env.device)
    chunks = list(zip(batch["image"].chunk(args.grad_accum), batch["label"].chunk(args.grad_accum)))
    for index, (images, labels) in enumerate(chunks):
        # Erasing, mixup/cutmix and drop path draw from a seed of (step, the micro-batch's place in the global batch:
        # process r's i-th is r * accum + i): N processes with accumulation a make the update of any other split
        # of the same N x a (and a resumed run that of an uninterrupted one).
        seed = tr.step_seed(args.seed, step, env.rank * args.grad_accum + index)
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        if regularisers.get("erase"):
            images = regularisers["erase"](images)
        targets = labels
        if regularisers.get("mixup"):
            images, targets = regularisers["mixup"](images, labels)
        with no_sync(model, index == len(chunks) - 1), tr.autocast(env.device, args.precision):
            loss = regularisers["criterion"](model(images).float(), targets)
            scaler.scale(loss / args.grad_accum).backward()
        loss_sum += loss.detach() * len(labels)
    if getattr(args, "clip_grad", None):
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
    scaler.step(optimizer)
    scaler.update()
    return loss_sum


# ----------------------------------------------------------------------------------------------
# Runs: the command line (command.txt) and the weights of every --save-every epochs (epochs/<epoch>.pt); the rest is
# common.torch_run's (checkpoints, resume, stopping, the log window).
# ----------------------------------------------------------------------------------------------


def record_command(out: Path, argv: list[str], env: tr.DistEnv) -> None:
    """Append this invocation to command.txt (what the study's record.sh wrote by hand): time, host, processes,
    working directory, git commit and the exact command."""
    if not env.is_main:
        return
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    launcher = f"torchrun --nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', 1)}" if env.distributed else "python"
    with open(out / "command.txt", "a") as f:
        f.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} host {os.uname().nodename}, {env.world_size} process(es) on "
                f"{env.device.type}, git {commit}\ncd {shlex.quote(os.getcwd())}\n"
                f"{launcher} {shlex.join([Path(__file__).name, *argv])}\n\n")


def save_epoch_weights(out: str | Path, step: int, model: nn.Module, config: dict, env: tr.DistEnv) -> None:
    """epochs/<epoch>.pt (weights and config; MAE's checkpoint-<epoch>.pth) at the end of every --save-every-th epoch
    and of the last one. All are kept: the study fine-tunes and probes the intermediate epochs."""
    epoch, into_epoch = divmod(step, config["steps_per_epoch"])
    if env.is_main and not into_epoch and (epoch % config["save_every"] == 0 or epoch == config["epochs"]):
        tr.save_checkpoint(Path(out) / "epochs", epoch, {"model": tr.unwrap(model).state_dict(), "config": config,
                                                         "step": step}, keep=10**9)


def open_run(out: Path, args: argparse.Namespace, argv: list[str], env: tr.DistEnv, config: dict,
             start_step: int) -> RunLog:
    """command.txt gets this invocation, config.json the run's config; the log drops records past `start_step`."""
    record_command(out, argv, env)
    return RunLog(out, config, start_step=start_step, wandb_project=args.wandb, tensorboard=args.tensorboard,
                  main=env.is_main)


def common_config(args: argparse.Namespace, env: tr.DistEnv, spec: data.DataSpec | None) -> dict[str, Any]:
    """The flags, the architecture and what follows from the data and the processes: batch, lr, steps."""
    batch = effective_batch(args, env.world_size)
    steps_per_epoch = data.steps_per_epoch(spec.train_size, batch) if spec and spec.train_size else 0
    return dict(vars(args), **arch_config(args), **run_record(f"{RECIPE} {args.command}", args),
                effective_batch=batch, micro_batch=micro_batch(args, env.world_size),
                peak_lr=peak_lr(args, env.world_size), steps_per_epoch=steps_per_epoch,
                total_steps=args.training_steps or args.epochs * steps_per_epoch,
                warmup_steps=round(args.warmup_epochs * steps_per_epoch),
                world_size=env.world_size, device=str(env.device), mean=MEAN, std=STD)


# ----------------------------------------------------------------------------------------------
# Pretraining.
# ----------------------------------------------------------------------------------------------


def pretrain_config(args: argparse.Namespace, env: tr.DistEnv, spec: data.DataSpec | None) -> dict[str, Any]:
    taps, scales = stage_layout(args.arch["layers"], args.all_stages)
    return dict(common_config(args, env, spec), taps=taps, scales=scales)


def pretrain(args: argparse.Namespace, argv: list[str], env: tr.DistEnv) -> dict:
    spec = data.describe(args.data)
    if spec.source == "synthetic" or not spec.train_size:
        raise UserError(f"pretraining needs data of known size (synthetic batches are for --benchmark): {args.data}")
    config = pretrain_config(args, env, spec)
    out = Path(args.output_dir)
    state = tr.start_run(out, resume=args.resume, recipe=config["trained_by"], settings=vars(args))
    torch.manual_seed(args.seed)  # the same initial weights in every process
    model = build_pretrain_model(config).to(env.device)
    config["params"] = sum(p.numel() for p in model.parameters())
    config["encoder_params"] = sum(p.numel() for p in model.encoder.parameters())
    plan = make_plan(config, config["total_steps"], config["warmup_steps"])
    config["freezeout_fractions"], config["freeze_steps"] = list(plan.fractions), list(plan.freeze_steps)
    optimizer = torch.optim.AdamW(freezeout_param_groups(model, plan, args.weight_decay), lr=config["peak_lr"],
                                  betas=(0.9, 0.95), fused=env.device.type == "cuda")
    scaler = tr.grad_scaler(env.device, args.precision)
    if state:
        apply_freezeout(optimizer, state["step"])  # the param groups the optimizer state was saved with
        tr.restore(state, out, model=model, optimizer=optimizer, scaler=scaler)
    log = open_run(out, args, argv, env, config, state["step"] if state else 0)
    run.say(f"{config['params'] / 1e6:.1f}M params ({config['encoder_params'] / 1e6:.1f}M encoder), "
            f"{config['total_steps']} steps ({config['steps_per_epoch']}/epoch), effective batch "
            f"{config['effective_batch']}, lr {config['peak_lr']:.3g}, FreezeOut "
            f"{'on: t_i ' + ' '.join(f'{t:.3f}' for t in plan.fractions) if args.freezeout else 'off'}, "
            f"{env.world_size} process(es) on {env.device.type}", main=env.is_main)
    try:
        return pretrain_loop(args, env, model, optimizer, scaler, config, plan, state or {}, log)
    finally:
        log.close()


def pretrain_loop(args, env: tr.DistEnv, model: LocalMIM, optimizer, scaler, config: dict, plan: FreezePlan,
                  state: dict, log: RunLog) -> dict:
    total, per_epoch, out = config["total_steps"], config["steps_per_epoch"], args.output_dir
    start_step, last = state.get("step", 0), {}
    batches = train_batches(args, env, config, start_step)
    # DDP (and the compiled graph) knows only the parameters that required gradients: a freeze wraps again. Dynamo
    # keeps its code per forward and recompiles for the new frozen set (it guards on requires_grad and the active
    # stages); FreezeOut's units past torch._dynamo's recompile_limit (8) run eagerly (not measured).
    ddp = tr.wrap(model, env, compile_model=args.compile, broadcast_buffers=False)
    zeros = torch.zeros(len(plan.taps) + 1, device=env.device)  # stage losses, unreadable images skipped
    window, epoch = tr.Window(zeros, state.get("log_window")), tr.Window(zeros, state.get("epoch_window"))
    with tr.Preemption(env) as preemption:
        for step in tr.progress(start_step, total, env, desc="pretrain"):
            if apply_freezeout(optimizer, step):
                ddp = tr.wrap(model, env, compile_model=args.compile, broadcast_buffers=False)
            lr = set_freezeout_lrs(optimizer, step, config)
            batch = next(batches)
            noise = mask_noise(args.seed, step, config["effective_batch"], model.grid**2, env)
            stage_sums = pretrain_step(ddp, optimizer, scaler, batch["image"], noise, plan.active_stages(step),
                                       plan.no_grad_units(step), args)
            skipped = torch.tensor([float(batch["skipped"])], device=env.device)  # unreadable images
            values = torch.cat([stage_sums / args.grad_accum, skipped])
            window.add(values)
            epoch.add(values)
            done = step + 1
            if run.due(done, args.log_interval, total):
                last = dict(loss_record(window.totals(done, out), window.steps * env.world_size), lr=lr,
                            epoch=done / per_epoch, img_per_sec=window.images_per_sec(config["effective_batch"]))
                log.write(done, **last)
                window.reset()
            stop = preemption.stop_after(done, start_step=start_step, stop_after=args.stop_after,
                                         every=args.log_interval)
            if done % per_epoch == 0:
                log.write(done, **epoch_record(epoch.totals(done, out), epoch, done // per_epoch, plan, step, env),
                          lr=lr)
                epoch.reset()
            if done % per_epoch == 0 or done == total or stop:
                with window.paused(), epoch.paused():
                    tr.save(out, done, env, model=model, optimizer=optimizer, scaler=scaler,
                            extra={"config": config, "log_window": window.state(), "epoch_window": epoch.state()})
                    save_epoch_weights(out, done, model, config, env)
            if stop and done < total:
                run.say(f"stopping at step {done}: continue with --resume", main=env.is_main)
                break
    return last


def loss_record(sums: torch.Tensor, steps: int) -> dict[str, float]:
    """A window's sums over the processes (stage losses, images skipped) as the log's loss and per-stage losses."""
    stage_losses = (sums[:-1] / steps).tolist()
    record = {"loss": sum(stage_losses), **{f"loss_stage{k}": v for k, v in enumerate(stage_losses)}}
    if sums[-1] > 0:
        record["skipped_images"] = round(sums[-1].item())
    return record


def epoch_record(sums: torch.Tensor, epoch: tr.Window, number: int, plan: FreezePlan, step: int,
                 env: tr.DistEnv) -> dict[str, Any]:
    """The study's record of an epoch: its mean train loss, FreezeOut's progress, the time of a training step."""
    record = {"epoch": number, "train_loss": (sums[:-1] / (epoch.steps * env.world_size)).sum().item(),
              "frozen_layers": plan.frozen_layers(step), "layers": len(plan.fractions),
              "active_stages": sum(plan.active_stages(step)), "step_ms": 1000 / epoch.images_per_sec(1)}
    run.say(f"epoch {number}: loss {record['train_loss']:.4f}, {record['frozen_layers']}/{record['layers']} layers "
            f"frozen, {record['active_stages']} stages, {record['step_ms']:.1f} ms/step", main=env.is_main)
    return record


# ----------------------------------------------------------------------------------------------
# Fine-tuning and linear probing.
# ----------------------------------------------------------------------------------------------


def supervised_config(args: argparse.Namespace, env: tr.DistEnv, spec: data.DataSpec) -> dict[str, Any]:
    return dict(common_config(args, env, spec), num_classes=spec.num_classes, class_names=spec.class_names)


def make_supervised_optimizer(model: VisionTransformer, args: argparse.Namespace, lr: float, device: torch.device):
    if args.command == "finetune":  # MAE: AdamW, layer-wise lr decay, no decay on 1-D params, pos_embed, cls_token
        groups = param_groups_layer_decay(model, args.weight_decay, no_weight_decay_list=model.no_weight_decay(),
                                          layer_decay=args.layer_decay)
        return torch.optim.AdamW(groups, lr=lr, fused=device.type == "cuda")
    # MAE linprobe: LARS on the head only, wd 0; the trust ratio on the weight matrix, not on the bias (MAE util/lars)
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("head."))
    weight, bias = model.head[-1].weight, model.head[-1].bias
    return Lars([{"params": [weight], "always_adapt": True}, {"params": [bias], "always_adapt": False}], lr=lr,
                momentum=0.9, weight_decay=args.weight_decay)


def regularisers(args: argparse.Namespace, num_classes: int, device: torch.device) -> dict:
    if args.command != "finetune":
        return {"criterion": nn.CrossEntropyLoss()}
    mixing = args.mixup > 0 or args.cutmix > 0
    return {"criterion": SoftTargetCrossEntropy() if mixing else LabelSmoothingCrossEntropy(args.label_smoothing),
            "mixup": Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.label_smoothing,
                           num_classes=num_classes) if mixing else None,
            "erase": RandomErasing(args.random_erasing, mode="pixel", device=str(device))
            if args.random_erasing > 0 else None}


def supervised(args: argparse.Namespace, argv: list[str], env: tr.DistEnv) -> dict:
    spec = data.describe(args.data)
    if not spec.train_size:
        raise UserError(f"{args.command} needs data of known size: {args.data}")
    if args.command == "finetune" and (args.mixup > 0 or args.cutmix > 0) and micro_batch(args, env.world_size) % 2:
        raise UserError(f"mixup/cutmix need an even batch per process and micro-batch, got "
                        f"{micro_batch(args, env.world_size)}")
    config = supervised_config(args, env, spec)
    out = Path(args.output_dir)
    state = tr.start_run(out, resume=args.resume, recipe=config["trained_by"], settings=vars(args))
    torch.manual_seed(args.seed)
    model = build_classifier(config)
    config["loaded"] = load_encoder(model, args.pretrained, config) if not state else state["config"]["loaded"]
    model.to(env.device)
    optimizer = make_supervised_optimizer(model, args, config["peak_lr"], env.device)
    scaler = tr.grad_scaler(env.device, args.precision)
    if state:
        tr.restore(state, out, model=model, optimizer=optimizer, scaler=scaler)
    log = open_run(out, args, argv, env, config, state["step"] if state else 0)
    run.say(f"{args.command}: {config['loaded']}; {config['total_steps']} steps ({config['steps_per_epoch']}/epoch), "
            f"effective batch {config['effective_batch']}, lr {config['peak_lr']:.3g}", main=env.is_main)
    try:
        return supervised_loop(args, env, model, optimizer, scaler, config, state or {}, log)
    finally:
        log.close()


def supervised_loop(args, env: tr.DistEnv, model, optimizer, scaler, config: dict, state: dict, log: RunLog) -> dict:
    total, per_epoch, out = config["total_steps"], config["steps_per_epoch"], args.output_dir
    start_step, best, last = state.get("step", 0), state.get("max_accuracy", 0.0), {}
    batches = train_batches(args, env, config, start_step)
    regs = regularisers(args, config["num_classes"], env.device)
    ddp = tr.wrap(model, env, compile_model=args.compile, broadcast_buffers=False)
    model.train()
    window = tr.Window(torch.zeros(2, device=env.device), state.get("log_window"))  # loss sum, images skipped
    with tr.Preemption(env) as preemption:
        for step in tr.progress(start_step, total, env, desc=args.command):
            lr = layer_lr(step, t=1.0, peak_lr=config["peak_lr"], min_lr=args.min_lr, total_steps=total,
                          warmup_steps=config["warmup_steps"])
            tr.set_lr(optimizer, lr)  # times each group's lr_scale (layer decay)
            batch = next(batches)
            loss_sum = supervised_step(ddp, optimizer, scaler, batch, step, args, env, regs)
            window.add(torch.stack([loss_sum.float(), torch.tensor(float(batch["skipped"]), device=env.device)]))
            done = step + 1
            epoch_done = done % per_epoch == 0 or done == total  # --training-steps may end inside an epoch
            if run.due(done, args.log_interval, total) or epoch_done:
                sums = window.totals(done, out)
                last = {"loss": (sums[0] / (window.steps * config["effective_batch"])).item(), "lr": lr,
                        "epoch": done / per_epoch, **({"skipped_images": round(sums[1].item())} if sums[1] else {})}
                log.write(done, **last)
                window.reset()
            stop = preemption.stop_after(done, start_step=start_step, stop_after=args.stop_after,
                                         every=args.log_interval)
            results = {}
            if epoch_done:
                results = tr.evaluate_classifier(model, val_batches(args, env), env, precision=args.precision,
                                                 all_reduce=args.dist_eval)
                best = max(best, results.get("val_top1", 0.0))
                log.write(done, **results, max_accuracy=best, epoch=done // per_epoch)
                last.update(results, max_accuracy=best)
                run.say(run.eval_line(done, dict(results, max_accuracy=best)), main=env.is_main and bool(results))
            if epoch_done or stop:
                tr.save(out, done, env, model=model, optimizer=optimizer, scaler=scaler, eval_metrics=results,
                        extra={"config": config, "max_accuracy": best, "log_window": window.state()})
                save_epoch_weights(out, done, model, config, env)
            if stop and done < total:
                run.say(f"stopping at step {done}: continue with --resume", main=env.is_main)
                break
    return last


def evaluate_only(args: argparse.Namespace, env: tr.DistEnv) -> dict:
    """--eval-only: the val metrics of the last checkpoint of the run in --output-dir, else of the model that
    --pretrained initialises (its encoder, a fresh head). A run's log gets the record; nothing else is written."""
    out = Path(args.output_dir)
    if tr.checkpoint_steps(out / "checkpoints"):
        state, file = tr.load_run_checkpoint(out, RECIPE)
        config, step = state["config"], state["step"]
        if config["command"] not in ("finetune", "linprobe"):
            raise UserError(f"{file} is a {config['command']} checkpoint: --eval-only evaluates a classifier")
        model = build_classifier(config)
        tr.check_state_dict(model, state["model"], str(file))
        model.load_state_dict(state["model"])
    elif args.pretrained:
        config, step = supervised_config(args, env, data.describe(args.data)), None
        model = build_classifier(config)
        run.say(load_encoder(model, args.pretrained, config), main=env.is_main)
    else:
        raise UserError(f"--eval-only: {out} holds no run to evaluate and no --pretrained is given")
    results = tr.evaluate_classifier(model.to(env.device), val_batches(args, env), env, precision=args.precision,
                                     all_reduce=args.dist_eval)
    if not results:
        raise UserError(f"--eval-only: {args.data} has no val split")
    if env.is_main:
        if step is not None:
            log = RunLog(out, None, main=True)
            log.write(step, **results, eval_only=True)
            log.close()
        print(json.dumps(results))
    return results


# ----------------------------------------------------------------------------------------------
# kNN (DINO eval_knn.py): frozen CLS features, L2-normalised; weighted vote of the k nearest train images.
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def extract_features(encoder: nn.Module, batches: Iterator[dict], env: tr.DistEnv,
                     args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised CLS features and labels, gathered over all processes. Labels travel with their images (the
    study's kNN paired shuffled features with file-order labels and logged chance accuracy)."""
    features, labels = [], []
    for batch in tr.batches_to_device(batches, env.device, MEAN, STD):
        with tr.autocast(env.device, args.precision):
            features.append(F.normalize(encoder(batch["image"]).float(), dim=-1))
        labels.append(batch["label"])
    features = torch.cat(features) if features else torch.zeros(0, encoder.embed_dim, device=env.device)
    labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64, device=env.device)
    if env.distributed:
        gathered = [torch.zeros_like(features) for _ in range(env.world_size)]
        torch_dist.all_gather(gathered, features)
        label_lists = [torch.zeros_like(labels) for _ in range(env.world_size)]
        torch_dist.all_gather(label_lists, labels)
        features, labels = torch.cat(gathered), torch.cat(label_lists)
    keep = labels >= 0
    return features[keep], labels[keep]


def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, k: int, temperature: float, num_classes: int,
                 chunk: int = 1024) -> tuple[float, float]:
    """Top-1 and top-5 (%) of DINO's weighted kNN: votes sum_{j in top-k} exp(sim_j / T) onehot(label_j)."""
    k = min(k, len(train_labels))
    top1 = top5 = 0
    for start in range(0, len(test_labels), chunk):
        sims, indices = (test_features[start:start + chunk] @ train_features.T).topk(k, dim=1)
        votes = torch.zeros(len(sims), num_classes, device=sims.device)
        votes.scatter_add_(1, train_labels[indices], (sims / temperature).exp())
        ranked = votes.argsort(dim=1, descending=True)
        truth = test_labels[start:start + chunk, None]
        top1 += (ranked[:, :1] == truth).sum().item()
        top5 += (ranked[:, :min(5, num_classes)] == truth).any(1).sum().item()
    return 100 * top1 / len(test_labels), 100 * top5 / len(test_labels)


def knn(args: argparse.Namespace, argv: list[str], env: tr.DistEnv) -> dict:
    spec = data.describe(args.data)
    if not spec.train_size or not spec.val_size:
        raise UserError(f"kNN needs a train and a val split of known size: {args.data}")
    config = dict(vars(args), **arch_config(args), **run_record(f"{RECIPE} knn", args),
                  num_classes=spec.num_classes, world_size=env.world_size)
    torch.manual_seed(args.seed)
    encoder = VisionTransformer(**vit_kwargs(config, num_classes=0))
    config["loaded"] = load_encoder(encoder, args.pretrained, config)
    out = make_output_dir(args.output_dir)
    # A kNN evaluation written into a training run's folder adds its record to the log and leaves the run's
    # config.json as it is.
    own_config = saved_config(out).get("trained_by", config["trained_by"]) == config["trained_by"]
    encoder.to(env.device).eval()
    # The train split once, in eval transform (one epoch of the loader: the last partial batch is left out).
    global_batch = effective_batch(args, env.world_size)
    train_host = data.train_batches(args.data, eval_transform(args), global_batch=global_batch, seed=args.seed,
                                    workers=args.workers, process_index=env.rank, process_count=env.world_size)
    steps = data.steps_per_epoch(spec.train_size, global_batch)
    bank, bank_labels = extract_features(encoder, (next(train_host) for _ in range(steps)), env, args)
    val_host = data.eval_batches(args.data, eval_transform(args), global_batch=global_batch,
                                 workers=args.workers, process_index=env.rank, process_count=env.world_size)
    test, test_labels = extract_features(encoder, val_host, env, args)
    result = {"bank_images": len(bank_labels), "val_images": len(test_labels)}
    for k in args.nb_knn:
        top1, top5 = knn_classify(bank, bank_labels, test, test_labels, k, args.temperature, spec.num_classes)
        result.update({f"knn_top1_k{k}": top1, f"knn_top5_k{k}": top5})
    if env.is_main:
        record_command(out, argv, env)
        log = RunLog(out, config if own_config else None, main=True)
        log.write(0, **result)
        log.close()
        print(json.dumps(result))
    return result


# ----------------------------------------------------------------------------------------------
# Benchmark: pretraining steps on device-made batches with a forced fraction of the blocks frozen.
# ----------------------------------------------------------------------------------------------


def step_flops(config: dict[str, Any], plan: FreezePlan, batch: int) -> float:
    """Forward + backward FLOPs of a pretraining step with `plan`'s step-0 freezing, counted by FlopCounterMode on
    the meta device (matmuls, convolutions, attention; AdamW's elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build_pretrain_model(config)
        for name, param in model.named_parameters():
            if param.requires_grad and plan.frozen(plan.layer_of(name), 0):
                param.requires_grad_(False)
        images = torch.zeros(batch, 3, config["image_size"], config["image_size"])
        noise = torch.rand(batch, model.grid**2)
    with FlopCounterMode(display=False) as counter:
        loss, _ = model(images, noise, plan.active_stages(0), plan.no_grad_units(0))
        loss.backward()
    return float(counter.get_total_flops())


def benchmark_input(args: argparse.Namespace, env: tr.DistEnv) -> dict:
    """--benchmark-input: the input pipeline alone (the command's augmentation, --loader), nothing written."""
    return tr.benchmark_input(args.data, train_augmentation(args), env,
                              global_batch=effective_batch(args, env.world_size), workers=args.workers,
                              steps=args.benchmark_steps, seed=args.seed, loader=args.loader, command=args.command,
                              model=args.model, image_size=args.image_size)


def benchmark(args: argparse.Namespace, env: tr.DistEnv) -> list[dict]:
    """One JSON line per --benchmark-frozen fraction (`tr.benchmark`: img/s, step time, peak memory, MFU against the
    device's bf16 peak), with FreezeOut's theoretical saving (1 - FLOPs frozen / FLOPs unfrozen) and the measured one
    (1 - step time / step time of the first fraction)."""
    config = pretrain_config(args, env, None)
    batch = micro_batch(args, env.world_size) * args.grad_accum  # this process's rows of a step
    full_flops = step_flops(config, forced_plan(config, 0.0), batch)
    results: list[dict] = []
    for fraction in args.benchmark_frozen:
        torch.manual_seed(args.seed)
        plan = forced_plan(config, fraction)
        model = build_pretrain_model(config).to(env.device)
        optimizer = torch.optim.AdamW(freezeout_param_groups(model, plan, args.weight_decay), lr=1e-4,
                                      betas=(0.9, 0.95), fused=env.device.type == "cuda")
        apply_freezeout(optimizer, 0)
        ddp = tr.wrap(model, env, compile_model=args.compile, broadcast_buffers=False)
        generator = torch.Generator(env.device).manual_seed(args.seed + env.rank)
        images = torch.randn(batch, 3, args.image_size, args.image_size, device=env.device, generator=generator)
        noise = torch.rand(batch, model.grid**2, device=env.device, generator=generator)
        step = partial(pretrain_step, ddp, optimizer, tr.grad_scaler(env.device, args.precision))
        stages, no_grad = plan.active_stages(0), plan.no_grad_units(0)
        real = None  # the first fraction also fed from the input pipeline on real data: is the run input-bound?
        if not results and args.data != "synthetic":
            real = train_batches(args, env, config, 0)
        flops = step_flops(config, plan, batch)
        result = tr.benchmark(lambda real_batch, step=step, images=images, noise=noise, stages=stages,
                              no_grad=no_grad: step(real_batch["image"] if real_batch else images, noise, stages,
                                                    no_grad, args),
                              env, steps=args.benchmark_steps, real_batches=real,
                              global_batch=batch * env.world_size, train_flops_per_image=flops / batch, echo=False,
                              model=args.model, image_size=args.image_size, frozen_fraction=fraction,
                              frozen_blocks=round(fraction * config["layers"]),
                              frozen_pe=plan.frozen(0, 0) and plan.freeze_pe, active_stages=sum(plan.active_stages(0)),
                              precision=args.precision if env.device.type == "cuda" else "fp32",
                              theoretical_saving=round(1 - flops / full_flops, 4))
        if results:
            result["measured_saving_vs_first"] = round(1 - result["step_ms"] / results[0]["step_ms"], 4)
            if results[0]["frozen_fraction"] == 0 and result["theoretical_saving"] > 0:
                result["saving_achieved"] = round(result["measured_saving_vs_first"] / result["theoretical_saving"], 3)
        results.append(result)
        if env.is_main:
            print(json.dumps(result), flush=True)
        del model, optimizer, ddp, step
    return results


# ----------------------------------------------------------------------------------------------
# Export: a run's encoder (pretraining, kNN features) or classifier (fine-tuning, linear probe) as a timm state dict.
# ----------------------------------------------------------------------------------------------


def timm_export(path: str | Path, *, which: str = "last", ema: bool = False, arch: str | None = None):
    """scripts/convert_to_timm.py's rule (and `export`'s): the pretrained encoder as timm's VisionTransformer without
    a head, the fine-tuned model with global_pool='avg', the linear probe with its BatchNorm (no affine) folded into
    its linear layer."""
    if ema or arch or which != "last":
        raise UserError("a localmim_freezeout.py run exports its last weights: no --which best, --ema or --arch")
    state, path = tr.load_run_checkpoint(path, RECIPE)
    config, weights = state["config"], state["model"]
    pooling = "avg" if config["command"] == "finetune" else "token"
    if config["command"] == "pretrain":
        tensors, kwargs = read_encoder_state(str(path)), vit_kwargs(config, num_classes=0)
    else:
        tensors, kwargs = dict(weights), vit_kwargs(config, config["num_classes"], pooling)
    if config["command"] == "linprobe":
        scale = (tensors.pop("head.0.running_var") + 1e-6).rsqrt()
        mean = tensors.pop("head.0.running_mean")
        tensors.pop("head.0.num_batches_tracked")
        weight, bias = tensors.pop("head.1.weight"), tensors.pop("head.1.bias")
        tensors["head.weight"] = weight * scale
        tensors["head.bias"] = bias - (weight * scale) @ mean
    name = convert.timm_model_name(dict(kwargs, global_pool="token", fc_norm=False))
    create = (f"timm.create_model({name!r}, num_classes={kwargs['num_classes']}"
              f"{', global_pool=' + repr(pooling) if pooling == 'avg' else ''})" if name else
              f"VisionTransformer(**{json.dumps(kwargs)})")
    return convert.TimmExport(tensors, lambda: VisionTransformer(**kwargs), create)


def export(args: argparse.Namespace) -> Path:
    """timm_model.pth and .safetensors of the run (`timm_export`), checked by loading them strict into timm's
    VisionTransformer; prints how to create it."""
    out = Path(args.out) if args.out else (Path(args.run_dir) if Path(args.run_dir).is_dir() else
                                           tr.find_checkpoint(args.run_dir).parent) / "timm_model.pth"
    export = timm_export(args.run_dir)
    make_output_dir(out.parent)
    return convert.write_timm_export(export, out)


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)

    def command() -> Any:
        args = parse_args(argv)
        if args.command == "export":
            return export(args)
        env = tr.init_distributed()
        try:
            if args.command == "knn":
                return knn(args, argv, env)
            args.compile = tr.wants_compile(args.compile, env.device)  # config.json records what ran
            args.loader = gpu_input.loader_for(args.loader, env.device, train_augmentation(args))
            if args.benchmark_input:
                return benchmark_input(args, env)
            if args.command == "pretrain":
                return benchmark(args, env) if args.benchmark else pretrain(args, argv, env)
            return evaluate_only(args, env) if args.eval_only else supervised(args, argv, env)
        finally:
            tr.cleanup_distributed()

    return exit_status(command)


if __name__ == "__main__":
    sys.exit(main())

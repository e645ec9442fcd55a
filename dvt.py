"""Dynamic Vision Transformer (DVT): "Not All Images are Worth 16x16 Words: Dynamic Transformers for Efficient Image
Recognition" (Wang et al., NeurIPS 2021), in PyTorch.

    python dvt.py train --model dvt_t2t_vit_14 --data /path/to/imagenet        # defaults: the paper's T2T-ViT-14 run
    torchrun --nproc_per_node=8 dvt.py train ... --resume                      # DDP; continue --output-dir exactly
    python dvt.py budget runs/dvt/in1k_dvt_t2t_vit_14 --target-gmacs 3.0       # exit thresholds for a compute budget
    python dvt.py eval runs/dvt/in1k_dvt_t2t_vit_14 --curve                    # real early exit + accuracy/GFLOPs curve

The DVT repository's command lines run as they are (its main.py's positional data path, model names, --amp,
--img-size, -b and the launcher's --local-rank), e.g.
    python -m torch.distributed.launch --nproc_per_node=1 dvt.py train PATH_TO_DATASET --model DVT_T2t_vit_12 \\
        --batch-size 128 --lr 2e-3 --weight-decay .03 --amp --img-size 224
with one difference: --batch-size is the global batch here (main.py's is per process).

The recipe in one paragraph (paper §3, the official code): three complete vision transformers read the same 224 image
as 7x7, 10x10 and 14x14 tokens. Each has its own tokens-to-token module (T2T-ViT) or patch embedding (DeiT-S), blocks,
final norm and classifier, so each exit is a full backbone. Exit 2 reuses exit 1 and exit 3 reuses exit 2 in two ways:
feature reuse (the upstream last-block tokens, transformed by a small MLP and upsampled to the new grid, concatenated
to each block's MLP input) and relationship reuse (all upstream attention logits, mixed by two 1x1 convolutions and
upsampled, added to each block's attention logits). Training minimises the sum of the three exits' cross-entropies.
At test time an image stops at the first exit whose softmax confidence reaches that exit's threshold; the thresholds
are set on training images so that the exits take shares proportional to q, q^2, q^3 (q picks the budget).
`budget` finds them for a target average GFLOPs, `eval` runs the real early exit (each exit only on the images still
running) and `eval --curve` sweeps the paper's budgets. The paper's runs are full command lines in `scripts/dvt/`.

File order: flags and presets, model, data, loss and train step, loop, evaluation, adaptive inference (thresholds,
FLOPs, early exit), budget and eval commands, benchmark, main.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import functools
import json
import math
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.mixup import cutmix_bbox_and_lam
from timm.data.transforms import str_to_interp_mode
from timm.layers import DropPath, Mlp
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms
from tqdm import tqdm

from common import UserError, augment, data, gpu_input, run
from common import torch_run as tr
from common.run import ArgumentParser, exit_status, make_output_dir, run_record
from common.runlog import RunLog

# ----------------------------------------------------------------------------------------------
# Flags and presets.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Backbone:
    """One exit's transformer; the three exits of a DVT share it and differ in their token grid."""

    embed: str  # 't2t': tokens-to-token module with token performers (T2T-ViT); 'patch': a strided conv (DeiT)
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    qkv_bias: bool
    learned_pos_embed: bool  # DeiT: learned; T2T-ViT: fixed 1-D sinusoid
    norm_eps: float
    token_dim: int = 64  # T2T module width (T2T-ViT: 64)


# Paper §4 and the official models/t2t_vit.py, models_deit.py.
MODELS = {
    "dvt_t2t_vit_12": Backbone("t2t", embed_dim=256, depth=12, num_heads=4, mlp_ratio=2.0, qkv_bias=False,
                               learned_pos_embed=False, norm_eps=1e-5),
    "dvt_t2t_vit_14": Backbone("t2t", embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0, qkv_bias=False,
                               learned_pos_embed=False, norm_eps=1e-5),
    "dvt_deit_s": Backbone("patch", embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, qkv_bias=True,
                           learned_pos_embed=True, norm_eps=1e-6),
}
# The DVT repository's names of the same models (its timm registry), accepted as --model.
OFFICIAL_NAMES = {"DVT_T2t_vit_12": "dvt_t2t_vit_12", "DVT_T2t_vit_14": "dvt_t2t_vit_14",
                  "DVT_Deit_small": "dvt_deit_s"}
PAPER_GRIDS = (7, 10, 14)  # tokens per side of the three exits
# The first T2T soft split (kernel, stride, padding) per (image size, grid), then two 3/2/1 splits (official code:
# performer_less_less_token, performer_less_token, performer): 224 -> 28 -> 14 -> 7, 38 -> 19 -> 10, 56 -> 28 -> 14.
T2T_SOFT_SPLITS = {(224, 7): (14, 8, 3), (224, 10): (11, 6, 5), (224, 14): (7, 4, 2)}
FEATURE_REUSE_DIM = 48  # official transformer_block.py: upstream tokens -> LN -> MLP D -> 128 -> 48
FEATURE_REUSE_HIDDEN = 128
T2T_DROPOUT = 0.1  # official token_performer.py: dropout 0.1 after the performer's projection and MLP
MEAN, STD = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
PAPER_BUDGET_QS = tuple(p / 20 for p in range(1, 60))  # official inference.py: q = p / 20, p = 1..59
CALIB_CACHE = "calibration.pt"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Dynamic Vision Transformer (Wang et al. 2021), in PyTorch",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    tr.add_launcher_flags(parser)  # torch.distributed.launch puts --local-rank=N before the command
    commands = parser.add_subparsers(dest="command", required=True)
    add_train_flags(commands.add_parser("train", help="train a DVT", description="train a DVT (all exits jointly)",
                                        formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    p = commands.add_parser("budget", help="exit thresholds that meet a compute budget (paper §3.3)",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_inference_flags(p)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-gflops", type=float, help="average GFLOPs per image (2 FLOPs per multiply-add)")
    target.add_argument("--target-gmacs", type=float, help="average GMACs per image: the unit of the paper's 'GFLOPs'")
    target.add_argument("--q", type=float, help="exit shares proportional to q, q^2, q^3 (paper: q = p/20, p=1..59)")
    p.add_argument("--output", help="default: RUN_DIR/budget.json")
    p = commands.add_parser("eval", help="early-exit evaluation on the val split; --curve: accuracy vs GFLOPs",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_inference_flags(p)
    p.add_argument("--thresholds", help="comma-separated confidence thresholds of all exits but the last (default: "
                                        "RUN_DIR/budget.json, written by `budget`)")
    p.add_argument("--budget", help="a budget.json (default: RUN_DIR/budget.json)")
    p.add_argument("--curve", action="store_true",
                   help="sweep the paper's 59 budgets: RUN_DIR/curve.csv and curve.png (accuracy vs GFLOPs)")
    return parser


def add_train_flags(p: argparse.ArgumentParser) -> None:
    # Defaults: the paper's DVT T2T-ViT-14 ImageNet run (official README: 8 GPUs x 64, lr 5e-4, wd 0.05, AMP) with
    # the T2T-ViT training recipe of its main.py. scripts/dvt/ holds T2T-ViT-12, DeiT-S and the CIFAR transfers.
    g = p.add_argument_group("run")
    g.add_argument("positional_data", nargs="?", metavar="DATA", default=argparse.SUPPRESS,
                   help="as --data (the positional path of the DVT repository's main.py)")
    g.add_argument("--data", default=argparse.SUPPRESS,
                   help="ImageNet-layout folder, webdataset shards, cifar10, cifar100, digits or synthetic (default: "
                        "digits)")
    g.add_argument("--output-dir", default="runs/dvt", help="config.json, log.jsonl and checkpoints go here")
    g.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    g.add_argument("--stop-after", type=int, default=0,
                   help="save and exit after this many steps of this invocation (0: run to the end)")
    g.add_argument("--eval-only", action="store_true",
                   help="evaluate the last checkpoint of the run in --output-dir (every exit, and the EMA) on --data's "
                        "val split: one log record and one JSON line, train nothing (`eval` exits early instead)")
    tr.add_loader_flag(g)
    g.add_argument("--benchmark", action="store_true",
                   help="time train steps and adaptive inference on synthetic batches, print JSON and exit")
    g.add_argument("--benchmark-steps", type=int, default=20)
    g.add_argument("--benchmark-input", action="store_true",
                   help="time the input pipeline alone (--data, --workers, --batch-size) over --benchmark-steps "
                        "batches, print JSON and exit")
    g.add_argument("--benchmark-q", default="0.05,1.0,2.95",
                   help="budgets (q) timed by --benchmark; 0.05 is the paper's lowest")
    g.add_argument("--workers", "-j", type=int, default=tr.default_workers(), help="data loader processes per process")
    g.add_argument("--log-interval", type=int, default=50)
    g.add_argument("--eval-interval", type=int, default=0, help="steps between evals and checkpoints (0: each epoch)")
    g.add_argument("--precision", choices=list(tr.AUTOCAST_DTYPES), default="bf16",
                   help="autocast dtype on GPUs (fp16 adds loss scaling: GPUs without bf16); CPUs compute in float32")
    g.add_argument("--amp", dest="precision", action="store_const", const="bf16", default=argparse.SUPPRESS,
                   help="main.py's mixed-precision switch: --precision bf16")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model for training (default: on with CUDA; --no-compile: eager)")
    g.add_argument("--seed", type=int, default=0, help="initial weights, data order, augmentation, drop path, mixup")
    g.add_argument("--wandb", default=None, metavar="PROJECT", help="also log to Weights & Biases (if installed)")
    g.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard (if installed)")

    g = p.add_argument_group("model")
    g.add_argument("--model", default="dvt_t2t_vit_14",
                   help="one of: " + ", ".join(MODELS) + " (or the DVT repository's " + ", ".join(OFFICIAL_NAMES) + ")")
    g.add_argument("--image-size", "--img-size", type=int, default=224)
    g.add_argument("--grids", default=",".join(map(str, PAPER_GRIDS)),
                   help="tokens per side of each exit, increasing (paper: 7,10,14 at 224 px)")
    g.add_argument("--embed-dim", type=int, help="override the backbone's width")
    g.add_argument("--depth", type=int, help="override the backbone's number of blocks")
    g.add_argument("--num-heads", type=int, help="override the backbone's number of heads")
    g.add_argument("--mlp-ratio", type=float, help="override the backbone's MLP ratio")
    g.add_argument("--token-dim", type=int, help="override the T2T module's width (64)")
    g.add_argument("--feature-reuse", action=argparse.BooleanOptionalAction, default=True, help="paper §3.2")
    g.add_argument("--relation-reuse", action=argparse.BooleanOptionalAction, default=True, help="paper §3.2")
    g.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth, linear from 0 over the blocks")
    g.add_argument("--num-classes", type=int, default=-1, help="-1: from the data")
    g.add_argument("--init-from", help="transfer learning: start from this run's (or .pt file's) weights, heads "
                                       "re-initialised when the number of classes differs")

    g = p.add_argument_group("augmentation (T2T-ViT / DeiT main.py)")
    g.add_argument("--random-crop", choices=["rrc", "pad", "none"], default="rrc",
                   help="rrc: RandomResizedCrop; pad: resize + random crop with size/8 zero padding (T2T-ViT's CIFAR "
                        "transfer; at 32 px the usual CIFAR crop); none: resize + center crop")
    g.add_argument("--hflip", type=float, default=0.5)
    g.add_argument("--auto-augment", "--aa", default="rand-m9-mstd0.5-inc1", help="timm policy string, or 'none'")
    g.add_argument("--interpolation", default="bicubic", help="resize interpolation (train and eval)")
    g.add_argument("--random-erasing", "--reprob", type=float, default=0.25, help="random erasing probability")
    g.add_argument("--mixup", type=float, default=0.8, help="mixup alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha (0: off)")
    g.add_argument("--label-smoothing", "--smoothing", type=float, default=0.1)
    g.add_argument("--repeats", type=int, default=1, help="repeated augmentation (DeiT: 3)")
    g.add_argument("--test-crop-ratio", "--crop-pct", type=float, default=0.875,
                   help="eval: resize to size/ratio, center crop")

    g = p.add_argument_group("optimizer and schedule")
    g.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw",
                   help="adamw (ImageNet; no weight decay on biases and norms, as the official code) or "
                        "sgd with momentum (T2T-ViT's CIFAR transfer; weight decay on every parameter)")
    g.add_argument("--lr", type=float, default=5e-4, help="peak lr at --lr-ref-batch")
    g.add_argument("--lr-ref-batch", type=int, default=0,
                   help="the batch --lr is given at, scaled linearly to --batch-size; 0: as given (T2T-ViT and DVT "
                        "do not scale it)")
    g.add_argument("--weight-decay", "--wd", type=float, default=0.05)
    g.add_argument("--momentum", type=float, default=0.9, help="sgd only")
    g.add_argument("--backbone-lr-scale", type=float, default=1.0,
                   help="lr multiplier of everything but the classifier heads (T2T-ViT's transfer ratio: 0.01)")
    g.add_argument("--batch-size", "-b", type=int, default=512, help="global batch over all processes")
    g.add_argument("--eval-batch-size", type=int, default=256, help="global")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--clip-grad", type=float, default=0.0, help="global gradient-norm clip (0: off, as the paper)")
    g.add_argument("--epochs", type=int, default=300, help="length of the cosine (timm t_initial)")
    g.add_argument("--cooldown-epochs", type=int, default=10, help="epochs at --min-lr after the cosine")
    g.add_argument("--warmup-epochs", type=int, default=20, help="linear warmup from --warmup-lr")
    g.add_argument("--warmup-lr", type=float, default=1e-6)
    g.add_argument("--min-lr", type=float, default=1e-5)
    g.add_argument("--training-steps", type=int, default=0, help="if > 0, overrides the epochs (synthetic data)")
    g.add_argument("--model-ema-decay", type=float, default=0.99996,
                   help="EMA of the weights, evaluated, kept as best and used by budget/eval (0: off)")


def add_inference_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a training run's --output-dir (its best checkpoint, else its last) or a .pt file")
    p.add_argument("positional_data", nargs="?", metavar="DATA", default=argparse.SUPPRESS, help="as --data")
    p.add_argument("--data", help="default: the run's --data")
    p.add_argument("--batch-size", "-b", type=int, default=128)
    p.add_argument("--workers", "-j", type=int, default=tr.default_workers())
    p.add_argument("--precision", choices=list(tr.AUTOCAST_DTYPES), default="bf16")
    p.add_argument("--calib-images", type=int, default=50_000,
                   help="training images the thresholds are set on (paper: 50,000 random ones, training crop)")
    p.add_argument("--calib-seed", type=int, default=1, help="which training images and crops")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    positional, given = vars(args).pop("positional_data", None), getattr(args, "data", None)
    if positional is not None and given is not None:
        raise UserError(f"the data is given twice: DATA {positional} and --data {given}; give one")
    args.data = positional or given or ("digits" if args.command == "train" else None)
    if args.command == "train":
        resolve_train_args(args)
    elif args.batch_size <= 0 or args.calib_images <= 0:
        raise UserError("--batch-size and --calib-images must be positive")
    return args


def parse_floats(text: str, flag: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} takes comma-separated numbers, got {text!r}") from None


def resolve_train_args(args: argparse.Namespace) -> None:
    args.model = OFFICIAL_NAMES.get(args.model, args.model)
    if args.model not in MODELS:
        raise UserError(f"unknown model {args.model!r}; choose one of {', '.join([*MODELS, *OFFICIAL_NAMES])}")
    args.grids = [int(g) for g in parse_floats(args.grids, "--grids")]
    if len(args.grids) < 2 or any(b <= a for a, b in zip(args.grids, args.grids[1:])) or args.grids[0] < 1:
        raise UserError(f"--grids needs two or more increasing token grids, got {args.grids}")
    args.benchmark_q = parse_floats(args.benchmark_q, "--benchmark-q")
    if not args.benchmark_q or min(args.benchmark_q) <= 0:
        raise UserError(f"--benchmark-q takes positive budgets q, got {args.benchmark_q}")
    for name in ("batch_size", "eval_batch_size", "grad_accum", "log_interval", "benchmark_steps", "repeats", "epochs"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.lr_ref_batch < 0:
        raise UserError(f"--lr-ref-batch must be >= 0 (0: --lr as given), got {args.lr_ref_batch}")
    if args.auto_augment.lower() == "none":
        args.auto_augment = None
    if args.random_crop == "pad" and args.auto_augment:
        raise UserError("--random-crop pad is T2T-ViT's transfer crop, which has no RandAugment: add "
                        "--auto-augment none")
    if (args.mixup > 0 or args.cutmix > 0) and (args.batch_size // args.grad_accum) % 2:
        raise UserError("mixup/cutmix pair each image with its mirror in the batch: use an even batch per process")


# ----------------------------------------------------------------------------------------------
# Model: three complete backbones on 7x7, 10x10 and 14x14 tokens, the later ones reusing the previous one's final
# features and attention logits (paper §3.2; official models/t2t_vit.py, transformer_block.py, token_performer.py).
# ----------------------------------------------------------------------------------------------


def t2t_soft_split(img_size: int, grid: int) -> tuple[int, int, int]:
    """(kernel, stride, padding) of the first T2T soft split so that the two 3/2/1 splits after it end on `grid`.
    The paper's table at 224 px; elsewhere 4 * grid tokens per side at stride round(size / that), kernel 2 stride - 1
    (or wider to cover the image) and the padding that completes the last window (T2T-ViT-14's 7/4/2 at 224 -> 14
    follows this rule)."""
    if (img_size, grid) in T2T_SOFT_SPLITS:
        return T2T_SOFT_SPLITS[img_size, grid]
    side = 4 * grid
    stride = max(1, round(img_size / side))
    kernel = max(2 * stride - 1, img_size - stride * (side - 1))
    excess = stride * (side - 1) + kernel - img_size  # 2 * padding must cover this (within one pixel)
    if stride == 1 and excess % 2:
        kernel, excess = kernel + 1, excess + 1
    return kernel, stride, -(-excess // 2)


def deit_patch(img_size: int, grid: int) -> tuple[int, int]:
    """(patch size, padding) of the DeiT patch embedding that gives `grid` tokens per side: 32/0 -> 7, 23/3 -> 10,
    16/0 -> 14 at 224 px (official models_deit.py)."""
    patch = -(-img_size // grid)
    return patch, -(-(patch * grid - img_size) // 2)


def unfold_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def sinusoid_pos_embed(length: int, dim: int) -> torch.Tensor:
    """T2T-ViT's fixed 1-D sinusoid table (1, length, dim): sin on even, cos on odd channels (position 0 = cls)."""
    position = np.arange(length)[:, None]
    channel = np.arange(dim)[None]
    angle = position / np.power(10000, 2 * (channel // 2) / dim)
    return torch.tensor(np.where(channel % 2 == 0, np.sin(angle), np.cos(angle)), dtype=torch.float32)[None]


def autocast_off(x: torch.Tensor) -> contextlib.AbstractContextManager:
    return torch.autocast("cuda", enabled=False) if x.is_cuda else contextlib.nullcontext()


class TokenPerformer(nn.Module):
    """T2T-ViT's token performer (dim_in -> token_dim): linear attention with positive random features
    phi(x) = exp(w x - |x|^2 / 2) / sqrt(m), m = token_dim / 2 fixed orthogonal rows scaled by sqrt(m); the value is
    the skip connection. The random-feature part runs in float32 (exp overflows float16)."""

    def __init__(self, dim: int, token_dim: int, dropout: float = T2T_DROPOUT):
        super().__init__()
        self.token_dim = token_dim
        self.norm1 = nn.LayerNorm(dim)
        self.kqv = nn.Linear(dim, 3 * token_dim)
        self.proj = nn.Linear(token_dim, token_dim)
        self.dropout = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(token_dim)
        self.mlp = nn.Sequential(nn.Linear(token_dim, token_dim), nn.GELU(), nn.Linear(token_dim, token_dim),
                                 nn.Dropout(dropout))
        features = token_dim // 2
        self.register_buffer("random_features",
                             nn.init.orthogonal_(torch.empty(features, token_dim)) * math.sqrt(features))

    def phi(self, x: torch.Tensor) -> torch.Tensor:
        w = self.random_features
        return torch.exp(x @ w.t() - x.square().sum(-1, keepdim=True) / 2) / math.sqrt(w.shape[0])

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        k, q, v = self.kqv(x).float().split(self.token_dim, dim=-1)
        with autocast_off(x):
            kp, qp = self.phi(k), self.phi(q)  # (B, T, m)
            normaliser = qp @ kp.sum(1).unsqueeze(-1)  # (B, T, 1)
            y = (qp @ (kp.transpose(1, 2) @ v)) / (normaliser + 1e-8)  # (B, T, token_dim)
        return v + self.dropout(self.proj(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attend(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class T2TEmbed(nn.Module):
    """Tokens-to-token module: soft split (unfold) -> performer -> re-structurise -> soft split 3/2/1 -> performer ->
    soft split 3/2/1 -> Linear(token_dim * 9 -> D). The first split's kernel/stride/padding set the exit's grid."""

    def __init__(self, img_size: int, grid: int, embed_dim: int, token_dim: int):
        super().__init__()
        kernel, stride, padding = t2t_soft_split(img_size, grid)
        self.sides = [unfold_size(img_size, kernel, stride, padding)]
        self.sides.append(unfold_size(self.sides[0], 3, 2, 1))
        if unfold_size(self.sides[1], 3, 2, 1) != grid:
            raise UserError(f"a T2T soft split {kernel}/{stride}/{padding} at {img_size} px does not give "
                            f"{grid}x{grid} tokens: choose other --grids or --img-size")
        self.soft_split0 = nn.Unfold(kernel, stride=stride, padding=padding)
        self.soft_split1 = nn.Unfold(3, stride=2, padding=1)
        self.soft_split2 = nn.Unfold(3, stride=2, padding=1)
        self.attention1 = TokenPerformer(3 * kernel * kernel, token_dim)
        self.attention2 = TokenPerformer(token_dim * 9, token_dim)
        self.project = nn.Linear(token_dim * 9, embed_dim)

    @staticmethod
    def to_map(tokens: torch.Tensor, side: int) -> torch.Tensor:
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.attention1(self.soft_split0(images).transpose(1, 2))
        x = self.attention2(self.soft_split1(self.to_map(x, self.sides[0])).transpose(1, 2))
        return self.project(self.soft_split2(self.to_map(x, self.sides[1])).transpose(1, 2))


class PatchEmbed(nn.Module):
    """DeiT's patch embedding, with the padding that gives 10x10 tokens from patch 23 at 224 px."""

    def __init__(self, img_size: int, grid: int, embed_dim: int):
        super().__init__()
        patch, padding = deit_patch(img_size, grid)
        self.proj = nn.Conv2d(3, embed_dim, patch, stride=patch, padding=padding)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


def resize_grid(tokens: torch.Tensor, side_in: int, side_out: int) -> torch.Tensor:
    """(..., side_in^2) -> (..., side_out^2) over the last axis, read as a square grid: the official "efficient
    upsampling": nearest-upsample by the integer factor ceil(out / in), then adaptive average pooling (7 -> 14 -> 10,
    10 -> 20 -> 14)."""
    lead = tokens.shape[:-1]
    factor = -(-side_out // side_in)
    x = tokens.reshape(1, -1, side_in, side_in)
    x = F.adaptive_avg_pool2d(F.interpolate(x, size=(side_in * factor,) * 2, mode="nearest"), side_out)
    return x.reshape(*lead, side_out * side_out)


def resize_relations(logits: torch.Tensor, side_in: int, side_out: int) -> torch.Tensor:
    """Attention maps (B, C, 1+n, 1+n) -> (B, C, 1+N, 1+N): the patch part resized along keys, then queries; the cls
    row and column resized along their patch axis, the cls-cls entry kept."""
    for _ in range(2):  # keys (last axis), then queries (swapped to the last axis)
        logits = torch.cat([logits[..., :1], resize_grid(logits[..., 1:], side_in, side_out)], dim=-1)
        logits = logits.transpose(-1, -2)
    return logits


class Reuse(NamedTuple):
    """What a stage hands to the next: its last block's output tokens before the final norm (B, 1+n, D), and the
    pre-softmax attention logits of all its blocks (B, depth * heads, 1+n, 1+n), block-major. None: not needed."""

    features: torch.Tensor | None
    relations: torch.Tensor | None

    def select(self, rows: torch.Tensor) -> Reuse:
        """The reuse inputs of a subset of the batch (early exit: only the images that go on)."""
        return Reuse(*(None if t is None else t[rows] for t in self))


class Attention(nn.Module):
    """Multi-head self-attention that adds reused logits before the softmax and can return its own logits.
    Without logits to return it runs F.scaled_dot_product_attention (the reused logits as an additive mask)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, reused: torch.Tensor | None,
                return_logits: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        logits = None
        if return_logits:
            logits = (q * self.scale) @ k.transpose(-2, -1)
            if reused is not None:
                logits = logits + reused
            out = logits.softmax(-1).to(v.dtype) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if reused is None else reused.to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim)), logits


class Block(nn.Module):
    """Pre-norm transformer block (timm's parameter names). With feature reuse (reuse_dim > 0) the MLP reads
    [h; f]: the post-attention tokens h and the upstream tokens f through this block's own LN -> MLP(D -> 128 -> 48),
    resized to this grid, a zero row for the cls token: x = h + MLP(LN([h; f])), the MLP (D + 48) -> hidden -> D."""

    def __init__(self, arch: Backbone, drop_path: float, reuse_dim: int = 0):
        super().__init__()
        dim = arch.embed_dim
        norm = functools.partial(nn.LayerNorm, eps=arch.norm_eps)
        self.norm1 = norm(dim)
        self.attn = Attention(dim, arch.num_heads, arch.qkv_bias)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm(dim + reuse_dim)
        self.mlp = Mlp(dim + reuse_dim, int(dim * arch.mlp_ratio), dim)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.feature_reuse = nn.Sequential(norm(dim), Mlp(dim, FEATURE_REUSE_HIDDEN, reuse_dim)) if reuse_dim else None

    def forward(self, x: torch.Tensor, upstream_features: torch.Tensor | None, reused_logits: torch.Tensor | None,
                sides: tuple[int, int] | None, return_logits: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        h, logits = self.attn(self.norm1(x), reused_logits, return_logits)
        x = x + self.drop_path1(h)
        mlp_in = x
        if self.feature_reuse is not None:
            f = self.feature_reuse(upstream_features)[:, 1:]  # (B, n, 48): the upstream cls token is dropped
            f = resize_grid(f.transpose(1, 2), *sides).transpose(1, 2)
            mlp_in = torch.cat([x, F.pad(f, (0, 0, 1, 0)).to(x.dtype)], dim=-1)
        return x + self.drop_path2(self.mlp(self.norm2(mlp_in))), logits


class Stage(nn.Module):
    """One exit: a complete T2T-ViT or DeiT (embedding, cls token, position embedding, blocks, final norm, head) on a
    grid x grid token sequence, plus the modules that transform the upstream stage's outputs when it reuses them."""

    def __init__(self, arch: Backbone, img_size: int, grid: int, num_classes: int, drop_path: float, *,
                 upstream_grid: int | None = None, feature_reuse: bool = False, relation_reuse: bool = False,
                 export_features: bool = False, export_relations: bool = False):
        super().__init__()
        self.grid, self.upstream_grid, self.depth = grid, upstream_grid, arch.depth
        self.export_features, self.export_relations = export_features, export_relations
        dim, tokens = arch.embed_dim, grid * grid + 1
        if arch.embed == "t2t":
            self.patch_embed = T2TEmbed(img_size, grid, dim, arch.token_dim)
        else:
            self.patch_embed = PatchEmbed(img_size, grid, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        if arch.learned_pos_embed:
            self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        else:
            self.register_buffer("pos_embed", sinusoid_pos_embed(tokens, dim))
        reuse_features = feature_reuse and upstream_grid is not None
        rates = np.linspace(0, drop_path, arch.depth).tolist()  # stochastic depth rising linearly over the blocks
        self.blocks = nn.ModuleList(Block(arch, rate, FEATURE_REUSE_DIM if reuse_features else 0) for rate in rates)
        self.norm = nn.LayerNorm(dim, eps=arch.norm_eps)
        self.head = nn.Linear(dim, num_classes)
        self.relation_reuse = None
        if relation_reuse and upstream_grid is not None:  # all upstream maps -> 1x1 conv (x3) -> GELU -> 1x1 conv
            maps = arch.depth * arch.num_heads
            self.relation_reuse = nn.Sequential(nn.Conv2d(maps, 3 * maps, 1), nn.GELU(), nn.Conv2d(3 * maps, maps, 1))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():  # official _init_weights: linears trunc-normal 0.02; convs keep PyTorch's
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor, upstream: Reuse | None = None) -> tuple[torch.Tensor, Reuse | None]:
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        reused_logits = [None] * self.depth
        if self.relation_reuse is not None:
            relations = resize_relations(self.relation_reuse(upstream.relations), self.upstream_grid, self.grid)
            reused_logits = relations.chunk(self.depth, dim=1)  # block l adds maps [l*heads, (l+1)*heads)
        features = upstream.features if self.blocks[0].feature_reuse is not None else None
        sides = (self.upstream_grid, self.grid)
        logits = []
        for block, reused in zip(self.blocks, reused_logits):
            x, block_logits = block(x, features, reused, sides, self.export_relations)
            logits.append(block_logits)
        out = self.head(self.norm(x)[:, 0])
        if not (self.export_features or self.export_relations):
            return out, None
        return out, Reuse(x if self.export_features else None,
                          torch.cat(logits, dim=1) if self.export_relations else None)


class DVT(nn.Module):
    """The cascade. forward(images) runs every exit on every image (training, simulation) and returns their logits;
    `early_exit` runs each exit only on the images still going."""

    def __init__(self, arch: Backbone, img_size: int, grids: list[int], num_classes: int, drop_path: float,
                 feature_reuse: bool, relation_reuse: bool):
        super().__init__()
        last = len(grids) - 1
        self.stages = nn.ModuleList(
            Stage(arch, img_size, grid, num_classes, drop_path, upstream_grid=grids[k - 1] if k else None,
                  feature_reuse=feature_reuse, relation_reuse=relation_reuse,
                  export_features=feature_reuse and k < last, export_relations=relation_reuse and k < last)
            for k, grid in enumerate(grids))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        outputs, upstream = [], None
        for stage in self.stages:
            logits, upstream = stage(images, upstream)
            outputs.append(logits)
        return outputs


def arch_of(config: dict[str, Any]) -> Backbone:
    overrides = {key: config[key] for key in ("embed_dim", "depth", "num_heads", "mlp_ratio", "token_dim")
                 if config.get(key) is not None}
    return dataclasses.replace(MODELS[config["model"]], **overrides)


def build_model(config: dict[str, Any]) -> DVT:
    """The model of a run from its config (train, budget and eval all use this)."""
    arch = arch_of(config)
    if arch.embed_dim % arch.num_heads:
        raise UserError(f"the width {arch.embed_dim} is not a multiple of the {arch.num_heads} heads")
    return DVT(arch, config["image_size"], config["grids"], config["num_classes"], config["drop_path"],
               config["feature_reuse"], config["relation_reuse"])


def plain_backbone(config: dict[str, Any]) -> Stage:
    """The last exit's backbone alone, without reuse (e.g. T2T-ViT-14 on 14x14 tokens): the baseline of the
    throughput comparison."""
    return Stage(arch_of(config), config["image_size"], config["grids"][-1], config["num_classes"], 0.0)


# ----------------------------------------------------------------------------------------------
# Data: uint8 batches from common.data (exact resume by step); normalisation, random erasing and mixup on the device.
# ----------------------------------------------------------------------------------------------


def crop_augmentation(config: dict[str, Any], auto_augment: str | None) -> dict[str, Any] | Callable:
    """The augmentation for either loader (`tr.train_batches`), or for the CIFAR transfers' padded crop a PIL
    transform (host only)."""
    size, interpolation = config["image_size"], config["interpolation"]
    if config["random_crop"] == "pad":  # T2T-ViT transfer_learning.py: Resize, RandomCrop(size, size // 8), flip
        return transforms.Compose([transforms.Resize(size, interpolation=str_to_interp_mode(interpolation)),
                                   transforms.CenterCrop(size), transforms.RandomCrop(size, padding=size // 8),
                                   transforms.RandomHorizontalFlip(config["hflip"]), augment.ToUint8HWC()])
    return dict(image_size=size, random_crop=config["random_crop"], hflip=config["hflip"], auto_augment=auto_augment,
                interpolation=interpolation)


def crop_transform(config: dict[str, Any], auto_augment: str | None):
    return gpu_input.host_transform(crop_augmentation(config, auto_augment))


def train_augmentation(config: dict[str, Any]) -> dict[str, Any] | Callable:
    return crop_augmentation(config, config["auto_augment"])


def calibration_transform(config: dict[str, Any]):
    """The images the thresholds are set on: training crops and flips, no RandAugment (official inference.py:
    RandomResizedCrop + flip)."""
    return crop_transform(config, None)


def eval_transform(config: dict[str, Any]):
    return augment.eval_transform(config["image_size"], crop_ratio=config["test_crop_ratio"],
                                  interpolation=config["interpolation"])


# ----------------------------------------------------------------------------------------------
# Loss and train step.
# ----------------------------------------------------------------------------------------------


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy against soft targets (timm SoftTargetCrossEntropy without the mean)."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1)


class Augmenter:
    """Device-side batch augmentation as timm's loader does it: random erasing (per image, pixel mode, on
    normalised images), then mixup / cutmix with label smoothing (timm Mixup, batch mode: one draw per batch, each
    image paired with its mirror in the batch).

    The batch is the global one, so that N processes make the 1-process update: image g of the global batch is
    erased under a seed of (seed, step, g), the mixup/cutmix draw is seeded by (seed, step) on every process, and
    the mirror is taken in the global batch (`tr.flip_global_batch`; timm's flip of a process's batch would pair
    images within each shard)."""

    def __init__(self, config: dict[str, Any], device: torch.device):
        self.num_classes, self.smoothing = config["num_classes"], config["label_smoothing"]
        self.erasing = config["random_erasing"]
        self.mixup = None
        if config["mixup"] > 0 or config["cutmix"] > 0:
            self.mixup = Mixup(mixup_alpha=config["mixup"], cutmix_alpha=config["cutmix"],
                               label_smoothing=config["label_smoothing"], num_classes=config["num_classes"])

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, *, seed: int, step: int,
                 first_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`images`, `labels`: this process's shard, whose first row is row `first_index` of the global batch."""
        images = images.clone()
        if self.erasing > 0:
            tr.erase_per_sample(images, self.erasing, seed=seed, step=step, first_index=first_index)
        smooth = self.smoothing / self.num_classes
        targets = F.one_hot(labels, self.num_classes).float() * (1 - self.smoothing) + smooth
        if self.mixup is None:
            return images, targets
        np.random.seed(tr.step_seed(seed, step))  # timm draws lam, mixup or cutmix, and the box from numpy
        lam, use_cutmix = self.mixup._params_per_batch()  # timm Mixup._mix_batch, with the global mirror
        if lam == 1.0:
            return images, targets
        mirror_images, mirror_targets = tr.flip_global_batch(images), tr.flip_global_batch(targets)
        if use_cutmix:
            (y_low, y_high, x_low, x_high), lam = cutmix_bbox_and_lam(
                images.shape, lam, ratio_minmax=self.mixup.cutmix_minmax, correct_lam=self.mixup.correct_lam)
            images[:, :, y_low:y_high, x_low:x_high] = mirror_images[:, :, y_low:y_high, x_low:x_high]
        else:
            images = images * lam + mirror_images * (1.0 - lam)
        return images, targets * lam + mirror_targets * (1.0 - lam)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, batch: dict,
               step: int, args: argparse.Namespace, env: tr.DistEnv, augmenter: Augmenter,
               ema: ModelEmaV3 | None) -> dict[str, torch.Tensor]:
    """One optimizer step on this process's share of the global batch, in --grad-accum micro-batches. The loss is the
    sum of the exits' cross-entropies (paper §3.3). Returns device tensors: per-exit summed loss and correct top-1
    over the local samples, and the gradient norm."""
    labels = batch["label"]
    images, targets = augmenter(batch["image"], labels, seed=args.seed, step=step,
                                first_index=env.rank * len(labels))
    # Drop path and the performers' dropout draw from torch's generator, seeded per process: their masks depend on
    # the split (README).
    torch.manual_seed(tr.step_seed(args.seed, step, env.rank))
    optimizer.zero_grad(set_to_none=True)
    loss_sums, correct = None, None
    chunks = list(zip(images.chunk(args.grad_accum), targets.chunk(args.grad_accum), labels.chunk(args.grad_accum)))
    for index, (micro_images, micro_targets, micro_labels) in enumerate(chunks):
        last = index == len(chunks) - 1
        no_sync = getattr(model, "no_sync", None) if not last else None  # DDP: all-reduce on the last one only
        with no_sync() if no_sync else contextlib.nullcontext(), tr.autocast(images.device, args.precision):
            outputs = model(micro_images)
            losses = torch.stack([soft_cross_entropy(logits, micro_targets) for logits in outputs])  # (exits, b)
            scaler.scale(losses.sum() / len(labels)).backward()
        hits = torch.stack([(logits.detach().argmax(-1) == micro_labels).sum() for logits in outputs]).float()
        loss_sums = losses.detach().sum(1) + (0 if loss_sums is None else loss_sums)
        correct = hits + (0 if correct is None else correct)
    scaler.unscale_(optimizer)
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad if args.clip_grad > 0 else math.inf)
    scaler.step(optimizer)
    scaler.update()
    if ema is not None:
        ema.update(tr.unwrap(model))
    return {"loss_sums": loss_sums, "correct": correct, "grad_norm": grad_norm}


def param_groups(model: nn.Module, args: argparse.Namespace) -> list[dict]:
    """Parameter groups with their peak lr (heads --lr, the rest --lr x --backbone-lr-scale, as T2T-ViT's
    transfer_learning.py gives its backbone groups their own 'lr') and weight decay: AdamW skips 1-D parameters
    (biases, norms) only, as the official code: its timm `create_optimizer` exempts the names of
    `model.no_weight_decay()`, which DVT's three-model wrapper does not define, so the class tokens (and the DeiT
    variant's learned position embeddings) are decayed. SGD (T2T-ViT's transfer_learning.py) decays every
    parameter."""
    groups: dict[tuple[float, float], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        scale = 1.0 if re.search(r"(^|\.)head\.", name) else args.backbone_lr_scale
        no_decay = args.optimizer == "adamw" and param.ndim <= 1
        groups.setdefault((scale, 0.0 if no_decay else args.weight_decay), []).append(param)
    return [{"params": params, "lr": peak_lr(args) * scale, "weight_decay": decay}
            for (scale, decay), params in groups.items()]


def make_optimizer(model: nn.Module, args: argparse.Namespace, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, args)
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=peak_lr(args), momentum=args.momentum)
    return torch.optim.AdamW(groups, lr=peak_lr(args), eps=1e-8, fused=device.type == "cuda")


def peak_lr(args: argparse.Namespace) -> float:
    """--lr, scaled linearly from --lr-ref-batch to --batch-size when a reference batch is given."""
    return args.lr * args.batch_size / args.lr_ref_batch if args.lr_ref_batch else args.lr


def make_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace) -> CosineLRScheduler:
    """timm's cosine as T2T-ViT's (and DVT's) main.py creates it and steps it, once per epoch: linear warmup from
    --warmup-lr over --warmup-epochs, then min + (peak - min)(1 + cos(pi e / E)) / 2 on the epoch count e (warmup
    included), --min-lr from epoch E = --epochs on (the cooldown). Each group's peak is its own lr; without warmup
    this is torch's CosineAnnealingLR of T2T-ViT's transfer."""
    return CosineLRScheduler(optimizer, t_initial=args.epochs, lr_min=args.min_lr, warmup_t=args.warmup_epochs,
                             warmup_lr_init=args.warmup_lr)


def epoch_at(step: int, config: dict[str, Any]) -> int:
    """The epoch that optimizer step `step` (0-based) is in; with data of unknown size (--training-steps), the same
    share of the schedule's epochs."""
    if config["steps_per_epoch"]:
        return step // config["steps_per_epoch"]
    return step * (config["epochs"] + config["cooldown_epochs"]) // config["total_steps"]


# ----------------------------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------------------------


def train(args: argparse.Namespace) -> dict:
    env = tr.init_distributed()
    try:
        return evaluate_run(args, env) if args.eval_only else run_training(args, env)
    finally:
        tr.cleanup_distributed()


def evaluate_run(args: argparse.Namespace, env: tr.DistEnv) -> dict:
    """--eval-only: the run's last checkpoint, its weights and EMA, on --data's val split; config.json and the
    checkpoints stay as they are."""
    state, path = tr.load_run_checkpoint(args.output_dir, "dvt.py")
    config = dict(state["config"], data=args.data, workers=args.workers, eval_batch_size=args.eval_batch_size,
                  loader=loader_of(args, env))
    config.setdefault("image_size", config.get("img_size"))  # a run from before --image-size was the spelling
    results = {}
    for prefix, weights in (("val", state["model"]), ("ema_val", state.get("ema"))):
        if weights is not None:
            model = build_model(config)
            tr.check_state_dict(model, weights, str(path))
            model.load_state_dict(weights)
            results |= evaluate(model.to(env.device), config, env, prefix)
    return tr.report_eval(args.output_dir, state["step"], results, str(path), env, wandb=args.wandb,
                          tensorboard=args.tensorboard)  # (synthetic data has no val split: no results)


def init_weights_from(model: DVT, path: str) -> None:
    """Transfer learning (--init-from): the reported weights of another run; heads of another class count stay
    freshly initialised, every other tensor must fit."""
    state = load_weights(path)[0]
    own = model.state_dict()
    heads = {k for k in state if re.search(r"\.head\.", k) and k in own and state[k].shape != own[k].shape}
    tr.check_state_dict(model, {k: (own[k] if k in heads else v) for k, v in state.items()}, path)
    model.load_state_dict({k: v for k, v in state.items() if k not in heads}, strict=False)


def loader_of(args: argparse.Namespace, env: tr.DistEnv) -> str:
    """--loader: auto takes the host loader for the CIFAR transfers' padded crop, which only the host runs."""
    return gpu_input.loader_for(args.loader, env.device, train_augmentation(vars(args)))


def run_training(args: argparse.Namespace, env: tr.DistEnv) -> dict:
    if args.benchmark_input:  # the host input pipeline alone: no model, nothing written
        return tr.benchmark_input(args.data, train_augmentation(vars(args)), env, global_batch=args.batch_size,
                                  workers=args.workers, steps=args.benchmark_steps, seed=args.seed,
                                  repeats=args.repeats, loader=loader_of(args, env), model=args.model,
                                  image_size=args.image_size)
    args.compile = tr.wants_compile(args.compile, env.device)  # config.json records what ran
    args.loader = loader_of(args, env)
    tr.check_batch_split(args.batch_size, env, args.grad_accum)
    spec = data.describe(args.data, num_classes=args.num_classes)
    steps_per_epoch = data.steps_per_epoch(spec.train_size, args.batch_size) if spec.train_size else 0
    total_epochs = args.epochs + args.cooldown_epochs
    total_steps = args.training_steps or total_epochs * steps_per_epoch or (10_000 if args.benchmark else 0)
    if total_steps <= 0:
        raise UserError(f"{args.data} has no known size: give --training-steps")
    config = dict(vars(args), **run_record("dvt.py train", args), num_classes=spec.num_classes,
                  class_names=spec.class_names, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                  world_size=env.world_size, device=str(env.device), mean=MEAN, std=STD)
    torch.manual_seed(args.seed)  # the same initial weights in every process
    model = build_model(config)
    if args.init_from and not args.resume:
        init_weights_from(model, args.init_from)
    model = model.to(env.device)
    config["params"] = sum(p.numel() for p in model.parameters())
    config["params_per_exit"] = [sum(p.numel() for p in stage.parameters()) for stage in model.stages]
    config["arch"] = dataclasses.asdict(arch_of(config))
    optimizer = make_optimizer(model, args, env.device)
    scheduler = make_scheduler(optimizer, args)
    scaler = tr.grad_scaler(env.device, args.precision)
    ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema_decay > 0 else None
    out = Path(args.output_dir)
    state = None if args.benchmark else tr.start_run(out, resume=args.resume, recipe=config["trained_by"],
                                                     settings=vars(args))
    if state:  # checkpoints keep the EMA as the averaged model's state dict (ema.module): budget and eval load it
        tr.restore(state, out, model=model, optimizer=optimizer, scaler=scaler,
                   ema=ema.module if ema is not None else None)
        for group in optimizer.param_groups:  # a run from before timm's scheduler: each group's lr is its own
            group.pop("lr_scale", None)
    model = tr.wrap(model, env, compile_model=args.compile)
    if args.benchmark:
        return benchmark(args, env, model, optimizer, scheduler, scaler, config)
    log = RunLog(out, config, start_step=state["step"] if state else 0, wandb_project=args.wandb,
                 tensorboard=args.tensorboard, main=env.is_main)  # rank 0 writes config.json and log.jsonl
    try:
        return loop(args, env, model, ema, optimizer, scheduler, scaler, config, state or {}, log)
    finally:
        log.close()


def loop(args, env: tr.DistEnv, model, ema, optimizer, scheduler, scaler, config: dict, state: dict,
         log: RunLog) -> dict:
    total_steps, steps_per_epoch, exits = config["total_steps"], config["steps_per_epoch"], len(args.grids)
    eval_interval = args.eval_interval or steps_per_epoch or total_steps
    start_step, best_top1, out, record = state.get("step", 0), state.get("best_top1", -1.0), Path(args.output_dir), {}
    run.say(f"{config['params'] / 1e6:.1f}M params ({', '.join(f'{p / 1e6:.2f}M' for p in config['params_per_exit'])}"
            f" per exit), {total_steps} steps ({steps_per_epoch}/epoch), {env.world_size} process(es) on "
            f"{env.device.type}, starting at step {start_step}", main=env.is_main)
    batches = tr.train_batches(args.data, train_augmentation(config), env, global_batch=args.batch_size,
                               seed=args.seed, start_step=start_step, workers=args.workers, image_size=args.image_size,
                               num_classes=config["num_classes"], mean=MEAN, std=STD, repeats=args.repeats,
                               loader=args.loader)
    augmenter, ema_weights = Augmenter(config, env.device), ema.module if ema is not None else None
    # Per exit: summed loss, correct top-1 and unreadable images skipped, since the last log record.
    window = tr.Window(torch.zeros(3, exits, device=env.device), state.get("log_window"))
    with tr.Preemption(env) as preemption, tr.progress(start_step, total_steps, env) as progress:
        for step in progress:
            batch = next(batches)
            scheduler.step(epoch_at(step, config))
            metrics = train_step(model, optimizer, scaler, batch, step, args, env, augmenter, ema)
            skipped = torch.full_like(metrics["correct"], batch["skipped"] / exits)  # spread over the exits
            window.add(torch.stack([metrics["loss_sums"], metrics["correct"], skipped]))
            done = step + 1
            epoch = done / steps_per_epoch if steps_per_epoch else 0.0
            if run.due(done, args.log_interval, total_steps):
                record = train_record(window.totals(done, out), window.steps * args.batch_size, optimizer, metrics)
                log.write(done, **record, img_per_sec=window.images_per_sec(args.batch_size), epoch=epoch)
                progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                window.reset()
            stop = preemption.stop_after(done, start_step=start_step, stop_after=args.stop_after,
                                         every=args.log_interval)
            evaluating = run.due(done, eval_interval, total_steps)
            if evaluating or stop:
                with window.paused():  # img/s counts training time only
                    results = evaluate_weights(model, ema, config, env) if evaluating else {}
                    top1 = results.get(report_key("val_top1", ema))
                    best_top1 = max(best_top1, top1 if top1 is not None else -1.0)
                    if results:
                        log.write(done, **results, best_top1=best_top1, epoch=epoch)
                        run.say(run.eval_line(done, results), main=env.is_main)
                    tr.save(out, done, env, model=model, optimizer=optimizer, scaler=scaler, ema=ema_weights,
                            eval_metrics=results,
                            extra={"best_top1": best_top1, "config": config, "log_window": window.state()})
                    if top1 is not None and top1 >= best_top1 and env.is_main:  # the weights budget/eval load
                        reported = ema_weights if ema is not None else tr.unwrap(model)
                        tr.save_checkpoint(out / "best", done, {"model": reported.state_dict(), "step": done,
                                                                "val_top1": top1, "config": config})
            if stop and done < total_steps:
                run.say(f"stopping at step {done}: checkpoint saved in {out / 'checkpoints'}; continue with "
                        "--resume", main=env.is_main)
                break
    return dict(record, best_top1=best_top1)


def train_record(sums: torch.Tensor, images: int, optimizer: torch.optim.Optimizer, metrics: dict) -> dict:
    """A log record of the window's sums over `images` training images: the trained loss (summed over the exits),
    each exit's loss and top-1 (on the augmented images, against their labels), the heads' lr (the highest:
    --backbone-lr-scale <= 1) and the last step's gradient norm."""
    means = sums / images
    record = {"loss": means[0].sum().item(), "lr": max(group["lr"] for group in optimizer.param_groups),
              "grad_norm": metrics["grad_norm"].item()}
    for k in range(sums.shape[1]):
        record[f"loss_exit{k + 1}"] = means[0, k].item()
        record[f"train_top1_exit{k + 1}"] = 100 * means[1, k].item()
    if sums[2].sum() > 0:
        record["skipped_images"] = round(sums[2].sum().item())
    return record


def report_key(key: str, ema: ModelEmaV3 | None) -> str:
    """The metric the run reports and keeps as best: the EMA weights' when EMA is on (official main.py)."""
    return f"ema_{key}" if ema is not None else key


# ----------------------------------------------------------------------------------------------
# Evaluation during training: every exit on every val image.
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: DVT, config: dict, env: tr.DistEnv, prefix: str) -> dict:
    """Summed cross-entropy of the exits and each exit's top-1 over the val split (all processes); `prefix`_top1 is
    the last exit's."""
    was_training = model.training
    model.eval()
    exits = len(config["grids"])
    sums = torch.zeros(2 + exits, device=env.device)  # images, loss, correct per exit
    batches = tr.eval_batches(config["data"], env, image_size=config["image_size"],
                              crop_ratio=config["test_crop_ratio"], interpolation=config["interpolation"],
                              global_batch=config["eval_batch_size"], workers=config["workers"], mean=MEAN, std=STD,
                              loader=config.get("loader", "pil"))
    for batch in tqdm(batches, desc="eval", leave=False, disable=not env.is_main, file=sys.stderr):
        labels = batch["label"]
        valid = labels >= 0  # padding slots and unreadable images carry -1
        with tr.autocast(env.device, config["precision"]):
            outputs = [logits.float() for logits in model(batch["image"])]
        loss = sum(F.cross_entropy(logits, labels.clamp(min=0), reduction="none") for logits in outputs)
        hits = [((logits.argmax(-1) == labels) & valid).sum() for logits in outputs]
        sums += torch.stack([valid.sum(), (loss * valid).sum(), *hits]).float()
    model.train(was_training)
    count, loss, *correct = tr.all_reduce_sum(sums).tolist()
    if count == 0:
        return {}
    results = {f"{prefix}_loss": loss / count, f"{prefix}_top1": 100 * correct[-1] / count,
               f"{prefix}_images": int(count)}
    results.update({f"{prefix}_top1_exit{k + 1}": 100 * c / count for k, c in enumerate(correct)})
    return results


def evaluate_weights(model: nn.Module, ema: ModelEmaV3 | None, config: dict, env: tr.DistEnv) -> dict:
    """`evaluate` of the trained weights (val_*) and, when EMA is on, of their average (ema_val_*)."""
    results = evaluate(tr.unwrap(model), config, env, "val")
    if ema is not None and results:
        results |= evaluate(ema.module, config, env, "ema_val")
    return results


# ----------------------------------------------------------------------------------------------
# Adaptive inference (paper §3.3): confidence thresholds for a budget, FLOPs per exit, real early exit.
# ----------------------------------------------------------------------------------------------


def budget_thresholds(confidences: torch.Tensor, q: float) -> list[float]:
    """The paper's thresholds (official inference.py, dynamic_find_threshold). confidences: (exits, n) max softmax
    of every exit on n training images. Target exit shares pi_k proportional to q^k; going down the exits, T_k is the
    floor(n pi_k)-th highest confidence among the images that have not exited yet, so that exactly that many exit
    at k. An exit with no share gets 2.0 (above any probability); the last exit takes everything left."""
    exits, n = confidences.shape
    shares = torch.tensor([q ** (k + 1) for k in range(exits)], dtype=torch.float64)
    shares /= shares.sum()
    remaining = torch.ones(n, dtype=torch.bool)
    thresholds = []
    for k in range(exits - 1):
        count = math.floor(n * shares[k].item())
        candidates = confidences[k][remaining].sort(descending=True).values
        threshold = candidates[count - 1].item() if 0 < count <= len(candidates) else 2.0
        thresholds.append(threshold)
        remaining &= confidences[k] < threshold
    return thresholds


def simulate_exits(confidences: torch.Tensor, thresholds: list[float]) -> torch.Tensor:
    """Exit index of each image when every exit's confidence is known: the first k with confidence >= T_k."""
    exits, n = confidences.shape
    exit_index = torch.full((n,), exits - 1, dtype=torch.long)
    for k in reversed(range(exits - 1)):
        exit_index[confidences[k] >= thresholds[k]] = k
    return exit_index


def average_flops(exit_index: torch.Tensor, cumulative: list[float]) -> float:
    """Mean FLOPs per image: an image leaving at exit k ran exits 1..k (their reuse modules included)."""
    return torch.tensor(cumulative, dtype=torch.float64)[exit_index].mean().item()


def exit_shares(exit_index: torch.Tensor, exits: int) -> list[float]:
    return (torch.bincount(exit_index, minlength=exits).double() / max(1, len(exit_index))).tolist()


def search_budget(confidences: torch.Tensor, cumulative: list[float], target: float) -> tuple[float, list[float]]:
    """q (and its thresholds) whose average FLOPs on the calibration images is nearest `target`: bisection on log q,
    the average cost rising with q (later exits get larger shares)."""
    def cost(log_q: float) -> float:
        return average_flops(simulate_exits(confidences, budget_thresholds(confidences, math.exp(log_q))), cumulative)

    low, high = math.log(1e-4), math.log(1e4)
    lowest, highest = cost(low), cost(high)
    if not lowest * 0.98 <= target <= highest * 1.02:
        raise UserError(f"a budget of {target / 1e9:.4g} GFLOPs is outside what the exits can meet on these images: "
                        f"{lowest / 1e9:.4g} (all leave at exit 1) to {highest / 1e9:.4g} (all reach the last exit)")
    best = min((low, high), key=lambda v: abs(cost(v) - target))
    for _ in range(60):
        middle = (low + high) / 2
        value = cost(middle)
        if abs(value - target) < abs(cost(best) - target):
            best = middle
        low, high = (middle, high) if value < target else (low, middle)
    return math.exp(best), budget_thresholds(confidences, math.exp(best))


def exit_flops(config: dict[str, Any]) -> list[float]:
    """FLOPs of one image through each exit (torch.utils.flop_counter: matmuls, convolutions, attention; 2 per
    multiply-add), each exit counted with the modules that transform the previous exit's outputs. The model is built
    on the meta device: no memory, no compute."""
    with torch.device("meta"):
        model = build_model(config).eval()
        images = torch.zeros(1, 3, config["image_size"], config["image_size"])
    flops, upstream = [], None
    for stage in model.stages:
        with FlopCounterMode(display=False) as counter:
            _, upstream = stage(images, upstream)
        flops.append(float(counter.get_total_flops()))
    return flops


def cumulative_flops(config: dict[str, Any]) -> list[float]:
    return np.cumsum(exit_flops(config)).tolist()


@torch.no_grad()
def early_exit(model: DVT, images: torch.Tensor, thresholds: list[float],
               precision: str = "bf16") -> tuple[torch.Tensor, torch.Tensor]:
    """Real adaptive inference on a batch: exit k runs on the images still going only, the batch compacted after
    each exit together with the reuse tensors of just those rows. Returns the logits of each image's exit and the
    exit index (0-based)."""
    outputs, exit_index = None, torch.empty(len(images), dtype=torch.long, device=images.device)
    active = torch.arange(len(images), device=images.device)
    upstream, last = None, len(model.stages) - 1
    for k, stage in enumerate(model.stages):
        with tr.autocast(images.device, precision):
            logits, reuse = stage(images if k == 0 else images[active], upstream)
        logits = logits.float()
        if outputs is None:
            outputs = torch.empty(len(images), logits.shape[-1], device=images.device)
        leaving = torch.ones(len(active), dtype=torch.bool, device=images.device) if k == last else \
            logits.softmax(-1).amax(-1) >= thresholds[k]
        outputs[active[leaving]] = logits[leaving]
        exit_index[active[leaving]] = k
        going = ~leaving
        if not going.any():
            break
        active, upstream = active[going], None if reuse is None else reuse.select(going)
    return outputs, exit_index


# ----------------------------------------------------------------------------------------------
# budget and eval commands.
# ----------------------------------------------------------------------------------------------


def load_weights(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], Path, int]:
    """The reported weights of a run (its best checkpoint, else the EMA or raw weights of its last), with its
    config, the file and its step."""
    state, file = tr.load_run_checkpoint(path, "dvt.py", subdirs=("best", "checkpoints"))
    weights = state["ema"] if state.get("ema") is not None else state["model"]
    config = state["config"]
    if "img_size" in config:  # a run from before --image-size was the canonical spelling
        config = dict(config, image_size=config["img_size"])
    return weights, config, file, state.get("step", 0)


def load_run(args: argparse.Namespace) -> tuple[DVT, dict, dict, torch.device]:
    weights, config, file, step = load_weights(args.run_dir)
    if "grids" not in config or config.get("model") not in MODELS:
        raise UserError(f"{file} is not a checkpoint of dvt.py")
    config = dict(config, data=args.data or config["data"])
    model = build_model(config)
    tr.check_state_dict(model, weights, str(file))
    model.load_state_dict(weights)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    meta = {"checkpoint": str(file), "step": step, "data": config["data"], "calib_images": args.calib_images,
            "calib_seed": args.calib_seed, "precision": args.precision if device.type == "cuda" else "fp32"}
    return model, config, meta, device


def run_folder(args: argparse.Namespace) -> Path:
    path = Path(args.run_dir)
    return path if path.is_dir() else path.parent


@torch.no_grad()
def all_exit_confidences(model: DVT, batches, device: torch.device, precision: str,
                         limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every exit on every image: max softmax (exits, n) and correctness (exits, n), padding slots dropped."""
    confidences, correct, seen = [], [], 0
    for batch in tqdm(tr.batches_to_device(batches, device, MEAN, STD), desc="all exits", leave=False,
                      file=sys.stderr):
        with tr.autocast(device, precision):
            probs = torch.stack([logits.float().softmax(-1) for logits in model(batch["image"])])
        confidence, prediction = probs.max(-1)
        valid = batch["label"] >= 0  # eval padding slots and unreadable images carry -1
        confidences.append(confidence[:, valid].cpu())
        correct.append((prediction == batch["label"])[:, valid].cpu())
        seen += int(valid.sum())
        if limit and seen >= limit:
            break
    if not confidences:
        raise UserError("no images to run on")
    return torch.cat(confidences, 1)[:, :limit], torch.cat(correct, 1)[:, :limit]


def calibration_confidences(model: DVT, config: dict, meta: dict, args: argparse.Namespace,
                            device: torch.device) -> torch.Tensor:
    """Max softmax of every exit on --calib-images random training images (cached in RUN_DIR/calibration.pt)."""
    cache = run_folder(args) / CALIB_CACHE
    if cache.exists():
        stored = torch.load(cache, weights_only=False)
        if stored.get("meta") == meta:
            return stored["confidences"]
    spec = data.describe(config["data"])
    if not spec.train_size:
        raise UserError(f"{config['data']} has no training images of known number to set the thresholds on")
    count = min(args.calib_images, spec.train_size)
    batches = data.train_batches(config["data"], calibration_transform(config), global_batch=min(args.batch_size,
                                 count), seed=args.calib_seed, workers=args.workers)
    confidences = all_exit_confidences(model, batches, device, args.precision, limit=count)[0]
    torch.save({"meta": meta, "confidences": confidences}, cache)
    return confidences


def budget(args: argparse.Namespace) -> dict:
    if args.q is not None and args.q <= 0:
        raise UserError(f"--q must be positive, got {args.q}")
    model, config, meta, device = load_run(args)
    output = make_output_dir(Path(args.output).parent) / Path(args.output).name if args.output else \
        run_folder(args) / "budget.json"
    confidences = calibration_confidences(model, config, meta, args, device)
    cumulative = cumulative_flops(config)
    if args.q is not None:
        q, thresholds = args.q, budget_thresholds(confidences, args.q)
    else:
        target = args.target_gflops * 1e9 if args.target_gflops is not None else args.target_gmacs * 2e9
        q, thresholds = search_budget(confidences, cumulative, target)
    exits = simulate_exits(confidences, thresholds)
    result = {"q": q, "thresholds": thresholds, "calib_gflops": average_flops(exits, cumulative) / 1e9,
              "calib_exit_share": exit_shares(exits, len(cumulative)), "target_gflops": args.target_gflops,
              "target_gmacs": args.target_gmacs, "cumulative_gflops": [c / 1e9 for c in cumulative], **meta,
              "calib_images": confidences.shape[1]}
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


def eval_thresholds(args: argparse.Namespace, exits: int) -> list[float] | None:
    if args.thresholds:
        thresholds = parse_floats(args.thresholds, "--thresholds")
    else:
        path = Path(args.budget) if args.budget else run_folder(args) / "budget.json"
        if not path.exists():
            if args.budget or not args.curve:
                raise UserError(f"no thresholds: {path} does not exist. Run `dvt.py budget {args.run_dir} "
                                "--target-gflops X` first, or give --thresholds (or --curve)")
            return None
        thresholds = json.loads(path.read_text())["thresholds"]
    if len(thresholds) != exits - 1:
        raise UserError(f"the model has {exits} exits: give {exits - 1} thresholds (the last exit takes the rest), "
                        f"got {len(thresholds)}")
    return thresholds


@torch.no_grad()
def early_exit_eval(model: DVT, config: dict, thresholds: list[float], args: argparse.Namespace,
                    device: torch.device) -> dict:
    """Top-1, average FLOPs and exit shares of the real early exit over the val split."""
    exits = len(config["grids"])
    cumulative = cumulative_flops(config)
    batches = data.eval_batches(config["data"], eval_transform(config), global_batch=args.batch_size,
                                workers=args.workers)
    correct, counts, seconds = 0, torch.zeros(exits, dtype=torch.long), 0.0
    for batch in tqdm(tr.batches_to_device(batches, device, MEAN, STD), desc="early exit", leave=False,
                      file=sys.stderr):
        valid = batch["label"] >= 0
        start = time.perf_counter()
        logits, exit_index = early_exit(model, batch["image"][valid], thresholds, args.precision)
        correct += (logits.argmax(-1) == batch["label"][valid]).sum().item()  # waits for the device
        seconds += time.perf_counter() - start
        counts += torch.bincount(exit_index.cpu(), minlength=exits)
    images = int(counts.sum())
    if images == 0:
        raise UserError(f"{config['data']} has no val images")
    gflops = float((counts.double() * torch.tensor(cumulative, dtype=torch.float64)).sum()) / images / 1e9
    return {"top1": 100 * correct / images, "gflops": gflops, "gmacs": gflops / 2,
            "exit_share": (counts.double() / images).tolist(), "thresholds": thresholds, "images": images,
            "img_per_sec": images / seconds, "cumulative_gflops": [c / 1e9 for c in cumulative]}


def budget_curve(model: DVT, config: dict, meta: dict, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """The paper's budgeted-classification curve: thresholds for q = p/20, p = 1..59 on the calibration images,
    applied to all-exit confidences of the val images (the official evaluation; `early_exit` gives the same
    predictions, see the tests). Writes RUN_DIR/curve.csv and curve.png."""
    calib = calibration_confidences(model, config, meta, args, device)
    batches = data.eval_batches(config["data"], eval_transform(config), global_batch=args.batch_size,
                                workers=args.workers)
    confidences, correct = all_exit_confidences(model, batches, device, args.precision)
    exits, cumulative = confidences.shape[0], cumulative_flops(config)
    rows = []
    for q in PAPER_BUDGET_QS:
        thresholds = budget_thresholds(calib, q)
        exit_index = simulate_exits(confidences, thresholds)
        hits = correct.gather(0, exit_index[None])[0]
        row = {"q": q, **{f"threshold_exit{k + 1}": t for k, t in enumerate(thresholds)},
               "calib_gflops": average_flops(simulate_exits(calib, thresholds), cumulative) / 1e9,
               "gflops": average_flops(exit_index, cumulative) / 1e9, "top1": 100 * hits.double().mean().item()}
        row["gmacs"] = row["gflops"] / 2
        row.update({f"share_exit{k + 1}": s for k, s in enumerate(exit_shares(exit_index, exits))})
        rows.append(row)
    folder = run_folder(args)
    with open(folder / "curve.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    anytime = [(c / 1e9, 100 * correct[k].double().mean().item()) for k, c in enumerate(cumulative)]
    plot_curve(rows, anytime, config, folder / "curve.png")
    return rows


def plot_curve(rows: list[dict], anytime: list[tuple[float, float]], config: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot([r["gflops"] for r in rows], [r["top1"] for r in rows], "-", label="DVT, early exit (q = 0.05 .. 2.95)")
    for (gflops, top1), grid in zip(anytime, config["grids"]):
        ax.plot(gflops, top1, "o", label=f"every image to exit {grid}x{grid}")
    ax.set_xlabel("average GFLOPs per image (GMACs x 2)")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(f"{config['model']} on {Path(str(config['data'])).name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def evaluate_command(args: argparse.Namespace) -> dict:
    model, config, meta, device = load_run(args)
    thresholds = eval_thresholds(args, len(config["grids"]))
    result = {}
    if thresholds is not None:
        result = early_exit_eval(model, config, thresholds, args, device)
    if args.curve:
        rows = budget_curve(model, config, meta, args, device)
        result["curve"] = {"csv": str(run_folder(args) / "curve.csv"), "png": str(run_folder(args) / "curve.png"),
                           "points": len(rows)}
    print(json.dumps(result))
    return result


# ----------------------------------------------------------------------------------------------
# Benchmark: train steps and adaptive inference on device-made batches (no data loading).
# ----------------------------------------------------------------------------------------------


def timed(fn, steps: int, device: torch.device) -> float:
    """Seconds per call of fn() (it returns a tensor to wait for), after two warm-up calls."""
    for _ in range(2):
        fn().sum().item()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        result = fn()
    result.sum().item()
    return (time.perf_counter() - start) / steps


@torch.no_grad()
def benchmark_inference(model: DVT, config: dict, args, env: tr.DistEnv) -> list[dict]:
    """img/s of the real early exit at --benchmark-q budgets (thresholds set by the paper's procedure on the same
    synthetic batch, so the exits take the budget's shares), of the cascade with no exit, and of the last exit's
    backbone alone on every image (e.g. T2T-ViT-14 at 14x14)."""
    model.eval()
    batch = tr.synthetic_batch(args.eval_batch_size, args.image_size, config["num_classes"], env.device,
                               args.seed + 1, MEAN, STD)
    images = batch["image"]
    cumulative = cumulative_flops(config)
    with tr.autocast(env.device, args.precision):
        confidences = torch.stack([o.float().softmax(-1).amax(-1) for o in model(images)]).cpu()
    torch.manual_seed(args.seed)
    baseline = plain_backbone(config).to(env.device).eval()

    def run_baseline() -> torch.Tensor:
        with tr.autocast(env.device, args.precision):
            return baseline(images)[0]

    base_seconds = timed(run_baseline, args.benchmark_steps, env.device)
    results = [{"name": f"exit {config['grids'][-1]}x{config['grids'][-1]} backbone alone",
                "gflops": exit_flops(dict(config, grids=config["grids"][-1:]))[0] / 1e9,
                "img_per_sec": round(len(images) / base_seconds, 1)}]
    budgets = [("no early exit (all exits)", None, [2.0] * (len(cumulative) - 1))]
    budgets += [(f"q={q}", q, budget_thresholds(confidences, q)) for q in args.benchmark_q]
    for name, q, thresholds in budgets:
        seconds = timed(lambda t=thresholds: early_exit(model, images, t, args.precision)[0], args.benchmark_steps,
                        env.device)
        exit_index = early_exit(model, images, thresholds, args.precision)[1].cpu()
        results.append({"name": name, "q": q, "thresholds": [round(t, 4) for t in thresholds],
                        "exit_share": [round(s, 4) for s in exit_shares(exit_index, len(cumulative))],
                        "gflops": round(average_flops(exit_index, cumulative) / 1e9, 4),
                        "img_per_sec": round(len(images) / seconds, 1),
                        "speedup_vs_backbone_alone": round(base_seconds / seconds, 2)})
    model.train()
    return results


def benchmark(args, env: tr.DistEnv, model, optimizer, scheduler, scaler, config: dict) -> dict:
    """--benchmark: the adaptive inference (main process), then train steps at the peak lr (`tr.benchmark`)."""
    batch = tr.synthetic_batch(args.batch_size // env.world_size, args.image_size, config["num_classes"], env.device,
                               env.rank, MEAN, STD)
    augmenter = Augmenter(config, env.device)
    scheduler.step(args.warmup_epochs)  # the peak lr
    flops = tr.train_flops_per_sample(lambda: build_model(config), (3, args.image_size, args.image_size))
    inference = benchmark_inference(tr.unwrap(model), config, args, env) if env.is_main else None

    real = None if args.data == "synthetic" else tr.train_batches(  # is the run input-bound?
        args.data, train_augmentation(config), env, global_batch=args.batch_size, seed=args.seed, start_step=0,
        workers=args.workers, num_classes=config["num_classes"], image_size=args.image_size, mean=MEAN, std=STD,
        repeats=args.repeats, loader=args.loader)

    def step(real_batch: dict | None) -> torch.Tensor:
        return train_step(model, optimizer, scaler, real_batch or batch, 0, args, env, augmenter, None)["loss_sums"]

    return tr.benchmark(step, env, steps=args.benchmark_steps, global_batch=args.batch_size, real_batches=real,
                        train_flops_per_image=flops, model=args.model, image_size=args.image_size, grids=args.grids,
                        precision=args.precision if env.device.type == "cuda" else "fp32", compile=args.compile,
                        loader=args.loader, inference=inference)


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    def command() -> None:
        args = parse_args(argv)
        {"train": train, "budget": budget, "eval": evaluate_command}[args.command](args)

    return exit_status(command)


if __name__ == "__main__":
    sys.exit(main())

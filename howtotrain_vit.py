"""How to train your ViT? Data, Augmentation, and Regularization in Vision Transformers (Steiner et al. 2021),
in PyTorch with timm's ViTs.

    python howtotrain_vit.py train --model vit_base_patch16_224 --augreg medium2 --data /path/to/imagenet
    torchrun --nproc_per_node=8 howtotrain_vit.py train ...              # DDP; add --nnodes/--rdzv-* for many nodes
    python howtotrain_vit.py train --output-dir RUN --eval-only         # evaluate a run's last checkpoint
    python howtotrain_vit.py finetune --init runs/howtotrain/i21k_b16_medium1_300ep --data /path/to/imagenet
    python howtotrain_vit.py finetune --init vit_b16_augreg_in21k.safetensors --model B/16 --data cifar10 \
        --training-steps 10000 --random-crop resmall --loader pil     # transfer (paper §3; big_vision transfer.py)
    python howtotrain_vit.py history runs/howtotrain/in1k_b16_medium2_300ep   # loss / accuracy / lr curves -> PNG
    python howtotrain_vit.py predict runs/howtotrain/in1k_b16_medium2_300ep photos/   # top-k labels

The PyTorch study of the paper that users start from (an extension of the PyTorch ImageNet example) runs unchanged:
    python howtotrain_vit.py train --data DIR --arch lucidrain_vit --epochs 36 --batch-size 256 \
        --output_parent_dir OUT --mixup
with its spellings (-a/--arch, -o/--output_parent_dir, -j, -b, --wd, --warmup_period, --randaug_num_ops, -e,
--dummy, --resume PATH, and vit-pytorch's --dim --heads --mlp_dim ...) as aliases of this recipe's flags; everything
it does not set is the paper's recipe, not the study's defaults.

The recipe in one paragraph (paper §3, and its official config big_vision/configs/vit_i1k.py): a plain ViT
(class token, learnable position embedding, a tanh pre-logits layer, zero-initialised head) trained with Adam
(β1 0.9, β2 0.999) at lr 1e-3 and batch 4096, decoupled weight decay 1e-4 on the weight matrices, gradient
clipping at global norm 1.0, 10k steps of linear warmup then cosine decay to 0, sigmoid cross-entropy;
inception crop + flip, and "AugReg": RandAugment and mixup at one of seven levels (`--augreg`), with or without
dropout 0.1 and stochastic depth 0.1 (`--reg`). The paper's grid points are full command lines in
`scripts/howtotrain/`.

Transfer (`finetune`, paper §3 and big_vision/configs/transfer.py): the upstream model (a `train` run, or a timm
checkpoint such as the released `augreg_in21k` ones, saved locally) with a zero head for the new classes, SGD with
momentum 0.9, no weight decay, clip 1.0, batch 512, 500 warmup steps then cosine, softmax cross-entropy, inception
crop + flip at 384 px (the position embedding resized bicubically), 20k steps on ImageNet-1k, 10k on CIFAR.

File order: flags and presets, model, finetune's --init, optimizers and schedule, data, loss and train step, the
loop (train and finetune), evaluation, benchmark, history, predict, main.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import math
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.layers import lecun_normal_
from timm.optim import param_groups_weight_decay
from torch import nn
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from common import UserError, augment, convert, data, gpu_input, run
from common import torch_run as tr
from common.run import ArgumentParser, check_positive, exit_status, run_record
from common.runlog import RunLog, plot_runs, read_log

SCRIPT = "howtotrain_vit.py"

# ----------------------------------------------------------------------------------------------
# Flags and presets.
# ----------------------------------------------------------------------------------------------

# The paper's models (§3, "Models") by their timm names. R+ViT hybrids: a ResNet stem, then the ViT on its feature map.
PAPER_MODELS = {
    "Ti/16": "vit_tiny_patch16_224", "S/32": "vit_small_patch32_224", "S/16": "vit_small_patch16_224",
    "B/32": "vit_base_patch32_224", "B/16": "vit_base_patch16_224", "L/16": "vit_large_patch16_224",
    "R+Ti/16": "vit_tiny_r_s16_p8_224", "R26+S/32": "vit_small_r26_s32_224", "R50+L/32": "vit_large_r50_s32_224",
}
# The PyTorch study's default `--arch lucidrain_vit`, vit-pytorch's ViT(patch_size=16, dim=1024, depth=6, heads=16,
# mlp_dim=2048, dropout=0.1, emb_dropout=0.1), as a timm ViT and the flags that reshape it (each overridable). Its
# head stays this recipe's (pre-logits, zero init); vit-pytorch also drops attention weights, which neither the
# paper nor this recipe does.
PORT_MODELS = {"lucidrain_vit": ("vit_large_patch16_224", dict(patch_size=16, embed_dim=1024, depth=6, num_heads=16,
                                                               mlp_dim=2048, dropout=0.1, emb_dropout=0.1))}


class AugLevel(NamedTuple):
    randaug_layers: int  # 0: no RandAugment
    randaug_magnitude: int
    mixup: float  # mixup alpha (0: off)


# Paper §3 ("Data augmentation and regularization") and big_vision configs/vit_i1k.py (RANDAUG_DEF, MIXUP_DEF).
AUGREG_LEVELS = {
    "none": AugLevel(0, 0, 0.0),
    "light1": AugLevel(2, 0, 0.0),  # magnitude 0 still applies autocontrast / equalize / invert
    "light2": AugLevel(2, 10, 0.2),
    "medium1": AugLevel(2, 15, 0.2),
    "medium2": AugLevel(2, 15, 0.5),
    "strong1": AugLevel(2, 20, 0.5),
    "strong2": AugLevel(2, 20, 0.8),
}
PAPER_REG_RATE = 0.1  # paper §3: dropout 0.1 and stochastic depth 0.1 together, or neither
MIXUP_SWITCH = object()  # bare --mixup (the study's switch): the level's alpha, else the paper's least, 0.2
MEAN = STD = (0.5, 0.5, 0.5)  # big_vision value_range(-1, 1)
PAPER_BATCH = 4096  # paper §3 ("Pre-training"): the batch at which the paper gives lr 1e-3

# The transfer recipe (paper §3, "Fine-tuning"; big_vision configs/transfer.py, the config of the released
# in21k_ft_in1k checkpoints): SGD momentum 0.9, no weight decay, clip 1.0, batch 512, 500 warmup steps then cosine
# to 0, softmax cross-entropy, a zero head, no mixup or RandAugment; inception crop + flip at 384 px, eval
# resize_small(448) | central_crop(384). lr 0.01 is the config's default (the paper sweeps {0.001, 0.003, 0.01,
# 0.03}); 20k steps is its ImageNet-1k schedule (CIFAR: 10k). Evaluate and save every 1000 steps (its
# checkpoint_steps).
TRANSFER = dict(image_size=384, test_crop_ratio=384 / 448, augreg="none", loss="softmax", batch_size=512, lr=0.01,
                lr_ref_batch=512, lr_scaling="linear", weight_decay=0.0, warmup_steps=500, training_steps=20_000,
                eval_interval=1000, output_dir="runs/howtotrain/finetune")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="How to train your ViT? (Steiner et al. 2021), in PyTorch",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    add_train_flags(commands.add_parser("train", help="train a ViT", description="train a ViT the AugReg way",
                                        formatter_class=argparse.ArgumentDefaultsHelpFormatter), "train")
    add_train_flags(commands.add_parser("finetune", help="transfer a trained ViT to new classes (paper §3)",
                                        description="fine-tune a howtotrain run or a timm checkpoint the way the "
                                                    "paper transfers (big_vision configs/transfer.py)",
                                        formatter_class=argparse.ArgumentDefaultsHelpFormatter), "finetune")
    p = commands.add_parser("history", help="plot a run's log.jsonl to PNG and print a summary table")
    p.add_argument("run_dir", help="a run's --output-dir (or its log.jsonl)")
    p.add_argument("--output", help="PNG path (default: RUN_DIR/history.png)")
    p = commands.add_parser("predict", help="classify images with a trained checkpoint",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="a run's --output-dir (its best checkpoint, else its last) or a .pt file")
    p.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--labels-file", help="class names, one per line (default: the training data's, saved in the "
                                         "checkpoint)")
    p.add_argument("--batch-size", type=int, default=64)
    return parser


def add_train_flags(p: argparse.ArgumentParser, stage: str) -> None:
    # train: the 36-epoch ImageNet-1k run at batch 256 that users of the PyTorch study start from; everything
    # else is the paper's. scripts/howtotrain/ holds the paper's 300-epoch, batch-4096 grid points. The second
    # spellings are the study's (and the PyTorch ImageNet example's). finetune: the same flags with the transfer
    # recipe's defaults (TRANSFER), plus --init and --momentum.
    g = p.add_argument_group("run")
    g.add_argument("--data", default="digits",
                   help="ImageNet-layout folder, webdataset shards, cifar10, cifar100, digits or synthetic")
    g.add_argument("--dummy", dest="data", action="store_const", const="synthetic", default=argparse.SUPPRESS,
                   help="= --data synthetic")
    g.add_argument("--output-dir", "-o", "--output_parent_dir", default="runs/howtotrain",
                   help="the run folder: config.json, log.jsonl and checkpoints go here (the study's "
                        "--output_parent_dir names this folder itself, not a parent of dated runs)")
    g.add_argument("--resume", nargs="?", const=True, default=False, metavar="PATH",
                   help="continue from the last checkpoint in --output-dir; PATH, if given, must be that folder or "
                        "its last checkpoint")
    g.add_argument("--eval-only", "-e", "--evaluate", action="store_true",
                   help="evaluate the run's last checkpoint (or --resume PATH, a checkpoint of the run) on the val "
                        "split, print and log the metrics, train nothing")
    g.add_argument("--stop-after", type=int, default=0,
                   help="save and exit after this many steps of this invocation (0: run to the end); for job time "
                        "limits, continue with --resume")
    g.add_argument("--benchmark", action="store_true", help="time train steps on synthetic batches and exit")
    g.add_argument("--benchmark-steps", type=int, default=20)
    g.add_argument("--benchmark-input", action="store_true",
                   help="time the input pipeline alone (--data, --workers, --batch-size) over --benchmark-steps "
                        "batches, print JSON and exit")
    g.add_argument("--workers", "-j", type=int, default=tr.default_workers(), help="data loader processes per process")
    g.add_argument("--log-interval", type=int, default=50, help="steps between log lines (big_vision: 50)")
    g.add_argument("--eval-interval", type=int, default=0, help="steps between evals and checkpoints (0: each epoch)")
    g.add_argument("--precision", choices=list(tr.AUTOCAST_DTYPES), default="bf16",
                   help="autocast dtype on GPUs (fp16 adds loss scaling); CPUs always compute in float32")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on with CUDA, off on CPUs; --no-compile: eager)")
    g.add_argument("--seed", type=int, default=0, help="initial weights, data order, augmentation, dropout, mixup")
    g.add_argument("--wandb", default=None, metavar="PROJECT", help="also log to Weights & Biases (if installed)")
    g.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard (if installed)")
    tr.add_loader_flag(g)
    tr.add_launcher_flags(g)

    g = p.add_argument_group("model")
    if stage == "finetune":
        g.add_argument("--init", required=True, metavar="RUN_OR_FILE",
                       help="the weights to transfer: a howtotrain_vit.py run folder or its .pt checkpoint (the "
                            "model comes from its config), a timm VisionTransformer state dict (.pth, .bin or "
                            ".safetensors; give its --model), or 'random' (--model's own initialisation: the "
                            "no-pretraining control). Its head is dropped for a zero head over --data's classes")
    g.add_argument("--model", "-a", "--arch", default="vit_small_patch16_224" if stage == "train" else None,
                   help="a timm model name, a paper name (" + " ".join(PAPER_MODELS) + ") or the study's "
                        "lucidrain_vit" + ("; the architecture of a timm --init file" if stage == "finetune" else ""))
    g.add_argument("--image-size", "--img-size", "--image_size", type=int, default=224, help="train resolution")
    g.add_argument("--patch-size", "--patch_size", type=int, help="override the model's patch size")
    g.add_argument("--depth", type=int, help="override the model's number of blocks")
    g.add_argument("--embed-dim", "--dim", type=int, help="override the model's width")
    g.add_argument("--num-heads", "--heads", type=int, help="override the model's number of heads")
    g.add_argument("--mlp-dim", "--mlp_dim", type=int, help="override the MLP's hidden width (needs --embed-dim)")
    g.add_argument("--num-classes", "--num_classes", type=int, default=-1, help="-1: from the data")
    if stage == "train":
        g.add_argument("--pre-logits", action=argparse.BooleanOptionalAction, default=True,
                       help="tanh pre-logits layer before the head (big_vision vit_i1k.py: rep_size=True)")

    g = p.add_argument_group("augmentation and regularisation (AugReg)")
    g.add_argument("--augreg", default="medium2",
                   help="augmentation level: " + ", ".join(f"{name} {tuple(level)}" for name, level in
                                                            AUGREG_LEVELS.items()) +
                        " as (RandAugment layers, magnitude, mixup alpha); medium2 is the paper's pick for S/16")
    g.add_argument("--reg", type=float, default=0.0,
                   help=f"dropout and stochastic depth rate together (paper: 0 or {PAPER_REG_RATE})")
    g.add_argument("--randaug-layers", "--randaug_num_ops", type=int, help="overrides the level's (0: no RandAugment)")
    g.add_argument("--randaug-magnitude", "--randaug_magnitude", type=int, help="overrides the level's")
    g.add_argument("--auto-augment", "--aa", metavar="POLICY",
                   help="a timm policy string (e.g. rand-m9-mstd0.5-inc1) or none, instead of the level's RandAugment")
    g.add_argument("--mixup", type=float, nargs="?", const=MIXUP_SWITCH, metavar="ALPHA",
                   help="mixup alpha, overrides the level's (0: off); bare --mixup (the study's switch) keeps the "
                        "level's alpha, or 0.2 (light2's) where the level has none")
    g.add_argument("--cutmix", type=float, default=0.0, metavar="ALPHA",
                   help="cutmix alpha (0: off; AugReg uses none): with mixup too, each batch takes one of the two, "
                        "as timm's Mixup does")
    g.add_argument("--random-erasing", "--reprob", type=float, default=0.0,
                   help="timm's random erasing probability, per image on the device (not in AugReg: 0)")
    g.add_argument("--dropout", type=float, help="overrides --reg")
    g.add_argument("--emb-dropout", "--emb_dropout", type=float,
                   help="dropout after the position embedding (default: --dropout)")
    g.add_argument("--drop-path", type=float, help="stochastic depth, overrides --reg")
    g.add_argument("--random-crop", choices=["rrc", "resmall", "none"], default="rrc",
                   help="rrc: inception crop, 5-100%% of the area (big_vision); resmall: big_vision's resmall_crop "
                        "(transfer.py's CIFAR crop): resize the shorter side to image-size / test-crop-ratio, then "
                        "a random image-size crop (host only: --loader pil); none: resize + center crop")
    g.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability")
    g.add_argument("--test-crop-ratio", type=float, default=0.875, help="eval: resize to size/ratio, center crop")

    g = p.add_argument_group("loss and optimizer")
    g.add_argument("--loss", choices=["sigmoid", "softmax"], default="sigmoid",
                   help="sigmoid cross-entropy (paper; head bias -log(classes)) or softmax cross-entropy")
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g.add_argument("--batch-size", "-b", type=int, default=256,
                   help="global batch over all processes (paper: 4096; the PyTorch study: 256)")
    g.add_argument("--eval-batch-size", type=int, default=256, help="global")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", "--learning-rate", type=float, default=1e-3,
                   help="peak lr at --lr-ref-batch (paper: 1e-3 at 4096; the study's 5e-4 is for its own model)")
    g.add_argument("--lr-ref-batch", type=int, default=PAPER_BATCH)
    g.add_argument("--lr-scaling", choices=["sqrt", "linear", "none"], default="sqrt",
                   help="how the peak lr follows --batch-size / --lr-ref-batch; sqrt (Adam's square-root rule) is "
                        "not the paper's, which trains at 4096 only")
    g.add_argument("--weight-decay", "--wd", type=float, default=1e-4,
                   help="decoupled, big_vision's convention: each step w -= wd * schedule(t) * w, NOT multiplied by "
                        "the lr. PyTorch's AdamW multiplies by the lr, so it gets weight_decay = wd / peak lr "
                        "(1e-4 / 1e-3 = 0.1, the 'wd_0.1' of the released checkpoints' names; the study's --wd 0.05 "
                        "is AdamW's, i.e. 0.05 x lr here); finetune's SGD decays the same way (transfer: none)")
    if stage == "train":
        g.add_argument("--adam-b1", type=float, default=0.9)
        g.add_argument("--adam-b2", type=float, default=0.999)
    else:
        g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (big_vision momentum_hp)")
    g.add_argument("--clip-grad", type=float, default=1.0, help="global gradient-norm clip (0: off)")
    g.add_argument("--warmup-steps", "--warmup_period", type=int, default=10_000, help="linear warmup")
    g.add_argument("--warmup-start-factor", type=float, default=0.0,
                   help="the warmup's first lr as a fraction of the peak (big_vision: 0; the PyTorch study's "
                        "LinearLR: 0.01)")
    g.add_argument("--warmup-epochs", type=float, help="the warmup in epochs instead, overrides --warmup-steps")
    g.add_argument("--decay", choices=["cosine", "linear"], default="cosine", help="decay after the warmup")
    g.add_argument("--min-lr", type=float, default=0.0, help="where the decay ends (paper: 0)")
    g.add_argument("--epochs", type=float, default=36, help="paper: 300 on ImageNet-1k")
    g.add_argument("--training-steps", type=int, default=0, help="if > 0, overrides --epochs")
    if stage == "finetune":
        p.set_defaults(**TRANSFER)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.command in ("train", "finetune"):
        resolve_train_args(args)
    return args


def resolve_train_args(args: argparse.Namespace) -> None:
    """Model name, AugReg level -> components (each overridable by its own flag), and sanity checks."""
    if args.model in PORT_MODELS:
        args.model, shape = PORT_MODELS[args.model]
        for name, value in shape.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
    args.model = PAPER_MODELS.get(args.model, args.model)
    if args.model is not None and not timm.is_model(args.model):  # finetune from a run: the run's model
        raise UserError(f"unknown model {args.model!r}: give a timm model name (e.g. vit_base_patch16_224) or a "
                        f"paper name: {', '.join(PAPER_MODELS)}")
    if args.augreg not in AUGREG_LEVELS:
        note = " ('light0' appears in some released checkpoint names but the paper does not define it)" \
            if args.augreg == "light0" else ""
        raise UserError(f"unknown --augreg level {args.augreg!r}; choose one of {', '.join(AUGREG_LEVELS)}{note}")
    level = AUGREG_LEVELS[args.augreg]
    if args.mixup is MIXUP_SWITCH:
        args.mixup = level.mixup or AUGREG_LEVELS["light2"].mixup
    for name in ("randaug_layers", "randaug_magnitude", "mixup"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(level, name))
    for name in ("dropout", "drop_path"):
        if getattr(args, name) is None:
            setattr(args, name, args.reg)
    if args.emb_dropout is None:
        args.emb_dropout = args.dropout
    check_positive(**{name: getattr(args, name) for name in ("batch_size", "eval_batch_size", "grad_accum",
                                                             "log_interval", "lr_ref_batch", "benchmark_steps")})
    if args.randaug_layers < 0 or args.randaug_magnitude < 0 or args.mixup < 0 or args.cutmix < 0:
        raise UserError("RandAugment layers and magnitude and the mixup and cutmix alphas must be >= 0")
    if args.random_crop == "resmall" and randaug_policy(args):
        raise UserError("--random-crop resmall (big_vision's transfer crop) takes no RandAugment: add --augreg none")
    if not 0 <= args.warmup_start_factor <= 1:
        raise UserError(f"--warmup-start-factor must be in [0, 1], got {args.warmup_start_factor}")
    if args.mlp_dim is not None and args.embed_dim is None:
        raise UserError("--mlp-dim needs --embed-dim (timm sizes the MLP as a ratio of the width)")
    if isinstance(args.resume, str):
        check_resume_path(args.resume, Path(args.output_dir), eval_only=args.eval_only)


def check_resume_path(resume: str, output_dir: Path, *, eval_only: bool) -> None:
    """The study's --resume PATH: this run's folder or its last checkpoint (with --eval-only, any checkpoint of it)."""
    out, path = output_dir.resolve(), Path(resume).resolve()
    if path != out and out not in path.parents:
        raise UserError(f"--resume {resume} is not in --output-dir {output_dir}: give the run folder (or a "
                        "checkpoint in it) as --output-dir")
    if not eval_only and tr.find_checkpoint(path) != tr.find_checkpoint(out):
        raise UserError(f"--resume {resume}: a run continues from its last checkpoint, {tr.find_checkpoint(out)}")


def randaug_policy(args: argparse.Namespace) -> str | None:
    """timm RandAugment string of the level (or --auto-augment's). timm clips magnitudes at 10 unless told otherwise
    (mmax); TF's RandAugment, which the paper used, does not: magnitude 15 rotates up to 45 degrees."""
    if args.auto_augment is not None:
        return None if args.auto_augment == "none" else args.auto_augment
    if args.randaug_layers == 0:
        return None
    return f"rand-n{args.randaug_layers}-m{args.randaug_magnitude}-mmax{max(10, args.randaug_magnitude)}"


def peak_lr(args: argparse.Namespace) -> float:
    ratio = args.batch_size / args.lr_ref_batch
    return args.lr * {"sqrt": math.sqrt(ratio), "linear": ratio, "none": 1.0}[args.lr_scaling]


# ----------------------------------------------------------------------------------------------
# Model: timm's ViT with the paper's initialisation (timm 'jax' init mirrors the original ViT code), an optional
# tanh pre-logits layer, and a zero head whose bias is -log(classes) for the sigmoid loss.
# ----------------------------------------------------------------------------------------------


def model_kwargs(args: argparse.Namespace, num_classes: int) -> dict[str, Any]:
    """timm.create_model keyword arguments. Dropout as the original ViT code: after the position embedding, after
    attention and in the MLP (timm pos_drop_rate, proj_drop_rate); stochastic depth linear from 0 to the rate."""
    kwargs = dict(num_classes=num_classes, img_size=args.image_size, pos_drop_rate=args.emb_dropout,
                  proj_drop_rate=args.dropout, drop_path_rate=args.drop_path)
    overrides = dict(patch_size=args.patch_size, depth=args.depth, embed_dim=args.embed_dim, num_heads=args.num_heads)
    kwargs.update({key: value for key, value in overrides.items() if value is not None})
    if args.mlp_dim is not None:
        kwargs["mlp_ratio"] = args.mlp_dim / args.embed_dim
    return kwargs


def create_model(name: str, kwargs: dict[str, Any], *, pre_logits: bool, head_bias: float) -> nn.Module:
    try:
        model = timm.create_model(name, pretrained=False, weight_init="jax", **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise UserError(f"timm cannot build {name} with {kwargs}: {e}") from None
    width, num_classes = model.head.in_features, model.head.out_features
    head = nn.Linear(width, num_classes)
    if pre_logits:
        hidden = nn.Linear(width, width)
        lecun_normal_(hidden.weight)  # flax Dense default, as big_vision's pre_logits
        nn.init.zeros_(hidden.bias)
        model.head = nn.Sequential(OrderedDict(pre_logits=hidden, act=nn.Tanh(), fc=head))
    else:
        model.head = head
    nn.init.zeros_(head.weight)  # big_vision head_zeroinit
    nn.init.constant_(head.bias, head_bias)
    return model


def head_bias(loss: str, num_classes: int) -> float:
    """-log(C) for the sigmoid loss: every class starts at probability 1/C instead of 1/2 (paper §3, "Pre-training")."""
    return -math.log(num_classes) if loss == "sigmoid" else 0.0


def build_model(config: dict[str, Any]) -> nn.Module:
    """The model of a run, from its config (train and predict both use this)."""
    return create_model(config["model"], config["model_kwargs"], pre_logits=config["pre_logits"],
                        head_bias=head_bias(config["loss"], config["num_classes"]))


def load_trained(path: str | Path, subdirs: tuple[str, ...] = ("checkpoints",)) -> tuple[nn.Module, dict, Path]:
    """The model of a run (a folder, looked up in `subdirs`, or a checkpoint file) with the checkpoint's weights, the
    checkpoint (its config, step) and its file: --eval-only and predict."""
    state, file = tr.load_run_checkpoint(path, SCRIPT, subdirs=subdirs)
    model = build_model(state["config"])
    tr.check_state_dict(model, state["model"], str(file))
    model.load_state_dict(state["model"])
    return model, state, file


def timm_export(path: str | Path, *, which: str = "last", ema: bool = False, arch: str | None = None):
    """scripts/convert_to_timm.py's rule: the run's model is timm's already (`timm.create_model` + the paper's head:
    with --pre-logits a tanh layer before it, which timm's ViTs no longer have, so say how to build that)."""
    if ema or arch:
        raise UserError("a howtotrain_vit.py run exports its own weights: no --ema, no --arch")
    model, state, _ = load_trained(path, ("best", "checkpoints") if which == "best" else ("checkpoints",))
    config = state["config"]
    create = f"timm.create_model({config['model']!r}, **{config['model_kwargs']})"
    if config["pre_logits"]:
        create += "; model.head = Sequential(pre_logits=Linear(D, D), act=Tanh(), fc=Linear(D, classes))"
    return convert.TimmExport(model.state_dict(), lambda: build_model(config), create)


# ----------------------------------------------------------------------------------------------
# finetune --init: the upstream weights (a run of this script, a timm state dict, or none) minus the head.
# ----------------------------------------------------------------------------------------------

SHAPE_KWARGS = ("patch_size", "depth", "embed_dim", "num_heads", "mlp_ratio")  # what a run's model_kwargs fix
HEAD_KEYS = ("head.weight", "head.bias", "head.fc.weight", "head.fc.bias")  # big_vision dont_load head/kernel, bias
TIMM_FILES = (".pth", ".bin", ".safetensors")


def read_init(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None, str]:
    """--init -> (its architecture: model, shape kwargs, pre_logits; its weights, None for 'random'; what it is).

    A run of this script (a folder or its .pt checkpoint) brings its architecture from its config; a timm state dict
    (.pth/.bin/.safetensors, e.g. `timm.create_model(name, pretrained=True).state_dict()` saved locally) and
    'random' take --model and the shape flags. Nothing is downloaded."""
    source = args.init
    own = dict(model=args.model, shape={}, pre_logits=False)  # timm's ViT: no pre-logits layer
    if source != "random" and not Path(source).exists():
        raise UserError(f"--init {source} does not exist")
    if source != "random" and Path(source).suffix not in TIMM_FILES:
        state, file = tr.load_run_checkpoint(source, SCRIPT)
        config = state["config"]
        shape = {k: v for k, v in config["model_kwargs"].items() if k in SHAPE_KWARGS}
        asked = {k: v for k, v in model_kwargs(args, 0).items() if k in SHAPE_KWARGS}
        if args.model not in (None, config["model"]) or any(shape.get(k) != v for k, v in asked.items()):
            raise UserError(f"--init {source} is a run of {config['model']} {shape}: its config gives the model; "
                            "drop --model and the shape flags (or give the run's)")
        return (dict(model=config["model"], shape=shape, pre_logits=config["pre_logits"]), state["model"],
                f"{file} (step {state['step']} of {config['trained_by']})")
    if args.model is None:
        raise UserError(f"--init {source}: give --model (the timm name of its architecture, and the shape flags it "
                        "needs); only a run of this script brings its own")
    if source == "random":
        return own, None, "no pretrained weights (--init random)"
    return own, convert.read_torch_state_dict(source, "--init"), source


def run_architecture(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None, str | None]:
    """The model to build, its starting weights and where they come from: `train`: the flags', from scratch;
    `finetune`: --init's (`read_init`), but on --resume the run's own (its config.json), so that the upstream file
    need not be there any more: the checkpoint holds the weights."""
    if args.command != "finetune":
        return dict(model=args.model, shape={}, pre_logits=args.pre_logits), None, None
    saved = run.saved_config(args.output_dir) if args.resume else {}
    if saved.get("init_from") and "model_kwargs" in saved:
        shape = {k: v for k, v in saved["model_kwargs"].items() if k in SHAPE_KWARGS}
        return dict(model=saved["model"], shape=shape, pre_logits=saved["pre_logits"]), None, saved["init_from"]
    return read_init(args)


def load_init_weights(model: nn.Module, weights: dict[str, torch.Tensor], source: str) -> str:
    """Load everything but the head (the zero head of `create_model` stays). A position embedding of another grid is
    resized as the originals do (`convert.resize_pos_embed`: bicubic on the (1, D, g, g) grid, no antialiasing)."""
    own = model.state_dict()
    weights = {k: v for k, v in weights.items() if k not in HEAD_KEYS}
    note = ""
    if "pos_embed" in weights and weights["pos_embed"].shape != own["pos_embed"].shape:
        prefix_rows = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        try:
            resized = convert.resize_pos_embed(weights["pos_embed"].float().numpy(), model.patch_embed.grid_size[0],
                                               prefix_rows)
        except ValueError as e:
            raise UserError(f"--init {source}: {e}") from None
        weights["pos_embed"] = torch.from_numpy(resized).to(own["pos_embed"].dtype)
        note = f"; position embedding resized to {model.patch_embed.grid_size[0]}^2 patches"
    for key in sorted((set(own) | set(weights)) - set(HEAD_KEYS)):
        there, here = weights.get(key), own.get(key)
        if there is None or here is None or there.shape != here.shape:
            raise UserError(f"--init {source} does not match the model: {key} is "
                            f"{tuple(there.shape) if there is not None else 'missing'} there and "
                            f"{tuple(here.shape) if here is not None else 'missing'} here")
    model.load_state_dict(weights, strict=False)
    return f"initialised from {source} ({len(weights)} tensors, zero head{note})"


# ----------------------------------------------------------------------------------------------
# Optimizers and the lr schedule.
# ----------------------------------------------------------------------------------------------


class SGDW(torch.optim.SGD):
    """SGD with momentum (big_vision momentum_hp; its momentum is bfloat16, this one float32) and decoupled weight
    decay as AdamW's: w *= 1 - lr * decoupled_weight_decay before the step (0 in the transfer recipe)."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            if group["decoupled_weight_decay"]:
                torch._foreach_mul_(group["params"], 1 - group["lr"] * group["decoupled_weight_decay"])
        return super().step(closure)


def make_optimizer(model: nn.Module, args: argparse.Namespace, lr: float,
                   device: torch.device) -> torch.optim.Optimizer:
    """train: Adam; finetune: SGD with momentum. Both with decoupled weight decay on weight matrices only
    (big_vision wd_mults '.*/kernel$': no biases, norms, class token or position embedding). The paper's wd is not
    scaled by the lr, AdamW's is: divide by the peak lr."""
    groups = param_groups_weight_decay(model, args.weight_decay / lr,
                                       no_weight_decay_list=getattr(model, "no_weight_decay", set)())
    if args.command == "finetune":
        for group in groups:
            group["decoupled_weight_decay"] = group.pop("weight_decay")
        return SGDW(groups, lr=lr, momentum=args.momentum)
    return torch.optim.AdamW(groups, lr=lr, betas=(args.adam_b1, args.adam_b2), eps=1e-8,
                             fused=device.type == "cuda")


def warmup_decay_lr(step: int, *, peak_lr: float, total_steps: int, warmup_steps: int, decay: str = "cosine",
                    min_lr: float = 0.0, warmup_start_factor: float = 0.0) -> float:
    """big_vision's schedule (utils.create_learning_rate_schedule), per optimizer step.

    `step` counts the updates already made (0 for the first). With progress p = clip((step - warmup) /
    (total - warmup), 0, 1):
        cosine: lr = min + (peak - min) (1 + cos(pi p)) / 2          linear: lr = min + (peak - min) (1 - p)
    (min = 0 in the paper) and during warmup lr is multiplied by step / warmup (linear warmup from 0), or with a start
    factor f by f + (1 - f) step / warmup (torch's LinearLR(start_factor=f), the PyTorch study's warmup from 1%).
    """
    if decay not in ("cosine", "linear"):
        raise ValueError(f"decay must be 'cosine' or 'linear', got {decay!r}")
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    lr = min_lr + (peak_lr - min_lr) * (0.5 * (1.0 + math.cos(math.pi * progress)) if decay == "cosine"
                                        else 1.0 - progress)
    if warmup_steps > 0:
        lr *= warmup_start_factor + (1 - warmup_start_factor) * min(1.0, step / warmup_steps)
    return lr


# ----------------------------------------------------------------------------------------------
# Data: uint8 batches from common.data (exact resume by step); normalisation and mixup on the device.
# ----------------------------------------------------------------------------------------------


def train_augmentation(args: argparse.Namespace) -> dict[str, Any] | transforms.Compose:
    """big_vision: decode_jpeg_and_inception_crop(224) (area 5-100%, bilinear) | flip_lr | randaug(n, m); for either
    loader (`tr.train_batches`). --random-crop resmall: transfer.py's resize_small(448) | random_crop(384) | flip_lr,
    a PIL transform (the host loader only)."""
    if args.random_crop == "resmall":
        resize = transforms.Resize(round(args.image_size / args.test_crop_ratio), InterpolationMode.BILINEAR)
        return transforms.Compose([resize, transforms.RandomCrop(args.image_size),
                                   transforms.RandomHorizontalFlip(args.hflip), augment.ToUint8HWC()])
    return dict(image_size=args.image_size, random_crop=args.random_crop, scale=(0.05, 1.0), hflip=args.hflip,
                auto_augment=randaug_policy(args), interpolation="bilinear")


def input_loader(args: argparse.Namespace, device: torch.device) -> str:
    """--loader auto|gpu|pil -> gpu or pil; the host-only resmall crop makes auto pil (and gpu an error)."""
    return gpu_input.loader_for(args.loader, device, train_augmentation(args))


def train_transform(args: argparse.Namespace):
    return gpu_input.host_transform(train_augmentation(args))


def eval_transform(image_size: int, crop_ratio: float):
    return augment.eval_transform(image_size, crop_ratio=crop_ratio, interpolation="bilinear")


def mixup(images: torch.Tensor, targets: torch.Tensor, alpha: float,
          rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """big_vision utils.mixup: one ratio per batch, lam = max(r, 1 - r) with r ~ Beta(alpha, alpha), each image
    mixed with its neighbour in the batch (roll by one).

    `images` and `targets` are this process's shard; the batch is the global one, so that N processes make the
    1-process update: `rng` must draw the same on every process (seeded by seed and step), and the neighbour of a
    shard's first image is the previous process's last (`tr.roll_global_batch`)."""
    if alpha <= 0:
        return images, targets
    ratio = rng.beta(alpha, alpha)
    lam = max(ratio, 1.0 - ratio)
    return (lam * images + (1 - lam) * tr.roll_global_batch(images),
            lam * targets + (1 - lam) * tr.roll_global_batch(targets))


def cutmix(images: torch.Tensor, targets: torch.Tensor, alpha: float,
           rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's batch-mode cutmix (not in AugReg): one box of area ~ (1 - lam) pasted from the neighbour in the global
    batch (as `mixup`), the targets mixed by the box's true area. `rng` draws the same on every process."""
    height, width = images.shape[-2:]
    lam = rng.beta(alpha, alpha)
    cut_h, cut_w = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
    center_y, center_x = rng.integers(height), rng.integers(width)
    top, bottom = np.clip([center_y - cut_h // 2, center_y + cut_h // 2], 0, height)
    left, right = np.clip([center_x - cut_w // 2, center_x + cut_w // 2], 0, width)
    mixed = images.clone()
    mixed[..., top:bottom, left:right] = tr.roll_global_batch(images)[..., top:bottom, left:right]
    lam = 1 - (bottom - top) * (right - left) / (height * width)
    return mixed, lam * targets + (1 - lam) * tr.roll_global_batch(targets)


def mix(images: torch.Tensor, targets: torch.Tensor, args: argparse.Namespace,
        rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (the paper's), or cutmix when asked; with both, each batch takes one of them with even odds (timm)."""
    if args.cutmix > 0 and (args.mixup <= 0 or rng.random() < 0.5):
        return cutmix(images, targets, args.cutmix, rng)
    return mixup(images, targets, args.mixup, rng)


def one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    return F.one_hot(labels, num_classes).float() * (1 - smoothing) + smoothing / num_classes


# ----------------------------------------------------------------------------------------------
# Loss and train step.
# ----------------------------------------------------------------------------------------------


def per_sample_loss(logits: torch.Tensor, targets: torch.Tensor, loss: str) -> torch.Tensor:
    if loss == "sigmoid":  # big_vision sigmoid_xent: summed over classes, averaged over the batch by the caller
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(-1)
    return -(targets * F.log_softmax(logits, dim=-1)).sum(-1)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, batch: dict,
               step: int, args: argparse.Namespace, env: tr.DistEnv, num_classes: int) -> dict[str, torch.Tensor]:
    """One optimizer step on this process's share of the global batch, split into --grad-accum micro-batches.

    DDP averages the gradients over processes, so the update equals one process's on the whole batch. Returns device
    tensors (no host sync): summed loss and correct top-1 over the local samples, and the pre-clip gradient norm.
    """
    # Dropout and drop path draw from torch's generator, seeded per process: their masks depend on the split (README).
    torch.manual_seed(tr.step_seed(args.seed, step, env.rank))
    images, labels = batch["image"], batch["label"]
    if args.random_erasing > 0:  # image g of the global batch erased under a seed of (seed, step, g)
        images = images.clone()
        tr.erase_per_sample(images, args.random_erasing, seed=args.seed, step=step, first_index=env.rank * len(images))
    targets = one_hot(labels, num_classes, args.label_smoothing)
    images, targets = mix(images, targets, args, np.random.default_rng([args.seed, step]))  # the same on all ranks
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=images.device)
    correct = torch.zeros((), device=images.device)
    chunks = list(zip(images.chunk(args.grad_accum), targets.chunk(args.grad_accum), labels.chunk(args.grad_accum)))
    for index, (micro_images, micro_targets, micro_labels) in enumerate(chunks):
        last = index == len(chunks) - 1
        no_sync = getattr(model, "no_sync", None) if not last else None  # DDP: all-reduce on the last one only
        with no_sync() if no_sync else contextlib.nullcontext(), tr.autocast(images.device, args.precision):
            logits = model(micro_images).float()
            losses = per_sample_loss(logits, micro_targets, args.loss)
            scaler.scale(losses.sum() / len(labels)).backward()
        loss_sum += losses.detach().sum()
        correct += (logits.detach().argmax(-1) == micro_labels).sum()
    scaler.unscale_(optimizer)
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad if args.clip_grad > 0 else math.inf)
    scaler.step(optimizer)
    scaler.update()
    return {"loss_sum": loss_sum, "correct": correct, "grad_norm": grad_norm}

# ----------------------------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------------------------


def train(args: argparse.Namespace) -> dict:
    env = tr.init_distributed()
    try:
        if args.benchmark_input:  # the host input pipeline alone: no model, nothing written
            return tr.benchmark_input(args.data, train_augmentation(args), env, global_batch=args.batch_size,
                                      workers=args.workers, steps=args.benchmark_steps, seed=args.seed,
                                      loader=input_loader(args, env.device), model=args.model,
                                      image_size=args.image_size)
        return evaluate_run(args, env) if args.eval_only else run_training(args, env)
    finally:
        tr.cleanup_distributed()


def run_training(args: argparse.Namespace, env: tr.DistEnv) -> dict:
    args.compile = tr.wants_compile(args.compile, env.device)  # config.json records what ran
    args.loader = input_loader(args, env.device)
    if args.batch_size % (env.world_size * args.grad_accum):
        raise UserError(f"--batch-size {args.batch_size} must be a multiple of {env.world_size} processes x "
                        f"--grad-accum {args.grad_accum}")
    spec = data.describe(args.data, num_classes=args.num_classes)
    steps_per_epoch = data.steps_per_epoch(spec.train_size, args.batch_size) if spec.train_size else 0
    total_steps = args.training_steps or int(args.epochs * steps_per_epoch) or (10_000 if args.benchmark else 0)
    if total_steps <= 0:
        raise UserError(f"{args.data} has no known size: give --training-steps")
    peak = peak_lr(args)
    architecture, init_weights, init_from = run_architecture(args)
    config = dict(vars(args), **run_record(f"{SCRIPT} {args.command}", args), model=architecture["model"],
                  pre_logits=architecture["pre_logits"], init_from=init_from, num_classes=spec.num_classes,
                  class_names=spec.class_names, peak_lr=peak, adamw_weight_decay=args.weight_decay / peak,
                  model_kwargs=dict(architecture["shape"], **model_kwargs(args, spec.num_classes)),
                  total_steps=total_steps, steps_per_epoch=steps_per_epoch, world_size=env.world_size,
                  device=str(env.device), randaug=randaug_policy(args), mean=MEAN, std=STD)
    torch.manual_seed(args.seed)  # the same initial weights in every process
    model = build_model(config)
    loaded = load_init_weights(model, init_weights, init_from) if init_weights is not None else init_from
    model = model.to(env.device)
    config["params"] = sum(p.numel() for p in model.parameters())
    optimizer = make_optimizer(model, args, peak, env.device)
    scaler = tr.grad_scaler(env.device, args.precision)

    out = Path(args.output_dir)
    start_step, best_top1, saved_window = 0, -1.0, None
    state = None if args.benchmark else tr.start_run(out, resume=bool(args.resume), recipe=config["trained_by"],
                                                     settings=vars(args))
    if state:
        tr.restore(state, out, model=model, optimizer=optimizer, scaler=scaler)
        start_step, best_top1, saved_window = state["step"], state["best_top1"], state["log_window"]
    # Every parameter is used in every step (drop path scales, it does not skip): a static graph. DDP's static_graph
    # breaks no_sync (an internal assert in torch 2.14 with --grad-accum 2), so only without it.
    model = tr.wrap(model, env, compile_model=args.compile, static_graph=args.grad_accum == 1)
    if args.benchmark:
        return benchmark(args, env, model, optimizer, scaler, config)

    eval_interval = args.eval_interval or steps_per_epoch or total_steps
    warmup_steps = args.warmup_steps if args.warmup_epochs is None else round(args.warmup_epochs * steps_per_epoch)
    batches = tr.train_batches(args.data, train_augmentation(args), env, global_batch=args.batch_size, seed=args.seed,
                               start_step=start_step, workers=args.workers, num_classes=spec.num_classes,
                               image_size=args.image_size, mean=MEAN, std=STD, loader=args.loader)
    window = tr.Window(torch.zeros(3, device=env.device), saved_window)  # loss, correct top-1, unreadable images
    log = RunLog(out, config, start_step=start_step, wandb_project=args.wandb, tensorboard=args.tensorboard,
                 main=env.is_main)  # rank 0 writes config.json and log.jsonl
    run.say(f"{config['params'] / 1e6:.1f}M params, {total_steps} steps ({steps_per_epoch}/epoch), peak lr {peak:.3g}, "
            f"{type(optimizer).__name__} weight decay {config['adamw_weight_decay']:.3g} x lr, {env.world_size} "
            f"process(es) on {env.device.type}, starting at step {start_step}", main=env.is_main)
    if loaded and not start_step:
        run.say(loaded, main=env.is_main)
    last = {}
    with tr.Preemption(env) as preemption, contextlib.closing(log):
        for step in tr.progress(start_step, total_steps, env):
            batch = next(batches)
            lr = warmup_decay_lr(step, peak_lr=peak, total_steps=total_steps, warmup_steps=warmup_steps,
                                 decay=args.decay, min_lr=args.min_lr, warmup_start_factor=args.warmup_start_factor)
            tr.set_lr(optimizer, lr)
            metrics = train_step(model, optimizer, scaler, batch, step, args, env, spec.num_classes)
            window.add(torch.stack([metrics["loss_sum"], metrics["correct"],
                                    torch.tensor(float(batch["skipped"]), device=env.device)]))
            done = step + 1
            epoch = done / steps_per_epoch if steps_per_epoch else 0.0
            if run.due(done, args.log_interval, total_steps):
                loss_sum, correct, skipped = window.totals(done, out).tolist()  # a NaN loss stops here
                images = window.steps * args.batch_size
                last = {"loss": loss_sum / images, "train_top1": 100 * correct / images, "lr": lr,
                        "grad_norm": metrics["grad_norm"].item(),
                        "img_per_sec": window.images_per_sec(args.batch_size), "epoch": epoch}
                if skipped:
                    last["skipped_images"] = round(skipped)
                log.write(done, **last)
                window.reset()
            stop = preemption.stop_after(done, start_step=start_step, stop_after=args.stop_after,
                                         every=args.log_interval)
            evaluating = run.due(done, eval_interval, total_steps)
            if evaluating or stop:
                with window.paused():  # img/s counts training time only
                    results = evaluate(tr.unwrap(model), args, env, config) if evaluating else {}
                    if results:
                        best_top1 = max(best_top1, results["val_top1"])
                        log.write(done, **results, best_top1=best_top1, epoch=epoch)
                        run.say(run.eval_line(done, results), main=env.is_main)
                    window.totals(done, out)  # a NaN loss since the last log record: stop, save nothing
                    tr.save(out, done, env, model=model, optimizer=optimizer, scaler=scaler, eval_metrics=results,
                            extra={"best_top1": best_top1, "config": config, "log_window": window.state()})
                    if env.is_main and results and results["val_top1"] >= best_top1:  # predict's weights
                        tr.save_checkpoint(out / "best", done, {"model": tr.unwrap(model).state_dict(), "step": done,
                                                                "val_top1": results["val_top1"], "config": config})
            if stop and done < total_steps:
                run.say(f"stopping at step {done}: checkpoint saved in {out / 'checkpoints'}; continue with --resume",
                        main=env.is_main)
                break
    return dict(last, best_top1=best_top1)


# ----------------------------------------------------------------------------------------------
# Evaluation: the training loss on one-hot labels, top-1 and top-5 over the val split.
# ----------------------------------------------------------------------------------------------


def evaluate(model: nn.Module, args: argparse.Namespace, env: tr.DistEnv, config: dict) -> dict:
    # big_vision: resize_small(256) | central_crop(224), i.e. crop ratio 0.875.
    batches = tr.eval_batches(args.data, env, image_size=config["image_size"], crop_ratio=config["test_crop_ratio"],
                              interpolation="bilinear", global_batch=args.eval_batch_size, workers=args.workers,
                              mean=MEAN, std=STD, loader=gpu_input.loader_choice(args.loader, env.device))

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return per_sample_loss(logits, one_hot(labels, config["num_classes"], 0.0), config["loss"])

    return tr.evaluate_classifier(model, batches, env, precision=args.precision, per_sample_loss=loss)


def evaluate_run(args: argparse.Namespace, env: tr.DistEnv) -> dict:
    """--eval-only: the run's last checkpoint (or --resume PATH) on --data's val split, one log record and one JSON
    line; config.json and the checkpoints stay as they are."""
    model, state, path = load_trained(args.resume if isinstance(args.resume, str) else args.output_dir)
    config = state["config"]
    data.describe(args.data, num_classes=config["num_classes"])  # the run's classes, or an error: line
    results = evaluate(model.to(env.device), args, env, config)
    return tr.report_eval(args.output_dir, state["step"], results, str(path), env, wandb=args.wandb,
                          tensorboard=args.tensorboard)  # (synthetic data has no val split: no results)


# ----------------------------------------------------------------------------------------------
# Benchmark: train steps on device-made batches (no data loading): img/s, step time, memory, MFU.
# ----------------------------------------------------------------------------------------------


def benchmark(args, env: tr.DistEnv, model, optimizer, scaler, config: dict) -> dict:
    num_classes = config["num_classes"]
    fixed = tr.synthetic_batch(args.batch_size // env.world_size, args.image_size, num_classes, env.device, env.rank,
                               MEAN, STD)
    real = None if args.data == "synthetic" else tr.train_batches(  # is the run input-bound?
        args.data, train_augmentation(args), env, global_batch=args.batch_size, seed=args.seed, start_step=0,
        workers=args.workers, num_classes=num_classes, image_size=args.image_size, mean=MEAN, std=STD,
        loader=args.loader)
    tr.set_lr(optimizer, config["peak_lr"])

    def step(batch: dict | None) -> torch.Tensor:
        return train_step(model, optimizer, scaler, fixed if batch is None else batch, 0, args, env,
                          num_classes)["loss_sum"]

    flops = tr.train_flops_per_sample(lambda: build_model(config), (3, args.image_size, args.image_size))
    return tr.benchmark(step, env, steps=args.benchmark_steps, global_batch=args.batch_size,
                        train_flops_per_image=flops, real_batches=real, model=args.model,
                        image_size=args.image_size, compile=args.compile,
                        precision=args.precision if env.device.type == "cuda" else "fp32")


# ----------------------------------------------------------------------------------------------
# History: a run's log.jsonl -> loss / accuracy / lr curves (PNG) and a summary table.
# ----------------------------------------------------------------------------------------------


def history(args: argparse.Namespace) -> Path:
    """The run's curves (`common.runlog.plot_runs`, as scripts/plot_runs.py draws them) and a table of its
    evaluations, each with the last train record at or before it."""
    run_dir = Path(args.run_dir)
    try:
        records = read_log(run_dir)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the log of {run_dir}: {e}") from None
    # Logs written before a resume dropped its re-logged records hold such steps twice: keep the last record.
    train_log = {r["step"]: r for r in records if "loss" in r}
    val_log = {r["step"]: r for r in records if "val_top1" in r}
    if not train_log and not val_log:
        raise UserError(f"{run_dir} has no training or evaluation records yet")
    steps, vsteps = sorted(train_log), sorted(val_log)
    output = plot_runs([run_dir], args.output or (run_dir if run_dir.is_dir() else run_dir.parent) / "history.png")

    print(f"{'step':>8} {'epoch':>7} {'train loss':>10} {'val loss':>9} {'val top-1':>9} {'val top-5':>9} {'lr':>9}")
    for step in vsteps:  # with the last train record at or before each eval
        train_at = train_log[steps[bisect.bisect_right(steps, step) - 1]] if steps and steps[0] <= step else {}
        val_at = val_log[step]
        train_loss, lr = (f"{train_at['loss']:.4f}", f"{train_at['lr']:.2e}") if train_at else ("-", "-")
        print(f"{step:>8} {val_at.get('epoch', 0.0):>7.2f} {train_loss:>10} {val_at['val_loss']:>9.4f} "
              f"{val_at['val_top1']:>9.2f} {val_at['val_top5']:>9.2f} {lr:>9}")
    if vsteps:
        best = max(vsteps, key=lambda s: val_log[s]["val_top1"])
        print(f"best val top-1 {val_log[best]['val_top1']:.2f}% at step {best}")
    print(f"wrote {output}")
    return output


# ----------------------------------------------------------------------------------------------
# Predict: top-k labels of image files or folders.
# ----------------------------------------------------------------------------------------------


def image_files(paths: list[str]) -> list[Path]:
    files = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in data.IMAGE_EXTENSIONS)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{name} does not exist")
    if not files:
        raise UserError(f"no images in {' '.join(paths)}")
    return files


def class_names(config: dict, labels_file: str | None) -> list[str]:
    if labels_file:
        try:
            names = [line.strip() for line in Path(labels_file).read_text().splitlines() if line.strip()]
        except OSError as e:
            raise UserError(f"cannot read --labels-file: {e}") from None
        if len(names) != config["num_classes"]:
            raise UserError(f"--labels-file {labels_file} has {len(names)} names; the model has "
                            f"{config['num_classes']} classes")
        return names
    return config.get("class_names") or [str(i) for i in range(config["num_classes"])]


@torch.no_grad()
def predict(args: argparse.Namespace) -> list[tuple[str, list[tuple[str, float]]]]:
    """Print one line per image: path, then the top-k (class name, softmax probability) pairs, tab-separated."""
    model, state, _ = load_trained(args.checkpoint, subdirs=("best", "checkpoints"))
    config = state["config"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    names = class_names(config, args.labels_file)
    transform = eval_transform(config["image_size"], config["test_crop_ratio"])
    files = image_files(args.images)
    top_k = min(args.top_k, config["num_classes"])
    rows = []
    for start in range(0, len(files), args.batch_size):
        batch, kept = [], []
        for file in files[start:start + args.batch_size]:
            try:
                with Image.open(file) as image:
                    batch.append(transform(image.convert("RGB")))
                kept.append(file)
            except Exception as e:  # unreadable or not an image: skip it, say so
                print(f"warning: skipping unreadable image {file} ({type(e).__name__}: {e})", file=sys.stderr)
        if not batch:
            continue
        with tr.autocast(device, "bf16"):
            logits = model(tr.images_to_device(np.stack(batch), device, MEAN, STD)).float()
        # Softmax over the logits: a distribution over the classes (for a sigmoid-trained model it ranks the classes
        # as the per-class sigmoids do).
        probs, indices = logits.softmax(-1).topk(top_k, dim=-1)
        for file, p_row, i_row in zip(kept, probs.tolist(), indices.tolist()):
            pairs = [(names[i], p) for i, p in zip(i_row, p_row)]
            rows.append((str(file), pairs))
            print("\t".join([str(file)] + [f"{name}\t{p:.4f}" for name, p in pairs]))
    return rows


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    def command() -> None:
        args = parse_args(argv)
        {"train": train, "finetune": train, "history": history, "predict": predict}[args.command](args)

    return exit_status(command)


if __name__ == "__main__":
    sys.exit(main())

"""Export any run of this repo to timm weights (.pth and .safetensors), checked by loading them strict into the timm
model, and print how to create that model.

    python scripts/convert_to_timm.py runs/deit3/in1k_b16_800ep_pretrain      # -> RUN/timm_model.{pth,safetensors}
    python scripts/convert_to_timm.py runs/howtotrain/imagenet_36ep --which best
    python scripts/convert_to_timm.py runs/mae/pretrain_b16_1600ep            # the encoder, as vit_*.mae

RUN is a run's --output-dir (or a checkpoint inside it). The recipe that trained it (`trained_by` in its config.json)
says how its weights become timm's: each recipe script has a `timm_export(path, which=, ema=, arch=)` rule, so this
script knows no recipe. A checkpoint from outside this repo (deit3-jax's .msgpack) names its reader with --recipe.
Then, in PyTorch:

    model = timm.create_model(NAME, num_classes=..., pretrained=False)   # the line printed here
    model.load_state_dict(torch.load("RUN/timm_model.pth"))
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the repo root: `common` and the recipe scripts

from common import UserError  # noqa: E402
from common.run import exit_status  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from common.run import ArgumentParser

    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="a run's --output-dir, or a checkpoint in it (or, with --recipe, another checkpoint)")
    p.add_argument("--out", help="output .pth path (default: RUN/timm_model.pth); .safetensors is written beside it")
    p.add_argument("--which", choices=["last", "best"], default="last",
                   help="the run's last checkpoint (the paper's number) or its best by val top-1")
    p.add_argument("--ema", action="store_true", help="export the EMA weights (runs that keep an EMA)")
    p.add_argument("--arch", choices=["deit3", "vit"],
                   help="JAX ViTs: position embedding on the patches only (deit3_* models) or with a zero cls row "
                        "(vit_* models); default: as trained")
    p.add_argument("--recipe", help="the recipe script whose rule reads RUN, when RUN has no config.json (e.g. "
                                    "deit3_jax.py for a deit3-jax .msgpack checkpoint)")
    return p


def trained_by(path: Path) -> str:
    """The recipe script that wrote the run holding `path`: `trained_by` of the nearest config.json at or above it
    (a PyTorch checkpoint file carries its config too)."""
    for folder in [path, *path.parents][:4]:
        config = folder / "config.json"
        if folder.is_dir() and config.is_file():
            saved = json.loads(config.read_text())
            return saved.get("trained_by", saved.get("script", "")).split(" ")[0]
    if path.suffix == ".pt":
        import torch

        state = torch.load(path, map_location="cpu", weights_only=False)
        return state.get("config", {}).get("trained_by", "").split(" ")[0]
    return ""


def recipe_rule(script: str):
    """The `timm_export` rule of a recipe script at the repo root."""
    if not script or not (REPO / script).is_file():
        raise UserError(f"cannot tell which recipe wrote this run ({script or 'no config.json'}): give --recipe SCRIPT")
    module = importlib.import_module(Path(script).stem)
    rule = getattr(module, "timm_export", None)
    if rule is None:
        raise UserError(f"{script} has no timm export: its models are not timm architectures")
    return rule


def main(argv: list[str] | None = None) -> int:
    def command() -> None:
        args = build_parser().parse_args(argv)
        path = Path(args.run)
        if not path.exists():
            raise UserError(f"{path} does not exist")
        from common.convert import write_timm_export

        rule = recipe_rule(args.recipe or trained_by(path))
        export = rule(path, which=args.which, ema=args.ema, arch=args.arch)
        write_timm_export(export, Path(args.out) if args.out else (path if path.is_dir() else path.parent) /
                          "timm_model.pth")

    return exit_status(command)


if __name__ == "__main__":
    sys.exit(main())

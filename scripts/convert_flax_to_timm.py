"""Export a Flax checkpoint of this repo to a timm `VisionTransformer` state dict, and check that it loads.

    python scripts/convert_flax_to_timm.py runs/deit3                  # -> runs/deit3/timm_model.{pth,safetensors}
    python scripts/convert_flax_to_timm.py runs/deit3 --arch vit       # pos-emb with a (zero) cls row, as vit_*

CKPT is a run's --output-dir, its `checkpoints`/`best` folder or one step folder (the best checkpoint is
taken from a run dir), or a deit3-jax `.msgpack` checkpoint (its parameter names are mapped to timm's).
Then, in PyTorch:

    model = timm.create_model("deit3_small_patch16_224", num_classes=..., pretrained=False)   # name printed here
    model.load_state_dict(torch.load("runs/deit3/timm_model.pth"))

--arch deit3 keeps the position embedding on the patches only (timm `no_embed_class=True`, the `deit3_*`
models); --arch vit prepends a zero row for the cls token (`vit_*` models; exact, since the row is zero).
Without --arch the layout the model was trained with is kept. Checkpoints of mae_jax.py export by stage: the
pretrained encoder without its decoder (timm `vit_*_patch16_224.mae`: no head, the fixed sin-cos embedding written
as `pos_embed`), a fine-tuned model (`vit_*` with `global_pool='avg'`), a linear probe (BatchNorm folded into the
head).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `common`

from common import UserError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("ckpt", help="run dir, checkpoints/best dir or step dir of a Flax checkpoint, or a deit3-jax "
                                ".msgpack file")
    p.add_argument("--out", help="output .pth path (default: CKPT/timm_model.pth); .safetensors is written beside it")
    p.add_argument("--which", choices=["last", "best"], default="last",
                   help="with a run dir: its last checkpoint (the paper's number) or the best by val top-1")
    p.add_argument("--ema", action="store_true", help="export the EMA weights (runs with --ema-decay > 0)")
    p.add_argument("--arch", choices=["deit3", "vit"],
                   help="deit3: pos-emb on patches only; vit: with a zero cls row (default: as trained)")
    return p


def convert(params: dict, config: dict, arch: str | None) -> tuple[dict, dict]:
    """(timm state dict of numpy arrays, timm VisionTransformer kwargs) for a checkpoint's params and config."""
    from common.convert import flax_to_timm, sincos_2d_pos_embed, timm_kwargs

    for key in ("image_size", "patch_size", "dim", "layers", "heads"):
        if key not in config:
            raise UserError(f"the checkpoint's config has no {key!r}: not a checkpoint of a ViT recipe")
    if config.get("num_classes") is None and "head" in params:
        config = {**config, "num_classes": len(params["head"]["bias"])}
    grid = config["image_size"] // config["patch_size"]
    prefix_tokens = int("cls_token" in params) + int("dist_token" in params)
    fixed_pos_embed = None
    if "pos_embed" in params:
        patches_only = params["pos_embed"].shape[1] == grid * grid
    elif config.get("posemb") == "sincos2d":
        fixed_pos_embed, patches_only = sincos_2d_pos_embed(grid, config["dim"]), True
    else:
        raise UserError("the checkpoint has no pos_embed and its config no posemb=sincos2d")
    if arch == "deit3" and not patches_only and prefix_tokens:
        raise UserError("--arch deit3: this model adds position embeddings to its cls token; use --arch vit")
    cls_rows = prefix_tokens if arch == "vit" and patches_only else 0
    state = flax_to_timm(params, pos_embed=fixed_pos_embed, cls_rows_in_pos_embed=cls_rows)
    try:
        kwargs = timm_kwargs(config, no_embed_class=state["pos_embed"].shape[1] == grid * grid)
    except ValueError as e:
        raise UserError(f"the checkpoint's config: {e}") from None
    return state, kwargs


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        ckpt = Path(args.ckpt)
        if not ckpt.exists():
            raise UserError(f"checkpoint {ckpt} does not exist")
        from common.checkpoint import load_params_and_config

        if ckpt.suffix == ".msgpack":  # a checkpoint of deit3-jax (github.com/affjljoo3581/deit3-jax)
            import deit3_jax

            params, config = deit3_jax.read_deit3_jax_checkpoint(str(ckpt))
        else:
            params, config = load_params_and_config(ckpt, which=args.which, key="ema_params" if args.ema else "params")
        arch = args.arch
        if config.get("script") == "mae_jax.py":  # the encoder, or the probe's folded head: mae_jax.timm_params
            import mae_jax
            from common.checkpoint import load_state_and_config

            saved, config = load_state_and_config(ckpt, which=args.which)
            params, arch = mae_jax.timm_params(saved, config), args.arch or "vit"  # MAE's pos_embed has the cls row
        state, kwargs = convert(params, config, arch)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if config.get("ema_eval") and config.get("ema_decay") and not args.ema:
        print("note: this run reported its EMA weights; pass --ema to export those", file=sys.stderr)

    import torch
    from safetensors.torch import save_file

    from common.convert import timm_model_class, timm_model_name

    out = Path(args.out) if args.out else (ckpt if ckpt.is_dir() else ckpt.parent) / "timm_model.pth"
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: torch.tensor(value) for name, value in state.items()}
    torch.save(tensors, out)
    save_file(tensors, str(out.with_suffix(".safetensors")))

    distilled = "dist_token" in tensors  # DeiT's distillation token: timm's VisionTransformerDistilled
    model = timm_model_class(distilled)(**kwargs)
    model.load_state_dict(tensors, strict=True)  # every key and shape, or a RuntimeError naming the mismatch
    name = timm_model_name(kwargs, distilled)
    print(f"wrote {out} and {out.with_suffix('.safetensors')} ({len(tensors)} tensors)")
    if name:
        pool = ", global_pool='avg'" if kwargs["global_pool"] == "avg" else ""
        print(f"timm model: {name} (timm.create_model({name!r}, num_classes={kwargs['num_classes']}{pool}))")
    else:
        print(f"timm model: {type(model).__name__}(**kwargs) with kwargs = {json.dumps(kwargs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

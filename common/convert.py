"""Weights between this repo's Flax ViTs and timm's `VisionTransformer`, plus position-embedding helpers.

The Flax models name their parameters after timm's modules, so one generic rule maps the two layouts:

    Flax params tree                          timm state dict
    blocks_3/attn/qkv/kernel (D, 3D)     <->  blocks.3.attn.qkv.weight (3D, D)        dense: transposed
    patch_embed/proj/kernel (p, p, 3, D) <->  patch_embed.proj.weight (D, 3, p, p)     conv: HWIO <-> OIHW
    norm/scale (D,)                      <->  norm.weight (D,)                         LayerNorm
    blocks_3/ls1/gamma, pos_embed, cls_token, .../bias                                 same name, same array

A segment `name_<digits>` is timm's `name.<digits>` (a ModuleList index). Nothing here knows a recipe:
the architecture comes from the run's config (`timm_kwargs`) and the arrays from its params.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from common import UserError

_INDEXED = re.compile(r"^(.+)_(\d+)$")  # Flax `blocks_3` <-> timm `blocks.3`
_CONV_TO_TIMM = (3, 2, 0, 1)  # HWIO -> OIHW
_CONV_TO_FLAX = (2, 3, 1, 0)  # OIHW -> HWIO

# (embed_dim, depth, num_heads) of timm's ViT size names, for `timm_model_name`.
_TIMM_SIZES = {
    (192, 12, 3): "tiny",
    (384, 12, 6): "small",
    (512, 12, 8): "medium",
    (768, 12, 12): "base",
    (1024, 24, 16): "large",
    (1280, 32, 16): "huge",
}


# ----------------------------------------------------------------------------------------------
# Position embeddings
# ----------------------------------------------------------------------------------------------


def sincos_2d_pos_embed(grid: int, dim: int, cls_rows: int = 0) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding, shape (1, cls_rows + grid*grid, dim), float32.

    MAE's convention (models_mae.py `get_2d_sincos_pos_embed`, also MoCo v3): tokens in row-major order;
    the first dim/2 channels encode the column index, the last dim/2 the row index; each half is
    [sin(pos * omega), cos(pos * omega)] with omega_i = 1 / 10000^(i / (dim/4)). Prefix (cls) rows are zero.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a dim divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")

    def encode(pos: np.ndarray) -> np.ndarray:
        angles = pos.reshape(-1, 1) * omega  # (grid*grid, dim/4)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    emb = np.concatenate([encode(cols), encode(rows)], axis=1)
    emb = np.concatenate([np.zeros((cls_rows, dim)), emb], axis=0)
    return emb[None].astype(np.float32)


def resize_pos_embed(pos_embed: np.ndarray, new_grid: int, prefix_rows: int = 0) -> np.ndarray:
    """Bicubic resize of the square patch grid of `pos_embed` (1, prefix_rows + g*g, D) to `new_grid`.

    The originals' resize (MAE util/pos_embed.py `interpolate_pos_embed`, DeiT main.py `--finetune`): the first
    `prefix_rows` rows (cls/dist tokens) are kept as they are, the grid is reshaped to (1, D, g, g) and resized by
    `torch.nn.functional.interpolate(mode="bicubic", align_corners=False)` in float32, without antialiasing.
    (timm's `resample_abs_pos_embed` defaults to antialias=True, another cubic kernel: ~1-8% off the originals.)
    """
    import torch
    import torch.nn.functional as F

    pos_embed = np.asarray(pos_embed)
    patches = pos_embed.shape[1] - prefix_rows if pos_embed.ndim == 3 else -1
    old_grid = int(round(max(patches, 0) ** 0.5))
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1 or old_grid * old_grid != patches:
        raise ValueError(f"pos_embed of shape {pos_embed.shape} with {prefix_rows} prefix rows is not a square grid")
    dim = pos_embed.shape[2]
    prefix = pos_embed[:, :prefix_rows]
    grid = torch.from_numpy(np.array(pos_embed[:, prefix_rows:], np.float32))
    grid = grid.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim).numpy()
    return np.concatenate([prefix, grid.astype(pos_embed.dtype)], axis=1)


# ----------------------------------------------------------------------------------------------
# Parameter layouts
# ----------------------------------------------------------------------------------------------


def flax_to_timm(params: Mapping[str, Any], *, pos_embed: np.ndarray | None = None,
                 cls_rows_in_pos_embed: int = 0) -> dict[str, np.ndarray]:
    """Flax params tree -> timm `VisionTransformer` state dict (numpy arrays, same dtypes).

    pos_embed: a fixed embedding (e.g. `sincos_2d_pos_embed`) to export as timm's `pos_embed` when the
        params have none; timm then holds it as an ordinary (learnable) parameter.
    cls_rows_in_pos_embed: zero rows prepended to a patches-only `pos_embed`, for a timm target whose
        pos_embed also covers the prefix tokens (a DeiT-III model, timm `no_embed_class=True`, exported to
        a `vit_*` layout). Exact: the source model added no position embedding to its cls token, and timm
        adds the zero row.
    """
    if "params" in params and len(params) == 1:  # a variables dict {"params": ...}
        params = params["params"]
    state: dict[str, np.ndarray] = {}
    for path, value in _flatten(params):
        *modules, leaf = path
        value = np.asarray(value)
        if leaf == "kernel":
            if value.ndim == 2:
                value = value.T
            elif value.ndim == 4:
                value = value.transpose(_CONV_TO_TIMM)
            else:
                raise ValueError(f"{'/'.join(path)}: cannot map a {value.ndim}-D kernel to timm")
            leaf = "weight"
        elif leaf == "scale":
            leaf = "weight"
        modules = [_INDEXED.sub(r"\1.\2", name) for name in modules]
        state[".".join([*modules, leaf])] = np.ascontiguousarray(value)
    if pos_embed is not None:
        if "pos_embed" in state:
            raise ValueError("the params already hold a pos_embed; pass pos_embed only for a fixed embedding")
        state["pos_embed"] = np.ascontiguousarray(pos_embed)
    if cls_rows_in_pos_embed:
        if "pos_embed" not in state:
            raise ValueError("cls_rows_in_pos_embed needs a pos_embed (in the params or as the pos_embed argument)")
        grid_rows = state["pos_embed"]
        zeros = np.zeros((1, cls_rows_in_pos_embed, grid_rows.shape[2]), grid_rows.dtype)
        state["pos_embed"] = np.concatenate([zeros, grid_rows], axis=1)
    return state


def timm_to_flax(state_dict: Mapping[str, Any]) -> dict:
    """timm `VisionTransformer` state dict (torch tensors or numpy) -> Flax params tree; inverse of `flax_to_timm`.

    A 1-D `weight` is a LayerNorm `scale`, a 2-D one a dense `kernel` (transposed), a 4-D one a conv `kernel`
    (OIHW -> HWIO); `blocks.3` becomes `blocks_3`. Dtypes are kept, so the round trip is bit-exact.
    """
    params: dict = {}
    for name, value in state_dict.items():
        value = _to_numpy(value)
        segments: list[str] = []
        for part in name.split("."):
            if part.isdigit() and segments:
                segments[-1] = f"{segments[-1]}_{part}"
            else:
                segments.append(part)
        *modules, leaf = segments
        if leaf == "weight":
            if value.ndim == 1:
                leaf = "scale"
            elif value.ndim == 2:
                leaf, value = "kernel", value.T
            elif value.ndim == 4:
                leaf, value = "kernel", value.transpose(_CONV_TO_FLAX)
            else:
                raise ValueError(f"{name}: cannot map a {value.ndim}-D weight to Flax")
        node = params
        for module in modules:
            node = node.setdefault(module, {})
        node[leaf] = np.ascontiguousarray(value)
    return params


def read_torch_state_dict(path: str, flag: str) -> dict:
    """The state dict in a PyTorch .pth / .safetensors file, unwrapped from the `{"model": ...}` of DeiT's and MAE's
    checkpoints. Anything else is a UserError naming `flag` (the command-line option that gave the path)."""
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path} is not a file")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        import torch

        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input error
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()  # torch.load's reasons run long, with terminal colours
        reason = text.splitlines()[0] if text else type(e).__name__
        raise UserError(f"{flag} {path} is not a PyTorch state dict: {reason}") from None
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise UserError(f"{flag} {path} is not a PyTorch state dict")
    return state


# ----------------------------------------------------------------------------------------------
# Architecture
# ----------------------------------------------------------------------------------------------


def timm_kwargs(config: Mapping[str, Any], *, no_embed_class: bool | None = None) -> dict[str, Any]:
    """Keyword arguments of `timm.models.vision_transformer.VisionTransformer` for a run's config.

    `config` is a run's saved config (its flags plus the resolved `num_classes`): image_size, patch_size,
    layers, dim, heads, num_classes (or labels; 0: no head, as timm's `vit_*.mae` encoders), pooling ('cls'
    or 'gap'), and optionally class_token (default: pooling == 'cls'), layerscale, layerscale_init and
    mlp_ratio. Position embeddings are exported as timm's learnable `pos_embed`, a
    fixed sin-cos one included (its values go into the state dict).

    no_embed_class: whether timm's pos_embed covers the patches only (`deit3_*`: added before the cls token
        is joined) rather than the cls token too (`vit_*`). None: the config's `no_embed_class` if present,
        else True, the layout of a model whose `pos_embed` parameter holds patch rows only.
    """
    num_classes = config.get("num_classes")
    if num_classes is None:
        num_classes = config.get("labels", -1)
    if num_classes is None or num_classes < 0:
        raise ValueError("the config has no resolved num_classes (nor a positive labels)")
    pooling = config.get("pooling", "cls")
    if pooling not in ("cls", "gap"):
        raise ValueError(f"unknown pooling {pooling!r}; expected 'cls' or 'gap'")
    layerscale_init = config.get("layerscale_init") if config.get("layerscale", False) else None
    if no_embed_class is None:
        no_embed_class = bool(config.get("no_embed_class", True))
    # A gap model may still carry a cls token that the pooling skips (MAE fine-tuning, timm global_pool='avg').
    class_token = bool(config.get("class_token", pooling == "cls"))
    return dict(
        img_size=int(config["image_size"]),
        patch_size=int(config["patch_size"]),
        embed_dim=int(config["dim"]),
        depth=int(config["layers"]),
        num_heads=int(config["heads"]),
        mlp_ratio=float(config.get("mlp_ratio", 4)),
        num_classes=int(num_classes),
        class_token=class_token,
        global_pool="avg" if pooling == "gap" else "token",
        fc_norm=pooling == "gap",  # gap: mean of patch tokens, then LayerNorm (`fc_norm`), no final `norm`
        no_embed_class=no_embed_class and class_token,  # without prefix tokens both layouts are the same
        init_values=layerscale_init or None,  # timm (like the Flax model) has no LayerScale for 0 / None
        qkv_bias=True,
        pos_embed="learn",
    )


def timm_model_class(distilled: bool = False) -> type:
    """timm's `VisionTransformer`, or `VisionTransformerDistilled` (DeiT's cls + distillation tokens, `head_dist`)."""
    if distilled:
        from timm.models.deit import VisionTransformerDistilled

        return VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer


def timm_model_name(kwargs: Mapping[str, Any], distilled: bool = False) -> str | None:
    """Name of the timm model (e.g. 'deit3_small_patch16_224', 'deit_tiny_distilled_patch16_224') with the
    architecture of `kwargs` (and DeiT's distillation token if `distilled`), else None.

    The number of classes and the pooling are not part of the name: create the model with `num_classes=`
    and, for average pooling, `global_pool='avg'` (timm then adds `fc_norm`, as MAE's fine-tuned models).
    The candidate is built on the meta device (no memory, no weights) and must match in every parameter
    shape, the number of heads, the pooling and the position-embedding layout.
    """
    import timm
    import torch

    size = _TIMM_SIZES.get((kwargs["embed_dim"], kwargs["depth"], kwargs["num_heads"]))
    family = "deit3" if kwargs.get("no_embed_class") else "vit"
    name = f"{family}_{size}_patch{kwargs['patch_size']}_{kwargs['img_size']}"
    if distilled:
        name = f"deit_{size}_distilled_patch{kwargs['patch_size']}_{kwargs['img_size']}"
    if size is None or not timm.is_model(name):
        return None
    model_class = timm_model_class(distilled)
    with torch.device("meta"):
        ours = model_class(**kwargs)
        preset = timm.create_model(name, pretrained=False, num_classes=kwargs["num_classes"],
                                   global_pool=kwargs.get("global_pool", "token"))
    if type(preset) is not model_class:
        return None

    def signature(model) -> tuple:
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        return (shapes, model.blocks[0].attn.num_heads, model.global_pool, model.no_embed_class,
                type(model.norm).__name__, type(model.fc_norm).__name__, type(model.blocks[0].mlp.act).__name__)

    return name if signature(ours) == signature(preset) else None


# ----------------------------------------------------------------------------------------------
# A run as timm weights: what scripts/convert_to_timm.py writes, whichever recipe trained it
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TimmExport:
    """A recipe's rule for `scripts/convert_to_timm.py` returns this: the timm state dict, a function that builds the
    timm model it must load into (strict), and how a user creates that model."""

    tensors: dict[str, Any]
    build_model: Callable[[], Any]
    create: str  # e.g. "timm.create_model('vit_base_patch16_224', num_classes=1000)"


def flax_params_to_timm(params: Mapping[str, Any], config: Mapping[str, Any], arch: str | None = None) -> TimmExport:
    """A JAX recipe's params and run config as a timm `VisionTransformer` (or DeiT's `VisionTransformerDistilled`).

    arch: 'deit3' keeps the position embedding on the patches only (timm `no_embed_class=True`, the `deit3_*`
    models); 'vit' prepends a zero row for the cls token (`vit_*` models; exact, since the row is zero); None keeps
    the layout the model was trained with."""
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
    distilled = "dist_token" in state  # DeiT's distillation token: timm's VisionTransformerDistilled
    name = timm_model_name(kwargs, distilled)
    if name:
        pool = ", global_pool='avg'" if kwargs["global_pool"] == "avg" else ""
        create = f"timm.create_model({name!r}, num_classes={kwargs['num_classes']}{pool})"
    else:
        create = f"{timm_model_class(distilled).__name__}(**{json.dumps(kwargs)})"
    return TimmExport(state, lambda: timm_model_class(distilled)(**kwargs), create)


def write_timm_export(export: TimmExport, out: str | os.PathLike) -> Path:
    """`out` (.pth) and the same tensors as .safetensors beside it, after checking that they load strict into the
    model (every key and shape, or an error naming the mismatch); prints what was written and how to create the
    model."""
    import torch
    from safetensors.torch import save_file

    tensors = {name: torch.as_tensor(np.asarray(value) if not hasattr(value, "detach") else value).detach().float()
               .contiguous() for name, value in export.tensors.items()}
    try:
        export.build_model().load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise UserError(f"the exported weights do not load into {export.create}: {e}") from None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tensors, out)
    save_file(tensors, str(out.with_suffix(".safetensors")))
    print(f"wrote {out} and {out.with_suffix('.safetensors')} ({len(tensors)} tensors)")
    print(f"timm model: {export.create}")
    return out


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()):
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, (*prefix, str(key)))
        else:
            yield (*prefix, str(key)), value


def _to_numpy(value: Any) -> np.ndarray:
    """numpy view of a torch tensor or array-like; bfloat16 tensors keep their bits (as ml_dtypes.bfloat16)."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch for numpy inputs
        import torch

        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            import ml_dtypes

            return value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return value.numpy()
    return np.asarray(value)

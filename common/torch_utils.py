"""PyTorch plumbing shared by the PyTorch recipes: torchrun/DDP setup, uint8 batches to device tensors, the
warmup + decay learning-rate schedule, atomic checkpoints, FLOP counting and mixed precision.

Nothing here knows about one recipe. The JAX recipes use `common.dist`, `common.checkpoint` and
`common.schedules` for the same jobs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn

from common import UserError, run, runtime

# ----------------------------------------------------------------------------------------------
# Processes: torchrun / DDP over one or many nodes, or a single process
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DistEnv:
    """Where this process stands in the run: global rank, rank on its node, number of processes, device."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistEnv:
    """Join the process group that `torchrun` describes (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT in the
    environment), or return a single-process environment when it is absent.

    Each process drives the GPU of its LOCAL_RANK (NCCL); without GPUs the processes use gloo on the CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not torch_dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        torch_dist.init_process_group(backend, rank=rank, world_size=world_size, **kwargs)
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def cleanup_distributed() -> None:
    """Leave the process group (if any); call once at the end of the run, also after errors."""
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of `tensor` over all processes (in place; a no-op in a single process). Returns the tensor."""
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def sums_for_checkpoint(sums: torch.Tensor) -> torch.Tensor:
    """Running log sums (a window's losses, counts) summed over all processes and divided by their number, on the
    CPU, for a checkpoint: each process takes back 1/N of them on resume and the next all-reduce adds them up again,
    so a run resumed between two log records logs what the uninterrupted run does."""
    world = torch_dist.get_world_size() if torch_dist.is_initialized() else 1
    return all_reduce_sum(sums.clone()).cpu() / world


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        torch_dist.barrier()


def default_workers() -> int:
    """Data-loader processes per training process: the node's CPU cores shared by its torchrun processes."""
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, (os.cpu_count() or 1) // local_processes - 1)


# ----------------------------------------------------------------------------------------------
# Batches: `common.data` yields uint8 NHWC numpy arrays; normalisation runs on the device
# ----------------------------------------------------------------------------------------------


def wants_compile(flag: bool | None, device: torch.device) -> bool:
    """--compile / --no-compile as given, else on with CUDA only: CPU runs (and the tests) stay eager."""
    return device.type == "cuda" if flag is None else flag


def images_to_device(images: np.ndarray | torch.Tensor, device: torch.device, mean: tuple[float, ...],
                     std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> normalised float32 (B, 3, H, W) on `device`: (x / 255 - mean) / std.

    The batch crosses to the device as uint8 (4x fewer bytes than float32), from pinned memory on GPUs.
    mean/std in 0-1 units, as timm's constants.
    """
    images = torch.as_tensor(images)
    if device.type == "cuda":
        images = images.pin_memory()
    images = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    mean_t, std_t = _normalisation_constants(device, tuple(mean), tuple(std))
    return (images - mean_t) / std_t


@functools.cache
def _normalisation_constants(device: torch.device, mean: tuple[float, ...],
                             std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """mean and std in 0-255 units as (1, C, 1, 1) tensors on `device`, made once (not a host copy every batch)."""
    return (torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255.0,
            torch.tensor(std, device=device).view(1, -1, 1, 1) * 255.0)


def labels_to_device(labels: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """int labels -> int64 tensor on `device` (what the losses index with)."""
    return torch.as_tensor(labels).to(device, dtype=torch.int64, non_blocking=True)


def batches_to_device(batches: Iterator[dict], device: torch.device, mean: tuple[float, ...],
                      std: tuple[float, ...]) -> Iterator[dict]:
    """Wrap an iterator of `common.data` batches: yields {"image": normalised NCHW, "label": int64, "skipped"}."""
    for batch in batches:
        yield {"image": images_to_device(batch["image"], device, mean, std),
               "label": labels_to_device(batch["label"], device), "skipped": int(batch.get("skipped", 0))}


def synthetic_batch(batch_size: int, img_size: int, num_classes: int, device: torch.device, seed: int,
                    mean: tuple[float, ...], std: tuple[float, ...]) -> dict:
    """Random normalised images and labels made on the device: --benchmark and --data synthetic."""
    generator = torch.Generator(device).manual_seed(seed)
    images = torch.randint(0, 256, (batch_size, img_size, img_size, 3), dtype=torch.uint8, device=device,
                           generator=generator)
    labels = torch.randint(0, num_classes, (batch_size,), device=device, generator=generator)
    return {"image": images_to_device(images, device, mean, std), "label": labels, "skipped": 0}


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """A seed that is a function of (seed, step, rank) only: the random draws of a step (dropout, drop path,
    masking, mixup) come out the same in a resumed run."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def sample_seed(seed: int, step: int, index: int) -> int:
    """A seed that is a function of (seed, step, global sample index) only: a per-image draw (random erasing) comes
    out the same whatever the number of processes the global batch is split over, and in a resumed run. A child
    stream of (seed, step) (numpy's spawn key), so it never equals a `step_seed`."""
    return int(np.random.SeedSequence([seed, step], spawn_key=(index,)).generate_state(1)[0])


# ----------------------------------------------------------------------------------------------
# The global batch across processes: mixup partners that live in another process's shard
# ----------------------------------------------------------------------------------------------


def _world() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) without one."""
    if torch_dist.is_initialized():
        return torch_dist.get_rank(), torch_dist.get_world_size()
    return 0, 1


def roll_global_batch(tensor: torch.Tensor) -> torch.Tensor:
    """This process's rows of `global_batch.roll(1, 0)`, where the global batch is the processes' equal shards in
    rank order (as `common.data` splits it): each row gets the previous row of the global batch. Only the last row
    of each shard crosses processes (one all_gather of a row per process). One process: `tensor.roll(1, 0)`."""
    rank, world = _world()
    if world == 1:
        return tensor.roll(1, 0)
    last_rows = [torch.empty(tensor[-1:].shape, dtype=tensor.dtype, device=tensor.device) for _ in range(world)]
    torch_dist.all_gather(last_rows, tensor[-1:].contiguous())
    return torch.cat([last_rows[rank - 1], tensor[:-1]])  # rank 0 takes the last process's row: the roll wraps


def flip_global_batch(tensor: torch.Tensor) -> torch.Tensor:
    """This process's rows of `global_batch.flip(0)` (global batch as in `roll_global_batch`): the shard of process
    world - 1 - rank, reversed, exchanged with that process by send/receive (the middle process of an odd world
    keeps its own). One process: `tensor.flip(0)`."""
    rank, world = _world()
    partner = world - 1 - rank
    if partner == rank:
        return tensor.flip(0)
    received = torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device)
    exchange = [torch_dist.P2POp(torch_dist.isend, tensor.contiguous(), partner),
                torch_dist.P2POp(torch_dist.irecv, received, partner)]
    for request in torch_dist.batch_isend_irecv(exchange):
        request.wait()
    return received.flip(0)


# ----------------------------------------------------------------------------------------------
# Learning rate
# ----------------------------------------------------------------------------------------------


def warmup_decay_lr(step: int, *, peak_lr: float, total_steps: int, warmup_steps: int,
                    decay: str = "cosine") -> float:
    """big_vision's schedule (utils.create_learning_rate_schedule), per optimizer step.

    `step` counts the updates already made (0 for the first). With progress p = clip((step - warmup) /
    (total - warmup), 0, 1):
        cosine: lr = peak * (1 + cos(pi p)) / 2          linear: lr = peak * (1 - p)
    and during warmup lr is multiplied by step / warmup (linear warmup from 0).
    """
    if decay not in ("cosine", "linear"):
        raise ValueError(f"decay must be 'cosine' or 'linear', got {decay!r}")
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    lr = peak_lr * (0.5 * (1.0 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress)
    if warmup_steps > 0:
        lr *= min(1.0, step / warmup_steps)
    return lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every param group's lr to `lr` times its `lr_scale` (timm's per-group multiplier, default 1)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


# ----------------------------------------------------------------------------------------------
# Checkpoints: one file per step, written to a temporary name and renamed when complete
# ----------------------------------------------------------------------------------------------


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def checkpoint_steps(directory: str | os.PathLike) -> list[int]:
    """Steps of the complete checkpoints `<step>.pt` in `directory`, ascending (empty if none or absent)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.stem) for p in directory.glob("*.pt") if re.fullmatch(r"\d+", p.stem))


def save_checkpoint(directory: str | os.PathLike, step: int, state: Mapping[str, Any], *, keep: int = 1) -> Path:
    """Write `state` to `directory/<step>.pt` atomically (temporary file, fsync, rename), then delete all but the
    `keep` newest checkpoints. A kill at any moment leaves the previous checkpoint intact. Call on one process."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{step}.pt"
    tmp = directory / f".{step}.pt.tmp"
    with open(tmp, "wb") as f:
        torch.save(dict(state), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for old in checkpoint_steps(directory)[:-keep]:
        (directory / f"{old}.pt").unlink(missing_ok=True)
    return path


def find_checkpoint(path: str | os.PathLike, subdirs: tuple[str, ...] = ("checkpoints",)) -> Path:
    """Resolve a checkpoint file, a folder of `<step>.pt`, or a run folder (looked up in `subdirs`, in order) to
    the newest checkpoint file. Raises UserError when there is none."""
    path = Path(path)
    if path.is_file():
        return path
    for folder in [path / sub for sub in subdirs] + [path]:
        steps = checkpoint_steps(folder)
        if steps:
            return folder / f"{steps[-1]}.pt"
    raise UserError(f"no checkpoint found at {path}")


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint` onto the CPU; an unreadable file is a UserError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise UserError(f"cannot read checkpoint {path}: {e}") from None


def start_run(output_dir: str | os.PathLike, *, resume: bool, recipe: str,
              settings: Mapping[str, Any]) -> dict[str, Any] | None:
    """`common.run.start_run` for a PyTorch run folder (checkpoints/<step>.pt): refuse what cannot start or continue
    there, create the folder, and return the last checkpoint when resuming (None for a new run)."""
    steps = checkpoint_steps(Path(output_dir) / "checkpoints")
    run.start_run(output_dir, resume=resume, has_checkpoint=bool(steps), recipe=recipe, settings=dict(settings))
    return load_checkpoint(Path(output_dir) / "checkpoints" / f"{steps[-1]}.pt") if resume else None


def finite_and_largest(*parts: nn.Module | torch.optim.Optimizer | None) -> tuple[bool, float]:
    """Whether every floating-point parameter, buffer and optimizer-state tensor of `parts` is finite, and the
    largest magnitude of a parameter (one host sync for both)."""
    tensors: list[torch.Tensor] = []
    for part in parts:
        if isinstance(part, nn.Module):
            tensors += [*part.parameters(), *part.buffers()]
        elif isinstance(part, torch.optim.Optimizer):
            tensors += [v for state in part.state.values() for v in state.values() if torch.is_tensor(v)]
    weights = [p for part in parts if isinstance(part, nn.Module) for p in part.parameters()]
    finite = torch.stack([t.detach().isfinite().all() for t in tensors if t.is_floating_point()] or
                         [torch.tensor(True)]).all()
    largest = torch.stack([p.detach().abs().max() for p in weights if p.numel()] or [torch.tensor(0.0)]).max()
    finite, largest = torch.stack([finite.float().cpu(), largest.float().cpu()]).tolist()
    return bool(finite), largest


def check_savable(step: int, *parts: nn.Module | torch.optim.Optimizer | None, eval_metrics: dict | None = None,
                  output_dir: str | os.PathLike) -> None:
    """Weights, buffers and optimizer state finite and not blown up, and the evaluation loss when one ran
    (`common.run.check_savable`): else a UserError before the save, so that a diverged run never replaces the last
    good checkpoint."""
    finite, largest = finite_and_largest(*parts)
    run.check_savable(step, state_finite=finite, largest_weight=largest, eval_metrics=eval_metrics,
                      output_dir=output_dir)


def load_run_checkpoint(path: str | os.PathLike, script: str,
                        subdirs: tuple[str, ...] = ("checkpoints",)) -> tuple[dict[str, Any], Path]:
    """The newest checkpoint (and its file) of a run of `script` given as a file, a run folder or its checkpoint
    folder; a checkpoint of another recipe is a UserError naming it."""
    file = find_checkpoint(path, subdirs)
    state = load_checkpoint(file)
    config = state.get("config") if isinstance(state, dict) else None
    if not isinstance(config, dict) or "model" not in state:
        raise UserError(f"{file} is not a checkpoint of {script}")
    trained_by = config.get("trained_by", script)  # runs from before config.json recorded it pass
    if trained_by.split()[0] != script:
        raise UserError(f"{file} is a checkpoint of {trained_by}, not of {script}")
    return state, file


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], where: str) -> None:
    """Raise UserError (naming the first difference) when `state_dict` does not fit `model`'s names and shapes."""
    expected = {k: tuple(v.shape) for k, v in unwrap(model).state_dict().items()}
    stored = {k: tuple(v.shape) for k, v in state_dict.items()}
    for key in sorted(set(expected) | set(stored)):
        if expected.get(key) != stored.get(key):
            raise UserError(f"checkpoint {where} does not match this model: {key} is "
                            f"{stored.get(key, 'missing')} in the checkpoint and {expected.get(key, 'missing')} here")


# ----------------------------------------------------------------------------------------------
# Throughput: FLOPs, peak FLOP/s, mixed precision
# ----------------------------------------------------------------------------------------------

def peak_flops(device: torch.device) -> float | None:
    """bf16 peak FLOP/s of `device` from `common.runtime.PEAK_FLOPS`, or None when unknown (CPUs, unlisted GPUs)."""
    return runtime.peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def train_flops_per_sample(make_model: Callable[[], nn.Module], input_shape: tuple[int, ...]) -> float:
    """FLOPs of one training sample (forward + backward) as counted by torch's FlopCounterMode: matmuls,
    convolutions and attention, 2 FLOPs per multiply-add. The model is built on the meta device (no memory, no
    compute), so this is cheap even for ViT-L."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = make_model()
        inputs = torch.zeros((1, *input_shape), device="meta")
    with FlopCounterMode(display=False) as counter:
        model(inputs).float().sum().backward()
    return float(counter.get_total_flops())


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass on GPUs ('bf16', 'fp16'); float32 on CPUs and with 'fp32'."""
    dtype = AUTOCAST_DTYPES[precision]
    if device.type != "cuda" or dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Loss scaling for fp16 on GPUs; a disabled scaler (a pass-through) otherwise."""
    return torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and precision == "fp16")

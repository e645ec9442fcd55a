"""The PyTorch half of the run layer (`common.run` is the framework-free half): torchrun/DDP setup and wrapping,
uint8 batches to device tensors, atomic checkpoints of model + optimizer + scaler + EMA, the verbs of a visible
training loop (`Window`, `Preemption.stop_after`, `save`, `progress`), classification eval, the `--benchmark`
skeleton, FLOP counting and mixed precision.

A recipe's loop reads (howtotrain_vit.py, dvt.py, localmim_freezeout.py):

    for step in tr.progress(start_step, total_steps, env):
        batch = next(batches)
        metrics = train_step(model, optimizer, scaler, batch, step)
        window.add(torch.stack([metrics["loss_sum"], metrics["correct"], batch_skipped]))
        done = step + 1
        if run.due(done, args.log_interval, total_steps):
            sums = window.totals(done, output_dir)            # one host sync; a NaN loss stops here
            log.write(done, loss=..., img_per_sec=window.images_per_sec(batch_size))
            window.reset()
        stop = preemption.stop_after(done, start_step=start_step, stop_after=args.stop_after,
                                     every=args.log_interval)
        if run.due(done, eval_interval, total_steps) or stop:
            results = evaluate(...) if run.due(done, eval_interval, total_steps) else {}
            tr.save(output_dir, done, env, model=model, optimizer=optimizer, scaler=scaler, eval_metrics=results,
                    extra={"best_top1": best_top1, "log_window": window.state(), "config": config})
        if stop: break

Nothing here knows about one recipe. The JAX recipes use `common.dist`, `common.checkpoint` and `common.loop` for
the same jobs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn

from common import UserError, data, gpu_input, run, runtime
from common.runlog import RunLog

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

    The batch crosses to the device as uint8 (4x fewer bytes than float32), from pinned memory on GPUs: pinned by
    the DataLoader's pinning thread (`tr.train_batches` asks for it), here only if it came unpinned.
    mean/std in 0-1 units, as timm's constants.
    """
    images = torch.as_tensor(images)
    if device.type == "cuda" and images.device.type == "cpu" and not images.is_pinned():
        images = images.pin_memory()
    images = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    mean_t, std_t = gpu_input.normalisation_constants(device, tuple(mean), tuple(std))
    return (images - mean_t) / std_t


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


def erase_per_sample(images: torch.Tensor, probability: float, *, seed: int, step: int, first_index: int) -> None:
    """timm's RandomErasing (pixel mode, on normalised images) on each image of this process's shard, in place; image
    g of the global batch (this shard starts at row `first_index`) draws under a seed of (seed, step, g), so the
    erasing is the same whatever the split over processes, and in a resumed run."""
    from timm.data.random_erasing import RandomErasing

    erasing = RandomErasing(probability, mode="pixel", device=str(images.device))
    for offset, image in enumerate(images):
        image_seed = sample_seed(seed, step, first_index + offset)
        random.seed(image_seed)  # timm draws the rectangle from python random, its pixels from torch
        torch.manual_seed(image_seed)
        erasing(image)  # one (C, H, W) image, erased in place


# ----------------------------------------------------------------------------------------------
# Learning rate
# ----------------------------------------------------------------------------------------------


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
    compute), so this is cheap even for ViT-L. A model with several outputs (a list: early exits) trains them all."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = make_model()
        inputs = torch.zeros((1, *input_shape), device="meta")
    with FlopCounterMode(display=False) as counter:
        outputs = model(inputs)
        sum(out.float().sum() for out in (outputs if isinstance(outputs, list) else [outputs])).backward()
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


# ----------------------------------------------------------------------------------------------
# The verbs of a training loop; the loop itself stays in the recipe
# ----------------------------------------------------------------------------------------------


def add_launcher_flags(parser: argparse.ArgumentParser) -> None:
    """Flags that launchers pass and a recipe takes without using: `python -m torch.distributed.launch` appends
    `--local-rank=N` (`--local_rank` before torch 2.0); the rank comes from the environment (LOCAL_RANK), as torchrun
    sets it."""
    parser.add_argument("--local-rank", "--local_rank", type=int, default=None, help=argparse.SUPPRESS)


def wrap(model: nn.Module, env: DistEnv, *, compile_model: bool, static_graph: bool = False,
         broadcast_buffers: bool = True) -> nn.Module:
    """DDP over the processes (gradient buckets as views: no copy of the gradients), then torch.compile when asked.
    `static_graph`: every parameter is used in every step, so DDP may skip the search for unused ones."""
    if env.distributed:
        device_ids = [env.device] if env.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True,
                                                    static_graph=static_graph, broadcast_buffers=broadcast_buffers)
    return torch.compile(model) if compile_model else model


def add_loader_flag(group: argparse._ArgumentGroup | argparse.ArgumentParser) -> None:
    """--loader: where the training and eval images are decoded and augmented."""
    group.add_argument("--loader", choices=("auto", "gpu", "pil"), default="auto",
                       help="gpu: the host reads bytes, the device decodes (nvJPEG) and augments whole batches "
                            "(common/gpu_input.py); pil: host workers decode and augment (common/data.py); auto: gpu "
                            "on a CUDA machine, pil elsewhere")


def train_batches(data_source: str, augmentation: Mapping[str, Any] | Callable, env: DistEnv, *, global_batch: int,
                  seed: int, start_step: int, workers: int, num_classes: int, image_size: int,
                  mean: tuple[float, ...], std: tuple[float, ...], repeats: int = 1,
                  loader: str = "pil") -> Iterator[dict]:
    """This process's shard of each global training batch, normalised on the device. Batch k depends on (seed, k)
    only, so a resumed run continues the sequence; `synthetic` repeats one device-made batch.

    augmentation: the keyword arguments of `common.augment.train_transform` (image_size, random_crop, scale, hflip,
    color_jitter, auto_augment, interpolation), one description for both loaders (`gpu_input.loader_train_batches`):
    `loader` 'pil' decodes and augments in host workers, 'gpu' on the device; or a recipe's own PIL transform, for an
    augmentation only the host runs."""
    if data.source_kind(data_source) == "synthetic":
        fixed = synthetic_batch(global_batch // env.world_size, image_size, num_classes, env.device, seed + env.rank,
                                mean, std)
        return iter(lambda: fixed, None)
    batches = gpu_input.loader_train_batches(loader, data_source, augmentation, global_batch=global_batch, seed=seed,
                                             start_step=start_step, workers=workers, device=env.device,
                                             process_index=env.rank, process_count=env.world_size, repeats=repeats,
                                             normalize=(mean, std), pin_memory=env.device.type == "cuda")
    return batches if loader == "gpu" else batches_to_device(batches, env.device, mean, std)


def eval_batches(data_source: str, env: DistEnv, *, image_size: int, crop_ratio: float, interpolation: str,
                 global_batch: int, workers: int, mean: tuple[float, ...], std: tuple[float, ...],
                 loader: str = "pil", shard: bool = True) -> Iterator[dict]:
    """The val split once, normalised on the device (resize the shorter side to image_size / crop_ratio, centre crop):
    this process's shard of each global batch, or with `shard` False the whole batch in every process. Padding rows
    and unreadable images carry label -1."""
    processes, index = (env.world_size, env.rank) if shard else (1, 0)
    batches = gpu_input.loader_eval_batches(loader, data_source, image_size=image_size, crop_ratio=crop_ratio,
                                            interpolation=interpolation, global_batch=global_batch, workers=workers,
                                            device=env.device, process_index=index, process_count=processes,
                                            normalize=(mean, std), pin_memory=env.device.type == "cuda")
    return batches if loader == "gpu" else batches_to_device(batches, env.device, mean, std)


def benchmark_input(data_source: str, augmentation: Mapping[str, Any] | Callable, env: DistEnv, *, global_batch: int,
                    workers: int, steps: int, seed: int, loader: str, image_size: int, repeats: int = 1,
                    **report: Any) -> dict:
    """--benchmark-input: the input pipeline alone (no model, nothing written), one JSON line with img_per_sec last,
    for the loader the run would use."""
    return gpu_input.loader_benchmark_input(loader, data_source, augmentation, global_batch=global_batch,
                                            workers=workers, steps=steps, seed=seed, device=env.device,
                                            repeats=repeats, process_index=env.rank, process_count=env.world_size,
                                            image_size=image_size, **report)


def progress(start_step: int, total_steps: int, env: DistEnv, desc: str = "train") -> Iterator[int]:
    """The steps still to train, with a tqdm bar on the main process (on stderr)."""
    from tqdm import tqdm

    return tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, desc=desc,
                disable=not env.is_main or None, dynamic_ncols=True, file=sys.stderr)


class Window:
    """Sums since the last log record (losses, hit counts, images skipped: whatever the recipe adds), kept on the
    device so that a step needs no host sync, and saved in checkpoints (`state`) so that a run resumed between two
    records logs what the uninterrupted run logs."""

    def __init__(self, zeros: torch.Tensor, saved: Mapping[str, Any] | None = None):
        saved = saved or {}
        self.sums = saved.get("sums", zeros).to(zeros.device)
        self.steps = saved.get("steps", 0)
        self.start = time.perf_counter()

    def add(self, values: torch.Tensor) -> None:
        """One step's contribution (same shape as the sums)."""
        self.sums = self.sums + values
        self.steps += 1

    def totals(self, step: int, output_dir: str | os.PathLike) -> torch.Tensor:
        """The sums over all processes (one host sync). A non-finite sum (a NaN or inf loss in the window) is a
        UserError that leaves the last checkpoint alone (`common.run.check_finite_loss`)."""
        sums = all_reduce_sum(self.sums.clone())
        run.check_finite_loss(sums.flatten().tolist(), step, Path(output_dir) / "checkpoints")
        return sums

    def images_per_sec(self, global_batch: int) -> float:
        """Training images per second since the window started (time spent in `paused` blocks excluded)."""
        return self.steps * global_batch / max(time.perf_counter() - self.start, 1e-9)

    def reset(self) -> None:
        self.sums = torch.zeros_like(self.sums)
        self.steps, self.start = 0, time.perf_counter()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time inside the block (evaluation, a checkpoint) does not count towards img/s."""
        start = time.perf_counter()
        yield
        self.start += time.perf_counter() - start

    def state(self) -> dict[str, Any]:
        """For a checkpoint; call on every process (an all-reduce): `sums_for_checkpoint`."""
        return {"sums": sums_for_checkpoint(self.sums), "steps": self.steps}


class Preemption(runtime.Preemption):
    """SIGTERM as a stop request (`common.runtime.Preemption`), plus --stop-after. Over several processes they must
    stop at the same step, so truth is agreed by an all-reduce, asked only every `every` steps (a host sync)."""

    def __init__(self, env: DistEnv):
        super().__init__()
        self.env = env

    def stop_after(self, done: int, *, start_step: int, stop_after: int | None, every: int) -> bool:
        """Whether to save and stop after step `done`: --stop-after N steps of this run, or SIGTERM."""
        if run.stopping(stop_after, start_step, done):
            return True
        if not self.env.distributed:
            return self.requested
        if done % every:
            return False
        return all_reduce_sum(torch.tensor(float(self.requested), device=self.env.device)).item() > 0


def save(output_dir: str | os.PathLike, step: int, env: DistEnv, *, model: nn.Module,
         optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None = None, ema: nn.Module | None = None,
         eval_metrics: dict | None = None, extra: Mapping[str, Any] | None = None) -> Path:
    """`output_dir/checkpoints/<step>.pt`: model, optimizer, scaler and EMA state plus `extra` (config, best metric,
    the log window...). A diverged state (non-finite or blown-up weights or optimizer state, a non-finite eval loss)
    is refused first, so the previous checkpoint stays. Call on every process (collectives); rank 0 writes."""
    folder = Path(output_dir) / "checkpoints"
    plain = unwrap(model)
    check_savable(step, plain, optimizer, ema, eval_metrics=eval_metrics, output_dir=folder)
    if env.is_main:
        save_checkpoint(folder, step, {
            "model": plain.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "ema": ema.state_dict() if ema is not None else None, "step": step, **(extra or {})})
    barrier()
    return folder / f"{step}.pt"


def restore(state: Mapping[str, Any], output_dir: str | os.PathLike, *, model: nn.Module,
            optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None = None,
            ema: nn.Module | None = None) -> None:
    """Load a checkpoint written by `save` into the run's objects (the model's names and shapes checked first)."""
    check_state_dict(model, state["model"], str(Path(output_dir) / "checkpoints" / f"{state['step']}.pt"))
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    if ema is not None:
        ema.load_state_dict(state["ema"])


@torch.no_grad()
def evaluate_classifier(model: nn.Module, batches: Iterator[dict], env: DistEnv, *, precision: str,
                        per_sample_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                        prefix: str = "val", all_reduce: bool = True) -> dict[str, float]:
    """Mean loss, top-1 and top-5 (percent) over device batches whose padding rows carry label -1, summed over the
    processes (`all_reduce`; False when every process evaluated the whole split). `per_sample_loss(logits, labels)`
    defaults to cross-entropy. {} when there was nothing to evaluate."""
    per_sample_loss = per_sample_loss or (lambda logits, labels: F.cross_entropy(logits, labels, reduction="none"))
    model.eval()
    sums = torch.zeros(4, device=env.device)  # images, loss, top-1, top-5
    for batch in batches:
        labels = batch["label"]
        valid = labels >= 0
        with autocast(env.device, precision):
            logits = model(batch["image"]).float()
        losses = per_sample_loss(logits, labels.clamp(min=0))
        hits = logits.topk(min(5, logits.shape[-1]), dim=-1).indices == labels[:, None]
        sums += torch.stack([valid.sum(), (losses * valid).sum(), (hits[:, 0] & valid).sum(),
                             (hits.any(-1) & valid).sum()]).float()
    model.train()
    count, loss, top1, top5 = (all_reduce_sum(sums) if all_reduce else sums).tolist()
    if count == 0:
        return {}
    return {f"{prefix}_loss": loss / count, f"{prefix}_top1": 100 * top1 / count, f"{prefix}_top5": 100 * top5 / count,
            f"{prefix}_images": int(count)}


def report_eval(output_dir: str, step: int, results: dict[str, float], checkpoint: str, env: DistEnv, *,
                wandb: str | None, tensorboard: bool) -> dict[str, float]:
    """--eval-only: the results as one record of the run's log.jsonl (none when there was nothing to evaluate;
    config.json and the checkpoints stay as they are) and, with the step and checkpoint, as one JSON line on
    stdout."""
    if results:
        with contextlib.closing(RunLog(output_dir, None, wandb_project=wandb, tensorboard=tensorboard,
                                       main=env.is_main)) as log:
            log.write(step, **results)
    if env.is_main:
        print(json.dumps(dict(results, step=step, checkpoint=checkpoint)))
    return results


def benchmark(step: Callable[[dict | None], torch.Tensor], env: DistEnv, *, steps: int, global_batch: int,
              train_flops_per_image: float, real_batches: Iterator[dict] | None = None, echo: bool = True,
              **report: Any) -> dict[str, Any]:
    """Time `steps` calls of `step(batch)` (a train step; None: on the recipe's device-made batch; it returns a
    tensor to wait on) after a first call (compile) and 3 warm-up calls; with `real_batches` (the input pipeline on
    real data) also `steps` calls fed from it, as end_to_end_img_per_sec (lower than img_per_sec: input-bound).
    Prints one JSON line, img/s, step time, peak memory and MFU, `report` first, img_per_sec last of the speeds
    (`echo=False`: returns it unprinted, for a caller that adds what it compares)."""
    def timed(calls: int, batches: Iterator[dict] | None = None) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            out = step(next(batches) if batches is not None else None)
        out.float().sum().item()  # waits for the device
        return time.perf_counter() - start

    first_step = timed(1)
    timed(3)  # warm up
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    step_time = timed(steps) / steps
    images_per_sec = global_batch / step_time
    end_to_end = {}
    if real_batches is not None:
        timed(3, real_batches)  # warm up: workers starting, first decodes
        end_to_end["end_to_end_img_per_sec"] = round(global_batch * steps / timed(steps, real_batches), 1)
        real_batches.close()  # shuts the loader workers down
    cuda = env.device.type == "cuda"
    peak = peak_flops(env.device)
    result = {**report, "batch_size": global_batch, "processes": env.world_size,
              "device": torch.cuda.get_device_name(env.device) if cuda else "cpu", **end_to_end,
              "img_per_sec": round(images_per_sec, 1), "step_ms": round(1000 * step_time, 2),
              "first_step_s": round(first_step, 1),
              "peak_memory_gib": round(torch.cuda.max_memory_allocated(env.device) / 2**30, 2) if cuda else None,
              "train_gflops_per_img": float(f"{train_flops_per_image / 1e9:.4g}"),
              "mfu": round(train_flops_per_image * images_per_sec / (peak * env.world_size), 3) if peak else None}
    if env.is_main and echo:
        print(json.dumps(result))
    return result


# --- added for dvt


def check_batch_split(global_batch: int, env: DistEnv, grad_accum: int = 1) -> None:
    """A global --batch-size must split evenly over the processes and the --grad-accum micro-batches (UserError)."""
    if global_batch % (env.world_size * grad_accum):
        raise UserError(f"--batch-size {global_batch} must be a multiple of {env.world_size} processes x "
                        f"--grad-accum {grad_accum}")

"""The plumbing of a JAX training loop, shared by the JAX recipes: the run flags, batches onto the mesh, gradient
accumulation, evaluation totals, the verbs of the loop (progress bar, log window, checked save, preemption) and the
benchmark.

The loop itself (step -> log -> eval -> save -> stop) is written out in each recipe script, with these verbs and
those of `common.run` (`due`, `stopping`, `say`, `eval_line`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from common import UserError, checkpoint, data, dist, run, runtime
from common.checkpoint import Checkpointer
from common.runlog import RunLog

# ----------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------


def compute_dtype(name: str) -> str:
    """--precision: the contract's bf16 / fp32 as the JAX dtype names bfloat16 / float32 (which pass as they are)."""
    return {"bf16": "bfloat16", "fp32": "float32"}.get(name, name)


def add_run_flags(parser: argparse.ArgumentParser, *, output_dir: str | None) -> argparse._ArgumentGroup:
    """The "run" flags of every JAX recipe, spelled as the CLI contract says (canonical first, then the names users
    bring from MAE's and deit3-jax's code): where the data and the run live, resume and stop, the benchmarks,
    loader workers, intervals and logging. Returns the group, for the recipe's own run flags."""
    g = parser.add_argument_group("run")
    g.add_argument("--data", "--data-path", "--data_path", "--train-dataset-shards", default="digits",
                   help="ImageNet-layout folder, webdataset shards, cifar10, cifar100, digits or synthetic")
    g.add_argument("--output-dir", "--output_dir", default=output_dir,
                   help="config.json, log.jsonl and checkpoints go here")
    g.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    g.add_argument("--stop-after", type=int, default=0, metavar="N",
                   help="save and exit after N steps of this process (0: train to the end)")
    g.add_argument("--benchmark", action="store_true", help="time train steps on synthetic data and exit")
    g.add_argument("--benchmark-steps", type=int, default=30)
    g.add_argument("--benchmark-input", action="store_true",
                   help="time the input pipeline alone (--data, --workers, --batch-size) over --benchmark-steps "
                        "batches, print JSON and exit")
    g.add_argument("--workers", "--train-loader-workers", "--num_workers", type=int,
                   default=min(16, os.cpu_count() or 1), help="data loader processes per host")
    g.add_argument("--loader", choices=("auto", "gpu", "pil"), default="auto",
                   help="gpu: the host reads bytes, the GPU decodes (nvJPEG) and augments whole batches, which reach "
                        "JAX by DLPack (common/gpu_input.py); pil: host workers decode and augment (common/data.py); "
                        "auto: gpu when JAX runs on CUDA GPUs, pil elsewhere (TPU, CPU)")
    g.add_argument("--log-interval", type=int, default=50, help="steps between log lines")
    g.add_argument("--eval-interval", type=int, default=0, help="steps between evals (0: once per epoch)")
    g.add_argument("--save-interval", type=int, default=0, help="steps between checkpoints (0: at each eval)")
    g.add_argument("--wandb", "--project", default=None, metavar="PROJECT",
                   help="also log to Weights & Biases (if installed)")
    g.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard (if installed)")
    return g


def complete_flags(args: argparse.Namespace, defaults: Mapping[str, Any], *, seeds: Iterable[str]) -> None:
    """What every JAX recipe does with its parsed flags: each flag the command line left unset (None) takes its
    value from `defaults` (the --model preset, then the recipe's table), each of `seeds` takes --seed, --auto-augment
    'none' is off; then the image must split into patches, the width into heads, and the global batch into
    --grad-accum micro-batches. A bad combination is a UserError naming the flags."""
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    for name in seeds:
        if getattr(args, name) is None:
            setattr(args, name, args.seed)
    if getattr(args, "auto_augment", None) in ("", "none"):
        args.auto_augment = None
    if args.image_size % args.patch_size:
        raise UserError(f"--image-size {args.image_size} is not a multiple of --patch-size {args.patch_size}")
    if args.dim % args.heads:
        raise UserError(f"--dim {args.dim} is not divisible by --heads {args.heads}")
    grad_accum = getattr(args, "grad_accum", 1)
    run.check_positive(batch_size=args.batch_size, eval_batch_size=args.eval_batch_size, grad_accum=grad_accum)
    if args.batch_size % grad_accum:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by --grad-accum {grad_accum}")


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------


def synthetic_batch(mesh: Mesh, global_batch: int, image_size: int, num_classes: int, seed: int) -> dict:
    """A random uint8 batch made on the devices (no host data path): for --benchmark and --data synthetic."""
    @functools.partial(jax.jit, out_shardings=dist.batch_sharded(mesh))
    def make(key):
        image_key, label_key = jax.random.split(key)
        return {"image": jax.random.randint(image_key, (global_batch, image_size, image_size, 3), 0, 256, jnp.uint8),
                "label": jax.random.randint(label_key, (global_batch,), 0, num_classes, jnp.int32)}

    return make(jax.random.PRNGKey(seed))


def loader_device() -> Any:
    """The torch device where `--loader gpu` decodes and augments: the CUDA GPU of this host's first JAX device (its
    batches then reach JAX by DLPack without a host copy), or the CPU when JAX runs elsewhere."""
    import torch

    device = jax.local_devices()[0]
    if device.platform == "gpu" and torch.cuda.is_available():
        return torch.device("cuda", device.local_hardware_id or 0)
    return torch.device("cpu")


def loader_choice(flag: str, augmentation: Mapping[str, Any]) -> str:
    """--loader auto|gpu|pil -> 'gpu' or 'pil' (auto: gpu when JAX runs on CUDA GPUs and the augmentation is one
    `common.gpu_input` has; `gpu_input.loader_for`)."""
    from common import gpu_input

    return gpu_input.loader_for(flag, loader_device(), augmentation)


def to_mesh(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """This host's rows of a batch as global arrays sharded over the 'data' axis: numpy arrays from the PIL loader
    (`dist.global_batch`), or torch tensors from `--loader gpu`, taken over by DLPack where they lie and cut into
    the rows of each of this host's devices."""
    batch = {key: value for key, value in batch.items() if key != "skipped"}
    if not any(hasattr(value, "__dlpack__") and not isinstance(value, np.ndarray) for value in batch.values()):
        return dist.global_batch(batch, mesh)
    import torch

    from common.gpu_input import to_jax

    sharding, arrays = dist.batch_sharded(mesh), {}
    for key, value in batch.items():
        local = to_jax(value.int() if value.dtype == torch.int64 else value)  # JAX's labels are int32
        global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
        rows = {device: index[0] for device, index in sharding.addressable_devices_indices_map(global_shape).items()}
        first = min(row.start or 0 for row in rows.values())
        shards = [jax.device_put(local[(row.start or 0) - first:(row.stop or global_shape[0]) - first], device)
                  for device, row in rows.items()]
        arrays[key] = jax.make_array_from_single_device_arrays(global_shape, sharding, shards)
    return arrays


def train_stream(data_source: str, augmentation: Mapping[str, Any], mesh: Mesh, *, global_batch: int, seed: int,
                 repeats: int, start_step: int, workers: int, image_size: int, num_classes: int,
                 loader: str = "pil") -> Iterator[tuple[dict, int]]:
    """Global train batches on the mesh, with the number of unreadable images skipped to make each.

    augmentation: the keyword arguments of `common.augment.train_transform`, one description for both loaders
    (`loader` 'pil': host workers, `common.data`; 'gpu': `common.gpu_input` on this host's GPU, uint8 batches
    handed to JAX by DLPack). Batch k depends only on (seed, k) (`common.data.train_batches`), so starting at
    `start_step` after a resume continues the exact sequence. `synthetic` repeats one device-made batch.
    """
    if data_source == "synthetic":
        fixed = synthetic_batch(mesh, global_batch, image_size, num_classes, seed)
        while True:
            yield fixed, 0
    from common import gpu_input

    batches = gpu_input.loader_train_batches(loader, data_source, augmentation, global_batch=global_batch, seed=seed,
                                             repeats=repeats, start_step=start_step, workers=workers,
                                             device=loader_device(), process_index=jax.process_index(),
                                             process_count=jax.process_count())
    for host_batch in batches:
        yield to_mesh(host_batch, mesh), int(host_batch.get("skipped", 0))


def eval_stream(data_source: str, *, image_size: int, crop_ratio: float, global_batch: int, workers: int,
                loader: str = "pil", interpolation: str = "bicubic") -> Iterator[dict]:
    """This host's rows of each val batch (resize the shorter side to image_size / crop_ratio, centre crop), from
    either loader; `evaluate` puts them on the mesh."""
    from common import gpu_input

    return gpu_input.loader_eval_batches(loader, data_source, image_size=image_size, crop_ratio=crop_ratio,
                                         interpolation=interpolation, global_batch=global_batch, workers=workers,
                                         device=loader_device(), process_index=jax.process_index(),
                                         process_count=jax.process_count())


def benchmark_input(data_source: str, augmentation: Mapping[str, Any], *, global_batch: int, workers: int,
                    steps: int, seed: int, repeats: int, loader: str, **report: Any) -> dict:
    """--benchmark-input: the input pipeline alone (no model, nothing written), one JSON line, img_per_sec last."""
    from common import gpu_input

    dist.initialize()
    return gpu_input.loader_benchmark_input(loader_choice(loader, augmentation), data_source, augmentation,
                                            global_batch=global_batch, workers=workers, steps=steps, seed=seed,
                                            device=loader_device(), repeats=repeats,
                                            process_index=jax.process_index(), process_count=jax.process_count(),
                                            **report)


def check_batch_sizes(global_batch: int, eval_batch: int, *, mixing: bool) -> None:
    """The global batch splits evenly over all devices, the eval batch over the hosts; mixup/cutmix (timm's
    batch mode pairs each image with the batch flipped) needs an even batch."""
    if global_batch % jax.device_count() or eval_batch % jax.process_count():
        raise UserError(f"--batch-size {global_batch} must be a multiple of the {jax.device_count()} devices and "
                        f"--eval-batch-size {eval_batch} of the {jax.process_count()} hosts")
    if mixing and global_batch % 2:
        raise UserError("mixup/cutmix pair each image with the batch flipped: --batch-size must be even")


def run_length(spec: data.DataSpec, global_batch: int, *, epochs: float, warmup_epochs: float, training_steps: int = 0,
               warmup_steps: int = -1, benchmark: bool = False) -> tuple[int, int, int]:
    """(steps per epoch, total steps, warmup steps). Durations are epochs of the training set unless given in
    steps (`training_steps` > 0, `warmup_steps` >= 0); an epoch is one dataset-size of samples, also with
    repeated augmentation (DeiT's RASampler)."""
    steps_per_epoch = data.steps_per_epoch(spec.train_size, global_batch) if spec.train_size else 0
    total_steps = training_steps or int(epochs * steps_per_epoch)
    if benchmark:
        total_steps = total_steps or 10_000  # only shapes the lr schedule of the timed steps
    if total_steps <= 0:
        raise UserError(f"the data ({spec.source}) has no known size: give --training-steps")
    warmup = warmup_steps if warmup_steps >= 0 else int(warmup_epochs * steps_per_epoch)
    return steps_per_epoch, total_steps, warmup


# ----------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------


def accumulate_gradients(grad_fn: Callable, params: Any, inputs: tuple, steps: int) -> tuple[jax.Array, Any]:
    """Mean loss and gradients of `grad_fn(params, *micro_inputs, micro_index)` over `steps` micro-batches.

    A scan inside the compiled step (one optimizer update per call). Micro-batch i takes rows i, i + n,
    i + 2n, ... of every input, so each device keeps working on its own rows of the sharded batch.
    """
    if steps == 1:
        return grad_fn(params, *inputs, 0)
    split = lambda x: x.reshape(-1, steps, *x.shape[1:]).swapaxes(0, 1)  # noqa: E731

    def add(carry, micro):
        return jax.tree_util.tree_map(jnp.add, carry, grad_fn(params, *micro)), None

    zeros = (jnp.zeros(()), jax.tree_util.tree_map(jnp.zeros_like, params))
    micro_inputs = (*jax.tree_util.tree_map(split, inputs), jnp.arange(steps))
    (loss, grads), _ = jax.lax.scan(add, zeros, micro_inputs)
    return jax.tree_util.tree_map(lambda x: x / steps, (loss, grads))


def classification_totals(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    """Summed loss, top-1 and top-5 hits over the valid rows of an eval batch (padding rows have label -1)."""
    valid = labels >= 0
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    loss = -jnp.take_along_axis(log_probs, jnp.maximum(labels, 0)[:, None], axis=-1)[:, 0]
    return {"count": valid.sum(), "loss": jnp.where(valid, loss, 0).sum(),
            "top1": jnp.where(valid, top5[:, 0] == labels, False).sum(),
            "top5": jnp.where(valid, (top5 == labels[:, None]).any(-1), False).sum()}


def evaluate(eval_step: Callable, weights: Mapping[str, Any], batches: Iterable[dict], mesh: Mesh) -> dict:
    """Run `eval_step(params, batch) -> totals` for each entry of `weights` (metric prefix -> params, e.g.
    {"val_": params, "ema_val_": ema_params}) over one pass of host batches, and turn the totals into metrics:
    the eval data is loaded once however many weights are evaluated. `totals` holds a `count` of valid images
    and sums over them (e.g. `classification_totals`: loss, top1, top5), reported as means."""
    totals: dict[str, Any] = {}
    for batch in tqdm(batches, desc="eval", leave=False, disable=_no_progress_bar()):
        batch = to_mesh(batch, mesh)
        for prefix, params in weights.items():
            out = eval_step(params, batch)
            totals[prefix] = jax.tree_util.tree_map(jnp.add, totals[prefix], out) if prefix in totals else out
    metrics = {}
    for prefix, total in totals.items():
        total = jax.tree_util.tree_map(lambda x: float(dist.host_value(x)), total)
        images = total.pop("count")
        for name, value in total.items():  # means over the images; top-k hits in percent
            metrics[f"{prefix}{name}"] = value / max(images, 1.0) * (100 if name in ("top1", "top5") else 1)
        metrics[f"{prefix}images"] = int(images)
    return metrics


# ----------------------------------------------------------------------------------------------
# Verbs of the loop
# ----------------------------------------------------------------------------------------------


def _no_progress_bar() -> bool | None:
    """tqdm's `disable`: bars on the main process when stderr is a terminal (None: tqdm checks), else none."""
    return None if dist.is_main_process() else True


class Preemption(runtime.Preemption):
    """SIGTERM as a stop request (`common.runtime.Preemption`); with several hosts, all of them must agree to stop
    at the same step, so truth is the OR over hosts."""

    def __bool__(self) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return bool(multihost_utils.process_allgather(np.int32(self.requested)).max())
        return self.requested

    def stop_after(self, done: int, *, every: int, last: int) -> bool:
        """Whether to stop after step `done`. One process: asked every step (a flag read, no sync), so SIGTERM
        saves the next step. Several hosts: the OR over hosts is a collective (a host sync), so it is asked only
        every `every` steps and at step `last`, the same steps on every host."""
        return (jax.process_count() == 1 or done % every == 0 or done == last) and bool(self)


def open_run(output_dir: str, *, resume: bool, recipe: str, settings: dict) -> Checkpointer:
    """Check that the run can start or continue in `output_dir` (`common.run.start_run`: --resume, the same recipe
    and settings, a writable folder), then open its checkpoints."""
    run.start_run(output_dir, resume=resume, has_checkpoint=checkpoint.has_checkpoint(output_dir), recipe=recipe,
                  settings=settings)
    return Checkpointer(output_dir)


def restore_or_start(ckpt: Checkpointer, state: Any, *, resume: bool) -> tuple[Any, dict]:
    """The state to start from: the last checkpoint with --resume (`open_run` checked there is one), else `state`."""
    return ckpt.restore(state) if resume else (state, {})


def report_eval(output_dir: str, step: int, metrics: dict, *, wandb: str | None, tensorboard: bool) -> dict:
    """--eval-only: the metrics as one record of the run's log.jsonl (config.json and checkpoints stay as they are)
    and as one JSON line on stdout."""
    log = RunLog(output_dir, None, wandb_project=wandb, tensorboard=tensorboard)
    log.write(step, **metrics)
    log.close()
    if dist.is_main_process():
        print(json.dumps(metrics))
    return metrics


@jax.jit
def _finite_and_largest(state: Any) -> tuple[jax.Array, jax.Array]:
    """Whether every float of the state is finite, and the largest magnitude outside the optimizer state."""
    floats = lambda tree: [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]  # noqa: E731
    finite = jnp.stack([jnp.isfinite(x).all() for x in floats(state)] or [jnp.bool_(True)]).all()
    weights = {k: v for k, v in state.items() if k != "opt_state"}
    largest = jnp.stack([jnp.abs(x).max() for x in floats(weights) if x.size] or [jnp.float32(0)]).max()
    return finite, largest


def check_savable(state: Any, step: int, output_dir: str, eval_metrics: dict | None = None) -> None:
    """Parameters and optimizer state finite and not blown up, and the evaluation loss when one ran
    (`common.run.check_savable`): else a UserError before the save, so that a diverged run never replaces the last
    good checkpoint."""
    finite, largest = (dist.host_value(x) for x in _finite_and_largest(state))
    run.check_savable(step, state_finite=bool(finite), largest_weight=float(largest), eval_metrics=eval_metrics,
                      output_dir=output_dir)


def progress_bar(start_step: int, total_steps: int) -> tqdm:
    """The steps of the run, range(start_step, total_steps), as a tqdm bar (main process, stderr a terminal)."""
    return tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, desc="train",
                disable=_no_progress_bar(), dynamic_ncols=True)


class Meter:
    """The log window of a training loop: the images skipped and the steps timed since the last log record.

    count(skipped) after each step; record(step, metrics) turns the step's metrics into the log record (loss, lr,
    ..., img_per_sec, epoch, and skipped_images when some were skipped) and opens the next window; restart() after
    an evaluation, so that img/s times the train steps only. `skipped` starts from a checkpoint's unlogged_skips.
    """

    def __init__(self, global_batch: int, steps_per_epoch: int, bar: tqdm | None = None, *, skipped: int = 0):
        self.global_batch, self.steps_per_epoch, self.bar = global_batch, steps_per_epoch, bar
        self.skipped, self.last = skipped, {}
        self.restart()

    def restart(self) -> None:
        self.start, self.steps = time.perf_counter(), 0

    def count(self, skipped: int) -> None:
        self.skipped += skipped
        self.steps += 1

    def record(self, step: int, metrics: Mapping[str, Any], output_dir: str) -> dict[str, float]:
        """The log record of step `step` (a NaN/inf loss is a UserError: the run stops before any save)."""
        record = {name: float(value) for name, value in jax.device_get(metrics).items()}
        run.check_finite_loss([record["loss"]] if "loss" in record else [], step, output_dir)
        record["img_per_sec"] = self.steps * self.global_batch / (time.perf_counter() - self.start)
        record["epoch"] = step / self.steps_per_epoch if self.steps_per_epoch else 0.0
        if self.skipped:
            record["skipped_images"], self.skipped = self.skipped, 0
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 img_s=f"{record['img_per_sec']:.0f}")
        self.last = record
        self.restart()
        return record


def save(ckpt: Checkpointer, state: Any, step: int, *, config: dict, best_top1: float, unlogged_skips: int,
         loss: Any = None, eval_metrics: dict | None = None, best: bool = False) -> None:
    """Save `state` as the run's last checkpoint (and as its best with `best`), with the meta a resume needs (the
    config, the best value so far, the images skipped since the last log record). Refused with a UserError, the
    previous checkpoint kept, when the step's loss, the weights or the evaluation loss are not finite
    (`check_savable`)."""
    output_dir = str(ckpt.output_dir)
    run.check_finite_loss([loss] if loss is not None else [], step, output_dir)
    check_savable(state, step, output_dir, eval_metrics)
    ckpt.save(step, state, {"config": config, "step": step, "best_top1": best_top1, "unlogged_skips": unlogged_skips},
              best=best)


# ----------------------------------------------------------------------------------------------
# Benchmark
# ----------------------------------------------------------------------------------------------


def benchmark(train_step: Callable, state: Any, batch: dict, *, steps: int, global_batch: int,
              train_flops_per_image: float, batches: Iterator[tuple[dict, int]] | None = None, **report: Any) -> dict:
    """Time `steps` train steps after compiling and 3 warm-up steps; print and return img/s, step time, compile
    time, peak device memory and MFU (model matmul FLOPs against `runtime.PEAK_FLOPS` of the device kind).

    batches: `train_stream` on real data; then `steps` more steps fed from it (after 3 warm-up steps) are timed too,
    reported as end_to_end_img_per_sec beside the device-only img_per_sec (lower: the run is input-bound)."""
    start = time.perf_counter()
    state, metrics = train_step(state, batch)
    jax.block_until_ready(metrics)
    compile_seconds = time.perf_counter() - start
    for _ in range(3):
        state, metrics = train_step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = train_step(state, batch)
    jax.block_until_ready(metrics)
    step_time = (time.perf_counter() - start) / steps
    images_per_sec = global_batch / step_time
    end_to_end = {}
    if batches is not None:
        for _ in range(3):
            state, metrics = train_step(state, next(batches)[0])
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = train_step(state, next(batches)[0])
        jax.block_until_ready(metrics)
        end_to_end["end_to_end_img_per_sec"] = round(global_batch * steps / (time.perf_counter() - start), 1)
        batches.close()  # shuts the loader workers down
    device = jax.devices()[0]
    peak_memory = (device.memory_stats() or {}).get("peak_bytes_in_use", 0)
    peak = runtime.peak_flops(device.device_kind)
    result = dict(report, batch_size=global_batch, devices=jax.device_count(), device_kind=device.device_kind,
                  **end_to_end, img_per_sec=round(images_per_sec, 1), step_ms=round(1000 * step_time, 2),
                  compile_s=round(compile_seconds, 1), peak_memory_gib=round(peak_memory / 2**30, 2) or None,
                  train_gflops_per_img=round(train_flops_per_image / 1e9, 2),
                  mfu=round(train_flops_per_image * images_per_sec / (peak * jax.device_count()), 3) if peak else None)
    if dist.is_main_process():
        print(json.dumps(result))
    return result

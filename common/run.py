"""A run's folder and its contract, the same for the JAX and the PyTorch recipes (no framework imported here).

Every recipe starts a run the same way, after its arguments and data are checked and before anything is written:

    start_run(output_dir, resume=..., has_checkpoint=..., config=...)

- a folder that holds a run's checkpoint is continued only with `--resume`, and `--resume` needs a checkpoint;
- a resumed run must be the same recipe with the same settings, except those in `MAY_CHANGE_ON_RESUME` (where the
  data lives, workers, intervals, logging, the peak learning rate to recover from a spike): any other difference is
  refused, naming the flag;
- the folder is created only then; one that cannot be created or written is refused.

A flag's bad value, a checkpoint that does not fit, an unwritable folder: each is a `UserError`, which the recipe's
`main` prints as one `error:` line before exiting with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn

from common import UserError

# Settings that a resumed run may change: where things are, how often to log, evaluate and save, how to report,
# and the peak learning rate (lowering it is how a run is nursed past a loss spike). Everything else (model,
# optimizer, schedule, augmentation, batch, seeds) must be what the run was started with.
MAY_CHANGE_ON_RESUME = frozenset({
    "data", "output_dir", "resume", "workers", "log_interval", "eval_interval", "save_interval", "save_every",
    "stop_after", "wandb", "tensorboard", "log_dir", "eval_batch_size", "dist_eval", "compile", "benchmark_steps",
    "learning_rate", "lr", "blr", "local_rank", "world_size", "loader",
})


def exit_status(command: Callable[[], Any]) -> int:
    """Run a script's command: 0 when it ends, 2 with one `error:` line on stderr when it raises a UserError."""
    try:
        command()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors (an unknown flag, a bad value) are UserErrors: one `error:` line, exit status 2."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see {self.prog} --help)")


def check_positive(**values: float) -> None:
    """Each keyword (a flag's name, underscores for dashes) must be > 0."""
    for name, value in values.items():
        if value is None or value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")


def run_record(recipe: str, args: Any) -> dict[str, Any]:
    """What config.json records of a run's identity: the recipe that trains it ("trained_by": script and command)
    and its parsed flags ("flags"), which a `--resume` is compared with (the rest of config.json holds values derived
    from them, some under a flag's own name)."""
    return {"trained_by": recipe, "flags": dict(vars(args))}


def start_run(output_dir: str | os.PathLike, *, resume: bool, has_checkpoint: bool, recipe: str,
              settings: dict[str, Any]) -> None:
    """Refuse what cannot be started or continued in `output_dir` (see module docstring), then create the folder.

    recipe, settings: the run's `run_record` (the script and command, and the flags as parsed), compared with the
    saved config.json on --resume.
    """
    out = Path(output_dir)
    if has_checkpoint and not resume:
        raise UserError(f"{out} already holds a run: pass --resume to continue it, or choose another --output-dir")
    if resume and not has_checkpoint:
        raise UserError(f"--resume: {out} holds no checkpoint to resume from; drop --resume to start a new run there")
    if resume:
        check_same_run(saved_config(out), recipe, settings, out)
    make_output_dir(out)
    from common import data  # noqa: PLC0415 (data imports torch and PIL; this module stays framework-free)

    data.forget_named_files()


def make_output_dir(output_dir: str | os.PathLike) -> Path:
    """Create `output_dir` (and its parents); one that cannot be created or written to is a UserError."""
    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to --output-dir {out}: {e.strerror or e}") from None
    return out


def saved_config(output_dir: str | os.PathLike) -> dict[str, Any]:
    """The config.json of a run folder ({} when there is none)."""
    path = Path(output_dir) / "config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def check_same_run(saved: dict[str, Any], recipe: str, settings: dict[str, Any], output_dir: Path) -> None:
    """A resumed run is the recipe that wrote the checkpoint, with the same settings but `MAY_CHANGE_ON_RESUME`."""
    if saved.get("trained_by", recipe) != recipe:
        raise UserError(f"{output_dir} holds a run of {saved['trained_by']}, not of {recipe}: it cannot be resumed "
                        "here")
    changed = changed_settings(saved.get("flags", {}), settings)
    if changed:
        raise UserError(f"--resume with other settings than the run in {output_dir}: " + ", ".join(changed)
                        + "; resume with the run's settings (see its config.json) or start another --output-dir")


def changed_settings(saved: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """'--flag NEW (the run has OLD)' for each setting present in both that differs and may not change."""
    def plain(value: Any) -> Any:
        return json.loads(json.dumps(value, default=str))

    return [f"--{key.replace('_', '-')} {plain(config[key])} (the run has {plain(saved[key])})"
            for key in sorted(set(saved) & set(config) - MAY_CHANGE_ON_RESUME)
            if plain(saved[key]) != plain(config[key])]


# A weight this large means the run has diverged, also where float32 still holds it (on a CPU, or a loss that
# saturates): trained ViT weights stay within a few units, and a bf16/fp16 forward pass overflows long before.
DIVERGED_WEIGHT = 1e8


def check_savable(step: int, *, state_finite: bool, largest_weight: float,
                  eval_metrics: dict[str, Any] | None = None, output_dir: str | os.PathLike) -> None:
    """Refuse to save a diverged state: weights or optimizer state not finite, a weight beyond `DIVERGED_WEIGHT`,
    or an evaluation loss that is not finite. The previous checkpoint stays as it is."""
    losses = {k: v for k, v in (eval_metrics or {}).items() if k.endswith("loss")}
    bad = [f"{k} is {v}" for k, v in losses.items() if not math.isfinite(float(v))]
    if not state_finite:
        bad.insert(0, "the weights or optimizer state are NaN or infinite")
    elif largest_weight >= DIVERGED_WEIGHT:
        bad.insert(0, f"a weight reached {largest_weight:.3g}")
    if not bad:
        return
    what = ", ".join(bad)
    raise UserError(f"the run diverged at step {step}: {what}; stopping without saving (the last good checkpoint in "
                    f"{output_dir} is kept)")


def check_finite_loss(values: Iterable[float], step: int, output_dir: str | os.PathLike) -> None:
    """A NaN/inf training loss stops the run before anything is saved over the last good checkpoint."""
    for value in values:
        if not math.isfinite(float(value)):
            raise UserError(f"the loss is {float(value)} at step {step}: the run diverged; stopping without saving "
                            f"(the last good checkpoint in {output_dir} is kept)")


# ----------------------------------------------------------------------------------------------
# Verbs of a training loop (big_vision's `u.itstime` style): the loop itself stays in the recipe
# ----------------------------------------------------------------------------------------------


def due(step: int, every: int, last: int) -> bool:
    """Whether something done every `every` steps (log, eval, save) is due after step `step`: each multiple of
    `every`, and always the run's `last` step. `every` <= 0: only at the last step."""
    return step == last or (every > 0 and step % every == 0)


def stopping(stop_after: int | None, start_step: int, done: int) -> bool:
    """--stop-after N: whether this process has trained its N steps since it started (or resumed)."""
    return bool(stop_after) and done - start_step >= stop_after


def say(message: str, *, main: bool = True) -> None:
    """One line for the user on stderr (from the main process), written so that it does not break a tqdm bar."""
    if main:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)


def eval_line(step: int, results: dict[str, float]) -> str:
    """`step 400: val_top1 71.2 val_loss 1.18 ...`: an evaluation as one line for the console."""
    return f"step {step}: " + " ".join(f"{name} {value:.4g}" for name, value in results.items())

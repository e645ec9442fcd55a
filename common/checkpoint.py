"""Checkpoints of the full train state with Orbax: `last` for resuming, `best` by validation accuracy.

Orbax (`orbax.checkpoint.CheckpointManager`) writes each checkpoint into a temporary folder and renames it
when complete, saves in the background, works on every host of a pod and on `gs://` paths, so a kill at
any moment leaves the previous checkpoint intact. Layout inside a run's --output-dir:

    checkpoints/<step>/{state,meta}   the last checkpoint (older ones are deleted once a newer is complete)
    best/<step>/{state,meta}          the checkpoint with the best validation top-1 so far

`state` is any pytree (params, optimizer state, EMA, step, RNG keys); `meta` is a JSON dict (the run's
config, data position, best metric).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from common import UserError


class _ItemMetadataNotice(logging.Filter):
    """Reading the `state` item of a step on its own (shapes, `load_state_and_config`) makes Orbax look for the
    step's metadata file inside the item and warn, at every restore, that it is missing: it is one level up, where
    Orbax wrote it. Drop that warning, keep every other."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Metadata file does not exist")


logging.getLogger("absl").addFilter(_ItemMetadataNotice())


def _manager(directory: str | os.PathLike, *, create: bool, barrier_prefix: str) -> ocp.CheckpointManager:
    # Each manager names its cross-process barriers with its own prefix: orbax keys them by step folder name
    # ('async_write_complete.4'), which `last` and `best` share.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=1, create=create, enable_async_checkpointing=True,
        multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=barrier_prefix))
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


class Checkpointer:
    """Saves and restores a run's `last` and `best` checkpoints (see module docstring).

    One save in flight at a time. Each orbax manager finishes a save in a background thread that waits at
    barriers of all the processes; with `last` and `best` writing the same step at once, the processes of a
    multi-host run could meet at each other's barriers and wait forever (issue 16: `best/<step>` left as a
    `.orbax-checkpoint-tmp`). So `best` starts once `last` is written, and the next `last` once `best` is.
    """

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)
        self.last = _manager(self.output_dir / "checkpoints", create=True, barrier_prefix="last")
        self.best = _manager(self.output_dir / "best", create=True, barrier_prefix="best")

    def latest_step(self) -> int | None:
        return self.last.latest_step()

    def save(self, step: int, state: Any, meta: dict, *, best: bool = False) -> None:
        """Start writing `state` and `meta` as the last checkpoint (and as the best one if `best`: then this waits
        until the last checkpoint is written, and the best one is written in the background)."""
        self.best.wait_until_finished()
        self.last.save(step, args=_save_args(state, meta), force=True)
        if best:
            self.last.wait_until_finished()
            self.best.save(step, args=_save_args(state, meta), force=True)

    def restore(self, template: Any, which: str = "last") -> tuple[Any, dict]:
        """Restore the latest `which` checkpoint into the structure, shapes and shardings of `template`."""
        manager = self.last if which == "last" else self.best
        step = manager.latest_step()
        if step is None:
            raise UserError(f"no checkpoint in {manager.directory}")
        return restore_into(Path(manager.directory) / str(step), template)

    def wait(self) -> None:
        self.last.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.last.close()
        self.best.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.wait()
        self.close()


def _save_args(state: Any, meta: dict) -> ocp.args.Composite:
    return ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))


def has_checkpoint(output_dir: str | os.PathLike) -> bool:
    """Whether a run folder holds a complete `last` checkpoint (Orbax renames a step's folder to its number when the
    step is complete)."""
    folder = Path(output_dir) / "checkpoints"
    return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def find_step_dir(path: str | os.PathLike, which: str = "last") -> Path:
    """Resolve a run dir, its `checkpoints`/`best` dir, or a step dir to the step dir holding `state` and `meta`."""
    path = Path(path)
    if (path / "state").is_dir():
        return path
    for sub in (("checkpoints", "best") if which == "last" else ("best", "checkpoints")):
        if (path / sub).is_dir():
            path = path / sub
            break
    steps = sorted(int(p.name) for p in path.glob("*") if p.name.isdigit() and (p / "state").is_dir()) \
        if path.is_dir() else []
    if not steps:
        raise UserError(f"no checkpoint found at {path}")
    return path / str(steps[-1])


def read_meta(step_dir: str | os.PathLike) -> dict:
    step_dir = Path(step_dir)
    with ocp.CheckpointManager(step_dir.parent) as manager:
        return dict(manager.restore(int(step_dir.name), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])


def restore_into(step_dir: str | os.PathLike, template: Any) -> tuple[Any, dict]:
    """Restore a step dir into `template`; a checkpoint of another shape is a UserError, not a traceback."""
    step_dir = Path(step_dir)
    stored = _stored_shapes(step_dir)
    expected = {_key(path): tuple(np.shape(leaf)) for path, leaf in jax.tree_util.tree_leaves_with_path(template)}
    for key in sorted(set(stored) | set(expected)):
        if stored.get(key) != expected.get(key):
            raise UserError(f"checkpoint {step_dir} does not match this model: {key} is "
                            f"{stored.get(key, 'missing')} in the checkpoint and {expected.get(key, 'missing')} here")
    with ocp.CheckpointManager(step_dir.parent) as manager:
        restored = manager.restore(int(step_dir.name), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(template), meta=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["meta"])


def load_params_and_config(path: str | os.PathLike, which: str = "last", key: str = "params") -> tuple[dict, dict]:
    """Params (nested dict of numpy arrays) and the run config of a checkpoint, without knowing the model.

    key: the state entry to read, "params" or e.g. "ema_params" (the EMA weights of a run that keeps them).
    """
    state, config = load_state_and_config(path, which)
    if key not in state:
        raise UserError(f"checkpoint {path} has no {key!r} (it holds {', '.join(sorted(state))})")
    return state[key], config


def load_state_and_config(path: str | os.PathLike, which: str = "last") -> tuple[dict, dict]:
    """The whole saved state (nested dict of numpy arrays) and the run config of a checkpoint."""
    step_dir = find_step_dir(path, which)
    state = ocp.StandardCheckpointer().restore(step_dir.absolute() / "state")
    return jax.tree_util.tree_map(np.asarray, dict(state)), read_meta(step_dir).get("config", {})


def _key(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _stored_shapes(step_dir: Path) -> dict[str, tuple]:
    metadata = ocp.StandardCheckpointer().metadata(step_dir.absolute() / "state")
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    return {_key(path): tuple(getattr(leaf, "shape", ())) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}

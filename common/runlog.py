"""Run records: `config.json` and `log.jsonl` in --output-dir, optional wandb / TensorBoard mirrors."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any


class RunLog:
    """Append-only JSON-lines log of one run, written by the main process only.

    Each `write` adds one object (`{"step": ..., "time": ..., **metrics}`) to `log.jsonl`. A resumed run keeps
    appending to the same file after dropping the records of the steps past its checkpoint (it logs them again), so
    that the log of an interrupted and resumed run is that of an uninterrupted one. `config.json` holds the full
    resolved configuration.
    """

    def __init__(self, output_dir: str | os.PathLike, config: dict[str, Any] | None, *, start_step: int | None = None,
                 wandb_project: str | None = None, tensorboard: bool = False, main: bool | None = None):
        """config: written to config.json (None leaves it as it is: an evaluation of an existing run).
        start_step: the step the run starts from; records of later steps are dropped (None keeps them all).
        main: whether this process writes (the PyTorch recipes pass rank == 0); None asks JAX (process 0)."""
        self.main = _jax_main_process() if main is None else main
        self.output_dir = Path(output_dir)
        self.file = None
        self.wandb = None
        self.tensorboard = None
        if not self.main:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if config is not None:
            save_json(self.output_dir / "config.json", config, main=True)
        if start_step is not None:
            _drop_records_after(self.output_dir / "log.jsonl", start_step)
        self.file = open(self.output_dir / "log.jsonl", "a")
        if wandb_project:
            self.wandb = _optional_import("wandb")
            if self.wandb:
                self.wandb.init(project=wandb_project, config=config, dir=str(self.output_dir),
                                name=self.output_dir.name, resume="allow")
        if tensorboard:
            module = _optional_import("torch.utils.tensorboard")
            if module:
                self.tensorboard = module.SummaryWriter(str(self.output_dir / "tensorboard"))

    def write(self, step: int, **metrics: Any) -> None:
        if not self.main:
            return
        record = {"step": int(step), "time": round(time.time(), 3)}
        record.update({k: _plain(v) for k, v in metrics.items()})
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "time")}
        if self.wandb:
            self.wandb.log(numeric, step=step)
        if self.tensorboard:
            for key, value in numeric.items():
                self.tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.wandb:
            self.wandb.finish()
        if self.tensorboard:
            self.tensorboard.close()


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a `log.jsonl` (a run dir or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / "log.jsonl"
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _drop_records_after(path: Path, step: int) -> None:
    """Keep only the records of steps <= `step` in a log file (atomically; nothing to do when all are)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) == len([line for line in lines if line.strip()]):
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def save_json(path: str | os.PathLike, obj: dict, *, main: bool | None = None) -> None:
    """Write JSON atomically (temp file + rename), from the main process only (None: JAX process 0)."""
    if not (_jax_main_process() if main is None else main):
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


def _jax_main_process() -> bool:
    import jax

    return jax.process_index() == 0


def _plain(value: Any) -> Any:
    try:
        return value.item()
    except AttributeError:
        return value


def _optional_import(name: str):
    try:
        return __import__(name, fromlist=["_"])
    except ImportError:
        print(f"warning: {name} is not installed; not logging to it", file=sys.stderr)
        return None

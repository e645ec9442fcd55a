"""Run records: `config.json` and `log.jsonl` in --output-dir, optional wandb / TensorBoard mirrors, and their
curves in a PNG."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from common import UserError
from common.run import make_output_dir


class RunLog:
    """Append-only JSON-lines log of one run, written by the main process only.

    Each `write` adds one object (`{"step": ..., "time": ..., **metrics}`) to `log.jsonl`. A resumed run keeps
    appending to the same file after dropping the records of the steps past its checkpoint (it logs them again), so
    that the log of an interrupted and resumed run is that of an uninterrupted one. `config.json` holds the full
    resolved configuration.
    """

    def __init__(self, output_dir: str | os.PathLike, config: dict[str, Any] | None, *, start_step: int | None = None,
                 wandb_project: str | None = None, tensorboard: bool | str | os.PathLike = False,
                 main: bool | None = None):
        """config: written to config.json (None leaves it as it is: an evaluation of an existing run).
        tensorboard: True logs into output_dir/tensorboard, a path into that folder.
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
                folder = self.output_dir / "tensorboard" if tensorboard is True else Path(tensorboard)
                self.tensorboard = module.SummaryWriter(str(folder))

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


# ----------------------------------------------------------------------------------------------
# Curves of any recipe's log.jsonl (scripts/plot_runs.py, howtotrain_vit.py history)
# ----------------------------------------------------------------------------------------------

PANELS = {  # panel -> how a record's keys are picked for it
    "loss": lambda key: key == "loss" or key == "train_loss" or key.endswith("val_loss"),
    "top-1 (%)": lambda key: key.endswith("top1") and not key.startswith("max"),
    "learning rate": lambda key: key == "lr",
}


def curves(run_dir: str | os.PathLike) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{panel: {metric: [(step, value), ...]}} of a run's log, one point per step (the last record of a step)."""
    series: dict[str, dict[str, dict[int, float]]] = {panel: {} for panel in PANELS}
    for record in read_log(run_dir):
        for key, value in record.items():
            if key in ("step", "time") or not isinstance(value, (int, float)):
                continue
            for panel, belongs in PANELS.items():
                if belongs(key):
                    series[panel].setdefault(key, {})[record["step"]] = float(value)
    return {panel: {key: sorted(points.items()) for key, points in metrics.items()}
            for panel, metrics in series.items() if metrics}


def plot_runs(run_dirs: list[str | os.PathLike], output: str | os.PathLike) -> Path:
    """Loss, top-1 and learning-rate curves of one or more runs (of any recipe) in one PNG: a colour per run, a
    line style per metric, so that studies can be laid over each other."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {Path(run_dir): curves(run_dir) for run_dir in run_dirs}
    panels = [panel for panel in PANELS if any(panel in run for run in runs.values())]
    if not panels:
        raise UserError(f"no training or evaluation records in {', '.join(map(str, run_dirs))}")
    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for color, (run_dir, run) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * len(runs), runs.items()):
        for ax, panel in zip(axes[0], panels):
            for style, (metric, points) in zip(("-", "--", ":", "-."), run.get(panel, {}).items()):
                steps, values = zip(*points)
                label = f"{run_dir.name}: {metric}" if len(runs) > 1 else metric
                ax.plot(steps, values, style, color=color, marker="o" if len(points) < 30 else None, label=label)
    for ax, panel in zip(axes[0], panels):
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.suptitle(" | ".join(str(run_dir) for run_dir in runs))
    figure.tight_layout()
    output = Path(output)
    make_output_dir(output.parent)
    figure.savefig(output, dpi=100)
    plt.close(figure)
    return output

"""Loss, top-1 and learning-rate curves of one or more runs of any recipe, in one PNG (several runs overlaid).

    python scripts/plot_runs.py runs/deit3/digits_demo                      # -> runs/deit3/digits_demo/runs.png
    python scripts/plot_runs.py runs/localmim/a runs/localmim/b --output study.png   # two studies side by side

Each RUN_DIR is a recipe's --output-dir (its log.jsonl): a colour per run, a line style per metric (train loss,
val loss, val / EMA / per-exit top-1, lr).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `common`

from common import UserError  # noqa: E402
from common.run import ArgumentParser, exit_status  # noqa: E402
from common.runlog import plot_runs  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dirs", nargs="+", help="runs' --output-dir folders (each with a log.jsonl)")
    p.add_argument("--output", help="the PNG (default: RUN_DIR/runs.png for one run, runs.png here for several)")
    return p


def plot(argv: list[str] | None) -> None:
    args = build_parser().parse_args(argv)
    for run_dir in args.run_dirs:
        if not (Path(run_dir) / "log.jsonl").is_file():
            raise UserError(f"{run_dir} has no log.jsonl")
    default = Path(args.run_dirs[0]) / "runs.png" if len(args.run_dirs) == 1 else Path("runs.png")
    print(f"wrote {plot_runs(args.run_dirs, args.output or default)}")


def main(argv: list[str] | None = None) -> int:
    return exit_status(lambda: plot(argv))


if __name__ == "__main__":
    sys.exit(main())

"""scripts/input_bench.sh (which --loader feeds a machine faster) in its TINY mode: every item runs its recipe's
command line to the end and the table reads back each one's result. The speeds themselves are not asserted."""

import json
import os
import subprocess
import sys

from conftest import REPO

ITEMS = [f"input {recipe} {loader}" for loader in ("pil", "gpu") for recipe in ("mae-pretrain", "deit3", "deit",
                                                                                 "howtotrain")]
ITEMS += [f"train {recipe} {loader}" for loader in ("pil", "gpu") for recipe in ("deit3", "howtotrain")]
ITEMS += ["train howtotrain gpu 48px"] + [f"input {recipe} {loader}" for loader in ("pil", "gpu")
                                          for recipe in ("dvt", "localmim")]


def test_tiny_run_times_every_item_on_both_loaders(tmp_path):
    env = dict(os.environ, TINY="1", OUT=str(tmp_path), PYTHON=sys.executable, BUDGET_S="100000", ITEM_S="600")
    done = subprocess.run(["bash", str(REPO / "scripts" / "input_bench.sh")], env=env, capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [row["item"] for row in rows] == ITEMS
    failed = [row for row in rows if "result" not in row]
    assert not failed, (failed, done.stdout[-3000:])
    for row in rows:
        result = row["result"]
        assert result["batch_size"] == 8 and result["img_per_sec"] > 0, row
        if row["item"].startswith("input"):
            assert result["loader"] == row["item"].split()[-1], row
        else:  # fed by the loader on the generated JPEGs
            assert result["end_to_end_img_per_sec"] > 0, row
    table = done.stdout[done.stdout.index("\ndata "):]
    assert all(item in table for item in ITEMS) and "failed" not in table, table

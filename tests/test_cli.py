"""The one command-line contract (README, "One CLI"): every training command lists the canonical flags, and every
command a user is shown (each preset under scripts/, each command line of the README) parses with the script's own
parser.

Presets are run by bash itself with `python` (and the launcher) replaced by a shim that prints its arguments, so
whatever the shell does (variables, arithmetic, several commands in a demo) is what gets parsed."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from common import UserError

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = {"deit3_jax.py": "deit3_jax", "deit_jax.py": "deit_jax", "mae_jax.py": "mae_jax",
           "howtotrain_vit.py": "howtotrain_vit", "dvt.py": "dvt", "localmim_freezeout.py": "localmim_freezeout"}
# The training commands of each script (subcommand words before the flags).
TRAINING_COMMANDS = {"deit3_jax.py": [[]], "deit_jax.py": [[]],
                     "mae_jax.py": [["pretrain"], ["finetune"], ["linprobe"]],
                     "howtotrain_vit.py": [["train"]], "dvt.py": [["train"]],
                     "localmim_freezeout.py": [["pretrain"], ["finetune"], ["linprobe"]]}
CANONICAL = ("--data --output-dir --resume --stop-after --seed --workers --model --image-size --batch-size "
             "--grad-accum --epochs --warmup-epochs --training-steps --lr --lr-ref-batch --min-lr --weight-decay "
             "--drop-path "
             "--auto-augment --mixup --cutmix --label-smoothing --random-erasing --test-crop-ratio --precision "
             "--benchmark --benchmark-input --eval-only --wandb --tensorboard").split()
# Canonical flags a script does not have, each because its recipe has no such thing.
NOT_IN_RECIPE: dict[str, dict[str, str]] = {}


def script_module(script: str):
    return importlib.import_module(SCRIPTS[script])


def parse(script: str, argv: list[str], processes: int = 1) -> None:
    """`argv` through the script's own parser (its `parse_args`: argparse plus the checks made before any work), as
    one of the `processes` a launcher started (its WORLD_SIZE)."""
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("WORLD_SIZE", str(processes))
            script_module(script).parse_args(argv)
    except UserError as e:
        pytest.fail(f"{script} {shlex.join(argv)}\n  is refused by the script's parser: {e}")
    except SystemExit as e:
        pytest.fail(f"{script} {shlex.join(argv)}\n  makes argparse exit ({e.code}); see the message above")


def help_text(script: str, command: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        script_module(script).parse_args([*command, "--help"])
    return out.getvalue()


@pytest.mark.parametrize("script", sorted(TRAINING_COMMANDS))
def test_help_lists_the_canonical_flags(script):
    listed = set()
    for command in TRAINING_COMMANDS[script]:
        listed |= set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", help_text(script, command)))
    missing = [flag for flag in CANONICAL if flag not in listed and flag not in NOT_IN_RECIPE.get(script, {})]
    assert not missing, f"{script} --help lacks canonical flags {missing}"


# ----------------------------------------------------------------------------------------------
# Every preset and every README command parses
# ----------------------------------------------------------------------------------------------

# Presets live in scripts/<recipe>/; scripts/*.sh are tools (input_bench.sh: tests/test_input_bench.py) and
# scripts/tpu/ the TPU helpers.
PRESETS = sorted(p.relative_to(REPO) for p in (REPO / "scripts").glob("*/*.sh") if p.parent.name != "tpu")


@pytest.fixture(scope="module")
def shim(tmp_path_factory) -> dict[str, str]:
    """An environment where `python`/`torchrun` print their arguments as one JSON line instead of running."""
    folder = tmp_path_factory.mktemp("shim")
    echo = "import json, sys; print(json.dumps(sys.argv[1:]))"
    printer = f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -c '{echo}' \"$@\"\n"
    for name in ("python", "python3", "torchrun"):
        (folder / name).write_text(printer)
        (folder / name).chmod(0o755)
    return dict(os.environ, PATH=f"{folder}{os.pathsep}{os.environ['PATH']}", LAUNCH="torchrun --nproc_per_node=8")


def commands_of(argv: list[str]) -> tuple[str, list[str], int]:
    """(script, its arguments, processes) from a python/torchrun command line (launcher flags dropped)."""
    script_index = next(i for i, word in enumerate(argv) if word.endswith(".py"))
    launcher = " ".join(argv[:script_index])
    processes = re.search(r"--nproc[_-]per[_-]node[= ](\d+)", launcher)
    return Path(argv[script_index]).name, argv[script_index + 1:], int(processes[1]) if processes else 1


def preset_commands(preset: Path, env: dict[str, str], extra: list[str] = ()) -> list[tuple[str, list[str], int]]:
    result = subprocess.run(["bash", str(REPO / preset), *extra], env=env, capture_output=True, text=True,
                            timeout=60, cwd=REPO)
    assert result.returncode == 0, f"bash {preset} failed under the shim: {result.stderr}"
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("[")]
    commands = [commands_of(argv) for argv in lines if any(word.endswith(".py") for word in argv)]
    return [command for command in commands if command[0] in SCRIPTS]


@pytest.mark.parametrize("preset", PRESETS, ids=str)
def test_preset_parses(preset, shim):
    commands = preset_commands(preset, shim)
    assert commands, f"{preset} runs no recipe"
    for command in commands:
        parse(*command)


def readme_commands() -> list[str]:
    """The command lines of the README's code blocks that run a recipe or a preset (`...` elisions skipped)."""
    text = (REPO / "README.md").read_text()
    lines = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for command in line.split("  #")[0].split(";"):
                command = command.strip()
                if re.match(r"(python|torchrun|bash scripts/)", command) and "..." not in command:
                    lines.append(command)
    return lines


@pytest.mark.parametrize("line", readme_commands())
def test_readme_command_parses(line, shim):
    words = shlex.split(line)
    if words[0] == "bash":
        for command in preset_commands(Path(words[1]), shim, words[2:]):
            parse(*command)
        return
    if words[:3] == ["python", "-m", "pytest"] or not any(word.endswith(".py") for word in words):
        pytest.skip("not a recipe command")
    script, argv, processes = commands_of(words)
    if script not in SCRIPTS:
        pytest.skip(f"{script} is a tool, tested with its own tests")
    parse(script, argv, processes)


REQUIRED = {("localmim_freezeout.py", "finetune"): ["--pretrained", "random"],
            ("localmim_freezeout.py", "linprobe"): ["--pretrained", "random"]}


@pytest.mark.parametrize("script, command", [(s, c) for s, commands in TRAINING_COMMANDS.items() for c in commands],
                         ids=str)
def test_the_contracts_precision_names_parse_everywhere(script, command):
    """--precision bf16 and fp32 mean the same compute dtype in every training command (JAX spells them bfloat16 and
    float32 inside)."""
    extra = REQUIRED.get((script, command[0] if command else ""), [])
    for name in ("bf16", "fp32"):
        args = script_module(script).parse_args([*command, *extra, "--precision", name])
        assert args.precision in ({"bf16": "bfloat16", "fp32": "float32"}[name], name), args.precision


PAPER_PRESETS = [p for p in PRESETS if p.stem != "digits_demo"]


@pytest.mark.parametrize("preset", PAPER_PRESETS, ids=str)
def test_every_preset_header_names_its_source_and_expected_top1(preset):
    """Issue 15: a preset says where its values come from (a paper table, an official README or config, a study)
    and what top-1 to expect (or that none is published / verified)."""
    lines = (REPO / preset).read_text().splitlines()[1:]
    header = "\n".join(line for line in lines[:next(i for i, x in enumerate(lines) if not x.startswith("#"))])
    assert re.search(r"top-1", header, re.I), f"{preset}: the header states no expected top-1"
    assert re.search(r"Table|README|paper|config|study|Fig\.|not a paper row", header, re.I), \
        f"{preset}: the header names no source"

"""The fault contract that every recipe meets, written once (DEVELOPERS.md "Bad input", README "Runs, checkpoints,
errors"), and the table of recipes it is run over. `test_contract_jax.py` and `test_contract_torch.py` hold the tests,
one file per framework so that `pytest -n 2 --dist loadfile` runs the two halves on two workers.

The contract:
- SIGTERM saves a checkpoint within one step and exits 0; SIGKILL at any step loses at most the steps since the last
  checkpoint; `--resume` then ends bitwise equal to an uninterrupted run, with the same log records.
- Unreadable images (a truncated JPEG, a 0-byte file, a non-image) are skipped, counted in `log.jsonl` and named once.
- Bad input (flags, data, checkpoints, an output folder) prints exactly one line starting with `error:` and exits with
  status 2: no traceback, no file of an existing run changed, no run folder created when the arguments are bad.
- A diverged run never writes a checkpoint: the last good one stays byte-identical.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import importlib.util
import io
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import REPO, recipe_env
from PIL import Image

from common.runlog import curves, read_log

# ----------------------------------------------------------------------------------------------
# The recipes: one row per training command, with the few flags whose spelling differs between scripts
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str                       # test id
    script: str                     # file name of the recipe
    args: tuple[str, ...]           # command and a tiny model; --data and --output-dir are added by the tests
    framework: str                  # "jax" or "torch"
    lr_flag: str = "--learning-rate"
    accum_flag: str = "--grad-accum"   # "" where the command has no gradient accumulation
    wider: tuple[str, ...] = ("--dim", "48")   # the same recipe with another architecture
    global_batch: bool = True       # --batch-size is the global batch (split over processes and accumulation)
    eval_only: bool = False         # has --eval-only
    every_step: tuple[str, ...] = ("--save-interval", "1", "--eval-interval", "1")  # save (and eval) every step
    evaluates: bool = True          # the training run evaluates on val/
    timm_export: bool = True        # scripts/convert_to_timm.py exports its runs (a timm architecture)

    @property
    def module(self):
        return importlib.import_module(self.script.removesuffix(".py"))


JAX_MODEL = ("--image-size", "16", "--patch-size", "4", "--layers", "1", "--dim", "32", "--heads", "2",
             "--dtype", "float32", "--workers", "0", "--batch-size", "8", "--eval-batch-size", "8",
             "--log-interval", "3", "--training-steps", "8", "--warmup-steps", "2", "--save-interval", "2",
             "--eval-interval", "4")
TORCH_VIT = ("--workers", "0", "--batch-size", "8", "--eval-batch-size", "8", "--log-interval", "3")

JAX_RECIPES = [
    Recipe("deit3", "deit3_jax.py", ("--model", "t16", *JAX_MODEL), "jax", eval_only=True),
    Recipe("deit", "deit_jax.py", ("--model", "t16", *JAX_MODEL), "jax", eval_only=True),
    Recipe("mae-pretrain", "mae_jax.py", ("pretrain", *JAX_MODEL, "--decoder-layers", "1", "--decoder-dim", "16",
                                          "--decoder-heads", "2"), "jax"),
    Recipe("mae-finetune", "mae_jax.py", ("finetune", *JAX_MODEL), "jax", eval_only=True),
    Recipe("mae-linprobe", "mae_jax.py", ("linprobe", *JAX_MODEL), "jax", eval_only=True, accum_flag=""),
]
LOCALMIM = ("--model", "vit_tiny_patch16", "--input-size", "16", "--patch-size", "4", "--embed-dim", "32",
            "--num-heads", "2", "--crop-pct", "1", *TORCH_VIT[:4], "--log-interval", "3", "--epochs", "3",
            "--warmup-epochs", "1")  # 27 train files, batch 8: 3 steps an epoch, a checkpoint at the end of each
LOCALMIM_FLAGS = dict(lr_flag="--lr", wider=("--embed-dim", "48"), every_step=())

TORCH_RECIPES = [
    Recipe("howtotrain", "howtotrain_vit.py",
           ("train", "--model", "vit_tiny_patch16_224", "--img-size", "16", "--patch-size", "4", "--depth", "1",
            "--embed-dim", "32", "--num-heads", "2", *TORCH_VIT, "--training-steps", "8", "--warmup-steps", "2",
            "--eval-interval", "2"),
           "torch", lr_flag="--lr", wider=("--embed-dim", "48"), every_step=("--eval-interval", "1"), eval_only=True),
    Recipe("dvt", "dvt.py",
           ("train", "--model", "dvt_deit_s", "--img-size", "16", "--grids", "2,3,4", "--embed-dim", "32", "--depth",
            "1", "--num-heads", "2", "--token-dim", "16", *TORCH_VIT, "--training-steps", "8", "--warmup-epochs",
            "0", "--eval-interval", "2"),
           "torch", lr_flag="--lr", wider=("--embed-dim", "48"), every_step=("--eval-interval", "1"), eval_only=True,
           timm_export=False),
    Recipe("localmim-pretrain", "localmim_freezeout.py",
           ("pretrain", *LOCALMIM, "--depth", "4", "--decoder-dim", "16", "--decoder-heads", "2"), "torch",
           evaluates=False, **LOCALMIM_FLAGS),
    Recipe("localmim-finetune", "localmim_freezeout.py", ("finetune", *LOCALMIM, "--depth", "2", "--pretrained",
                                                          "random"), "torch", eval_only=True, **LOCALMIM_FLAGS),
    Recipe("localmim-linprobe", "localmim_freezeout.py", ("linprobe", *LOCALMIM, "--depth", "2", "--pretrained",
                                                          "random"), "torch", eval_only=True, **LOCALMIM_FLAGS),
    # The transfer stage on --init random (no upstream file: the run plumbing is what is tested here; the upstream
    # paths, a train run and timm files, are tests/test_howtotrain.py's). Last, so that TORCH_RECIPES[:3] stay.
    Recipe("howtotrain-finetune", "howtotrain_vit.py",
           ("finetune", "--init", "random", "--model", "vit_tiny_patch16_224", "--img-size", "16", "--patch-size",
            "4", "--depth", "1", "--embed-dim", "32", "--num-heads", "2", *TORCH_VIT, "--training-steps", "8",
            "--warmup-steps", "2", "--eval-interval", "2"),
           "torch", lr_flag="--lr", wider=("--embed-dim", "48"), every_step=("--eval-interval", "1"), eval_only=True),
]

# ----------------------------------------------------------------------------------------------
# Data: a tiny ImageNet-layout folder with the three kinds of unreadable file
# ----------------------------------------------------------------------------------------------

COLORS = [(220, 40, 40), (40, 200, 60), (50, 60, 230)]
BAD_TRAIN_FILES = ("truncated.jpg", "empty.jpg", "notes.jpg")
BAD_VAL_FILE = "broken.jpg"


def make_jpeg_folder(root: Path, train_per_class: int = 8, val_per_class: int = 4) -> Path:
    """3 colour classes of 36 px JPEGs, plus a truncated JPEG, a 0-byte file and a text file named .jpg in train/ and a
    broken file in val/."""
    for s, (split, count) in enumerate((("train", train_per_class), ("val", val_per_class))):
        for c, color in enumerate(COLORS):
            for i in range(count):
                rng = np.random.default_rng(1000 * s + 100 * c + i)
                pixels = np.clip(np.array(color) + rng.integers(-40, 40, (36, 36, 3)), 0, 255).astype(np.uint8)
                path = root / split / f"class_{c}" / f"img_{i}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(path, quality=90)
    good = (root / "train" / "class_1" / "img_0.jpg").read_bytes()
    (root / "train" / "class_0" / BAD_TRAIN_FILES[0]).write_bytes(good[: len(good) // 2])
    (root / "train" / "class_1" / BAD_TRAIN_FILES[1]).write_bytes(b"")
    (root / "train" / "class_2" / BAD_TRAIN_FILES[2]).write_text("these are notes, not an image\n" * 10)
    (root / "val" / "class_0" / BAD_VAL_FILE).write_bytes(b"\xff\xd8\xff garbage")
    return root


# ----------------------------------------------------------------------------------------------
# Running a recipe: in this process (fast), or as a subprocess that SIGKILLs itself after logging a given step
# ----------------------------------------------------------------------------------------------


def call(recipe: Recipe, *args, capture: io.StringIO | None = None) -> int:
    """recipe.main([...]) in this process; stderr goes to `capture` when given."""
    argv = [*recipe.args, *map(str, args)]
    with contextlib.redirect_stderr(capture) if capture is not None else contextlib.nullcontext():
        return recipe.module.main(argv)


def signal_at_step(step: int, signum: int, sent: list[int]):
    """Patch the loaders' train_batches (common.data's and common.gpu_input's) so that `signum` reaches this process
    when the batch of step index `step` (0-based: `step` steps are done) is asked for: during any step of the run, not
    only at a log record. Returns the unpatched common.data.train_batches."""
    from common import data, gpu_input

    def then_signal(batches):
        def batches_then_signal(*args, start_step: int = 0, **kwargs):
            for index, batch in enumerate(batches(*args, start_step=start_step, **kwargs), start_step):
                if index >= step and not sent:
                    sent.append(index)
                    os.kill(os.getpid(), signum)
                yield batch

        return batches_then_signal

    unpatched = data.train_batches
    data.train_batches = then_signal(unpatched)
    gpu_input.train_batches = then_signal(gpu_input.train_batches)
    return unpatched


@contextlib.contextmanager
def signal_during_step(step: int, signum: int = signal.SIGTERM):
    """Send `signum` to this process (as a scheduler would) while it trains step `step` + 1; yields [step] once sent."""
    from common import data, gpu_input

    sent: list[int] = []
    on_device = gpu_input.train_batches
    batches = signal_at_step(step, signum, sent)
    try:
        yield sent
    finally:
        data.train_batches, gpu_input.train_batches = batches, on_device


KILLED_RUN = """
import runpy, signal, sys
sys.path[:0] = [{repo!r}, {tests!r}]
if {threads}:  # the test's thread count: a float sum over other threads can round differently
    import torch
    torch.set_num_threads({threads})
from contract import signal_at_step
signal_at_step({step}, signal.SIGKILL, [])
sys.argv = {argv!r}
runpy.run_path({script!r}, run_name="__main__")
"""


def run_killed_at(recipe: Recipe, step: int, *args) -> subprocess.CompletedProcess:
    """Run the recipe in a subprocess that is SIGKILLed during step `step` + 1 (no chance to clean up)."""
    script = str(REPO / recipe.script)
    threads = sys.modules["torch"].get_num_threads() if recipe.framework == "torch" else 0
    code = KILLED_RUN.format(repo=str(REPO), step=step, argv=[script, *recipe.args, *map(str, args)], script=script,
                             threads=threads, tests=str(Path(__file__).parent))
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=recipe_env())


# ----------------------------------------------------------------------------------------------
# What a run left behind
# ----------------------------------------------------------------------------------------------


def file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (by relative path): 'no file changed' is equality of two of these."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def checkpoint_digests(run_dir: Path) -> dict[str, str]:
    return {k: v for k, v in file_digests(run_dir).items() if k.startswith(("checkpoints", "best"))}


def final_state(recipe: Recipe, run_dir: Path):
    """The last checkpoint's trained state (params, optimizer state, step...), without the run's config."""
    if recipe.framework == "jax":
        from common import checkpoint

        return checkpoint.load_state_and_config(run_dir)[0]
    from common import torch_run as tr

    state = tr.load_checkpoint(tr.find_checkpoint(run_dir))
    return {k: v for k, v in state.items() if k != "config"}


def checkpoint_step(recipe: Recipe, run_dir: Path) -> int:
    return int(final_state(recipe, run_dir)["step"])


def assert_same_state(a, b, path: str = "") -> None:
    """Bitwise equality of two nested states (dicts, lists, numpy arrays, torch tensors, numbers)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a, key=str) == sorted(b, key=str), f"{path}: keys differ"
        for key in a:
            assert_same_state(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}/{i}")
    elif hasattr(a, "detach"):  # torch tensor
        assert a.dtype == b.dtype and a.shape == b.shape and bool((a == b).all()), f"{path} differs"
    elif isinstance(a, np.ndarray) or np.isscalar(a):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{path} differs")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def state_is_finite(state) -> bool:
    if isinstance(state, dict):
        return all(state_is_finite(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return all(state_is_finite(v) for v in state)
    if hasattr(state, "detach"):
        return not state.is_floating_point() or bool(state.isfinite().all())
    if isinstance(state, float):
        return math.isfinite(state)
    array = np.asarray(state)
    return not np.issubdtype(array.dtype, np.floating) or bool(np.isfinite(array).all())


VOLATILE = ("time", "img_per_sec", "step_ms", "seconds")


def log_records(run_dir: Path) -> list[dict]:
    """log.jsonl without the wall-clock fields."""
    return [{k: v for k, v in r.items() if not any(word in k for word in VOLATILE)} for r in read_log(run_dir)]


def assert_same_log(resumed: list[dict], uninterrupted: list[dict]) -> None:
    for a, b in zip(resumed, uninterrupted):
        assert a == b, f"the resumed run logged\n{a}\nwhere the uninterrupted run logged\n{b}"
    assert len(resumed) == len(uninterrupted), f"{len(resumed)} records, uninterrupted {len(uninterrupted)}"


def assert_one_error_line(code: int, err: str, *words: str) -> str:
    """Exit status 2 and exactly one line starting with `error:`, the last one, naming `words`; no traceback."""
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert code == 2, f"exit {code}, expected 2:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    assert len(errors) == 1 and lines[-1] == errors[0], f"expected one `error:` line, last:\n{err[-3000:]}"
    for word in words:
        assert word in errors[0], f"{word!r} not in {errors[0]!r}"
    return errors[0]


# ----------------------------------------------------------------------------------------------
# The tests, written once: test_contract_jax.py and test_contract_torch.py subclass this with their recipes
# ----------------------------------------------------------------------------------------------

import random  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402

DIVERGING_LR = "1e30"
_STOPPED: dict[str, Path] = {}  # recipe name -> a run stopped by SIGTERM mid-way (made once, copied by the tests)


def steps_of(recipe: Recipe) -> tuple[int, int]:
    """(SIGTERM step, SIGKILL step) of a recipe, drawn once per recipe (any step must do): the signals arrive while
    the run trains the step after, between log records (every 3 steps) and checkpoints."""
    rng = random.Random(recipe.name)
    sigterm = rng.randint(1, 4)
    return sigterm, rng.randint(sigterm + 2, 7)


def stopped_run(recipe: Recipe, data_root: Path, root: Path) -> Path:
    """A run of `recipe` stopped by SIGTERM during step `steps_of(recipe)[0]` + 1 (cached for the module): it saves
    that step and exits 0."""
    if recipe.name not in _STOPPED:
        out = root / f"stopped-{recipe.name}"
        err, step = io.StringIO(), steps_of(recipe)[0]
        with signal_during_step(step) as sent:
            code = call(recipe, "--data", data_root, "--output-dir", out, capture=err)
        assert code == 0 and sent, f"SIGTERM during step {step + 1}: exit {code}\n{err.getvalue()[-3000:]}"
        saved = checkpoint_step(recipe, out)
        assert saved == step + 1, f"SIGTERM during step {step + 1} saved step {saved}"
        _STOPPED[recipe.name] = out
    return _STOPPED[recipe.name]


def plot_runs_script():
    """scripts/plot_runs.py as a module."""
    spec = importlib.util.spec_from_file_location("plot_runs", REPO / "scripts" / "plot_runs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def script_module(name: str):
    """A script under scripts/ as a module."""
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), REPO / "scripts" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / run_dir.name))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_jpeg_folder(tmp_path_factory.mktemp("jpegs"))


@pytest.fixture(scope="class")
def reference(recipe, data_root, tmp_path_factory):
    """The uninterrupted run of the class's recipe, and what it printed on stderr."""
    out, err = tmp_path_factory.mktemp(recipe.name) / "reference", io.StringIO()
    code = call(recipe, "--data", data_root, "--output-dir", out, capture=err)
    assert code == 0, err.getvalue()[-3000:]
    return out, err.getvalue()


@pytest.fixture(scope="class")
def stopped(recipe, data_root, tmp_path_factory):
    return stopped_run(recipe, data_root, tmp_path_factory.getbasetemp())


class ContractTests:
    """Needs fixtures `recipe` (a Recipe), `recipes` (all of this framework), `data_root` (make_jpeg_folder), and
    `reference` and `stopped` from this module."""

    # ------------------------------------------------------------------------------------ interruptions

    def test_sigterm_then_sigkill_then_resume_equals_the_uninterrupted_run(self, recipe, reference, stopped, data_root,
                                                                          tmp_path):
        run_dir = copy_run(stopped, tmp_path)
        kill_step = steps_of(recipe)[1]
        killed = run_killed_at(recipe, kill_step, "--data", data_root, "--output-dir", run_dir, "--resume")
        assert killed.returncode == -signal.SIGKILL, f"not killed at step {kill_step}:\n{killed.stderr[-3000:]}"
        assert "Metadata file does not exist" not in killed.stderr, "a restore warned of what is as it should be"
        assert max(r["step"] for r in read_log(run_dir)) <= kill_step, "logged past the kill"
        err = io.StringIO()
        assert call(recipe, "--data", data_root, "--output-dir", run_dir, "--resume", capture=err) == 0, \
            err.getvalue()[-3000:]
        assert_same_state(final_state(recipe, reference[0]), final_state(recipe, run_dir))
        assert_same_log(log_records(run_dir), log_records(reference[0]))

    def test_unreadable_images_are_skipped_counted_and_named_once(self, recipe, reference):
        """Which bad train files a short run meets depends on its sampler (repeated augmentation visits fewer
        files); every one it meets is counted and named once, and the broken val file (two evaluations) once."""
        run_dir, err = reference
        assert sum(r.get("skipped_images", 0) for r in read_log(run_dir)) >= 1
        named = {name: sum(name in line for line in err.splitlines()) for name in BAD_TRAIN_FILES}
        assert sum(named.values()) >= 1 and max(named.values()) == 1, f"{named}\n{err[-3000:]}"
        assert sum(BAD_VAL_FILE in line for line in err.splitlines()) == (1 if recipe.evaluates else 0), err[-3000:]

    def test_plot_runs_draws_the_logs_curves(self, recipe, reference, stopped, tmp_path):
        """scripts/plot_runs.py on this recipe's runs: the curves are the log's values, two runs overlay in one PNG."""
        run_dir = reference[0]
        drawn = curves(run_dir)
        for panel, key in (("loss", "loss"), ("learning rate", "lr")):  # one point a step: the step's last record
            assert drawn[panel][key] == sorted({r["step"]: r[key] for r in read_log(run_dir) if key in r}.items())
        assert ("val_loss" in drawn["loss"]) == recipe.evaluates
        output = tmp_path / "two.png"
        assert plot_runs_script().main([str(run_dir), str(stopped), "--output", str(output)]) == 0
        with Image.open(output) as image:
            assert image.size[0] >= 1000 and len(image.convert("RGB").getcolors(1 << 16) or ()) > 20

    def test_convert_to_timm_exports_the_run(self, recipe, reference, tmp_path, capsys):
        """scripts/convert_to_timm.py RUN_DIR finds the recipe's rule through config.json, writes weights that load
        strict into the timm model it names (the writer checks every key and shape), and leaves the run alone; a
        recipe whose models timm does not have says so."""
        run_dir = reference[0]
        before, out = file_digests(run_dir), tmp_path / "timm.pth"
        code = script_module("convert_to_timm.py").main([str(run_dir), "--out", str(out)])
        captured = capsys.readouterr()
        assert file_digests(run_dir) == before
        if not recipe.timm_export:
            assert_one_error_line(code, captured.err, "no timm export")
            return
        assert code == 0, captured.err[-3000:]
        assert out.is_file() and out.with_suffix(".safetensors").is_file() and "timm model: " in captured.out

    # ------------------------------------------------------------------------------------ bad arguments

    def assert_refused(self, recipe, capfd, *args, words=(), output_dir: Path) -> str:
        """Refused with one error line, and no run folder created."""
        existed = output_dir.exists()
        code = call(recipe, *args, "--output-dir", output_dir)
        line = assert_one_error_line(code, capfd.readouterr().err, *words)
        assert existed or not output_dir.exists(), f"{output_dir} was created for a refused run"
        return line

    def test_unknown_model(self, recipe, data_root, tmp_path, capfd):
        self.assert_refused(recipe, capfd, "--data", data_root, "--model", "x99", words=["x99"],
                            output_dir=tmp_path / "run")

    def test_missing_data_folder(self, recipe, tmp_path, capfd):
        self.assert_refused(recipe, capfd, "--data", tmp_path / "nowhere", words=["nowhere"],
                            output_dir=tmp_path / "run")

    def test_empty_class_folder(self, recipe, data_root, tmp_path, capfd):
        data = Path(shutil.copytree(data_root, tmp_path / "data"))
        (data / "train" / "empty_class").mkdir()
        self.assert_refused(recipe, capfd, "--data", data, words=["empty_class"], output_dir=tmp_path / "run")

    @pytest.mark.parametrize("batch", ["0", "-8"])
    def test_non_positive_batch(self, recipe, data_root, tmp_path, capfd, batch):
        self.assert_refused(recipe, capfd, "--data", data_root, "--batch-size", batch, words=["--batch-size"],
                            output_dir=tmp_path / "run")

    def test_batch_that_does_not_split_over_accumulation(self, recipe, data_root, tmp_path, capfd):
        if not recipe.global_batch or not recipe.accum_flag:
            pytest.skip("--batch-size is per process and per accumulation step, or no accumulation: any batch splits")
        self.assert_refused(recipe, capfd, "--data", data_root, recipe.accum_flag, "3", words=["--batch-size"],
                            output_dir=tmp_path / "run")

    @pytest.mark.parametrize("where", ["under a file", "in /proc"])
    def test_unwritable_output_folder(self, recipe, data_root, tmp_path, capfd, where):
        (tmp_path / "file").write_text("not a folder")
        out = tmp_path / "file" / "run" if where == "under a file" else Path("/proc/vit-recipes-contract/run")
        self.assert_refused(recipe, capfd, "--data", data_root, words=[str(out)], output_dir=out)

    def test_resume_with_nothing_to_resume(self, recipe, data_root, tmp_path, capfd):
        self.assert_refused(recipe, capfd, "--data", data_root, "--resume", words=["--resume"],
                            output_dir=tmp_path / "new")
        (tmp_path / "empty").mkdir()
        self.assert_refused(recipe, capfd, "--data", data_root, "--resume", words=["--resume"],
                            output_dir=tmp_path / "empty")
        assert not any((tmp_path / "empty").iterdir())

    # ------------------------------------------------------------------------------------ existing runs

    def assert_refused_unchanged(self, recipe, capfd, run_dir: Path, *args, words=()) -> str:
        before = file_digests(run_dir)
        line = self.assert_refused(recipe, capfd, *args, words=words, output_dir=run_dir)
        assert file_digests(run_dir) == before, f"a refused run changed files in {run_dir}"
        return line

    def test_existing_run_needs_resume(self, recipe, reference, data_root, tmp_path, capfd):
        self.assert_refused_unchanged(recipe, capfd, copy_run(reference[0], tmp_path), "--data", data_root,
                                      words=["--resume"])

    def test_checkpoint_of_another_architecture(self, recipe, stopped, data_root, tmp_path, capfd):
        self.assert_refused_unchanged(recipe, capfd, copy_run(stopped, tmp_path), "--data", data_root, "--resume",
                                      *recipe.wider, words=[recipe.wider[0]])

    def test_resume_that_changes_an_optimizer_flag(self, recipe, stopped, data_root, tmp_path, capfd):
        self.assert_refused_unchanged(recipe, capfd, copy_run(stopped, tmp_path), "--data", data_root, "--resume",
                                      "--weight-decay", "0.125", words=["--weight-decay 0.125"])

    def test_checkpoint_of_another_recipe(self, recipe, recipes, data_root, tmp_path_factory, tmp_path, capfd):
        other = recipes[(recipes.index(recipe) + 1) % len(recipes)]
        foreign = stopped_run(other, data_root, tmp_path_factory.getbasetemp())
        self.assert_refused_unchanged(recipe, capfd, copy_run(foreign, tmp_path), "--data", data_root, "--resume")

    def test_diverging_lr_from_scratch_saves_nothing_diverged(self, recipe, data_root, tmp_path, capfd):
        out = tmp_path / "run"
        code = call(recipe, "--data", data_root, "--output-dir", out, recipe.lr_flag, DIVERGING_LR, *recipe.every_step)
        assert_one_error_line(code, capfd.readouterr().err)
        for folder in (p for p in (out / "checkpoints", out / "best") if p.is_dir() and any(p.iterdir())):
            assert state_is_finite(final_state(recipe, folder.parent)), f"non-finite checkpoint in {folder}"

    def test_diverging_lr_on_resume_keeps_the_last_checkpoint(self, recipe, stopped, data_root, tmp_path, capfd):
        run_dir = copy_run(stopped, tmp_path)
        before = checkpoint_digests(run_dir)
        code = call(recipe, "--data", data_root, "--output-dir", run_dir, "--resume", recipe.lr_flag, DIVERGING_LR,
                    *recipe.every_step)
        assert_one_error_line(code, capfd.readouterr().err)
        assert checkpoint_digests(run_dir) == before

    def test_eval_only_changes_no_run_file(self, recipe, reference, data_root, tmp_path, capfd):
        if not recipe.eval_only:
            pytest.skip("no --eval-only")
        run_dir = copy_run(reference[0], tmp_path)
        before = file_digests(run_dir)
        assert call(recipe, "--data", data_root, "--output-dir", run_dir, "--eval-only") == 0, capfd.readouterr().err
        after = file_digests(run_dir)
        assert {k: v for k, v in after.items() if k != "log.jsonl"} == {k: v for k, v in before.items()
                                                                        if k != "log.jsonl"}
        evaluations = [r for r in log_records(run_dir) if "val_top1" in r]
        trained, evaluated = evaluations[-2:]  # the run's last evaluation, then --eval-only's of the last checkpoint
        assert evaluated["step"] == trained["step"], (trained, evaluated)
        for key in ("val_top1", "val_loss"):
            assert evaluated[key] == pytest.approx(trained[key], rel=1e-5, abs=1e-6), (key, trained, evaluated)

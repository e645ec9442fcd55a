"""--loader gpu in every recipe (issue 14): the host reads bytes and the device decodes and augments (on CPU tensors
here, the fallback; the JAX recipes take the batches by DLPack). A run trains on it, skips the unreadable files, and
resumes bitwise; --benchmark-input times it."""

import json
import signal

import pytest
from conftest import run_script
from contract import (
    JAX_RECIPES,
    TORCH_RECIPES,
    assert_one_error_line,
    assert_same_log,
    assert_same_state,
    call,
    final_state,
    log_records,
    make_jpeg_folder,
    run_killed_at,
)


@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory):
    return make_jpeg_folder(tmp_path_factory.mktemp("loader_data"))


LOADER_RECIPES = TORCH_RECIPES + JAX_RECIPES[:3]  # the PyTorch commands, deit3, deit, MAE pretraining


@pytest.mark.parametrize("recipe", LOADER_RECIPES, ids=lambda r: r.name)
def test_loader_gpu_trains_skips_unreadable_files_and_resumes_bitwise_after_sigkill(recipe, jpeg_root, tmp_path,
                                                                                    capsys):
    """The same run on --loader pil and --loader gpu: the same samples (and so the same unreadable files named),
    other pixels (other resize kernels, augmentation on the device). A gpu run SIGKILLed mid-way and resumed ends
    bitwise where the uninterrupted one does, every log record (losses included) the same."""
    on_host, uninterrupted, resumed = tmp_path / "pil", tmp_path / "uninterrupted", tmp_path / "resumed"
    assert call(recipe, "--data", jpeg_root, "--output-dir", on_host, "--loader", "pil") == 0
    named_on_host = unreadable_named(capsys.readouterr().err)
    assert call(recipe, "--data", jpeg_root, "--output-dir", uninterrupted, "--loader", "gpu", *recipe.every_step) == 0
    assert unreadable_named(capsys.readouterr().err) == named_on_host
    killed = run_killed_at(recipe, 5, "--data", jpeg_root, "--output-dir", resumed, "--loader", "gpu",
                           *recipe.every_step)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert call(recipe, "--data", jpeg_root, "--output-dir", resumed, "--loader", "gpu", *recipe.every_step,
                "--resume") == 0
    records, host_records = log_records(uninterrupted), log_records(on_host)
    # Counted in both (not always equally: a JPEG that only fails to decode gives its slot to the next image of the
    # batch on the device, to the next dataset index, which may be unreadable too, on the host).
    assert skipped(records) > 0 and skipped(host_records) > 0, "unreadable files are counted"
    assert_same_state(final_state(recipe, resumed), final_state(recipe, uninterrupted))
    assert_same_log(log_records(resumed), records)
    losses = [[r["loss"] for r in run if "loss" in r] for run in (records, host_records)]
    assert losses[0] != losses[1], "--loader gpu trained on the PIL loader's batches"


def unreadable_named(err: str) -> set[str]:
    return {line.split()[4].rsplit("/", 1)[-1] for line in err.splitlines() if line.startswith("warning: skipping")}


def skipped(records: list[dict]) -> int:
    return sum(r.get("skipped_images", 0) for r in records)


@pytest.fixture(scope="module")
def larger_jpeg_root(tmp_path_factory):
    return make_jpeg_folder(tmp_path_factory.mktemp("loader_data_72"), train_per_class=24)


@pytest.mark.parametrize("loader", ["pil", "gpu"])
@pytest.mark.parametrize("recipe", TORCH_RECIPES + JAX_RECIPES, ids=lambda r: r.name)
def test_benchmark_input_times_either_loader(recipe, loader, larger_jpeg_root, tmp_path, capsys):
    """--benchmark-input --loader {pil,gpu} --workers 1 --batch-size 64: one JSON line naming the loader, img_per_sec
    last, nothing written."""
    out = tmp_path / "run"
    code = call(recipe, "--data", larger_jpeg_root, "--output-dir", out, "--benchmark-input", "--loader", loader,
                "--workers", "1", "--batch-size", "64", "--benchmark-steps", "2")
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["loader"] == loader and list(result)[-1] == "img_per_sec" and result["img_per_sec"] > 0, result
    assert not out.exists()


@pytest.mark.parametrize("name, flags, words", [
    ("dvt", ("--random-crop", "pad", "--auto-augment", "none"), ("--loader gpu", "pil")),
    ("howtotrain-finetune", ("--random-crop", "resmall"), ("--loader gpu", "pil")),
    ("mae-finetune", ("--auto-augment", "original"), ("pil",)),
])
def test_loader_gpu_refuses_an_augmentation_only_the_host_runs(name, flags, words, jpeg_root, tmp_path, capfd):
    """Asked for --loader gpu with an augmentation it does not have: one error: line, exit 2, no run folder; with
    --loader auto the host loader takes it (on CPU it would anyway)."""
    (recipe,) = [r for r in TORCH_RECIPES + JAX_RECIPES if r.name == name]
    out = tmp_path / "run"
    code = call(recipe, "--data", jpeg_root, "--output-dir", out, "--loader", "gpu", *flags)
    assert_one_error_line(code, capfd.readouterr().err, *words)
    assert not out.exists()


def test_loader_gpu_batches_are_cut_over_the_devices_of_the_mesh(jpeg_root, tmp_path):
    """JAX on 2 devices: each device takes its rows of the DLPack batch (loop.to_mesh), and the run logs the losses
    of the run on one device (the same global batch, the same update)."""
    (recipe,) = [r for r in JAX_RECIPES if r.name == "deit3"]
    one, two = tmp_path / "one_device", tmp_path / "two_devices"
    assert call(recipe, "--data", jpeg_root, "--output-dir", one, "--loader", "gpu") == 0
    result = run_script(recipe.script, *recipe.args, "--data", jpeg_root, "--output-dir", two, "--loader", "gpu",
                        devices=2)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [[r["loss"] for r in log_records(run) if "loss" in r] for run in (one, two)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5), losses
    assert json.loads((two / "config.json").read_text())["devices"] == 2

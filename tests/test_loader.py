"""--loader gpu in every recipe (issue 14): the host reads bytes and the device decodes and augments (on CPU tensors
here, the fallback; the JAX recipes take the batches by DLPack). A run trains on it, skips the unreadable files, and
resumes bitwise; --benchmark-input times it."""

import json

import pytest
from contract import (
    JAX_RECIPES,
    TORCH_RECIPES,
    assert_same_log,
    assert_same_state,
    call,
    final_state,
    log_records,
    make_jpeg_folder,
)


@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory):
    return make_jpeg_folder(tmp_path_factory.mktemp("loader_data"))


@pytest.mark.parametrize("recipe", TORCH_RECIPES + JAX_RECIPES[:1] + JAX_RECIPES[2:3], ids=lambda r: r.name)
def test_loader_gpu_trains_skips_unreadable_files_and_resumes_bitwise(recipe, jpeg_root, tmp_path, capsys):
    """The same run on --loader pil and --loader gpu: the same samples (and so the same unreadable files named),
    other pixels (other resize kernels, augmentation on the device); the gpu run stopped and resumed ends
    bitwise where the uninterrupted one does."""
    on_host, uninterrupted, resumed = tmp_path / "pil", tmp_path / "uninterrupted", tmp_path / "resumed"
    assert call(recipe, "--data", jpeg_root, "--output-dir", on_host, "--loader", "pil") == 0
    named_on_host = unreadable_named(capsys.readouterr().err)
    assert call(recipe, "--data", jpeg_root, "--output-dir", uninterrupted, "--loader", "gpu") == 0
    assert unreadable_named(capsys.readouterr().err) == named_on_host
    assert call(recipe, "--data", jpeg_root, "--output-dir", resumed, "--loader", "gpu", "--stop-after", "4") == 0
    assert call(recipe, "--data", jpeg_root, "--output-dir", resumed, "--loader", "gpu", "--resume") == 0
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


@pytest.mark.parametrize("recipe", TORCH_RECIPES[:3] + JAX_RECIPES[:1], ids=lambda r: r.name)
def test_benchmark_input_times_the_gpu_loader(recipe, jpeg_root, tmp_path, capsys):
    code = call(recipe, "--data", jpeg_root, "--output-dir", tmp_path / "run", "--benchmark-input", "--loader", "gpu",
                "--benchmark-steps", "2")
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["loader"] == "gpu" and list(result)[-1] == "img_per_sec" and result["img_per_sec"] > 0, result

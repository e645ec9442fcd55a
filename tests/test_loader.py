"""--loader gpu in the PyTorch recipes (issue 14): the host reads bytes and the device decodes and augments (on CPU
tensors here, the fallback). A run trains on it, skips the unreadable files, and resumes bitwise; --benchmark-input
times it."""

import json

import pytest
from contract import TORCH_RECIPES, assert_same_log, assert_same_state, call, final_state, log_records, make_jpeg_folder


@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory):
    return make_jpeg_folder(tmp_path_factory.mktemp("loader_data"))


@pytest.mark.parametrize("recipe", TORCH_RECIPES, ids=lambda r: r.name)
def test_loader_gpu_trains_skips_unreadable_files_and_resumes_bitwise(recipe, jpeg_root, tmp_path, capsys):
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    assert call(recipe, "--data", jpeg_root, "--output-dir", uninterrupted, "--loader", "gpu") == 0
    assert call(recipe, "--data", jpeg_root, "--output-dir", resumed, "--loader", "gpu", "--stop-after", "4") == 0
    assert call(recipe, "--data", jpeg_root, "--output-dir", resumed, "--loader", "gpu", "--resume") == 0
    err = capsys.readouterr().err
    assert "truncated.jpg" in err and "empty.jpg" in err, "the unreadable files are named"
    records = log_records(uninterrupted)
    assert sum(r.get("skipped_images", 0) for r in records) > 0, "unreadable files are counted"
    assert_same_state(final_state(recipe, resumed), final_state(recipe, uninterrupted))
    assert_same_log(log_records(resumed), records)
    on_host = tmp_path / "pil"
    assert call(recipe, "--data", jpeg_root, "--output-dir", on_host, "--loader", "pil") == 0
    losses = [[r["loss"] for r in log_records(run) if "loss" in r] for run in (uninterrupted, on_host)]
    assert losses[0] != losses[1], "--loader gpu trained on the PIL loader's batches"


@pytest.mark.parametrize("recipe", TORCH_RECIPES[:3], ids=lambda r: r.name)
def test_benchmark_input_times_the_gpu_loader(recipe, jpeg_root, tmp_path, capsys):
    code = call(recipe, "--data", jpeg_root, "--output-dir", tmp_path / "run", "--benchmark-input", "--loader", "gpu",
                "--benchmark-steps", "2")
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["loader"] == "gpu" and list(result)[-1] == "img_per_sec" and result["img_per_sec"] > 0, result

"""--benchmark-input (issue 14): every training command times its input pipeline alone on real data, prints one JSON
line with img_per_sec last, writes nothing, and refuses --data synthetic (which has no input pipeline)."""

import json

import numpy as np
import pytest
from contract import JAX_RECIPES, TORCH_RECIPES, assert_one_error_line, call, make_jpeg_folder

from common import data

RECIPES = JAX_RECIPES + TORCH_RECIPES


@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory):
    return make_jpeg_folder(tmp_path_factory.mktemp("benchmark_input_data"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.name)
def test_benchmark_input_prints_img_per_sec_last_and_writes_nothing(recipe, jpeg_root, tmp_path, capsys):
    out = tmp_path / "run"
    code = call(recipe, "--data", jpeg_root, "--output-dir", out, "--benchmark-input", "--workers", "1",
                "--batch-size", "8", "--benchmark-steps", "2")
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert list(result)[-1] == "img_per_sec", f"img_per_sec is not the last key of {result}"
    assert result["img_per_sec"] > 0 and result["loader"] == "pil" and result["workers"] == 1, result
    assert not out.exists(), f"--benchmark-input created {out}"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.name)
def test_benchmark_input_refuses_synthetic_data(recipe, tmp_path, capfd):
    out = tmp_path / "run"
    code = call(recipe, "--data", "synthetic", "--output-dir", out, "--benchmark-input")
    assert_one_error_line(code, capfd.readouterr().err, "synthetic")
    assert not out.exists(), f"a refused --benchmark-input created {out}"


def test_benchmark_input_counts_the_global_batch_and_prints_on_the_main_process_only(capsys):
    transform = np.asarray  # digits are 32x32 RGB already
    main = data.benchmark_input("digits", transform, global_batch=16, workers=0, steps=2, warmup=1, repeats=3)
    assert capsys.readouterr().out.strip() == json.dumps(main)
    assert (main["batch_size"], main["repeats"], main["steps"], main["skipped"]) == (16, 3, 2, 0)
    other = data.benchmark_input("digits", transform, global_batch=16, workers=0, steps=2, warmup=0,
                                 process_index=1, process_count=2)
    assert capsys.readouterr().out == "", "a process other than 0 printed its result"
    assert other["img_per_sec"] > 0


@pytest.mark.parametrize("name, extra", [("deit3", ()), ("howtotrain", ()), ("dvt", ()),
                                         ("localmim-pretrain", ("--benchmark-frozen", "0"))])  # JAX: loop.benchmark
def test_benchmark_on_real_data_reports_end_to_end_img_per_sec_beside_the_device_figure(name, extra, jpeg_root,
                                                                                      tmp_path, capsys):
    (recipe,) = [r for r in RECIPES if r.name == name]
    out = tmp_path / "run"
    code = call(recipe, "--data", jpeg_root, "--output-dir", out, "--benchmark", "--benchmark-steps", "2",
                "--workers", "1", *extra)
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    result = json.loads(captured.out.strip().splitlines()[-1])
    keys = list(result)
    assert keys.index("end_to_end_img_per_sec") == keys.index("img_per_sec") - 1, keys
    assert result["end_to_end_img_per_sec"] > 0 and result["img_per_sec"] > 0, result
    assert not out.exists(), f"--benchmark created {out}"

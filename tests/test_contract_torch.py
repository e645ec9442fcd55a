"""The fault contract (tests/contract.py) on the PyTorch recipes: howtotrain_vit.py, dvt.py, localmim_freezeout.py."""

import re

import pytest
from contract import (  # noqa: F401 (reference, stopped: fixtures)
    TORCH_RECIPES,
    ContractTests,
    assert_one_error_line,
    data_root,
    file_digests,
    reference,
    stopped,
    stopped_run,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models on one thread


@pytest.fixture(scope="module")
def recipes():
    return TORCH_RECIPES


@pytest.mark.parametrize("recipe", TORCH_RECIPES, ids=lambda r: r.name, scope="class")
class TestTorchRecipes(ContractTests):
    pass


# ---------------------------------------------------------------------------------------------- the other commands

HOWTOTRAIN, DVT, LOCALMIM = TORCH_RECIPES[0], TORCH_RECIPES[1], TORCH_RECIPES[2]


@pytest.fixture(scope="module")
def runs(data_root, tmp_path_factory):  # noqa: F811 (the fixture imported above)
    """Runs of three recipes (stopped mid-way), for the commands that read a run."""
    root = tmp_path_factory.getbasetemp()
    return {r.name: stopped_run(r, data_root, root) for r in (HOWTOTRAIN, DVT, LOCALMIM)}


# (recipe, argv with {run:NAME} / {data} / {missing} / {file} placeholders, a word the error must name)
OTHER_COMMANDS = [
    (HOWTOTRAIN, "history {missing}", "missing"),
    (HOWTOTRAIN, "history {run:howtotrain} --output {file}/history.png", "file"),
    (HOWTOTRAIN, "predict {missing} {data}/val/class_0/img_0.jpg", "missing"),
    (HOWTOTRAIN, "predict {run:howtotrain} {missing}.jpg", "missing"),
    (HOWTOTRAIN, "predict {run:dvt} {data}/val/class_0/img_0.jpg", "dvt.py train, not of howtotrain_vit.py"),
    (DVT, "eval {missing} --data {data}", "missing"),
    (DVT, "eval {run:dvt} --data {missing} --thresholds 0.5,0.5", "missing"),
    (DVT, "eval {run:howtotrain} --data {data}", "howtotrain_vit.py train, not of dvt.py"),
    (DVT, "budget {missing} --data {data} --q 1", "missing"),
    (DVT, "budget {run:dvt} --data {data} --q 1 --output {file}/thresholds.json", "file"),
    (LOCALMIM, "export {missing}", "missing"),
    (LOCALMIM, "export {run:howtotrain}", "howtotrain_vit.py train, not of localmim_freezeout.py"),
    (LOCALMIM, "export {run:localmim-pretrain} --out {file}/timm.pth", "file"),
    (LOCALMIM, "knn --data {missing} --pretrained random --input-size 16 --patch-size 4 --output-dir {new}", "missing"),
    (LOCALMIM, "knn --data {data} --pretrained random --input-size 16 --patch-size 4 --batch-size 8 "
               "--output-dir {file}/knn", "file"),
    (LOCALMIM, "knn --data {data} --pretrained {run:howtotrain} --input-size 16 --patch-size 4 --output-dir {new}",
     "howtotrain"),
]


@pytest.mark.parametrize("recipe, command, word", OTHER_COMMANDS, ids=[f"{r.name}:{c.split()[0]}:{i}" for i, (r, c, _)
                                                                       in enumerate(OTHER_COMMANDS)])
def test_other_commands_refuse_bad_input(recipe, command, word, runs, data_root, tmp_path, capfd):  # noqa: F811
    (tmp_path / "file").write_text("not a folder")
    before = {name: file_digests(path) for name, path in runs.items()}
    places = {"data": data_root, "missing": tmp_path / "missing", "file": tmp_path / "file", "new": tmp_path / "new",
              **{f"run:{name}": path for name, path in runs.items()}}
    argv = re.sub(r"{([^}]+)}", lambda m: str(places[m.group(1)]), command).split()
    code = recipe.module.main(argv)
    assert_one_error_line(code, capfd.readouterr().err, word)
    assert {name: file_digests(path) for name, path in runs.items()} == before, "a refused command changed a run"
    assert not (tmp_path / "new").exists()

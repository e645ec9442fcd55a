"""Shared test helpers: repo on sys.path, CPU-only JAX, and a runner for recipe scripts."""

import getpass
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TQDM_DISABLE", "1")  # in-process recipe runs: no progress bars in captured output
# One persistent XLA compilation cache, shared with the recipe subprocesses: the many short runs of the same tiny
# models compile each program once, and a fixed folder (per user, in the system temp dir beside pytest's own
# `pytest-of-<user>` root) lets a rerun of the suite reuse the programs the last session compiled.
XLA_CACHE = Path(tempfile.gettempdir()) / f"vit-recipes-xla-cache-{getpass.getuser()}"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(XLA_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def recipe_env(devices: int = 1, **extra: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", TQDM_DISABLE="1",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env.update(extra)
    return env


def run_script(script: str, *args: str, devices: int = 1, timeout: float = 600, **env) -> subprocess.CompletedProcess:
    """Run `python <script> args...` from the repo root and return the finished process (output captured)."""
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=recipe_env(devices, **env))


@pytest.fixture(scope="module")
def one_torch_thread():
    """For the PyTorch test files (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`): tiny models gain
    nothing from a second thread, and OpenMP threads crawl when the cores are shared."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def run():
    return run_script


# The files with the longest runs go first, so that with `-n 2 --dist loadfile` (the README's command) neither
# worker is left with a long file at the end.
LONGEST_FIRST = ("test_contract_jax.py", "test_deit3.py", "test_deit.py", "test_contract_torch.py", "test_mae.py",
                 "test_howtotrain.py", "test_dvt.py")


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a file is kept


def assert_states_close(actual: dict, expected: dict, rtol: float = 1e-2) -> None:
    """Every leaf of two saved train states (params, optimizer moments, step) agrees to `rtol` of the leaf's largest
    magnitude: the comparison that sees a gradient of the wrong scale (Adam's moments grow with it, 4x and 16x for
    four micro-batches summed) where losses do not. Not tighter: a gradient that is zero in exact arithmetic (the
    attention's key bias) is float noise that Adam divides by its own size."""
    import jax
    import numpy as np

    flat_actual = dict(jax.tree_util.tree_flatten_with_path(actual)[0])
    flat_expected = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    assert flat_actual.keys() == flat_expected.keys()
    for path, want in flat_expected.items():
        got, want = np.asarray(flat_actual[path], np.float64), np.asarray(want, np.float64)
        scale = np.abs(want).max(initial=0.0)
        np.testing.assert_allclose(got, want, rtol=0, atol=rtol * scale + 1e-30,
                                   err_msg=f"{jax.tree_util.keystr(path)} (max |value| {scale:.3g})")


def assert_user_error(code: int, capsys, *words: str) -> None:
    """The fault contract's bad-input answer: exit status 2, the last stderr line `error: ...` naming `words`, no
    traceback."""
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in err, err[-3000:]
    for word in words:
        assert word in last, last

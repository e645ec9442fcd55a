"""Shared test helpers: repo on sys.path, CPU-only JAX, and a runner for recipe scripts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def recipe_env(devices: int = 1, **extra: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", TQDM_DISABLE="1",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env.update(extra)
    return env


def run_script(script: str, *args: str, devices: int = 1, timeout: float = 600, **env) -> subprocess.CompletedProcess:
    """Run `python <script> args...` from the repo root and return the finished process (output captured)."""
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=recipe_env(devices, **env))


@pytest.fixture
def run():
    return run_script

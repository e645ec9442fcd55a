"""When the JAX loops stop: common.loop.Preemption (SIGTERM; a host sync with several hosts) and --stop-after."""

import numpy as np
import pytest
from contract import JAX_RECIPES, assert_same_state, call, checkpoint_step, final_state
from jax.experimental import multihost_utils

from common import loop


def test_one_process_asks_every_step_so_sigterm_stops_after_the_next_step():
    with loop.Preemption() as preemption:
        assert not any(preemption.stop_after(done, every=10, last=25) for done in range(1, 26))
        preemption.requested = True
        assert preemption.stop_after(3, every=10, last=25), "one process must stop right after a SIGTERM"


def test_several_hosts_gather_only_every_log_interval_and_at_the_last_step(monkeypatch):
    asked = []

    def allgather(value):
        asked.append(done)
        return np.stack([np.asarray(value), np.int32(1)])  # another host got SIGTERM

    monkeypatch.setattr(loop.jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
    with loop.Preemption() as preemption:
        stops = []
        for done in range(1, 26):
            if preemption.stop_after(done, every=10, last=25):
                stops.append(done)
    assert asked == [10, 20, 25], f"the cross-host gather ran after steps {asked}, want only 10, 20 and 25"
    assert stops == [10, 20, 25], "a stop request on another host must stop every host at the same step"


@pytest.mark.parametrize("recipe", [r for r in JAX_RECIPES if r.name in ("deit3", "deit", "mae-pretrain")],
                         ids=lambda r: r.name)
def test_stop_after_saves_exits_0_and_the_resumed_run_ends_as_an_uninterrupted_one(recipe, tmp_path):
    """--stop-after N (the PyTorch recipes' flag, for schedulers and tests): the JAX commands save after N steps of
    this process, between two intervals, exit 0, and a --resume (which may change --stop-after) finishes bitwise
    where a run without the stop ends."""
    data = ("--data", "digits")
    assert call(recipe, *data, "--output-dir", tmp_path / "whole") == 0
    assert call(recipe, *data, "--stop-after", "3", "--output-dir", tmp_path / "stopped") == 0
    assert checkpoint_step(recipe, tmp_path / "stopped") == 3, "--stop-after 3 must save step 3"
    assert call(recipe, *data, "--stop-after", "0", "--resume", "--output-dir", tmp_path / "stopped") == 0
    assert_same_state(final_state(recipe, tmp_path / "whole"), final_state(recipe, tmp_path / "stopped"))

"""common.loop.Preemption: when the JAX loop asks whether to stop (a host sync with several hosts)."""

import numpy as np
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

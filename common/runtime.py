"""Framework-neutral run helpers for the JAX and PyTorch recipes: accelerator peaks for MFU, SIGTERM as a stop."""

from __future__ import annotations

import signal

# Dense bf16 matmul peak per chip, FLOP/s, for MFU (H100: measured on a large matmul, spec 989e12).
PEAK_FLOPS = {"H100": 800e12, "H200": 800e12, "A100": 312e12, "TPU v3": 123e12, "TPU v4": 275e12,
              "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6": 918e12}


def peak_flops(device_name: str) -> float | None:
    """The bf16 peak of a device from its name (JAX `device_kind`, `torch.cuda.get_device_name`), or None when
    unknown (CPUs, unlisted accelerators)."""
    return next((flops for key, flops in PEAK_FLOPS.items() if key in device_name), None)


class Preemption:
    """SIGTERM (a preempted VM, a scheduler's stop, torchrun's shutdown) sets `requested`, so that the loop can
    checkpoint and exit cleanly. `close()` (or leaving the `with` block) gives SIGTERM back to the handler
    installed before."""

    def __init__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def close(self) -> None:
        signal.signal(signal.SIGTERM, self.previous)

    def __enter__(self) -> Preemption:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

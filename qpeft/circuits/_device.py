"""Which of two code paths a device gets: the CPU's, or the accelerator's.

A few places pick their kernels by device, because launching a kernel costs far more on an
accelerator than on the CPU: :func:`qpeft.circuits.compound.compound_apply` (order-2 action:
a cache-blocked CPU kernel, or a few large mode products on an accelerator) and QuIC's cost
model (``qpeft.circuits.compound_rotation.order_costs``). They ask :func:`accelerator_path`.

:func:`force_accelerator_path` makes CPU tensors take the accelerator's path too: the same
values (both paths compute the same function), other kernels. ``benchmarks/dispatch.py`` uses
it to count the operations a training step dispatches on an accelerator without one; tests use
it to run the accelerator's code on the CPU. Process-wide, not thread-local.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["accelerator_path", "force_accelerator_path"]

_forced = False


def accelerator_path(device: torch.device) -> bool:
    """Whether code that picks kernels by device takes its accelerator path on ``device``:
    every device but the CPU, and the CPU too inside :func:`force_accelerator_path`. O(1)."""
    return _forced or device.type != "cpu"


@contextmanager
def force_accelerator_path(enabled: bool = True) -> Iterator[None]:
    """Within the block, :func:`accelerator_path` is True for every device (``enabled=False``:
    as outside). Restores the previous setting on exit, so blocks nest."""
    global _forced
    previous, _forced = _forced, enabled
    try:
        yield
    finally:
        _forced = previous

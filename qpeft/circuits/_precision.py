"""Circuit simulation ignores autocast: it runs in the dtype of its inputs.

Under ``torch.autocast`` a custom autograd Function's forward would see its matmuls cast to
bfloat16 while its backward, which runs after the autocast region has closed, sees float32: the
backward then meets mixed dtypes (and bfloat16 amplitudes or compounds would lose the precision
the adapters are generated in). Each entry point into a hand-written circuit kernel is therefore
wrapped in :func:`without_autocast`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable[..., torch.Tensor])


def without_autocast(fn: F) -> F:
    """``fn`` run with autocast off on the device of its first tensor argument. O(1)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):  # type: ignore[no-untyped-def]
        device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        if not torch.is_autocast_enabled(device):
            return fn(*args, **kwargs)
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)

    return run  # type: ignore[return-value]

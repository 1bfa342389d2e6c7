"""One value computed from a few parameters and shared by every layer that reads it.

QPA's generator circuit turns one small angle tensor into the probabilities every adapted layer
slices its LoRA factors from. Simulating it in every layer's forward (and backward) is the same
work 2 x (number of layers) times per step. :class:`SharedValue` computes it once while the
parameters keep their values and hands every reader the same tensor, so autograd sums the
readers' gradients and runs the value's backward once.

Why this stays correct under every wrapper a layer may run in:

- **One autograd node that saves nothing through autograd** (:class:`_Recomputed`): it keeps a
  snapshot of the parameters' values on its context and recomputes the value in its backward.
  Gradient checkpointing counts the tensors a region saves and checks the recomputation saves
  the same ones; a layer that computed the value and a layer that reused it save the same
  tensors, so both ``use_reentrant`` modes work. The backward can run any number of times: every
  graph that reused the value (micro-batches, a checkpointed region's recomputation) has its own.
- **Reuse is by identity and value**: the same parameter objects holding the same values (compared
  by value: ``.data`` writes and FSDP's unsharding bypass version counters), under the same
  autocast state. A replaced or changed parameter computes afresh.
- **Only while autograd records** (grad mode, a parameter that needs a gradient): evaluation has
  the layers' own reuse (:meth:`WeightMergeLayer._generated`). Never under ``torch.compile`` or a
  ``torch.func`` transform (they trace the plain computation), nor for tensor subclasses (an
  FSDP2 ``DTensor`` shard: the plain computation raises peft's usual error).

Pure torch (no peft): QPA's generator uses it without any model.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = ["SharedValue", "same_values"]

AutocastState = tuple[str, bool, torch.dtype]


def same_values(snapshot: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> bool:
    """Whether ``params`` hold exactly ``snapshot``'s values (and dtypes, devices, shapes).
    O(numel); a device sync on an accelerator."""
    return len(snapshot) == len(params) and all(
        a.dtype == b.dtype and a.device == b.device and a.shape == b.shape and torch.equal(a, b)
        for a, b in zip(snapshot, params, strict=True)
    )


def _autocast_state(device_type: str) -> AutocastState:
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class _Recomputed(torch.autograd.Function):
    """``fn(*params)`` as one node with nothing saved through autograd: the backward reruns
    ``fn`` on the parameters' values at forward time (``snapshot``), under the forward's autocast
    state, and differentiates that. Cost: the backward is ``fn``'s forward + backward."""

    @staticmethod
    def forward(ctx: Any, fn: Callable[..., torch.Tensor], snapshot: tuple[torch.Tensor, ...],
                autocast: AutocastState, *params: torch.Tensor) -> torch.Tensor:
        ctx.fn, ctx.snapshot, ctx.autocast = fn, snapshot, autocast
        return fn(*params)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        needed = ctx.needs_input_grad[3:]
        device_type, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
            inputs = [s.detach().requires_grad_(n) for s, n in zip(ctx.snapshot, needed, strict=True)]
            value = ctx.fn(*inputs)
            grads = iter(torch.autograd.grad(value, [x for x in inputs if x.requires_grad], grad))
        return (None, None, None, *(next(grads) if n else None for n in needed))


def _shareable(params: Sequence[torch.Tensor]) -> bool:
    return (
        torch.is_grad_enabled()
        and not torch.is_inference_mode_enabled()
        and not torch.compiler.is_compiling()
        and not torch._C._are_functorch_transforms_active()
        and any(p.requires_grad for p in params)
        and all(type(p) in (torch.Tensor, nn.Parameter) for p in params)
    )


class SharedValue:
    """``fn(*params)``, computed once while ``params`` keep their values and shared by every
    caller (see the module docstring). ``fn`` must be a pure function of its tensor arguments
    returning one tensor, and picklable (a module-level function or a ``functools.partial``).

    A copy (``copy.deepcopy``, pickling a model) starts empty. Lookup cost: one ``torch.equal``
    per parameter."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn = fn
        self._entry: tuple[Any, ...] | None = None  # (refs, snapshot, autocast, value), one tuple

    def __call__(self, *params: torch.Tensor) -> torch.Tensor:
        if not _shareable(params):
            return self.fn(*params)
        autocast = _autocast_state(params[0].device.type)
        entry = self._entry  # read once: a concurrent caller replaces the whole tuple
        if entry is not None:
            refs, snapshot, state, value = entry
            if (state == autocast and all(r() is p for r, p in zip(refs, params, strict=True))
                    and same_values(snapshot, params)):
                return value
        snapshot = tuple(p.detach().clone() for p in params)
        value = _Recomputed.apply(self.fn, snapshot, autocast, *params)
        self._entry = (tuple(weakref.ref(p) for p in params), snapshot, autocast, value)
        return value

    def clear(self) -> None:
        """Forget the kept value (the next call computes afresh)."""
        self._entry = None

    def __deepcopy__(self, memo: dict[int, Any]) -> SharedValue:
        return SharedValue(self.fn)

    def __getstate__(self) -> dict[str, Any]:
        return {"fn": self.fn, "_entry": None}

"""Batched generation: the small matrices of many layers generated in one call per training
step and handed to each layer (:class:`BatchedGeneration`).

Two generations repeat the same work in every adapted layer of a training step:

- QPA: every layer slices its LoRA factors from the same generator circuit's probabilities, a
  function of one angle tensor: simulated 2 x (number of layers) times per step.
- Quantum-PEFT: every layer runs its own small circuits; dozens of layers with the same widths
  run the same program, one autograd node each, where one batched call would do.

:class:`BatchedGeneration` runs the generation of all *members* (QPA: the one generator;
Quantum-PEFT: every adapted layer of an adapter) as one call when the first layer asks, and hands
each later reader its member's outputs while that member's parameters are unchanged. Why this is
invisible to every wrapper a layer may run in:

- **One autograd node that saves nothing through autograd** (:class:`_Detached`): the generation
  runs on detached copies of the parameters under ``torch.enable_grad()`` and saved-tensor hooks
  that keep tensors as they are, so nothing reaches an enclosing checkpoint's hooks; the node's
  backward differentiates that inner graph and keeps it. So a gradient-checkpointed layer saves
  the same tensors whether it generated the outputs, reused them, or generated its member alone
  (the fallback below), and recomputation matches; and the node's backward runs once per graph
  that reused it (micro-batches, reentrant recomputation, backwards in any order).
- **Per-member gradients**: a member whose outputs no reader used gets no gradient (``None``,
  as if it had generated on its own), e.g. an expert a mixture-of-experts router skipped.
- **Reuse is decided from what the host already knows, never by reading values back** (a
  comparison of values is one device sync per lookup, and a sync stalls the queue of kernels a
  training step runs on an accelerator): the member's parameter objects, each with the same
  version counter (bumped by every in-place write through autograd's view of the tensor: an
  optimizer's ``p.add_``, ``copy_`` under ``no_grad``, ``load_state_dict``) and the same storage
  (``p.data = x`` swaps it; the entry keeps the old storage alive, so its address is never
  handed to another tensor while compared), the same ``requires_grad``, under the same autocast
  state; and the kept outputs **expire** when a backward runs through them (outputs generated
  inside a backward, by a checkpointed layer's recomputation: when that backward ends), so
  every write that follows a backward is covered, whatever bypasses version counters
  (``p.data.add_``, an optimizer writing raw memory, FSDP's unsharding); also when any
  ``torch.optim`` optimizer steps, and on :func:`parameters_written`. The one write not seen: an in-place ``.data`` write between
  two recorded forwards with no backward or optimizer step between them (call
  :func:`parameters_written` after such a write). An expired entry lets go of its outputs,
  and so of the generation's graph: that lives as long as some step's graph uses it, never
  between steps.
- **Batched only over plain parameters on one device**: when any member's parameters are
  tensor subclasses (FSDP2's DTensor shards of other blocks), FSDP1-flattened or DeepSpeed
  parameters, on another device or dtype, or on the meta device (offloaded), the asking layer
  generates its own member alone, still as one such node.
- **Only while autograd records**: not under ``no_grad`` / ``inference_mode`` (evaluation has the
  layers' own reuse, :meth:`WeightMergeLayer._generated`), ``torch.compile`` or ``torch.func``
  transforms (they trace the plain generation), nor when no parameter of the member needs a
  gradient.

Pure torch (no peft): QPA's generator uses it without any model.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import nn
from torch.autograd import Variable
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["BatchedGeneration", "KeptConstant", "parameters_written", "same_values"]


T = TypeVar("T")
Params = tuple[torch.Tensor, ...]
Outputs = tuple[torch.Tensor, ...]

_writes = 0  # bumped after every torch.optim step and by parameters_written()


def parameters_written() -> None:
    """Declare that parameters changed in a way no version counter records (an in-place write
    through ``.data`` between two recorded forwards, with no backward or optimizer step between
    them): every :class:`BatchedGeneration` generates afresh at its next read. O(1)."""
    global _writes
    _writes += 1


def _after_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    parameters_written()


register_optimizer_step_post_hook(_after_optimizer_step)


def same_values(snapshot: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> bool:
    """Whether ``params`` hold exactly ``snapshot``'s values (and dtypes, devices, shapes).
    O(numel); on an accelerator one device sync for all of them (``torch.equal`` would sync
    once per tensor). For evaluation's reuse (:meth:`WeightMergeLayer._generated`), never
    inside a training step: :class:`BatchedGeneration` decides reuse without reading values."""
    if len(snapshot) != len(params) or not all(
            a.dtype == b.dtype and a.device == b.device and a.shape == b.shape
            for a, b in zip(snapshot, params, strict=True)):
        return False
    devices = {p.device for p in params}
    if len(devices) != 1 or next(iter(devices)).type in ("cpu", "meta"):
        return all(torch.equal(a, b) for a, b in zip(snapshot, params, strict=True))
    return _all_equal_one_sync(snapshot, params)


def _all_equal_one_sync(snapshot: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> bool:
    """Every ``snapshot[i] == params[i]`` entrywise (same shapes, one device), read back once."""
    return bool(torch.stack([torch.eq(a, b).all() for a, b in zip(snapshot, params, strict=True)])
                .all())


class _Stamp:
    """What the host knows about one parameter when outputs were generated from it: the object
    (weakly), its version counter, its storage address and ``requires_grad``. ``storage`` keeps
    that storage alive, so no other tensor can be handed the same address while the stamp
    exists. Nothing here reads the values: O(1), no device work."""

    __slots__ = ("ref", "storage", "version", "address", "requires_grad")

    def __init__(self, p: torch.Tensor) -> None:
        self.ref = weakref.ref(p)
        self.storage = p.untyped_storage()
        self.version = p._version
        self.address = p.data_ptr()
        self.requires_grad = p.requires_grad

    def holds(self, p: torch.Tensor) -> bool:
        """Whether ``p`` is the stamped parameter, unwritten since (as far as the host sees)."""
        return (self.ref() is p and p._version == self.version
                and p.data_ptr() == self.address and p.requires_grad == self.requires_grad)


class _Lifetime:
    """Whether kept outputs may still be handed out. Outputs generated in a forward expire when
    a backward runs through their node; outputs generated inside a backward (recomputation of
    a checkpointed layer) when that backward ends, so the recomputation of every other layer in
    the same backward reuses them, also where each recomputed layer runs a backward of its own
    (reentrant checkpointing). On expiry the entry lets go of its outputs, and with them (their
    ``grad_fn``) of the generation's graph: it lives on only while some step's graph uses it,
    never between steps. ``entry``: a weak reference (no cycle with the entry's own
    reference to this object, so a replaced entry is freed at once)."""

    __slots__ = ("live", "in_backward", "entry")

    def __init__(self) -> None:
        self.live = True
        self.entry: weakref.ReferenceType[_Entry] | None = None
        self.in_backward = torch._C._current_graph_task_id() != -1
        if self.in_backward:
            Variable._execution_engine.queue_callback(self.expire)

    def expire(self) -> None:
        self.live = False
        entry = None if self.entry is None else self.entry()
        if entry is not None:
            entry.outputs = []

    def backward_ran(self) -> None:
        if not self.in_backward:
            self.expire()


def _keep(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


class _Detached(torch.autograd.Function):
    """``fn(*params)`` (a tuple of tensors) as one node that saves nothing through autograd.

    ``param_member[i]`` / ``output_member[j]``: which member parameter ``i`` / output ``j``
    belongs to; a parameter gets a gradient only if some output of its member got one. The
    inner graph is kept (``retain_graph``) until the node is freed. ``lifetime``: the kept
    outputs' (None when nothing is kept), told when a backward runs through the node."""

    @staticmethod
    def forward(ctx: Any, fn: Callable[..., Outputs], param_member: tuple[int, ...],
                output_member: tuple[int, ...], lifetime: _Lifetime | None,
                *params: torch.Tensor) -> Outputs:
        # constants (buffers) are read as they are: only what needs a gradient is detached
        inputs = tuple(p.detach().requires_grad_() if p.requires_grad else p for p in params)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
            outputs = tuple(fn(*inputs))
        ctx.inner = (inputs, outputs)
        ctx.param_member, ctx.output_member = param_member, output_member
        ctx.lifetime = lifetime
        ctx.set_materialize_grads(False)
        return tuple(o.detach() for o in outputs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        if torch.is_grad_enabled():
            raise RuntimeError(
                "qpeft's shared generation does not support higher-order gradients "
                "(create_graph=True); its backward is computed outside the outer graph"
            )
        if ctx.lifetime is not None:
            ctx.lifetime.backward_ran()
        inputs, outputs = ctx.inner
        used = {m for m, g in zip(ctx.output_member, grads, strict=True) if g is not None}
        pairs = [(o, g) for o, g in zip(outputs, grads, strict=True)
                 if g is not None and o.requires_grad]
        wanted = [i for i, (x, m) in enumerate(zip(inputs, ctx.param_member, strict=True))
                  if x.requires_grad and m in used]
        result: list[torch.Tensor | None] = [None] * len(inputs)
        if pairs and wanted:
            got = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wanted],
                                      [g for _, g in pairs], retain_graph=True, allow_unused=True)
            for i, g in zip(wanted, got, strict=True):
                result[i] = g
        return (None, None, None, None, *result)


def _recording() -> bool:
    return (
        torch.is_grad_enabled()
        and not torch.is_inference_mode_enabled()
        and not torch.compiler.is_compiling()
        and not torch._C._are_functorch_transforms_active()
    )


def _plain(p: torch.Tensor, device: torch.device, dtype: torch.dtype) -> bool:
    """A parameter the batched generation may read and send gradients to directly, or a
    constant it may read (a plain tensor that needs no gradient: a buffer, any dtype)."""
    if type(p) is torch.Tensor and not p.requires_grad:
        return p.device == device and p.device.type != "meta"
    return (
        type(p) is nn.Parameter
        and p.device == device
        and p.dtype == dtype
        and p.device.type != "meta"
        and not getattr(p, "_fsdp_flattened", False)
        and not hasattr(p, "ds_id")
    )


def _all_plain(params: list[Params], like: torch.Tensor) -> bool:
    """Every parameter of every member is plain (:func:`_plain`) on ``like``'s device and dtype."""
    return all(_plain(p, like.device, like.dtype) for ps in params for p in ps)


class BatchedGeneration:
    """Generates the small matrices of several *members* (layers, or one generator) in one
    batched call when the first reader asks during a recorded forward, and hands every later
    reader its member's outputs while that member's parameters are unchanged (see the module
    docstring for when "unchanged" is known and why this is one autograd node).

    ``generate_all(params)``: ``params[m]`` is member ``m``'s parameter tuple; returns one tuple
    of ``n_outputs`` tensors per member. ``generate_one(m, own)``: member ``m`` alone, the same
    values. Both must be pure functions of their tensor arguments.

    A copy (``copy.deepcopy``, pickling a model) starts empty; the functions may be bound
    methods of the module that owns this object (a deep copy then binds the copy's). Lookup
    cost for a reader: a few attribute reads per parameter of its member, on the host (no
    tensor operation, no device sync)."""

    def __init__(self, generate_all: Callable[[list[Params]], list[Outputs]],
                 generate_one: Callable[[int, Params], Outputs], n_outputs: int) -> None:
        self.generate_all = generate_all
        self.generate_one = generate_one
        self.n_outputs = n_outputs
        self._entry: _Entry | None = None  # replaced whole, never changed in place

    def batchable(self, params: list[Params]) -> bool:
        """Whether :meth:`outputs` would generate (or reuse) all members of ``params`` in one
        batched call now, rather than each asking member alone: autograd is recording, some
        parameter needs a gradient, and all are plain parameters on one device and dtype."""
        return (_recording() and any(p.requires_grad for ps in params for p in ps)
                and _all_plain(params, params[0][0]))

    def outputs(self, member: int, own: Params, gather: Callable[[], list[Params] | None]) -> Outputs:
        """Member ``member``'s outputs given its parameters ``own``; ``gather()`` returns every
        member's current parameters (``None`` when some member cannot be read)."""
        if not (_recording() and any(p.requires_grad for p in own)):
            return tuple(self.generate_one(member, own))
        state = _autocast_state(own[0].device.type)
        entry = self._entry  # read once: a concurrent caller replaces the whole entry
        if entry is not None and entry.serves(member, own, state):
            return entry.outputs[member]
        params = gather()
        if (params is None or member >= len(params)
                or any(a is not b for a, b in zip(params[member], own, strict=True))
                or not _all_plain(params, own[0])):
            # this member alone, as the same kind of node (checkpointing sees the same saved
            # tensors either way); nothing kept
            return _Detached.apply(lambda *ps: self.generate_one(member, ps), (0,) * len(own),
                                   (0,) * self.n_outputs, None, *own)
        sizes = [len(ps) for ps in params]

        def generate(*flat: torch.Tensor) -> Outputs:
            grouped, start = [], 0
            for n in sizes:
                grouped.append(flat[start:start + n])
                start += n
            return tuple(t for outs in self.generate_all(grouped) for t in outs)

        stamps = [tuple(_Stamp(p) for p in ps) for ps in params]  # before: nothing written yet
        writes, lifetime = _writes, _Lifetime()
        flat_outputs = _Detached.apply(
            generate,
            tuple(m for m, n in enumerate(sizes) for _ in range(n)),
            tuple(m for m in range(len(params)) for _ in range(self.n_outputs)),
            lifetime,
            *(p for ps in params for p in ps),
        )
        k = self.n_outputs
        outputs = [tuple(flat_outputs[m * k:(m + 1) * k]) for m in range(len(params))]
        self._entry = _Entry(stamps, state, writes, lifetime, outputs)
        lifetime.entry = weakref.ref(self._entry)
        return outputs[member]

    def clear(self) -> None:
        """Forget the kept outputs (the next reader generates afresh)."""
        self._entry = None

    def __getstate__(self) -> dict[str, Any]:
        # what copy.deepcopy and pickle copy: no kept outputs (tensors, weak references). Bound
        # methods go through their memo, so a copied owner's object calls the copy's methods
        return {**self.__dict__, "_entry": None}


class _Entry:
    """Every member's kept outputs and what the host knew when they were generated."""

    __slots__ = ("stamps", "state", "writes", "lifetime", "outputs", "__weakref__")

    def __init__(self, stamps: list[tuple[_Stamp, ...]], state: tuple[str, bool, torch.dtype],
                 writes: int, lifetime: _Lifetime, outputs: list[Outputs]) -> None:
        self.stamps, self.state, self.writes = stamps, state, writes
        self.lifetime, self.outputs = lifetime, outputs

    def serves(self, member: int, own: Params, state: tuple[str, bool, torch.dtype]) -> bool:
        """Whether member ``member``'s kept outputs are those of ``own`` now (module docstring:
        how that is known without reading values). O(len(own)) attribute reads."""
        return (self.lifetime.live and self.writes == _writes and self.state == state
                and member < len(self.stamps) and len(own) == len(self.stamps[member])
                and all(s.holds(p) for s, p in zip(self.stamps[member], own, strict=True)))


class KeptConstant:
    """A value computed from constant tensors (buffers that need no gradient, e.g. an adapter's
    frozen start), computed once and handed out while those tensors are the same objects,
    unwritten, under the same autocast state (host-side :class:`_Stamp` checks: no tensor
    operation, no device sync). A load, a hot-swap or a device move writes or replaces them,
    and the next call recomputes. A copy (``copy.deepcopy``, pickling) starts empty."""

    def __init__(self) -> None:
        self._kept: tuple[list[_Stamp], tuple, Any] | None = None

    def get(self, tensors: Sequence[torch.Tensor], build: Callable[[], T]) -> T:
        """``build()`` (run without autograd) for ``tensors``, or the value kept for them."""
        if any(t.is_inference() for t in tensors):  # no version counter to stamp: not kept
            with torch.no_grad():
                return build()
        state = _autocast_state(tensors[0].device.type) if tensors else None
        kept = self._kept
        if kept is not None and kept[1] == state and len(kept[0]) == len(tensors) and all(
                stamp.holds(t) for stamp, t in zip(kept[0], tensors, strict=True)):
            return kept[2]
        # ordinary tensors even under torch.inference_mode(): a kept value may be read later by
        # a forward that autograd records
        with torch.inference_mode(False), torch.no_grad():
            value = build()
        self._kept = ([_Stamp(t) for t in tensors], state, value)
        return value

    def __getstate__(self) -> dict[str, Any]:
        return {"_kept": None}


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype]:
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)

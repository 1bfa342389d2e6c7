"""RY rotations of a group of qubits as one dense matrix, and the angles' gradient from the matrix's.

A group of ``c`` adjacent qubits (slot ``t`` = the group's ``t``-th least significant qubit)
rotated by ``RY(t_0), ..., RY(t_{c-1})`` acts as the ``2**c x 2**c`` Kronecker product
``kron(RY(t_{c-1}), ..., RY(t_0))`` with ``RY(t) = [[cos t/2, -sin t/2], [sin t/2, cos t/2]]``:
entry ``(i, j)`` is the product over slots of ``RY(t_t)[bit_t(i), bit_t(j)]``.  Both circuit
simulators (Quantum-PEFT's Pauli circuits, QPA's QNN) build their group matrices here and take
the gradient of the half angles ``h = t / 2`` back through it, inside their own hand-written
backward passes: ``d RY / d h = RY(t + pi)``, whose entries are ``(-sin h, -cos h, cos h, -sin h)``.
"""

from __future__ import annotations

import torch

from qpeft.circuits._cache import tensor_table_cache

__all__ = [
    "entry_table",
    "gather_rotations",
    "group_rotations",
    "group_rotations_half_angle_grad",
    "rotation_index",
]


@tensor_table_cache(maxsize=64)
def _entry_index(slots: int, device: torch.device) -> torch.Tensor:
    """``(slots * 4**slots,)`` long: for slot ``t`` (major) and entry ``(i, j)`` of the group
    matrix (row-major), the position ``4 t + 2 bit_t(i) + bit_t(j)`` of its factor in the
    ``(4 slots,)`` table of RY entries ``(cos, -sin, sin, cos)`` per slot."""
    d = 1 << slots
    i = torch.arange(d).view(d, 1)
    j = torch.arange(d).view(1, d)
    rows = [(4 * t + 2 * ((i >> t) & 1) + ((j >> t) & 1)).reshape(-1) for t in range(slots)]
    return torch.cat(rows).to(device)


def entry_table(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``(..., 4 n)``: the RY entries ``(cos, -sin, sin, cos)`` of each of ``n`` half angles
    (``cos``, ``sin``: ``(..., n)``), angle-major: what ``gather_rotations`` reads."""
    return torch.stack((cos, -sin, sin, cos), dim=-1).flatten(-2)


@tensor_table_cache(maxsize=256)
def rotation_index(slot_angles: tuple[tuple[int, ...], ...], device: torch.device) -> torch.Tensor:
    """``(M c 4**c,)`` long: for group ``g`` (major) of ``M`` groups of ``c`` slots, slot ``t``
    and entry ``(i, j)`` of its matrix, the position ``4 a + 2 bit_t(i) + bit_t(j)`` of its
    factor in an ``entry_table``, ``a = slot_angles[g][t]`` the slot's angle.  Built once."""
    slots = len(slot_angles[0])
    local = _entry_index(slots, torch.device("cpu")).view(slots, -1)  # 4 t + 2 bit_t(i) + bit_t(j)
    shift = 4 * (torch.tensor(slot_angles, dtype=torch.long) - torch.arange(slots))
    return (local + shift[:, :, None]).flatten().to(device)


def gather_rotations(table: torch.Tensor, index: torch.Tensor, slots: int) -> torch.Tensor:
    """``(..., M, 2**c, 2**c)``: the group matrices ``kron(RY(slot c-1), ..., RY(slot 0))`` of
    the ``M`` groups of ``rotation_index``, from ``table (..., 4 n)`` (``entry_table``).  One
    gather and one product, O(M c 4**c); contiguous."""
    d = 1 << slots
    width = table.shape[-1]
    if table.dim() > 1:  # several tables: one flat gather, each table's index offset by its start
        starts = torch.arange(0, table.numel(), width, device=table.device)
        index = (starts[:, None] + index).flatten()
    factors = table.reshape(-1).index_select(0, index).view(-1, slots, d * d)
    return factors.prod(1).view(*table.shape[:-1], -1, d, d)


def group_rotations(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``(..., 2**c, 2**c)`` group matrices from ``cos``, ``sin`` ``(..., c)`` of the half
    angles (slot ``t``'s angle at position ``t``).  O(c 4**c) per group."""
    slots = cos.shape[-1]
    index = _entry_index(slots, cos.device)
    return gather_rotations(entry_table(cos, sin), index, slots).squeeze(-3)


@tensor_table_cache(maxsize=64)
def _flip_index(slots: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index, sign)``, both ``(slots, 2**slots)``: for slot ``t`` and column ``j``, the
    position ``j 2**slots + (j xor 2**t)`` in a flattened group matrix and ``(-1)**bit_t(j)``."""
    d = 1 << slots
    j = torch.arange(d)
    index = torch.stack([j * d + (j ^ (1 << t)) for t in range(slots)])
    sign = torch.stack([1 - 2 * ((j >> t) & 1) for t in range(slots)])
    return index.to(device), sign.to(device)


def group_rotations_half_angle_grad(rot: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``(..., c)``: the gradient of the half angles from ``rot = group_rotations(cos, sin)``
    and its gradient ``grad``, both ``(..., 2**c, 2**c)``.

    ``d rot / d h_t`` replaces slot ``t``'s factor ``RY`` by ``RY(t + pi)``, whose entry
    ``[a, b]`` is ``(-1)**b RY[a, 1 - b]``; so its entry ``[i, j]`` is
    ``(-1)**bit_t(j) rot[i, j xor 2**t]`` and the gradient is
    ``sum_j (-1)**bit_t(j) (grad^T rot)[j, j xor 2**t]``: one batched matmul and one gather.
    O(8**c) per group."""
    index, sign = _flip_index(int(rot.shape[-1]).bit_length() - 1, rot.device)
    inner = torch.matmul(grad.transpose(-1, -2), rot).flatten(-2)  # (..., 4**c)
    return (inner[..., index] * sign.to(inner.dtype)).sum(-1)

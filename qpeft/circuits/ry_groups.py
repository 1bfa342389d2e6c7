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

__all__ = ["group_rotations", "group_rotations_half_angle_grad"]


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


def _factors(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``(slots, 4**slots, M)``: every slot's 2x2 entry ``[[a, b], [c, d]]`` (each
    ``(slots, M)``, one column per group) placed at each entry of the group matrix.  One gather
    along the leading (contiguous) dimension."""
    slots = a.shape[0]
    entries = torch.stack((a, b, c, d), dim=1).flatten(0, 1)  # (4 slots, M)
    return entries.index_select(0, _entry_index(slots, a.device)).unflatten(0, (slots, -1))


def _slot_major(x: torch.Tensor) -> torch.Tensor:
    """``(..., c)`` -> ``(c, M)``, one column per group."""
    return x.reshape(-1, x.shape[-1]).T


def group_rotations(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``(..., 2**c, 2**c)`` group matrices from ``cos``, ``sin`` ``(..., c)`` of the half
    angles.  O(c 4**c) per group, in a gather and a product."""
    c, s = _slot_major(cos), _slot_major(sin)
    d = 1 << c.shape[0]
    # (4**c, M) -> contiguous (M, 4**c): a strided view would make every matmul copy it
    return _factors(c, -s, s, c).prod(0).T.contiguous().view(*cos.shape[:-1], d, d)


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

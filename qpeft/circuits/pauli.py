"""The Pauli ("simplified two-design") RY + CZ circuit of Quantum-PEFT, evaluated on K columns.

Circuit on ``n`` qubits, ``N = 2**n`` (papers.md section 1)::

    RY on every qubit                                   (n angles)
    repeat L times:
        CZ on even pairs (0,1),(2,3),...  then RY on the qubits of those pairs
        CZ on odd pairs  (1,2),(3,4),...  then RY on the qubits of those pairs

with ``RY(t) = [[cos t/2, -sin t/2], [sin t/2, cos t/2]]`` and ``CZ = diag(1, 1, 1, -1)``.
Every matrix is real, so the circuit is an orthogonal ``N x N`` matrix ``Q``.

Conventions (the circuit-export code must match them):

* basis index ``i = sum_q b_q 2**q``: **qubit 0 is the least significant bit** (as in Qiskit),
  so the circuit matrix is ``kron(G_{n-1}, ..., G_1, G_0)`` for a layer of one-qubit gates;
* angles are laid out as: the first RY layer (qubits ``0..n-1``), then for each of the ``L``
  layers the RY angles of the even-pair qubits ``0..n_e-1`` (``n_e = 2*(n//2)``) followed by
  those of the odd-pair qubits ``1..n_o`` (``n_o = 2*((n-1)//2)``); ``n_e + n_o = 2(n-1)``.
  ``pauli_gates`` lists the gates in application order with their angle indices.

Evaluation never forms ``Q``: the circuit is applied to ``K`` columns.  Python and autograd
overhead per operation dominate at these sizes, so a sub-layer is a few batched matmuls whatever
``n``: the register is cut into ``g = ceil(n / 5)`` groups of adjacent qubits (group 0 holds the
least significant ones, sizes ``c_j <= 5``, ``d_j = 2**c_j``); a sub-layer's RYs are the Kronecker
product of one ``d_j x d_j`` matrix per group, and the matrices of every group and sub-layer are
built together in one Kronecker chain from one angle gather.  The CZ gates are diagonal: a fixed
+-1 scaling of the state.  Each column's state is held as a ``d_{g-1} x ... x d_1 x d_0`` tensor
(the ``K`` columns sit next to the last axis), and group ``j`` multiplies its axis: one batched
matmul per group, ``O(N K sum_j d_j)`` flops per sub-layer, ``O(g L)`` operations in all.
"""

from __future__ import annotations

import functools
import math

import torch

from qpeft.circuits._cache import tensor_table_cache
from qpeft.circuits._checks import (
    check_finite,
    check_float_dtype,
    check_in_range,
    check_last_dim,
    check_positive_int,
)
from qpeft.circuits.statevector import qubit_groups

__all__ = [
    "pauli_num_params",
    "pauli_stiefel",
    "pauli_apply",
    "pauli_gates",
    "is_power_of_two",
]

def is_power_of_two(n: int) -> bool:
    """True for 1, 2, 4, 8, ... (n an int >= 1)."""
    return n >= 1 and (n & (n - 1)) == 0


def _layer_qubits(n_qubits: int) -> tuple[int, int]:
    """(n_e, n_o): number of qubits rotated by the even-pair and the odd-pair sub-layers."""
    return 2 * (n_qubits // 2), 2 * ((n_qubits - 1) // 2)


def pauli_num_params(n_qubits: int, depth: int) -> int:
    """Number of angles of the Pauli circuit: ``n + 2 L (n - 1)``.  O(1)."""
    check_positive_int("n_qubits", n_qubits)
    check_positive_int("depth", depth, minimum=0)
    return n_qubits + 2 * depth * (n_qubits - 1)


def pauli_gates(n_qubits: int, depth: int) -> list[tuple[str, tuple[int, ...], int | None]]:
    """The circuit as a gate list in application order (the export helper's contract).

    Each entry is ``("ry", (q,), angle_index)`` or ``("cz", (q, q + 1), None)``.  Length
    ``O(L n)``.  ``Q = G_last ... G_1 G_0`` (gate 0 acts first on the input state).
    """
    check_positive_int("n_qubits", n_qubits)
    check_positive_int("depth", depth, minimum=0)
    n_e, n_o = _layer_qubits(n_qubits)
    gates: list[tuple[str, tuple[int, ...], int | None]] = []
    gates += [("ry", (q,), q) for q in range(n_qubits)]
    idx = n_qubits
    for _ in range(depth):
        gates += [("cz", (q, q + 1), None) for q in range(0, n_e, 2)]
        for q in range(n_e):
            gates.append(("ry", (q,), idx))
            idx += 1
        gates += [("cz", (q, q + 1), None) for q in range(1, n_o + 1, 2)]
        for q in range(1, n_o + 1):
            gates.append(("ry", (q,), idx))
            idx += 1
    return gates


@functools.lru_cache(maxsize=64)
def _group_sizes(n_qubits: int) -> tuple[int, ...]:
    """Qubits per group, group 0 (least significant) first: the QNN simulator's balanced
    ``ceil(n / 5)`` runs (``statevector.qubit_groups``)."""
    return tuple(size for _, size in reversed(qubit_groups(n_qubits)))


def _slot_angles(n_qubits: int, depth: int) -> list[list[list[int]]]:
    """``[s][j][t]``: index (in the circuit's own angle vector) of the RY on slot ``t`` of group
    ``j`` in sub-layer ``s``, or -1 where the sub-layer leaves that qubit alone.  ``S = 1 + 2L``
    sub-layers: the first RY layer, then the even and odd sub-layer of each layer."""
    n_e, n_o = _layer_qubits(n_qubits)
    rows = [list(range(n_qubits))]
    for layer in range(depth):
        offset = n_qubits + layer * (n_e + n_o)
        rows.append([offset + q if q < n_e else -1 for q in range(n_qubits)])
        rows.append([offset + n_e + q - 1 if 1 <= q <= n_o else -1 for q in range(n_qubits)])
    out = []
    for row in rows:
        groups, start = [], 0
        for size in _group_sizes(n_qubits):
            groups.append(row[start : start + size])
            start += size
        out.append(groups)
    return out


@tensor_table_cache(maxsize=256)
def _gather_table(
    circuits: tuple[tuple[int, int], ...], depth: int, total: int, device: torch.device
) -> torch.Tensor:
    """``(C, S, g, c)`` long on ``device``: for every circuit ``(n_qubits, offset)``, sub-layer,
    group and slot, the index of its angle in a flat vector of ``total`` angles, or ``total`` (an
    appended zero: RY(0) = I) for a qubit left alone or a slot above the group's size.  ``g``,
    ``c``: the largest group count and size among the circuits.  Cached per device, so a forward
    on an accelerator copies no table."""
    plans = [_slot_angles(n, depth) for n, _ in circuits]
    g = max(len(p[0]) for p in plans)
    c = max(len(group) for p in plans for group in p[0])
    table = torch.full((len(circuits), 1 + 2 * depth, g, c), total, dtype=torch.long)
    for i, ((_, offset), plan) in enumerate(zip(circuits, plans, strict=True)):
        for s, groups in enumerate(plan):
            for j, slots in enumerate(groups):
                for t, index in enumerate(slots):
                    if index >= 0:
                        table[i, s, j, t] = offset + index
    return table.to(device)


def circuit_matrices(
    angles: torch.Tensor, circuits: tuple[tuple[int, int], ...], depth: int
) -> list[list[list[torch.Tensor]]]:
    """``mats[i][s][j]``: the ``(B, d_j, d_j)`` RY matrix of group ``j`` in sub-layer ``s`` of
    circuit ``i`` (``kron(RY_top, ..., RY_low)`` of the group's qubits, the identity on qubits
    the sub-layer leaves alone).

    ``angles (B, total)`` holds every circuit's angles; circuit ``i = (n_qubits, offset)`` reads
    ``angles[:, offset : offset + pauli_num_params(n_qubits, depth)]``.  Every matrix of every
    circuit comes out of one gather and one Kronecker chain over the slots (most significant
    first): ``c - 1`` broadcast products, O(C S g 4**c) with ``c <= 5``.  A group with fewer
    slots gets RY(0) = I in its top slots: its chain is ``kron(I, G)``, whose leading
    ``d_j x d_j`` block is ``G``.
    """
    b, total = angles.shape
    table = _gather_table(circuits, depth, total, angles.device)
    padded = torch.cat((angles, angles.new_zeros(b, 1)), dim=1)
    half = padded[:, table] * 0.5  # (B, C, S, g, c)
    c, s = torch.cos(half), torch.sin(half)
    ry = torch.stack((c, -s, s, c), dim=-1).unflatten(-1, (2, 2))  # (B, C, S, g, c, 2, 2)
    slots = ry.unbind(-3)
    mat = slots[-1]
    for rot in reversed(slots[:-1]):  # kron(mat, rot): the lower slot is the faster index
        d = mat.shape[-1]
        mat = (mat[..., :, None, :, None] * rot[..., None, :, None, :]).reshape(
            *mat.shape[:-2], 2 * d, 2 * d
        )
    flat = iter(mat.flatten(1, 3).unbind(1))
    out = []
    for n_qubits, _ in circuits:
        sizes = _group_sizes(n_qubits)
        per_sublayer = []
        for _s in range(table.shape[1]):
            row = [next(flat) for _ in range(table.shape[2])]
            per_sublayer.append(
                [m if m.shape[-1] == 1 << size else m[:, : 1 << size, : 1 << size]
                 for m, size in zip(row[: len(sizes)], sizes, strict=True)]
            )
        out.append(per_sublayer)
    return out


@tensor_table_cache(maxsize=256)
def _cz_signs(n_qubits: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """``(even, odd)``: the +-1 diagonals of the even-pair and odd-pair CZ layers, each
    ``(N / d_0, 1, d_0)`` to scale a ``(B, N / d_0, m, d_0)`` state.  O(n 2**n), built once per
    dtype and device."""
    n_e, n_o = _layer_qubits(n_qubits)
    low = 1 << _group_sizes(n_qubits)[0]
    index = torch.arange(1 << n_qubits)
    out = []
    for first, last in ((0, n_e), (1, 1 + n_o)):  # CZ on (0,1),(2,3),... then (1,2),(3,4),...
        parity = torch.zeros_like(index)
        for q in range(first, last - 1, 2):
            parity ^= ((index >> q) & 1) & ((index >> (q + 1)) & 1)
        out.append((1 - 2 * parity).reshape(-1, 1, low).to(device=device, dtype=dtype))
    return tuple(out)


def _apply_sublayer(y: torch.Tensor, mats: list[torch.Tensor], sizes: tuple[int, ...]) -> torch.Tensor:
    """One sub-layer's RYs on ``y (B, N / d_0, m, d_0)``, whose entry ``[b, I, k, i_0]`` is
    amplitude ``I d_0 + i_0`` of column ``k``.  One batched matmul per group: O(N m sum_j d_j)."""
    b, rows, m, d0 = y.shape
    y = torch.bmm(y.reshape(b, rows * m, d0), mats[0].transpose(1, 2))
    for j in range(1, len(sizes)):  # rows = d_{g-1} ... d_j (slowest first), j's axis is last
        d = 1 << sizes[j]
        rows //= d
        if rows == 1:
            y = torch.bmm(mats[j], y.reshape(b, d, -1))
        else:
            y = torch.matmul(mats[j][:, None], y.reshape(b, rows, d, -1))
    return y.reshape(b, -1, m, d0)


def _entangling_layers(
    y: torch.Tensor, mats: list[list[torch.Tensor]], n_qubits: int
) -> torch.Tensor:
    """Sub-layers ``1 .. 2L`` (CZ signs, then the RYs) on ``y (B, N / d_0, m, d_0)``."""
    signs = _cz_signs(n_qubits, y.dtype, y.device)
    sizes = _group_sizes(n_qubits)
    for s in range(1, len(mats)):
        y = _apply_sublayer(y * signs[(s - 1) % 2], mats[s], sizes)
    return y


def circuit_columns(mats: list[list[torch.Tensor]], n_qubits: int, k: int) -> torch.Tensor:
    """First ``k`` columns ``(B, 2**n, k)`` of the circuit whose matrices are ``mats``
    (``circuit_matrices(...)[i]``)."""
    sizes = _group_sizes(n_qubits)
    first = mats[0]
    b = first[0].shape[0]
    # first RY layer on the basis columns e_j: the Kronecker product over groups of column
    # digit_j(k) of each group's matrix (digit 0 = the lowest group's)
    cols = torch.arange(k, device=first[0].device)
    d0 = 1 << sizes[0]
    y = first[0].index_select(2, cols % d0).transpose(1, 2)[:, None]  # (B, 1, k, d0)
    place = d0
    for j in range(1, len(sizes)):
        d = 1 << sizes[j]
        col = first[j].index_select(2, (cols // place) % d)  # (B, d, k)
        y = (col[:, :, None, :, None] * y[:, None]).reshape(b, -1, k, d0)
        place *= d
    y = _entangling_layers(y, mats, n_qubits)
    return y.transpose(2, 3).reshape(b, 1 << n_qubits, k)


def circuit_apply(mats: list[list[torch.Tensor]], n_qubits: int, x: torch.Tensor) -> torch.Tensor:
    """``Q x`` for ``x (B, 2**n, m)`` and the circuit whose matrices are ``mats``."""
    sizes = _group_sizes(n_qubits)
    b, big_n, m = x.shape
    d0 = 1 << sizes[0]
    y = x.reshape(b, big_n // d0, d0, m).transpose(2, 3)
    y = _apply_sublayer(y, mats[0], sizes)
    y = _entangling_layers(y, mats, n_qubits)
    return y.transpose(2, 3).reshape(b, big_n, m)


def _check_angles(angles: torch.Tensor, n_qubits: int, depth: int, values: bool = True) -> int:
    check_positive_int("n_qubits", n_qubits)
    check_positive_int("depth", depth, minimum=0)
    check_float_dtype("angles", angles)
    p = pauli_num_params(n_qubits, depth)
    check_last_dim("angles", angles, p, f"pauli_num_params({n_qubits}, {depth})")
    if values:
        check_finite("angles", angles)
    return p


def pauli_stiefel(
    angles: torch.Tensor, n_qubits: int, depth: int, k: int, *, check_values: bool = True
) -> torch.Tensor:
    """First ``k`` columns of the Pauli circuit's orthogonal matrix ``Q``.

    Args:
        angles: ``(..., P)`` with ``P = pauli_num_params(n_qubits, depth)``; float32/float64;
            leading dimensions are a batch of independent circuits.
        n_qubits: ``n >= 1``; ``N = 2**n``.
        depth: ``L >= 0`` entangling layers.
        k: number of columns, ``1 <= k <= N``.
        check_values: refuse NaN/inf angles (an O(P) check; on an accelerator a device sync,
            which a training step skips: its outputs would show NaN anyway).

    Returns:
        ``(..., N, k)`` with orthonormal columns, dtype of ``angles``.
        Cost ``O(L N k sqrt(N))`` time in ``O(L)`` batched matmuls, ``O(N k)`` memory per
        circuit; ``Q`` is never formed.
    """
    _check_angles(angles, n_qubits, depth, check_values)
    big_n = 1 << n_qubits
    check_in_range("k", k, 1, big_n)
    lead = angles.shape[:-1]
    (mats,) = circuit_matrices(angles.reshape(-1, angles.shape[-1]), ((n_qubits, 0),), depth)
    return circuit_columns(mats, n_qubits, k).reshape(*lead, big_n, k)


def pauli_apply(angles: torch.Tensor, n_qubits: int, depth: int, x: torch.Tensor) -> torch.Tensor:
    """``Q @ x`` for the Pauli circuit ``Q`` and any ``x``.

    Args:
        angles: ``(..., P)`` as in ``pauli_stiefel``.
        x: ``(..., N, m)``, same leading shape as ``angles`` (or broadcastable to it) and dtype.

    Returns:
        ``(..., N, m)``.  Cost ``O((L + 1) N m sqrt(N))`` in ``O(L)`` batched matmuls; ``Q`` is
        never formed.
    """
    _check_angles(angles, n_qubits, depth)
    big_n = 1 << n_qubits
    check_float_dtype("x", x)
    if x.dim() < 2 or x.shape[-2] != big_n:
        raise ValueError(f"x must have shape (..., {big_n}, m), got {tuple(x.shape)}")
    if x.dtype != angles.dtype:
        raise ValueError(f"x dtype {x.dtype} must match angles dtype {angles.dtype}")
    try:
        lead = torch.broadcast_shapes(angles.shape[:-1], x.shape[:-2])
    except RuntimeError as err:
        raise ValueError(
            f"leading shapes of angles {tuple(angles.shape)} and x {tuple(x.shape)} "
            "do not broadcast"
        ) from err
    m = x.shape[-1]
    a = angles.expand(*lead, angles.shape[-1]).reshape(-1, angles.shape[-1])
    (mats,) = circuit_matrices(a, ((n_qubits, 0),), depth)
    y = circuit_apply(mats, n_qubits, x.expand(*lead, big_n, m).reshape(-1, big_n, m))
    return y.reshape(*lead, big_n, m)


def _log2_exact(name: str, n: int) -> int:
    """log2 of a power of two, else ValueError naming ``name``."""
    check_positive_int(name, n)
    if not is_power_of_two(n):
        raise ValueError(f"{name} must be a power of two, got {n}")
    return int(math.log2(n))

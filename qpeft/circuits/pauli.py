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

import math
from dataclasses import dataclass

import torch

from qpeft.circuits._cache import tensor_table_cache
from qpeft.circuits._checks import (
    check_finite,
    check_float_dtype,
    check_in_range,
    check_last_dim,
    check_positive_int,
)

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


_MAX_GROUP = 5  # qubits per group: d_j <= 32, so a sub-layer costs <= 32 g multiply-adds per entry


@dataclass(frozen=True)
class _Plan:
    """Constant tables of one circuit shape ``(n_qubits, depth)``; see the module docstring.

    ``S = 1 + 2L`` sub-layers: the first RY layer, then the even and odd sub-layer of each layer.
    """

    sizes: tuple[int, ...]  # qubits per group, group 0 (least significant) first
    angle_index: torch.Tensor  # (S, g, c) long: angle of (sub-layer, group, slot); P = RY(0)


def _group_sizes(n_qubits: int) -> tuple[int, ...]:
    """``ceil(n / 5)`` near-equal groups, the larger ones at the low end (the K columns of the
    first layer come from group 0)."""
    g = -(-n_qubits // _MAX_GROUP)
    return tuple(n_qubits // g + (j < n_qubits % g) for j in range(g))


@tensor_table_cache(maxsize=256)
def _plan(n_qubits: int, depth: int) -> _Plan:
    """The circuit's angle table; O(S n) integers, built once."""
    n_e, n_o = _layer_qubits(n_qubits)
    sizes = _group_sizes(n_qubits)
    zero = pauli_num_params(n_qubits, depth)  # index of an appended 0 angle: RY(0) = I
    angle = torch.full((1 + 2 * depth, n_qubits), zero, dtype=torch.long)
    angle[0] = torch.arange(n_qubits)
    for layer in range(depth):
        offset = n_qubits + layer * (n_e + n_o)
        angle[1 + 2 * layer, :n_e] = offset + torch.arange(n_e)
        angle[2 + 2 * layer, 1 : 1 + n_o] = offset + n_e + torch.arange(n_o)
    # a group smaller than the largest has RY(0) = I in its top slots: its Kronecker product is
    # kron(I, G), whose leading d_j x d_j block is G
    groups = torch.full((1 + 2 * depth, len(sizes), sizes[0]), zero, dtype=torch.long)
    start = 0
    for j, size in enumerate(sizes):
        groups[:, j, :size] = angle[:, start : start + size]
        start += size
    return _Plan(sizes, groups)


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


def _sublayer_matrices(angles: torch.Tensor, plan: _Plan) -> list[list[torch.Tensor]]:
    """``G[s][j]``: group ``j``'s ``(B, d_j, d_j)`` RY matrix in sub-layer ``s``
    (``kron(RY_{top}, ..., RY_{low})`` of the group's qubits; identity for qubits it skips).

    Every group of every sub-layer in one Kronecker chain over the slots (most significant
    first): ``c - 1`` broadcast products, O(S g 4**c).
    """
    b = angles.shape[0]
    padded = torch.cat((angles, angles.new_zeros(b, 1)), dim=1)
    half = padded[:, plan.angle_index.to(angles.device)] * 0.5  # (B, S, g, c)
    c, s = torch.cos(half), torch.sin(half)
    ry = torch.stack((c, -s, s, c), dim=-1).unflatten(-1, (2, 2))  # (B, S, g, c, 2, 2)
    slots = ry.unbind(-3)
    mat = slots[-1]
    for rot in reversed(slots[:-1]):  # kron(mat, rot): the lower slot is the faster index
        d = mat.shape[-1]
        mat = (mat[..., :, None, :, None] * rot[..., None, :, None, :]).reshape(
            *mat.shape[:-2], 2 * d, 2 * d
        )
    return [
        [g[:, : 1 << size, : 1 << size] for g, size in zip(sub.unbind(1), plan.sizes, strict=True)]
        for sub in mat.unbind(1)
    ]


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
    y: torch.Tensor, mats: list[list[torch.Tensor]], plan: _Plan, n_qubits: int
) -> torch.Tensor:
    """Sub-layers ``1 .. 2L`` (CZ signs, then the RYs) on ``y (B, N / d_0, m, d_0)``."""
    signs = _cz_signs(n_qubits, y.dtype, y.device)
    for s in range(1, len(mats)):
        y = _apply_sublayer(y * signs[(s - 1) % 2], mats[s], plan.sizes)
    return y


def stiefel_columns(angles: torch.Tensor, n_qubits: int, depth: int, k: int) -> torch.Tensor:
    """``pauli_stiefel`` without argument checks, for callers that have checked: ``angles (B, P)``
    -> ``(B, 2**n, k)``."""
    plan = _plan(n_qubits, depth)
    mats = _sublayer_matrices(angles, plan)
    # first RY layer on the basis columns e_j: the Kronecker product over groups of column
    # digit_j(k) of each group's matrix (digit 0 = the lowest group's)
    b = angles.shape[0]
    cols = torch.arange(k, device=angles.device)
    d0 = 1 << plan.sizes[0]
    y = mats[0][0].index_select(2, cols % d0).transpose(1, 2)[:, None]  # (B, 1, k, d0)
    place = d0
    for j in range(1, len(plan.sizes)):
        d = 1 << plan.sizes[j]
        col = mats[0][j].index_select(2, (cols // place) % d)  # (B, d, k)
        y = (col[:, :, None, :, None] * y[:, None]).reshape(b, -1, k, d0)
        place *= d
    y = _entangling_layers(y, mats, plan, n_qubits)
    return y.transpose(2, 3).reshape(b, 1 << n_qubits, k)


def apply_circuit(angles: torch.Tensor, n_qubits: int, depth: int, x: torch.Tensor) -> torch.Tensor:
    """``pauli_apply`` without argument checks: ``angles (B, P)``, ``x (B, 2**n, m)`` -> ``Q x``."""
    plan = _plan(n_qubits, depth)
    mats = _sublayer_matrices(angles, plan)
    b, big_n, m = x.shape
    d0 = 1 << plan.sizes[0]
    y = x.reshape(b, big_n // d0, d0, m).transpose(2, 3)
    y = _apply_sublayer(y, mats[0], plan.sizes)
    y = _entangling_layers(y, mats, plan, n_qubits)
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
    y = stiefel_columns(angles.reshape(-1, angles.shape[-1]), n_qubits, depth, k)
    return y.reshape(*lead, big_n, k)


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
    y = apply_circuit(a, n_qubits, depth, x.expand(*lead, big_n, m).reshape(-1, big_n, m))
    return y.reshape(*lead, big_n, m)


def _log2_exact(name: str, n: int) -> int:
    """log2 of a power of two, else ValueError naming ``name``."""
    check_positive_int(name, n)
    if not is_power_of_two(n):
        raise ValueError(f"{name} must be a power of two, got {n}")
    return int(math.log2(n))

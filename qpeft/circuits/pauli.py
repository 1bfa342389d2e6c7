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

Evaluation never forms ``Q``: the circuit is applied to ``K`` columns held as an ``(N, K)``
tensor.  For speed (Python overhead per gate dominates at these sizes) the one-qubit rotations of
a layer are fused in groups of ``_CHUNK`` adjacent qubits: the group acts as the Kronecker product
of its 2x2 rotations (a ``2**c x 2**c`` matrix built from the angles, cheap), and the CZ gates of
the layer, whose pairs never straddle a group, become a fixed +-1 column scaling of that small
matrix.  One layer is then ``ceil(n / c)`` batched small matmuls on the ``(N, K)`` state:
``O(L * n * N * K * 2**c / c)`` flops with ``c`` a constant, i.e. ``O(L * n * N * K)``.
The first layer, applied to basis columns, is a Kronecker product of its groups' leading columns.
"""

from __future__ import annotations

import functools
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

# Qubits fused per small matmul.  Must be even so that CZ pairs never straddle two groups.
_CHUNK = 4


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


@dataclass(frozen=True)
class _Group:
    """A run of adjacent qubits [start, start + size) rotated together in one sub-layer."""

    start: int
    size: int
    index: torch.Tensor  # (n_sublayers, size) long: angle index of each qubit, low qubit first
    cz: bool  # True when the CZ pairs (start, start+1), (start+2, start+3)... precede the RYs


@dataclass(frozen=True)
class _Plan:
    first: tuple[_Group, ...]  # the first RY layer (one sub-layer)
    even: tuple[_Group, ...]  # the L even sub-layers, stacked along the sub-layer axis
    odd: tuple[_Group, ...]  # the L odd sub-layers


def _groups(
    lo: int, hi: int, chunk: int, offsets: list[int], first_index: int, cz: bool
) -> tuple[_Group, ...]:
    """Split qubits lo..hi-1 into groups of ``chunk``; qubit q of sub-layer s has angle index
    ``offsets[s] + first_index + (q - lo)``."""
    out = []
    for start in range(lo, hi, chunk):
        size = min(chunk, hi - start)
        idx = [[off + first_index + (start - lo) + t for t in range(size)] for off in offsets]
        out.append(_Group(start, size, torch.tensor(idx, dtype=torch.long), cz))
    return tuple(out)


@functools.lru_cache(maxsize=256)
def _plan(n_qubits: int, depth: int, chunk: int) -> _Plan:
    n_e, n_o = _layer_qubits(n_qubits)
    per_layer = n_e + n_o
    offsets = [n_qubits + layer * per_layer for layer in range(depth)]
    first = _groups(0, n_qubits, chunk, [0], 0, cz=False)
    even = _groups(0, n_e, chunk, offsets, 0, cz=True) if depth and n_e else ()
    odd = _groups(1, 1 + n_o, chunk, offsets, n_e, cz=True) if depth and n_o else ()
    return _Plan(first, even, odd)


@tensor_table_cache(maxsize=64)
def _cz_signs(size: int) -> torch.Tensor:
    """+-1 diagonal of CZ on local pairs (0,1),(2,3),... of ``size`` qubits, float64 (2**size,)."""
    i = torch.arange(2**size)
    parity = torch.zeros_like(i)
    for p in range(0, size - 1, 2):
        parity ^= ((i >> p) & 1) & ((i >> (p + 1)) & 1)
    return 1.0 - 2.0 * parity.to(torch.float64)


def _group_matrices(angles: torch.Tensor, groups: tuple[_Group, ...]) -> list[torch.Tensor]:
    """Fused matrices of every group: a list of ``(B, S, 2**size, 2**size)`` from ``(B, P)``.

    ``kron(RY_{start+size-1}, ..., RY_start) @ diag(cz signs)``.  Groups of equal size are built
    together (one gather and one Kronecker chain per size), O(sum S 4**size).
    """
    out: list[torch.Tensor | None] = [None] * len(groups)
    for size in sorted({g.size for g in groups}):
        members = [i for i, g in enumerate(groups) if g.size == size]
        index = torch.cat([groups[i].index for i in members]).to(angles.device)  # (R, size)
        theta = angles[:, index]  # (B, R, size)
        c, s = torch.cos(theta / 2), torch.sin(theta / 2)
        # (B, R, 2, 2, size): rotations [[c, -s], [s, c]] per qubit, low qubit first
        rot = torch.stack((torch.stack((c, -s), 2), torch.stack((s, c), 2)), 2)
        mat = rot[..., size - 1]
        for t in range(size - 2, -1, -1):  # most significant qubit is the leading factor
            d = mat.shape[-1]
            mat = (mat[..., :, None, :, None] * rot[..., None, :, None, :, t]).reshape(
                *mat.shape[:-2], 2 * d, 2 * d
            )
        signs = torch.cat(
            [
                (_cz_signs(size) if groups[i].cz else torch.ones(2**size, dtype=torch.float64))
                .expand(groups[i].index.shape[0], 2**size)
                for i in members
            ]
        )
        if any(groups[i].cz for i in members):  # static: no data-dependent branch
            mat = mat * signs.to(device=mat.device, dtype=mat.dtype)[:, None, :]
        rows = [groups[i].index.shape[0] for i in members]
        for i, m in zip(members, torch.split(mat, rows, dim=1), strict=True):
            out[i] = m
    return out  # type: ignore[return-value]


def _apply_group(x: torch.Tensor, mat: torch.Tensor, start: int) -> torch.Tensor:
    """Apply a ``(B, d, d)`` group matrix acting on qubits [start, start+log2 d) to ``x (B, N, m)``.

    O(N m d) flops, one batched matmul.
    """
    b, n, m = x.shape
    d = mat.shape[-1]
    lo = 1 << start
    xv = x.reshape(b, n // (d * lo), d, lo * m)
    return torch.einsum("bij,bhjr->bhir", mat, xv).reshape(b, n, m)


def _apply_layers(
    plan: _Plan, even: list[torch.Tensor], odd: list[torch.Tensor], x: torch.Tensor, depth: int
) -> torch.Tensor:
    """Apply the L entangling layers (not the first RY layer) to ``x (B, N, m)``."""
    for layer in range(depth):
        for g, mats in zip(plan.even, even, strict=True):
            x = _apply_group(x, mats[:, layer], g.start)
        for g, mats in zip(plan.odd, odd, strict=True):
            x = _apply_group(x, mats[:, layer], g.start)
    return x


def _check_angles(angles: torch.Tensor, n_qubits: int, depth: int) -> int:
    check_positive_int("n_qubits", n_qubits)
    check_positive_int("depth", depth, minimum=0)
    check_float_dtype("angles", angles)
    p = pauli_num_params(n_qubits, depth)
    check_last_dim("angles", angles, p, f"pauli_num_params({n_qubits}, {depth})")
    check_finite("angles", angles)
    return p


def pauli_stiefel(
    angles: torch.Tensor, n_qubits: int, depth: int, k: int, *, chunk: int = _CHUNK
) -> torch.Tensor:
    """First ``k`` columns of the Pauli circuit's orthogonal matrix ``Q``.

    Args:
        angles: ``(..., P)`` with ``P = pauli_num_params(n_qubits, depth)``; float32/float64;
            leading dimensions are a batch of independent circuits.
        n_qubits: ``n >= 1``; ``N = 2**n``.
        depth: ``L >= 0`` entangling layers.
        k: number of columns, ``1 <= k <= N``.
        chunk: qubits fused per small matmul (even, >= 2); a speed knob, the result is the same.

    Returns:
        ``(..., N, k)`` with orthonormal columns, dtype of ``angles``.
        Cost ``O(L n N k)`` time and ``O(N k)`` memory per circuit; ``Q`` is never formed.
    """
    _check_angles(angles, n_qubits, depth)
    big_n = 1 << n_qubits
    check_in_range("k", k, 1, big_n)
    check_positive_int("chunk", chunk, minimum=2)
    if chunk % 2:
        raise ValueError(f"chunk must be even (CZ pairs may not straddle groups), got {chunk}")
    lead = angles.shape[:-1]
    a = angles.reshape(-1, angles.shape[-1])
    plan = _plan(n_qubits, depth, chunk)
    mats = _group_matrices(a, plan.first + plan.even + plan.odd)
    nf, ne = len(plan.first), len(plan.even)
    first, even, odd = mats[:nf], mats[nf : nf + ne], mats[nf + ne :]
    # First RY layer on basis columns e_0..e_{k-1}: (kron of the groups' matrices)[:, :k],
    # built low group first, keeping only the columns that can reach the first k.
    y = a.new_ones(a.shape[0], 1, 1)
    for mat in first:
        mat = mat[:, 0]  # (B, d, d)
        d = mat.shape[-1]
        cols = y.shape[-1]
        need = min(d, -(-k // cols))
        mat = mat[:, :, :need]
        rows = y.shape[-2]
        y = (mat[:, :, None, :, None] * y[:, None, :, None, :]).reshape(-1, d * rows, need * cols)
        y = y[:, :, :k]
    y = _apply_layers(plan, even, odd, y, depth)
    return y.reshape(*lead, big_n, k)


def pauli_apply(
    angles: torch.Tensor, n_qubits: int, depth: int, x: torch.Tensor, *, chunk: int = _CHUNK
) -> torch.Tensor:
    """``Q @ x`` for the Pauli circuit ``Q`` and any ``x``.

    Args:
        angles: ``(..., P)`` as in ``pauli_stiefel``.
        x: ``(..., N, m)``, same leading shape as ``angles`` (or broadcastable to it) and dtype.

    Returns:
        ``(..., N, m)``.  Cost ``O((L + 1) n N m)``; ``Q`` is never formed.
    """
    _check_angles(angles, n_qubits, depth)
    big_n = 1 << n_qubits
    check_float_dtype("x", x)
    if x.dim() < 2 or x.shape[-2] != big_n:
        raise ValueError(f"x must have shape (..., {big_n}, m), got {tuple(x.shape)}")
    if x.dtype != angles.dtype:
        raise ValueError(f"x dtype {x.dtype} must match angles dtype {angles.dtype}")
    check_positive_int("chunk", chunk, minimum=2)
    if chunk % 2:
        raise ValueError(f"chunk must be even (CZ pairs may not straddle groups), got {chunk}")
    try:
        lead = torch.broadcast_shapes(angles.shape[:-1], x.shape[:-2])
    except RuntimeError as err:
        raise ValueError(
            f"leading shapes of angles {tuple(angles.shape)} and x {tuple(x.shape)} "
            "do not broadcast"
        ) from err
    m = x.shape[-1]
    a = angles.expand(*lead, angles.shape[-1]).reshape(-1, angles.shape[-1])
    y = x.expand(*lead, big_n, m).reshape(-1, big_n, m)
    plan = _plan(n_qubits, depth, chunk)
    mats = _group_matrices(a, plan.first + plan.even + plan.odd)
    nf, ne = len(plan.first), len(plan.even)
    for g, mat in zip(plan.first, mats[:nf], strict=True):
        y = _apply_group(y, mat[:, 0], g.start)
    y = _apply_layers(plan, mats[nf : nf + ne], mats[nf + ne :], y, depth)
    return y.reshape(*lead, big_n, m)


def _log2_exact(name: str, n: int) -> int:
    """log2 of a power of two, else ValueError naming ``name``."""
    check_positive_int(name, n)
    if not is_power_of_two(n):
        raise ValueError(f"{name} must be a power of two, got {n}")
    return int(math.log2(n))

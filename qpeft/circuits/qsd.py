"""Orthogonal circuits on any dimension N: a binary cosine-sine (quantum-Shannon-type) split.

Construction (papers.md section 1, "Any N"; the paper's own construction is unreadable, this is
qpeft's design).  ``Q_N`` is the ``N x N`` orthogonal matrix

* ``N = 1``: ``Q = [[1]]`` (no parameters);
* ``N = 2**n`` (n >= 1): the Pauli circuit on n qubits (``qpeft.circuits.pauli``), so the
  generalized circuit *is* the Pauli circuit when N is a power of two (same angle layout);
* otherwise ``N = N1 + N2`` with ``N1`` the largest power of two below ``N`` (``N2 < N1``)::

      Q_N = (A1 (+) A2) . CS(phi) . (B1 (+) I_{N2})

  ``A1``, ``B1``: Pauli circuits on ``log2 N1`` qubits (depth L); ``A2 = Q_{N2}`` recursively;
  ``CS(phi)``: Givens rotations on the row pairs ``(i, N1 + i)``, ``i < N2``, all with the one
  angle ``phi`` (``x_i -> c x_i - s x_j``, ``x_j -> s x_i + c x_j``, the ``givens.py``
  convention).  The bottom-right input factor is the identity rather than a second recursive
  circuit: a second recursive factor per level would make the count grow like ``2**levels``
  (``O(N)`` for N = 2**m - 1) instead of ``O(L log**2 N)``.

The recursion follows the binary digits of N: one level per 1-bit, so at most ``log2 N`` levels,
each with two Pauli circuits of ``<= log2 N`` qubits, giving
``generalized_num_params = O(L log**2 N)`` (e.g. L = 1: N = 768 -> 73, N = 1000 -> 202, N = 997 -> 204).

Angle layout of ``Q_N`` (non power of two): ``[B1 | phi | A1 | A2]``.

Every angle influences the first k columns for every ``k >= 1`` (column 0 passes through B1,
CS rotates its head into the bottom block, A1 and A2 act on non-zero blocks; an RY or Givens
generator never annihilates a non-zero vector), so the count does not depend on k and
``generalized_num_params(n, k, L)`` is exactly the number of angles ``generalized_stiefel``
consumes.  When ``k <= N1`` the identity input block only meets zero rows and is skipped.

Cost of ``generalized_stiefel``: ``O(L N k log N)`` time, ``O(N k)`` memory (never ``N x N``
unless ``k = N``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from qpeft.circuits._cache import tensor_table_cache
from qpeft.circuits._checks import (
    check_finite,
    check_float_dtype,
    check_in_range,
    check_last_dim,
    check_positive_int,
)
from qpeft.circuits.pauli import (
    circuit_apply,
    circuit_columns,
    circuit_matrices,
    is_power_of_two,
    pauli_num_params,
)

__all__ = [
    "generalized_num_params",
    "generalized_stiefel",
    "generalized_stiefel_many",
    "generalized_apply",
    "split_sizes",
]


def split_sizes(n: int) -> tuple[int, int]:
    """``(N1, N2)`` with ``N1`` the largest power of two ``< n`` and ``N2 = n - N1``.

    Only for ``n >= 3`` not a power of two.  O(1).
    """
    check_positive_int("n", n, minimum=3)
    if is_power_of_two(n):
        raise ValueError(f"n must not be a power of two to be split, got {n}")
    n1 = 1 << (n.bit_length() - 1)
    return n1, n - n1


@functools.lru_cache(maxsize=4096)
def _count(n: int, depth: int) -> int:
    if n == 1:
        return 0
    if is_power_of_two(n):
        return pauli_num_params(n.bit_length() - 1, depth)
    n1, n2 = split_sizes(n)
    return 2 * _count(n1, depth) + 1 + _count(n2, depth)


def generalized_num_params(n: int, k: int, depth: int) -> int:
    """Number of angles of the generalized circuit's first k columns on dimension ``n``.

    Equals ``pauli_num_params(log2 n, depth)`` for a power of two; independent of ``k`` (every
    factor always influences the output, see the module docstring).  ``O(log n)``.
    """
    check_positive_int("n", n)
    check_in_range("k", k, 1, n)
    check_positive_int("depth", depth, minimum=0)
    return _count(n, depth)


def _qubits(n: int) -> int:
    return n.bit_length() - 1


@functools.lru_cache(maxsize=4096)
def _layout(n: int, depth: int, offset: int = 0) -> tuple[tuple[tuple[int, int], ...], tuple[int, ...]]:
    """``(circuits, phis)`` of ``Q_n``'s angle vector (starting at ``offset``), in the order
    ``_stiefel``/``_apply`` consume them: each level's ``B1`` then ``A1`` as ``(qubits, offset)``,
    then the levels of ``A2``; ``phis``: the index of each level's ``phi``.  O(log n)."""
    if n == 1:
        return (), ()
    if is_power_of_two(n):
        return ((_qubits(n), offset),), ()
    n1, n2 = split_sizes(n)
    p1 = _count(n1, depth)
    circuits, phis = _layout(n2, depth, offset + 2 * p1 + 1)
    return ((_qubits(n1), offset), (_qubits(n1), offset + p1 + 1), *circuits), (offset + p1, *phis)


@tensor_table_cache(maxsize=256)
def _phi_index(phis: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The CS angles' positions as a long tensor on ``device`` (built once, not per forward)."""
    return torch.tensor(phis, dtype=torch.long, device=device)


class _Factors:
    """Every Pauli circuit matrix and every CS angle of one or more ``Q_n`` (``dims``: their
    ``(n, offset)`` in ``a``), built in one go (``circuit_matrices``: one Kronecker chain),
    handed out in the recursion's order, one ``Q_n`` after the other."""

    def __init__(self, a: torch.Tensor, dims: tuple[tuple[int, int], ...], depth: int) -> None:
        self.angles = a
        layouts = [_layout(n, depth, offset) for n, offset in dims]
        circuits = tuple(c for layout in layouts for c in layout[0])
        phis = tuple(p for layout in layouts for p in layout[1])
        self.mats = iter(circuit_matrices(a, circuits, depth) if circuits else ())
        phi = a[:, _phi_index(phis, a.device)][:, :, None, None]  # (B, levels, 1, 1)
        self.cos, self.sin = iter(torch.cos(phi).unbind(1)), iter(torch.sin(phi).unbind(1))

    def circuit(self) -> list[list[torch.Tensor]]:
        return next(self.mats)

    def cosine_sine(self) -> tuple[torch.Tensor, torch.Tensor]:
        return next(self.cos), next(self.sin)


def _cosine_sine(
    top: torch.Tensor, bottom: torch.Tensor, c: torch.Tensor, s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``CS(phi)`` on the row pairs ``(i, N1 + i)``, ``i < N2``: ``top (B, N1, m)`` and
    ``bottom (B, N2, m)`` -> the rotated pair."""
    n2 = bottom.shape[1]
    head, tail = torch.split(top, [n2, top.shape[1] - n2], dim=1)
    return torch.cat((c * head - s * bottom, tail), dim=1), s * head + c * bottom


def _apply(f: _Factors, n: int, x: torch.Tensor) -> torch.Tensor:
    """``Q_n @ x`` for ``x (B, n, m)``, taking the circuits and angles from ``f``."""
    if n == 1:
        return x
    if is_power_of_two(n):
        return circuit_apply(f.circuit(), _qubits(n), x)
    n1, n2 = split_sizes(n)
    b1, a1, (c, s) = f.circuit(), f.circuit(), f.cosine_sine()
    top, bottom = torch.split(x, [n1, n2], dim=1)
    top, bottom = _cosine_sine(circuit_apply(b1, _qubits(n1), top), bottom, c, s)
    return torch.cat((circuit_apply(a1, _qubits(n1), top), _apply(f, n2, bottom)), dim=1)


def _stiefel(f: _Factors, n: int, k: int) -> torch.Tensor:
    """``Q_n[:, :k]``: ``(B, n, k)``, taking the circuits and angles from ``f``."""
    if n == 1:
        return f.angles.new_ones(f.angles.shape[0], 1, 1)
    if is_power_of_two(n):
        return circuit_columns(f.circuit(), _qubits(n), k)
    n1, n2 = split_sizes(n)
    b1, a1, (c, s) = f.circuit(), f.circuit(), f.cosine_sine()
    if k <= n1:  # (B1 (+) I)[:, :k] = [B1[:, :k]; 0]: the identity block meets zeros only
        head, tail = torch.split(circuit_columns(b1, _qubits(n1), k), [n2, n1 - n2], 1)
        top, bottom = torch.cat((c * head, tail), dim=1), s * head
    else:
        full = circuit_columns(b1, _qubits(n1), n1)  # (B, n1, n1)
        bsz = full.shape[0]
        top = torch.cat((full, full.new_zeros(bsz, n1, k - n1)), dim=2)
        eye = torch.eye(n2, k - n1, dtype=full.dtype, device=full.device).expand(bsz, n2, k - n1)
        bottom = torch.cat((full.new_zeros(bsz, n2, n1), eye), dim=2)
        top, bottom = _cosine_sine(top, bottom, c, s)
    return torch.cat((circuit_apply(a1, _qubits(n1), top), _apply(f, n2, bottom)), dim=1)


def _check(angles: torch.Tensor, n: int, k: int, depth: int, values: bool = True) -> None:
    p = generalized_num_params(n, k, depth)
    check_float_dtype("angles", angles)
    check_last_dim("angles", angles, p, f"generalized_num_params({n}, {k}, {depth})")
    if values:
        check_finite("angles", angles)


def generalized_stiefel(
    angles: torch.Tensor, n: int, k: int, depth: int, *, check_values: bool = True
) -> torch.Tensor:
    """First ``k`` columns of the generalized orthogonal circuit ``Q_n`` (any ``n >= 1``).

    Args:
        angles: ``(..., P)``, ``P = generalized_num_params(n, k, depth)``, float32/float64;
            leading dimensions batch independent circuits.
        n: dimension ``N >= 1``; k: ``1 <= k <= n``; depth: Pauli depth ``L >= 0``.
        check_values: refuse NaN/inf angles (see ``pauli_stiefel``).

    Returns:
        ``(..., n, k)`` with orthonormal columns, dtype of ``angles``; identical to
        ``pauli_stiefel`` when n is a power of two.  ``O(L n k log**2 n)`` time.
    """
    _check(angles, n, k, depth, check_values)
    lead = angles.shape[:-1]
    a = angles.reshape(math.prod(lead), angles.shape[-1])
    return _stiefel(_Factors(a, ((n, 0),), depth), n, k).reshape(*lead, n, k)


def generalized_stiefel_many(
    angles: Sequence[torch.Tensor], dims: Sequence[int], k: int, depth: int
) -> list[torch.Tensor]:
    """``[generalized_stiefel(a, n, k, depth) for a, n in zip(angles, dims)]`` with every Pauli
    circuit of every factor built in one Kronecker chain (fewer, larger operations: the two
    sides of a non-square adapter layer).  ``angles[i]``: ``(P_i,)``; no NaN check (the layers'
    forward path).  Returns ``(n_i, k)`` tensors."""
    if len(angles) != len(dims):
        raise ValueError(f"got {len(angles)} angle vectors for {len(dims)} dims")
    offsets, total = [], 0
    for a, n in zip(angles, dims, strict=True):
        _check(a, n, k, depth, values=False)
        offsets.append(total)
        total += a.shape[-1]
    flat = torch.cat(tuple(angles))[None]
    factors = _Factors(flat, tuple(zip(dims, offsets, strict=True)), depth)
    return [_stiefel(factors, n, k)[0] for n in dims]


def generalized_apply(angles: torch.Tensor, n: int, depth: int, x: torch.Tensor) -> torch.Tensor:
    """``Q_n @ x`` for ``x (..., n, m)`` with the same leading shape as ``angles (..., P)``.

    ``P = generalized_num_params(n, 1, depth)``.  ``O(L n m log**2 n)`` time.
    """
    _check(angles, n, 1, depth)
    check_float_dtype("x", x)
    if x.dim() < 2 or x.shape[-2] != n or x.shape[:-2] != angles.shape[:-1]:
        raise ValueError(
            f"x must have shape {(*angles.shape[:-1], n, 'm')}, got {tuple(x.shape)}"
        )
    if x.dtype != angles.dtype:
        raise ValueError(f"x dtype {x.dtype} must match angles dtype {angles.dtype}")
    lead = angles.shape[:-1]
    a = angles.reshape(math.prod(lead), angles.shape[-1])
    y = _apply(_Factors(a, ((n, 0),), depth), n, x.reshape(-1, n, x.shape[-1]))
    return y.reshape(*lead, n, x.shape[-1])

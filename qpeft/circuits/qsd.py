"""Orthogonal circuits on any dimension N: a binary cosine-sine (quantum-Shannon-type) split.

Construction (docs/methods/quantum_peft.md, "Any N"; the paper's own construction is unreadable, this is
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

from qpeft.circuits._checks import (
    check_finite,
    check_float_dtype,
    check_in_range,
    check_last_dim,
    check_positive_int,
)
from qpeft.circuits.pauli import (
    Step,
    _identity_columns,
    _stacked_identity_columns,
    is_power_of_two,
    pauli_num_params,
    run_program,
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
def _program(n: int, depth: int, offset: int = 0, row: int = 0) -> tuple[Step, ...]:
    """``Q_n`` as a program of ``pauli.run_program`` on rows ``row .. row + n`` reading its
    angles from ``offset`` on: ``B1`` on the top ``N1`` rows, the cosine-sine step, ``A1`` on the
    top rows, then ``A2``'s program on the bottom ``N2`` rows (``A1`` and ``A2`` touch disjoint
    rows, so their order is free).  ``3 levels + 1`` steps at most, O(log n)."""
    if n == 1:
        return ()
    if is_power_of_two(n):
        return (("circuit", _qubits(n), offset, row),)
    n1, n2 = split_sizes(n)
    p1, q1 = _count(n1, depth), _qubits(n1)
    return (
        ("circuit", q1, offset, row),
        ("cs", offset + p1, row, n1, n2),
        ("circuit", q1, offset + p1 + 1, row),
        *_program(n2, depth, offset + 2 * p1 + 1, row + n1),
    )


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
    x = _identity_columns(a.shape[0], n, k, a)
    return run_program(a, x, _program(n, depth), depth).reshape(*lead, n, k)


def generalized_stiefel_many(
    angles: Sequence[torch.Tensor], dims: Sequence[int], k: int, depth: int
) -> list[torch.Tensor]:
    """``[generalized_stiefel(a, n, k, depth) for a, n in zip(angles, dims)]`` as one program on
    the factors' stacked rows (one autograd node, every circuit's matrices from one gather:
    the two sides of a non-square adapter layer).  ``angles[i]``: ``(P_i,)``; no NaN check (the
    layers' forward path).  Returns ``(n_i, k)`` tensors, views of one ``(sum n_i, k)``."""
    if len(angles) != len(dims):
        raise ValueError(f"got {len(angles)} angle vectors for {len(dims)} dims")
    program: tuple[Step, ...] = ()
    offset, row = 0, 0
    for a, n in zip(angles, dims, strict=True):
        _check(a, n, k, depth, values=False)
        program += _program(n, depth, offset, row)
        offset, row = offset + a.shape[-1], row + n
    flat = torch.cat(tuple(angles))[None]
    x = _stacked_identity_columns(tuple(dims), k, flat.dtype, flat.device)[None]
    return list(run_program(flat, x, program, depth)[0].split(list(dims)))


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
    y = run_program(a, x.reshape(-1, n, x.shape[-1]), _program(n, depth), depth)
    return y.reshape(*lead, n, x.shape[-1])

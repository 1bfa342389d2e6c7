"""One entry point for the Stiefel factors of Quantum-PEFT: method name -> ``(n, k)`` orthonormal
columns from a flat parameter vector.

Methods (``STIEFEL_METHODS``):

* ``"pauli"``: RY+CZ circuit on ``log2 n`` qubits (``n`` a power of two), ``n + 2L(n-1)``
  angles with ``n`` qubits, i.e. ``O(L log n)`` numbers;
* ``"generalized"``: any ``n`` (binary cosine-sine split, ``O(L log**2 n)`` numbers), equal to
  ``"pauli"`` for powers of two;
* ``"lie_exp"`` / ``"lie_cayley"`` / ``"lie_taylor"``: ``exp`` / Cayley / truncated Taylor of a
  Stiefel-restricted skew generator, ``n k - k(k+1)/2`` numbers (``depth`` unused).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from qpeft.circuits._checks import check_choice, check_in_range, check_positive_int
from qpeft.circuits.lie import lie_stiefel, lie_stiefel_num_params
from qpeft.circuits.pauli import is_power_of_two, pauli_num_params, pauli_stiefel
from qpeft.circuits.qsd import (
    generalized_num_params,
    generalized_stiefel,
    generalized_stiefel_many,
)

__all__ = [
    "STIEFEL_METHODS",
    "stiefel_num_params",
    "stiefel",
    "stiefel_pair",
    "stiefel_many",
    "stiefel_init",
    "stack_params",
]

STIEFEL_METHODS = ("pauli", "generalized", "lie_exp", "lie_cayley", "lie_taylor")
_LIE = {"lie_exp": "exp", "lie_cayley": "cayley", "lie_taylor": "taylor"}


def _check(method: object, n: int, k: int, depth: int) -> None:
    check_choice("method", method, STIEFEL_METHODS)
    check_positive_int("n", n)
    check_in_range("k", k, 1, n)
    check_positive_int("depth", depth, minimum=0)
    if method == "pauli" and not is_power_of_two(n):
        raise ValueError(
            f"method 'pauli' needs n a power of two, got n={n}; use method='generalized' "
            "for any n"
        )


def stiefel_num_params(method: str, n: int, k: int, depth: int) -> int:
    """Number of parameters of one ``(n, k)`` Stiefel factor under ``method``.  O(log n)."""
    _check(method, n, k, depth)
    if method == "pauli":
        return pauli_num_params(int(math.log2(n)), depth) if n > 1 else 0
    if method == "generalized":
        return generalized_num_params(n, k, depth)
    return lie_stiefel_num_params(n, k)


def stiefel(
    method: str,
    params: torch.Tensor,
    n: int,
    k: int,
    depth: int,
    *,
    taylor_order: int = 8,
    check_values: bool = True,
) -> torch.Tensor:
    """``(..., n, k)`` orthonormal columns from ``params (..., P)``.

    ``P = stiefel_num_params(method, n, k, depth)``; leading dimensions batch independent
    factors; dtype is preserved (float32/float64).  Cost: ``O(L n k sqrt n)`` for the circuits
    (times ``log n`` for generalized), ``O(n k**2)`` for the Lie maps; never an ``n x n``
    matrix.  ``check_values=False`` skips the NaN/inf check of ``params`` (a device sync on
    accelerators; the adapter layers skip it in their forward).
    """
    _check(method, n, k, depth)
    if method == "pauli":
        if n == 1:  # zero qubits: the 1x1 identity, no parameters
            return generalized_stiefel(params, n, k, depth, check_values=check_values)
        return pauli_stiefel(params, int(math.log2(n)), depth, k, check_values=check_values)
    if method == "generalized":
        return generalized_stiefel(params, n, k, depth, check_values=check_values)
    return lie_stiefel(
        params, n, k, method=_LIE[method], taylor_order=taylor_order, check_values=check_values
    )


def stiefel_pair(
    methods: tuple[str, str],
    params: tuple[torch.Tensor, torch.Tensor],
    dims: tuple[int, int],
    k: int,
    depth: int,
    *,
    taylor_order: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both Stiefel factors of one adapter: ``(stiefel(methods[0], params[0], dims[0], k, depth),
    stiefel(methods[1], ...))``, evaluated together where that saves work, without the NaN check
    (the layers' forward path: a check is a device sync per layer).

    ``params[i]``: ``(P_i,)``.  Two circuit factors of the same shape run as one batch; two
    circuit factors of different shapes share one Kronecker chain for all their circuits'
    matrices; anything else is evaluated one factor at a time.  Same values as two ``stiefel``
    calls (float rounding aside).
    """
    circuits = ("pauli", "generalized")
    (m0, m1), (p0, p1), (n0, n1) = methods, params, dims
    both_circuits = m0 in circuits and m1 in circuits and p0.numel() and p1.numel()
    if both_circuits and n0 == n1:
        for method, n in zip(methods, dims, strict=True):
            _check(method, n, k, depth)
        u, v = generalized_stiefel(torch.stack(params), n0, k, depth, check_values=False)
        return u, v
    if both_circuits:
        for method, n in zip(methods, dims, strict=True):
            _check(method, n, k, depth)
        u, v = generalized_stiefel_many(params, dims, k, depth)
        return u, v
    u, v = (
        stiefel(m, p, n, k, depth, taylor_order=taylor_order, check_values=False)
        for m, p, n in zip(methods, params, dims, strict=True)
    )
    return u, v


def stiefel_many(
    methods: Sequence[str],
    params: Sequence[torch.Tensor],
    dims: Sequence[int],
    k: int,
    depth: int,
    *,
    scales: Sequence[float] | None = None,
    columns: Sequence[tuple[torch.Tensor, float] | None] | None = None,
    append: Sequence[torch.Tensor | None] | None = None,
) -> list[torch.Tensor]:
    """``[stiefel(m, p, n, k, depth) for m, p, n in zip(methods, params, dims)]`` for circuit
    methods (``"pauli"`` / ``"generalized"``), one batched call per (method, width): ``B``
    factors of one width cost about one factor's op count (the dispatch), ``B`` times its
    arithmetic. ``params[i]``: ``(P_i,)``, all one dtype and device; no NaN check (the layers'
    forward path). Same values as one ``stiefel`` call each, float rounding aside.

    Optional, applied once per batch rather than once per factor (the dispatched operations of
    a step, not the arithmetic, are what they save): ``scales[i]``, a gain on factor ``i``'s
    parameters (the circuit runs on ``scales[i] * params[i]``); ``columns[i] = (c, s)``, factor
    ``i``'s columns multiplied by ``c * s`` (``c``: ``(k,)``, same dtype and device; ``s`` a
    float), ``None``: unscaled. Each product has the value of the same product per factor
    (``scales[i] * params[i]``, ``factor * (c * s)``): elementwise, same operands.
    ``append[i]``: ``(n, k_a)`` columns placed after factor ``i``'s (``(n, k + k_a)``), one
    concatenation per batch; constants (no gradient is sent to them); given for every factor
    of a width or for none of them."""
    if not len(methods) == len(params) == len(dims):
        raise ValueError(
            f"got {len(methods)} methods, {len(params)} parameter vectors and {len(dims)} dims"
        )
    batches: dict[tuple[str, int], list[int]] = {}
    for i, (method, n) in enumerate(zip(methods, dims, strict=True)):
        if method not in ("pauli", "generalized"):
            raise ValueError(f"stiefel_many batches circuit methods only, got {method!r}")
        _check(method, n, k, depth)
        batches.setdefault((method, n), []).append(i)
    factors: list[torch.Tensor | None] = [None] * len(params)
    for (method, n), members in batches.items():
        # equal gains next to each other: each distinct value is one fill (no host data)
        members.sort(key=lambda i: (1.0 if scales is None else scales[i],
                                    1.0 if columns is None or columns[i] is None else columns[i][1]))
        stacked = stack_params([params[i] for i in members])
        if scales is not None:
            stacked = _times(stacked, [scales[i] for i in members])
        out = stiefel(method, stacked, n, k, depth, check_values=False)
        if columns is not None and any(columns[i] is not None for i in members):
            cols = [columns[i] for i in members]
            ones = next(c for c, _ in filter(None, cols)).new_ones(k)
            stacked_cols = stack_params([ones if c is None else c[0] for c in cols])
            stacked_cols = _times(stacked_cols, [1.0 if c is None else c[1] for c in cols])
            out = out * stacked_cols.unsqueeze(1)
        if append is not None and append[members[0]] is not None:
            out = torch.cat([out, torch.stack([append[i] for i in members])], dim=2)
        for i, factor in zip(members, out.unbind(0), strict=True):
            factors[i] = factor
    return factors  # type: ignore[return-value]


def stack_params(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(tensors)`` [len, ...] for a batched generation over many layers' parameters:
    its backward hands each tensor its gradient with one ``unbind`` (autograd's stack does one
    ``select`` per tensor). Same values and gradients; fewer dispatched operations."""
    return _Stack.apply(*tensors)


class _Stack(torch.autograd.Function):
    """``torch.stack(tensors)`` whose backward splits the gradient with one ``unbind`` rather
    than one ``select`` per tensor (autograd's): the same gradients, fewer dispatched
    operations per factor."""

    @staticmethod
    def forward(ctx: object, *tensors: torch.Tensor) -> torch.Tensor:
        return torch.stack(tensors)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return grad.unbind(0)


def _times(stacked: torch.Tensor, gains: list[float]) -> torch.Tensor:
    """Row ``b`` of ``stacked`` times ``gains[b]``: one product, none when every gain is 1; a
    common gain multiplies as a Python number, as ``row * gain`` would. Otherwise the gains'
    column is built on ``stacked``'s device, one fill per run of equal gains (no host-to-device
    copy, which ``torch.tensor`` would be), the same numbers as ``torch.tensor(gains)``."""
    if all(g == gains[0] for g in gains):
        return stacked if gains[0] == 1.0 else stacked * gains[0]
    runs: list[tuple[float, int]] = []
    for g in gains:
        if runs and runs[-1][0] == g:
            runs[-1] = (g, runs[-1][1] + 1)
        else:
            runs.append((g, 1))
    column = torch.cat([stacked.new_full((count,), g) for g, count in runs])
    return stacked * column.view(-1, *([1] * (stacked.dim() - 1)))


def stiefel_init(
    method: str,
    n: int,
    k: int,
    depth: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A generic random starting point ``(P,)`` for ``stiefel(method, ., n, k, depth)``.

    Circuits: angles i.i.d. uniform on ``(-pi, pi)``.  Lie maps: ``C`` and ``B`` entries
    i.i.d. ``N(0, 1/n)`` (columns of ``B`` have norm about 1, a rotation of order one radian;
    generic, away from the degenerate ``B = 0``).  Drawn in float64 on CPU from ``generator``,
    then cast, so the values do not depend on ``dtype``.
    """
    p = stiefel_num_params(method, n, k, depth)
    if dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    if method in ("pauli", "generalized"):
        x = (torch.rand(p, generator=generator, dtype=torch.float64) * 2 - 1) * math.pi
    else:
        x = torch.randn(p, generator=generator, dtype=torch.float64) / math.sqrt(n)
    return x.to(dtype)

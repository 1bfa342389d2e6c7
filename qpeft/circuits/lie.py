"""Skew-symmetric generators -> orthogonal matrices, and the Lie-algebra Stiefel map.

Dense maps on ``(..., n, n)`` skew ``S``: ``cayley`` (``(I - S)(I + S)^-1``), ``expm_orthogonal``
(``exp(S)``) and ``taylor_orthogonal`` (truncated Taylor series of ``exp``, approximate).

``lie_stiefel`` (docs/methods/quantum_peft.md, "Lie-algebra / Taylor parameterization") returns
``f(S)[:, :k]`` for ``S = [[C, -B^T], [B, 0]]``, ``C`` in so(k), ``B`` in R^{(n-k) x k}, with
``f`` = exp, Cayley or truncated Taylor, in ``O(n k**2 + k**3)`` and without forming ``S``:

    The subspace ``{[a; B b] : a, b in R^{k x k}}`` contains ``E = [I_k; 0]`` and is invariant
    under ``S``: ``S [a; B b] = [C a - G b; B a]`` with the Gram matrix ``G = B^T B``.  So
    ``S`` acts on the pair ``(a, b)`` as the ``2k x 2k`` matrix ``T = [[C, -G], [I, 0]]`` and,
    for every polynomial or rational ``f`` defined on the spectrum,
    ``f(S) E = [a; B b]`` with ``[a; b] = f(T) [I; 0]``.

No QR of ``B`` is needed, so ``B = 0`` (or rank-deficient ``B``) has well-defined gradients.
``T`` is balanced by the similarity ``diag(I, s I)``, ``s = 1 / |B|_F`` (clamped; a constant
of the computation, detached; the result does not depend on it), which keeps the ``2k x 2k``
matrix as well scaled as ``S`` itself.  The spectrum of ``T`` is purely imaginary (quadratic
eigenproblem ``l**2 x - l C x + G x = 0`` with ``C`` skew, ``G >= 0``), so ``I + T`` is always
invertible for Cayley.

Parameter layout of ``lie_stiefel``: the ``k(k-1)/2`` strictly-upper entries of ``C``
(row-major), then ``B`` row-major: ``n k - k(k+1)/2`` numbers.
"""

from __future__ import annotations

import math

import torch

from qpeft.circuits._checks import (
    check_choice,
    check_finite,
    check_float_dtype,
    check_in_range,
    check_last_dim,
    check_positive_int,
)

__all__ = [
    "skew",
    "cayley",
    "expm_orthogonal",
    "taylor_orthogonal",
    "lie_stiefel_num_params",
    "lie_stiefel",
    "LIE_METHODS",
]

LIE_METHODS = ("exp", "cayley", "taylor")


def _check_square(name: str, m: torch.Tensor, values: bool = True) -> None:
    """dtype and shape; with ``values`` also finiteness (a reduction read back: a device sync
    on an accelerator)."""
    check_float_dtype(name, m)
    if m.dim() < 2 or m.shape[-1] != m.shape[-2]:
        raise ValueError(f"{name} must have shape (..., n, n), got {tuple(m.shape)}")
    if values:
        check_finite(name, m)


def _check_skew(name: str, s: torch.Tensor, values: bool = True) -> None:
    """:func:`_check_square`, and with ``values`` skew-symmetry (two more read-backs)."""
    _check_square(name, s, values)
    if not values or torch.compiler.is_compiling() or s.numel() == 0:
        return
    s = s.detach()
    scale = max(1.0, float(s.abs().max()))
    err = float((s + s.transpose(-1, -2)).abs().max())
    tol = 100 * torch.finfo(s.dtype).eps * scale
    if err > tol:
        raise ValueError(f"{name} must be skew-symmetric: max|S + S^T| = {err:.3g} > {tol:.3g}")


def _eye_like(m: torch.Tensor) -> torch.Tensor:
    return torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)


def skew(p: torch.Tensor) -> torch.Tensor:
    """``(p - p^T) / 2`` of ``p (..., n, n)``: the skew-symmetric part.  O(n**2)."""
    _check_square("p", p)
    return (p - p.transpose(-1, -2)) / 2


def cayley(s: torch.Tensor) -> torch.Tensor:
    """Cayley map ``(I - S)(I + S)^-1`` of skew ``s (..., n, n)``: orthogonal, ``(..., n, n)``.

    ``I + S`` is invertible for every skew ``S``.  One linear solve, O(n**3).
    """
    _check_skew("s", s)
    eye = _eye_like(s)
    return torch.linalg.solve(eye + s, eye - s)  # the two factors commute


def _matrix_exp(x: torch.Tensor) -> torch.Tensor:
    """``torch.linalg.matrix_exp``, evaluated in float64 below float64 and cast back: torch's
    float32 kernel is off by up to ~5e-5 on small rotation generators (e.g. the 2 x 2
    [[0, -0.58], [0.58, 0]]), 400x float32's rounding.  The matrices here are small (n x n
    blocks, 2K x 2K), so the float64 cost is negligible."""
    if x.dtype == torch.float64:
        return torch.linalg.matrix_exp(x)
    return torch.linalg.matrix_exp(x.double()).to(x.dtype)


def expm_orthogonal(s: torch.Tensor, *, check_values: bool = True) -> torch.Tensor:
    """Matrix exponential of skew ``s (..., n, n)``: orthogonal ``(..., n, n)``, O(n**3).
    ``check_values=False`` skips the checks that read values (finite, skew: device syncs on an
    accelerator), for callers whose ``s`` is skew by construction; dtype and shape are checked."""
    _check_skew("s", s, check_values)
    return _matrix_exp(s)


def taylor_orthogonal(s: torch.Tensor, order: int) -> torch.Tensor:
    """``sum_{j <= order} S**j / j!`` for skew ``s (..., n, n)`` (Horner), O(order n**3).

    Approximate: ``|exp(S) - result| <= |S|**(order+1) / (order+1)! * exp(|S|)``, so it is only
    orthogonal up to that error.
    """
    _check_skew("s", s)
    check_positive_int("order", order)
    eye = _eye_like(s)
    out = eye.expand_as(s)
    for j in range(order, 0, -1):
        out = eye + (s @ out) / j
    return out


def lie_stiefel_num_params(n: int, k: int) -> int:
    """``n k - k (k + 1) / 2``: ``C`` in so(k) plus ``B`` in R^{(n-k) x k}.  O(1)."""
    check_positive_int("n", n)
    check_in_range("k", k, 1, n)
    return n * k - k * (k + 1) // 2


def _unpack(params: torch.Tensor, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C (B, k, k), B (B, n-k, k))`` from params ``(B, P)``."""
    nc = k * (k - 1) // 2
    bsz = params.shape[0]
    iu = torch.triu_indices(k, k, offset=1, device=params.device)
    flat = iu[0] * k + iu[1]
    upper = params.new_zeros(bsz, k * k).index_copy(1, flat, params[:, :nc]).reshape(bsz, k, k)
    c = upper - upper.transpose(-1, -2)
    b = params[:, nc:].reshape(bsz, n - k, k)
    return c, b


def lie_stiefel(
    params: torch.Tensor,
    n: int,
    k: int,
    method: str = "exp",
    taylor_order: int = 8,
    *,
    check_values: bool = True,
) -> torch.Tensor:
    """``f(S)[:, :k]`` with ``S = [[C, -B^T], [B, 0]]`` built from ``params``.

    Args:
        params: ``(..., P)``, ``P = lie_stiefel_num_params(n, k)``, float32/float64; leading
            dimensions batch independent matrices.
        n, k: ``1 <= k <= n``.
        method: ``"exp"`` (exact), ``"cayley"`` (exact Cayley map), ``"taylor"`` (truncated
            Taylor series of exp of order ``taylor_order``, orthonormal only approximately).
        check_values: refuse NaN/inf parameters (an O(P) check; a device sync on accelerators).

    Returns:
        ``(..., n, k)``, dtype of ``params``.  ``O(n k**2 + k**3)`` time (``O(order k**3)``
        for Taylor), ``O(n k)`` memory; ``S`` (n x n) is never formed.
    """
    check_positive_int("n", n)
    check_in_range("k", k, 1, n)
    check_choice("method", method, LIE_METHODS)
    check_positive_int("taylor_order", taylor_order)
    check_float_dtype("params", params)
    check_last_dim("params", params, lie_stiefel_num_params(n, k), f"lie_stiefel_num_params({n}, {k})")
    if check_values:
        check_finite("params", params)
    lead = params.shape[:-1]
    p = params.reshape(math.prod(lead), params.shape[-1])
    c, b = _unpack(p, n, k)
    gram = b.transpose(-1, -2) @ b  # (B, k, k)
    # Balanced T' = diag(I, 1/s) T diag(I, s) = [[C, -s G], [I/s, 0]]; f(T)E = diag(I, s) f(T')E.
    norm_b = gram.diagonal(dim1=-2, dim2=-1).sum(-1).detach().sqrt()
    sc = 1 / norm_b.clamp(min=1e-20)[:, None, None]
    eye = torch.eye(k, dtype=p.dtype, device=p.device).expand_as(c)
    t = torch.cat(
        (torch.cat((c, -sc * gram), -1), torch.cat((eye / sc, torch.zeros_like(c)), -1)), -2
    )
    e = torch.cat((eye, torch.zeros_like(c)), -2)  # (B, 2k, k)
    if method == "exp":
        f = _matrix_exp(t)[..., :k]
    elif method == "cayley":
        i2 = torch.eye(2 * k, dtype=p.dtype, device=p.device)
        f = torch.linalg.solve(i2 + t, e - t[..., :k])
    else:
        f = e
        for j in range(taylor_order, 0, -1):
            f = e + (t @ f) / j
    top, low = f[:, :k], sc * f[:, k:]
    out = torch.cat((top, b @ low), dim=-2)
    return out.reshape(*lead, n, k)

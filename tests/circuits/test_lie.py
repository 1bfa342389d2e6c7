"""Lie-algebra maps: dense maps vs textbook formulas, the O(nk^2) Stiefel map vs dense n x n."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qpeft.circuits.lie import (
    cayley,
    expm_orthogonal,
    lie_stiefel,
    lie_stiefel_num_params,
    skew,
    taylor_orthogonal,
)
from tests.circuits.test_pauli import param_sensitivity

F64 = torch.float64


def rand(*shape, seed=0, scale=1.0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dtype)


def dense_generator(params: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """S = [[C, -B^T], [B, 0]] filled entry by entry from the documented layout."""
    s = torch.zeros(n, n, dtype=params.dtype)
    idx = 0
    for i in range(k):
        for j in range(i + 1, k):
            s[i, j], s[j, i] = params[idx], -params[idx]
            idx += 1
    for r in range(n - k):
        for c in range(k):
            s[k + r, c], s[c, k + r] = params[idx], -params[idx]
            idx += 1
    assert idx == params.numel()
    return s


def series_exp(s: torch.Tensor, terms: int = 60) -> torch.Tensor:
    out, term = torch.eye(s.shape[-1], dtype=s.dtype), torch.eye(s.shape[-1], dtype=s.dtype)
    for j in range(1, terms):
        term = term @ s / j
        out = out + term
    return out


def test_skew_and_dense_maps():
    p = rand(3, 6, 6, seed=1)
    s = skew(p)
    torch.testing.assert_close(s, -s.transpose(-1, -2))
    torch.testing.assert_close(skew(s), s)
    eye = torch.eye(6, dtype=F64)
    torch.testing.assert_close(cayley(s), (eye - s) @ torch.linalg.inv(eye + s), atol=1e-12, rtol=0)
    small = s / 4
    torch.testing.assert_close(expm_orthogonal(small), torch.stack([series_exp(m) for m in small]), atol=1e-12, rtol=0)
    for q in (cayley(s), expm_orthogonal(s)):
        torch.testing.assert_close(q.transpose(-1, -2) @ q, eye.expand(3, 6, 6), atol=1e-12, rtol=0)
    powers = sum(torch.linalg.matrix_power(s, j) / math.factorial(j) for j in range(6))
    torch.testing.assert_close(taylor_orthogonal(s, 5), powers, atol=1e-12, rtol=0)
    # error bound |exp(S) - T_m(S)| <= |S|^(m+1)/(m+1)! e^|S| (spectral norm)
    m = 8
    norm = torch.linalg.matrix_norm(small[0], ord=2).item()
    err = torch.linalg.matrix_norm(taylor_orthogonal(small[0], m) - expm_orthogonal(small[0]), ord=2).item()
    assert err <= norm ** (m + 1) / math.factorial(m + 1) * math.exp(norm) + 1e-14


def test_dense_maps_reject_bad_input():
    with pytest.raises(ValueError, match="s"):
        cayley(rand(4, 4))  # not skew
    with pytest.raises(ValueError, match="s"):
        expm_orthogonal(rand(4, 3))
    with pytest.raises(ValueError, match="p"):
        skew(torch.zeros(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="order"):
        taylor_orthogonal(skew(rand(3, 3)), 0)


@pytest.mark.parametrize("n,k", [(1, 1), (2, 1), (5, 2), (7, 7), (9, 1), (12, 5), (30, 4)])
@pytest.mark.parametrize("scale", [1e-7, 0.1, 1.0, 3.0])
def test_matches_dense_n_by_n(n, k, scale):
    p = rand(lie_stiefel_num_params(n, k), seed=n * k, scale=scale)
    s = dense_generator(p, n, k)
    eye = torch.eye(n, dtype=F64)
    torch.testing.assert_close(lie_stiefel(p, n, k, "exp"), torch.linalg.matrix_exp(s)[:, :k], atol=1e-12, rtol=0)
    torch.testing.assert_close(lie_stiefel(p, n, k, "cayley"), torch.linalg.solve(eye + s, eye - s)[:, :k], atol=1e-12, rtol=0)
    for order in (1, 4, 8):
        dense = taylor_orthogonal(s, order)[:, :k]
        torch.testing.assert_close(lie_stiefel(p, n, k, "taylor", taylor_order=order), dense, atol=1e-10 * max(1.0, dense.abs().max().item()), rtol=0)


def test_num_params():
    for n in range(1, 20):
        for k in range(1, n + 1):
            assert lie_stiefel_num_params(n, k) == n * k - k * (k + 1) // 2
            assert lie_stiefel_num_params(n, k) == k * (k - 1) // 2 + (n - k) * k


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 300), kfrac=st.floats(0, 1), scale=st.floats(0.0, 5.0), seed=st.integers(0, 99))
def test_orthonormal_exp_and_cayley(n, kfrac, scale, seed):
    k = max(1, min(n, round(kfrac * min(n, 24))))
    for dtype, tol in ((F64, 1e-10), (torch.float32, 1e-5)):
        p = rand(lie_stiefel_num_params(n, k), seed=seed, scale=scale / math.sqrt(n), dtype=dtype)
        for method in ("exp", "cayley"):
            u = lie_stiefel(p, n, k, method)
            assert u.dtype == dtype and u.shape == (n, k)
            assert (u.T @ u - torch.eye(k, dtype=dtype)).abs().max().item() < tol


@pytest.mark.parametrize("theta", [0.58, 1.3])
def test_exp_is_orthonormal_to_float32_rounding(theta):
    """torch's float32 matrix_exp is off by ~5e-5 on these rotation generators; the maps
    evaluate the exponential in float64, so float32 results are orthonormal to ~1e-7."""
    s = torch.tensor([[0.0, -theta], [theta, 0.0]])
    q = expm_orthogonal(s)
    assert (q.T @ q - torch.eye(2)).abs().max().item() < 1e-6
    b = torch.zeros(lie_stiefel_num_params(9, 1))
    b[0] = theta
    u = lie_stiefel(b, 9, 1, "exp")
    assert abs(float(u.T @ u) - 1.0) < 1e-6


def test_taylor_close_to_exp_for_small_generators():
    n, k = 64, 8
    p = rand(lie_stiefel_num_params(n, k), seed=3, scale=0.3 / math.sqrt(n))
    u = lie_stiefel(p, n, k, "taylor", taylor_order=12)
    torch.testing.assert_close(u, lie_stiefel(p, n, k, "exp"), atol=1e-10, rtol=0)


@pytest.mark.parametrize("method", ["exp", "cayley", "taylor"])
def test_zero_generator_is_identity_with_finite_gradients(method):
    n, k = 10, 3
    p = torch.zeros(lie_stiefel_num_params(n, k), dtype=F64, requires_grad=True)
    u = lie_stiefel(p, n, k, method)
    torch.testing.assert_close(u, torch.eye(n, k, dtype=F64))
    (u * rand(n, k, seed=5)).sum().backward()
    assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert torch.autograd.gradcheck(lambda t: lie_stiefel(t, n, k, method), (p.detach().clone().requires_grad_(),))


@pytest.mark.parametrize("method", ["exp", "cayley", "taylor"])
def test_gradcheck_random_point(method):
    n, k = 7, 3
    p = rand(lie_stiefel_num_params(n, k), seed=9, scale=0.7).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: lie_stiefel(t, n, k, method, taylor_order=6), (p,))


@pytest.mark.parametrize("method", ["exp", "cayley"])
@pytest.mark.parametrize("n,k", [(6, 1), (6, 6), (9, 4)])
def test_every_parameter_influences_the_output(method, n, k):
    p = rand(lie_stiefel_num_params(n, k), seed=11, scale=0.8)
    assert param_sensitivity(lambda t: lie_stiefel(t, n, k, method), p).min().item() > 1e-6


def test_batching_equals_loop():
    n, k = 9, 3
    p = rand(2, 3, lie_stiefel_num_params(n, k), seed=13)
    for method in ("exp", "cayley", "taylor"):
        u = lie_stiefel(p, n, k, method)
        assert u.shape == (2, 3, n, k)
        for i in range(2):
            for j in range(3):
                torch.testing.assert_close(u[i, j], lie_stiefel(p[i, j], n, k, method), atol=1e-13, rtol=0)


def test_bad_input_names_the_argument():
    p = rand(lie_stiefel_num_params(6, 2))
    with pytest.raises(ValueError, match="k"):
        lie_stiefel(p, 6, 7)
    with pytest.raises(ValueError, match="k"):
        lie_stiefel(p, 6, 0)
    with pytest.raises(ValueError, match="n"):
        lie_stiefel(p, 0, 1)
    with pytest.raises(ValueError, match="method"):
        lie_stiefel(p, 6, 2, method="qr")
    with pytest.raises(ValueError, match="taylor_order"):
        lie_stiefel(p, 6, 2, method="taylor", taylor_order=0)
    with pytest.raises(ValueError, match="params"):
        lie_stiefel(p[:-1], 6, 2)
    with pytest.raises(ValueError, match="params"):
        lie_stiefel(p.to(torch.bfloat16), 6, 2)
    with pytest.raises(ValueError, match="params"):
        lie_stiefel(torch.full_like(p, float("inf")), 6, 2)

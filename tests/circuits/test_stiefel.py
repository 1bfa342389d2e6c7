"""Stiefel dispatch: counts, init and outputs agree with the underlying constructions."""

from __future__ import annotations

import math

import pytest
import torch

from qpeft.circuits.lie import lie_stiefel
from qpeft.circuits.pauli import pauli_num_params, pauli_stiefel
from qpeft.circuits.qsd import generalized_stiefel
from qpeft.circuits.stiefel import (
    STIEFEL_METHODS,
    stiefel,
    stiefel_init,
    stiefel_num_params,
    stiefel_pair,
)

F64 = torch.float64


def test_methods_tuple_is_the_agreed_one():
    assert STIEFEL_METHODS == ("pauli", "generalized", "lie_exp", "lie_cayley", "lie_taylor")


@pytest.mark.parametrize("method", STIEFEL_METHODS)
@pytest.mark.parametrize("n,k", [(1, 1), (2, 2), (16, 4), (64, 8), (256, 1)])
def test_init_length_output_shape_and_orthonormality(method, n, k):
    depth = 2
    gen = torch.Generator().manual_seed(0)
    p = stiefel_init(method, n, k, depth, gen, F64)
    assert p.shape == (stiefel_num_params(method, n, k, depth),)
    u = stiefel(method, p, n, k, depth)
    assert u.shape == (n, k) and u.dtype == F64
    tol = 1e-10 if method != "lie_taylor" else 1e-3  # Taylor is approximate by design
    assert (u.T @ u - torch.eye(k, dtype=F64)).abs().max().item() < tol
    u32 = stiefel(method, p.float(), n, k, depth)
    assert u32.dtype == torch.float32
    torch.testing.assert_close(u32, u.float(), atol=1e-5, rtol=0)


def test_dispatch_routes_to_the_constructions():
    n, k, depth = 32, 5, 3
    a = stiefel_init("pauli", n, k, depth, torch.Generator().manual_seed(1), F64)
    assert stiefel_num_params("pauli", n, k, depth) == pauli_num_params(5, depth)
    assert torch.equal(stiefel("pauli", a, n, k, depth), pauli_stiefel(a, 5, depth, k))
    assert torch.equal(stiefel("generalized", a, n, k, depth), pauli_stiefel(a, 5, depth, k))
    g = stiefel_init("generalized", 100, k, depth, torch.Generator().manual_seed(1), F64)
    assert torch.equal(stiefel("generalized", g, 100, k, depth), generalized_stiefel(g, 100, k, depth))
    lp = stiefel_init("lie_exp", n, k, depth, torch.Generator().manual_seed(1), F64)
    assert lp.numel() == n * k - k * (k + 1) // 2
    for method, inner in (("lie_exp", "exp"), ("lie_cayley", "cayley"), ("lie_taylor", "taylor")):
        assert torch.equal(stiefel(method, lp, n, k, depth), lie_stiefel(lp, n, k, inner))
    assert torch.equal(
        stiefel("lie_taylor", lp, n, k, depth, taylor_order=3), lie_stiefel(lp, n, k, "taylor", 3)
    )


def test_init_is_seeded_generic_and_in_range():
    a1 = stiefel_init("generalized", 768, 8, 1, torch.Generator().manual_seed(5), torch.float32)
    a2 = stiefel_init("generalized", 768, 8, 1, torch.Generator().manual_seed(5), torch.float32)
    assert torch.equal(a1, a2) and a1.dtype == torch.float32
    assert a1.abs().max() < math.pi and a1.std() > 0.5  # U(-pi, pi), not a degenerate point
    b = stiefel_init("lie_exp", 512, 8, 1, torch.Generator().manual_seed(5), F64)
    assert 0.3 / math.sqrt(512) < b.std() < 3 / math.sqrt(512)
    # generic: the circuit is far from the trivial embedding [I; 0]
    u = stiefel("generalized", a1.double(), 768, 8, 1)
    assert (u - torch.eye(768, 8, dtype=F64)).abs().max() > 0.1


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="generalized"):
        stiefel_num_params("pauli", 768, 8, 1)
    with pytest.raises(ValueError, match="n=768"):
        stiefel("pauli", torch.zeros(10, dtype=F64), 768, 8, 1)
    with pytest.raises(ValueError, match="method"):
        stiefel_num_params("householder", 16, 2, 1)
    with pytest.raises(ValueError, match="k"):
        stiefel_num_params("lie_exp", 16, 17, 1)
    with pytest.raises(ValueError, match="depth"):
        stiefel_num_params("generalized", 16, 2, -1)
    with pytest.raises(ValueError, match="dtype"):
        stiefel_init("pauli", 16, 2, 1, None, torch.int64)
    with pytest.raises(ValueError, match="angles"):
        stiefel("pauli", torch.zeros(3, dtype=F64), 16, 2, 1)


@pytest.mark.slow
@pytest.mark.parametrize("method,n", [("pauli", 256), ("generalized", 100), ("lie_exp", 64), ("lie_cayley", 64)])
def test_torch_compile_matches_eager(method, n):
    p = stiefel_init(method, n, 4, 2, torch.Generator().manual_seed(0), torch.float32).requires_grad_()
    u = torch.compile(lambda t: stiefel(method, t, n, 4, 2))(p)
    u.sum().backward()
    torch.testing.assert_close(u, stiefel(method, p, n, 4, 2), atol=1e-5, rtol=0)
    assert torch.isfinite(p.grad).all()


@pytest.mark.parametrize(
    "methods,dims,k",
    [
        (("generalized", "generalized"), (24, 24), 5),  # same shape: one batch
        (("generalized", "generalized"), (24, 11), 4),  # two shapes: one Kronecker chain
        (("pauli", "generalized"), (16, 37), 3),
        (("generalized", "pauli"), (1000, 64), 8),  # four QSD levels next to a plain circuit
        (("lie_exp", "generalized"), (12, 20), 3),  # a Lie side: one factor at a time
        (("generalized", "generalized"), (1, 9), 1),  # a width-1 side has no angles
    ],
)
def test_pair_equals_two_separate_factors_values_and_gradients(methods, dims, k):
    depth = 2
    g = torch.Generator().manual_seed(sum(dims) + k)
    params = [
        stiefel_init(m, n, k, depth, g, torch.float64).requires_grad_()
        for m, n in zip(methods, dims, strict=True)
    ]
    weights = [torch.randn(n, k, generator=g, dtype=torch.float64) for n in dims]
    pair = stiefel_pair(tuple(methods), tuple(params), tuple(dims), k, depth)
    alone = [stiefel(m, p, n, k, depth) for m, p, n in zip(methods, params, dims, strict=True)]
    for got, want in zip(pair, alone, strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    live = [p for p in params if p.numel()]
    def loss(factors):
        return sum((w * f).sum() for w, f in zip(weights, factors, strict=True))

    grads_pair = torch.autograd.grad(loss(pair), live)
    grads_alone = torch.autograd.grad(loss(alone), live)
    for got, want in zip(grads_pair, grads_alone, strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_many_circuit_factors_batched_per_width_equal_one_call_each():
    """stiefel_many: factors of mixed methods and widths, values and gradients as one stiefel
    call each (float64, 1e-12)."""
    from qpeft.circuits.stiefel import stiefel_many

    k, depth = 3, 2
    g = torch.Generator().manual_seed(5)
    methods = ["generalized", "pauli", "generalized", "pauli", "generalized"]
    dims = [12, 16, 12, 16, 7]
    params = [stiefel_init(m, n, k, depth, g, F64).requires_grad_() for m, n in zip(methods, dims, strict=True)]
    weights = [torch.randn(n, k, generator=g, dtype=F64) for n in dims]
    many = stiefel_many(methods, params, dims, k, depth)
    alone = [stiefel(m, p, n, k, depth) for m, p, n in zip(methods, params, dims, strict=True)]
    for got, want in zip(many, alone, strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    def loss(factors):
        return sum((w * f).sum() for w, f in zip(weights, factors, strict=True))
    for got, want in zip(torch.autograd.grad(loss(many), params),
                         torch.autograd.grad(loss(alone), params), strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_many_applies_parameter_gains_and_column_scales_as_per_factor_products():
    """stiefel_many's ``scales`` / ``columns`` (one product per width, not per factor): values
    bit for bit those of ``stiefel_many(scales * params) * (c * s)`` per factor, gradients to
    1e-12 (float64), with common and differing gains and a factor without columns."""
    from qpeft.circuits.stiefel import stiefel_many

    k, depth = 3, 1
    g = torch.Generator().manual_seed(7)
    methods, dims = ["pauli"] * 4, [16, 16, 16, 8]
    params = [stiefel_init(m, n, k, depth, g, F64).requires_grad_() for m, n in zip(methods, dims, strict=True)]
    cols = [torch.randn(k, generator=g, dtype=F64).requires_grad_() for _ in range(3)]
    for scales in ([0.5, 0.5, 0.5, 2.0], [0.5, 1.5, 1.0, 1.0]):
        columns = [(cols[0], 0.25), None, (cols[1], 3.0), (cols[2], 1.0)]
        got = stiefel_many(methods, params, dims, k, depth, scales=scales, columns=columns)
        want = stiefel_many(methods, [s * p for s, p in zip(scales, params, strict=True)], dims, k, depth)
        want = [f if c is None else f * (c[0] * c[1]) for f, c in zip(want, columns, strict=True)]
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)
        weights = [torch.randn(n, k, generator=g, dtype=F64) for n in dims]
        def loss(factors, weights=weights):
            return sum((w * f).sum() for w, f in zip(weights, factors, strict=True))
        for a, b in zip(torch.autograd.grad(loss(got), params + cols),
                        torch.autograd.grad(loss(want), params + cols), strict=True):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_many_refuses_lie_methods_and_mismatched_lists():
    from qpeft.circuits.stiefel import stiefel_many

    p = stiefel_init("lie_exp", 8, 2, 1, torch.Generator().manual_seed(0), F64)
    with pytest.raises(ValueError, match="circuit methods only"):
        stiefel_many(["lie_exp"], [p], [8], 2, 1)
    with pytest.raises(ValueError, match="2 methods, 1 parameter vectors"):
        stiefel_many(["pauli", "pauli"], [p], [8], 2, 1)

"""Givens/RBS circuits against explicit products of dense rotation matrices."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qpeft.circuits.givens import (
    GIVENS_LAYOUTS,
    givens_apply,
    givens_decompose,
    givens_matrix,
    givens_num_params,
    givens_pairs,
)
from tests.circuits.reference import dense_givens

F64 = torch.float64


def _angles(n: int, layout: str, *lead: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*lead, givens_num_params(n, layout), generator=g, dtype=F64)


def _haar_orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return q * torch.sign(torch.diagonal(r))


# ---------------------------------------------------------------- layouts and counts


@pytest.mark.parametrize("n", range(1, 18))
@pytest.mark.parametrize("layout", GIVENS_LAYOUTS)
def test_pairs_are_valid_layers(n, layout):
    pairs = givens_pairs(n, layout)
    for layer in pairs:
        assert layer, "no empty layers"
        wires = [w for p in layer for w in p]
        assert len(set(wires)) == len(wires), "gates of one layer act on disjoint wires"
        assert all(0 <= i < j < n for i, j in layer)
    assert givens_num_params(n, layout) == sum(len(layer) for layer in pairs)


@pytest.mark.parametrize("n", range(1, 18))
def test_counts_closed_forms(n):
    assert givens_num_params(n, "pyramid") == n * (n - 1) // 2
    assert givens_num_params(n, "brick") == n * (n - 1) // 2
    assert len(givens_pairs(n, "pyramid")) == max(2 * n - 3, 0)
    assert all(i + 1 == j for layer in givens_pairs(n, "pyramid") for i, j in layer)
    assert all(i + 1 == j for layer in givens_pairs(n, "brick") for i, j in layer)
    if n >= 3:
        assert len(givens_pairs(n, "brick")) == n
    if n & (n - 1) == 0 and n >= 2:
        s = int(math.log2(n))
        assert givens_num_params(n, "butterfly") == n // 2 * s
        assert len(givens_pairs(n, "butterfly")) == s
        for t, layer in enumerate(givens_pairs(n, "butterfly")):
            assert all(j - i == 2**t for i, j in layer) and len(layer) == n // 2


def test_pyramid_shape_small():
    # the textbook triangle for n = 4: (2,3) | (1,2) | (0,1),(2,3) | (1,2) | (2,3)
    assert givens_pairs(4, "pyramid") == [[(2, 3)], [(1, 2)], [(0, 1), (2, 3)], [(1, 2)], [(2, 3)]]
    assert givens_pairs(4, "brick") == [[(0, 1), (2, 3)], [(1, 2)], [(0, 1), (2, 3)], [(1, 2)]]
    assert givens_pairs(6, "butterfly") == [
        [(0, 1), (2, 3), (4, 5)],
        [(0, 2), (1, 3)],
        [(0, 4), (1, 5)],
    ]


# ---------------------------------------------------------------- math vs dense products


def test_single_gate_convention():
    theta = torch.tensor([0.3], dtype=F64)
    m = givens_matrix(theta, 2, "pyramid")
    c, s = math.cos(0.3), math.sin(0.3)
    torch.testing.assert_close(m, torch.tensor([[c, -s], [s, c]], dtype=F64), rtol=0, atol=1e-15)
    x = torch.tensor([1.0, 0.0], dtype=F64)
    torch.testing.assert_close(
        givens_apply(theta, x, 2, "pyramid"), torch.tensor([c, s], dtype=F64), rtol=0, atol=1e-15
    )


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 12), layout=st.sampled_from(GIVENS_LAYOUTS), seed=st.integers(0, 10**6))
def test_matrix_equals_dense_product(n, layout, seed):
    a = _angles(n, layout, seed=seed)
    ref = dense_givens(a, givens_pairs(n, layout), n)
    torch.testing.assert_close(givens_matrix(a, n, layout), ref, rtol=0, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 10), layout=st.sampled_from(GIVENS_LAYOUTS), seed=st.integers(0, 10**6))
def test_apply_equals_matrix_times_vector_with_broadcast(n, layout, seed):
    a = _angles(n, layout, 3, 1, seed=seed)  # [3, 1, P]
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(4, n, generator=g, dtype=F64)  # [4, n] broadcasts to [3, 4, n]
    y = givens_apply(a, x, n, layout)
    assert y.shape == (3, 4, n)
    ref = torch.einsum("bij,cj->bci", givens_matrix(a[:, 0], n, layout), x)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("layout", GIVENS_LAYOUTS)
def test_orthogonal_and_batched(layout):
    n = 9
    a = _angles(n, layout, 2, 3)
    m = givens_matrix(a, n, layout)
    assert m.shape == (2, 3, n, n) and m.dtype == F64
    eye = torch.eye(n, dtype=F64)
    torch.testing.assert_close(m @ m.transpose(-1, -2), eye.expand(2, 3, n, n), rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.linalg.det(m), torch.ones(2, 3, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(m[1, 2], givens_matrix(a[1, 2], n, layout), rtol=0, atol=0)


def test_zero_angles_identity_and_float32():
    for layout in GIVENS_LAYOUTS:
        a = torch.zeros(givens_num_params(7, layout))
        m = givens_matrix(a, 7, layout)
        assert m.dtype == torch.float32
        assert torch.equal(m, torch.eye(7))


@pytest.mark.parametrize("layout", GIVENS_LAYOUTS)
def test_gradcheck(layout):
    n = 6
    a = _angles(n, layout).requires_grad_()
    x = torch.randn(2, n, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, x: givens_apply(a, x, n, layout), (a, x))
    assert torch.autograd.gradcheck(lambda a: givens_matrix(a, n, layout), (a,))


# ---------------------------------------------------------------- decomposition


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 16), seed=st.integers(0, 10**6))
def test_decompose_recomposes_exactly(n, seed):
    q = _haar_orthogonal(n, seed)
    angles, signs = givens_decompose(q)
    assert angles.shape == (givens_num_params(n, "pyramid"),)
    rec = signs[:, None] * givens_matrix(angles, n, "pyramid")
    torch.testing.assert_close(rec, q, rtol=0, atol=1e-10)
    # only the last sign may be -1, and it is det(q)
    assert torch.all(signs[:-1] == 1)
    assert float(signs[-1]) == pytest.approx(float(torch.linalg.det(q)), abs=1e-9)


def test_decompose_special_orthogonal_and_batched_and_roundtrip():
    n = 8
    a = _angles(n, "pyramid", 3, seed=5)
    q = givens_matrix(a, n, "pyramid")  # SO(n)
    angles, signs = givens_decompose(q)
    assert angles.shape == (3, a.shape[-1]) and torch.all(signs == 1)
    torch.testing.assert_close(givens_matrix(angles, n, "pyramid"), q, rtol=0, atol=1e-10)
    # other layouts compile to the pyramid too
    qb = givens_matrix(_angles(n, "butterfly", seed=2), n, "butterfly")
    ang_b, sg_b = givens_decompose(qb)
    torch.testing.assert_close(
        sg_b[:, None] * givens_matrix(ang_b, n, "pyramid"), qb, atol=1e-10, rtol=0
    )


def test_decompose_permutation_and_reflection():
    # degenerate entries (exact zeros) must still decompose exactly
    p = torch.eye(5, dtype=F64)[[3, 0, 4, 1, 2]]
    p[0] *= -1
    angles, signs = givens_decompose(p)
    torch.testing.assert_close(
        signs[:, None] * givens_matrix(angles, 5, "pyramid"), p, rtol=0, atol=1e-12
    )
    eye_angles, eye_signs = givens_decompose(torch.eye(6, dtype=F64))
    assert torch.all(eye_angles == 0) and torch.all(eye_signs == 1)


def test_decompose_cayley_block():
    g = torch.Generator().manual_seed(7)
    p = torch.randn(22, 22, generator=g, dtype=F64)
    s = (p - p.T) / 2
    eye = torch.eye(22, dtype=F64)
    q = (eye - s) @ torch.linalg.inv(eye + s)
    angles, signs = givens_decompose(q)
    torch.testing.assert_close(
        signs[:, None] * givens_matrix(angles, 22, "pyramid"), q, rtol=0, atol=1e-10
    )


# ---------------------------------------------------------------- bad input


def test_bad_input_raises_value_error():
    with pytest.raises(ValueError, match="layout"):
        givens_pairs(4, "ladder")
    with pytest.raises(ValueError, match="n"):
        givens_num_params(0, "pyramid")
    with pytest.raises(ValueError, match="n"):
        givens_num_params(2.5, "pyramid")
    with pytest.raises(ValueError, match="angles.*6"):
        givens_matrix(torch.zeros(5), 4, "pyramid")
    with pytest.raises(ValueError, match="x.*4"):
        givens_apply(torch.zeros(6), torch.zeros(3), 4, "pyramid")
    with pytest.raises(ValueError, match="float32 or float64"):
        givens_matrix(torch.zeros(6, dtype=torch.long), 4, "pyramid")
    with pytest.raises(ValueError, match="non-finite"):
        givens_matrix(torch.tensor([0.0, float("nan"), 0.0, 0.0, 0.0, 0.0]), 4, "pyramid")
    with pytest.raises(ValueError, match="square"):
        givens_decompose(torch.zeros(3, 4, dtype=F64))
    with pytest.raises(ValueError, match="orthogonal"):
        givens_decompose(torch.ones(3, 3, dtype=F64))

"""Generalized (any N) circuits: fast evaluation vs a dense recursive reference, orthonormality for
prime / non-power-of-two N, reduction to Pauli, exact parameter use."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qpeft.circuits.pauli import pauli_num_params, pauli_stiefel
from qpeft.circuits.qsd import (
    generalized_apply,
    generalized_num_params,
    generalized_stiefel,
    split_sizes,
)
from tests.circuits.test_pauli import dense_pauli, param_sensitivity, rand_angles

F64 = torch.float64


def dense_generalized(a: torch.Tensor, n: int, depth: int) -> torch.Tensor:
    """N x N matrix (A1 (+) A2) CS(phi) (B1 (+) I), written with explicit dense blocks."""
    if n == 1:
        assert a.numel() == 0
        return torch.ones(1, 1, dtype=a.dtype)
    if n & (n - 1) == 0:
        return dense_pauli(a, int(math.log2(n)), depth)
    n1 = 2 ** int(math.floor(math.log2(n)))
    n2 = n - n1
    p1 = pauli_num_params(int(math.log2(n1)), depth)
    b1, phi, a1, a2 = a[:p1], a[p1], a[p1 + 1 : 2 * p1 + 1], a[2 * p1 + 1 :]
    q1 = int(math.log2(n1))
    b = torch.block_diag(dense_pauli(b1, q1, depth), torch.eye(n2, dtype=a.dtype))
    cs = torch.eye(n, dtype=a.dtype)
    for i in range(n2):
        j = n1 + i
        cs[i, i], cs[i, j], cs[j, i], cs[j, j] = torch.cos(phi), -torch.sin(phi), torch.sin(phi), torch.cos(phi)
    a_mat = torch.block_diag(dense_pauli(a1, q1, depth), dense_generalized(a2, n2, depth))
    return a_mat @ cs @ b


def test_split_sizes_and_known_counts():
    assert split_sizes(3) == (2, 1) and split_sizes(768) == (512, 256) and split_sizes(997) == (512, 485)
    p = pauli_num_params
    assert generalized_num_params(768, 8, 1) == 2 * p(9, 1) + 1 + p(8, 1) == 73
    assert generalized_num_params(3072, 8, 1) == 2 * p(11, 1) + 1 + p(10, 1)
    assert generalized_num_params(3, 1, 2) == 3  # B1, phi, A1 one RY each; A2 on N=1 is free
    assert generalized_num_params(1, 1, 3) == 0
    for n in (2, 4, 64, 4096):
        assert generalized_num_params(n, 1, 2) == p(int(math.log2(n)), 2)


def test_count_is_polylog():
    for depth in (1, 2, 4):
        for n in list(range(2, 600)) + [997, 1000, 1023, 3071, 4095, 65535]:
            bound = (2 * depth + 1) * 2 * math.log2(n) ** 2 + 2 * math.log2(n)
            assert generalized_num_params(n, 1, depth) <= bound, (n, depth)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6, 7, 11, 12, 13])
@pytest.mark.parametrize("depth", [0, 1, 2])
def test_matches_dense_reference_all_k(n, depth):
    a = rand_angles(generalized_num_params(n, 1, depth), seed=n * 10 + depth)
    q_mat = dense_generalized(a, n, depth)
    torch.testing.assert_close(q_mat.T @ q_mat, torch.eye(n, dtype=F64), atol=1e-12, rtol=0)
    for k in range(1, n + 1):
        assert generalized_num_params(n, k, depth) == a.numel()
        torch.testing.assert_close(generalized_stiefel(a, n, k, depth), q_mat[:, :k], atol=1e-12, rtol=0)
    x = torch.randn(n, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(generalized_apply(a, n, depth, x), q_mat @ x, atol=1e-12, rtol=0)


@pytest.mark.parametrize("n", [1, 2, 8, 64, 256])
def test_equals_pauli_for_powers_of_two(n):
    depth = 2
    a = rand_angles(generalized_num_params(n, 1, depth), 3)
    for k in {1, max(1, n // 3), n}:
        expect = pauli_stiefel(a, int(math.log2(n)), depth, k) if n > 1 else torch.ones(1, 1, dtype=F64)
        assert torch.equal(generalized_stiefel(a, n, k, depth), expect)


@pytest.mark.parametrize("n,k", [(768, 8), (3072, 8), (1000, 8), (997, 8), (997, 997), (1000, 513)])
def test_orthonormal_at_model_sizes_and_primes(n, k):
    depth = 2
    p = generalized_num_params(n, k, depth)
    for dtype, tol in ((F64, 1e-10), (torch.float32, 1e-5)):
        u = generalized_stiefel(rand_angles(p, n, dtype), n, k, depth)
        assert u.shape == (n, k) and u.dtype == dtype
        assert (u.T @ u - torch.eye(k, dtype=dtype)).abs().max().item() < tol


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 700), depth=st.integers(0, 3), kfrac=st.floats(0, 1), seed=st.integers(0, 99))
def test_orthonormal_random_n(n, depth, kfrac, seed):
    k = max(1, min(n, round(kfrac * min(n, 40))))
    p = generalized_num_params(n, k, depth)
    for dtype, tol in ((F64, 1e-10), (torch.float32, 1e-5)):
        u = generalized_stiefel(rand_angles(p, seed, dtype), n, k, depth)
        assert (u.T @ u - torch.eye(k, dtype=dtype)).abs().max().item() < tol


@pytest.mark.parametrize("n", [1, 3, 5, 6, 7, 11, 37])
def test_full_orthogonal_k_equals_n(n):
    u = generalized_stiefel(rand_angles(generalized_num_params(n, n, 1), 2), n, n, 1)
    torch.testing.assert_close(u @ u.T, torch.eye(n, dtype=F64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("n,k", [(3, 1), (3, 3), (5, 1), (5, 5), (6, 4), (7, 5), (11, 2), (11, 9), (13, 13), (100, 3)])
def test_every_angle_influences_the_output(n, k):
    depth = 2
    a = rand_angles(generalized_num_params(n, k, depth), 17)
    assert param_sensitivity(lambda t: generalized_stiefel(t, n, k, depth), a).min().item() > 1e-6


def test_gradcheck_fp64():
    for n, k in ((5, 2), (7, 7), (6, 5)):
        a = rand_angles(generalized_num_params(n, k, 1), 19).requires_grad_()
        assert torch.autograd.gradcheck(lambda t, n=n, k=k: generalized_stiefel(t, n, k, 1), (a,))


def test_batching_equals_loop():
    n, k, depth = 11, 4, 1
    a = rand_angles(generalized_num_params(n, k, depth), 23, lead=(3, 2))
    u = generalized_stiefel(a, n, k, depth)
    assert u.shape == (3, 2, n, k)
    for i in range(3):
        for j in range(2):
            torch.testing.assert_close(u[i, j], generalized_stiefel(a[i, j], n, k, depth), atol=1e-14, rtol=0)


def test_bad_input_names_the_argument():
    a = rand_angles(generalized_num_params(6, 2, 1), 0)
    with pytest.raises(ValueError, match="k"):
        generalized_stiefel(a, 6, 7, 1)
    with pytest.raises(ValueError, match="k"):
        generalized_stiefel(a, 6, 0, 1)
    with pytest.raises(ValueError, match="n"):
        generalized_stiefel(a, 0, 1, 1)
    with pytest.raises(ValueError, match="depth"):
        generalized_stiefel(a, 6, 2, -1)
    with pytest.raises(ValueError, match="angles"):
        generalized_stiefel(a[:-1], 6, 2, 1)
    with pytest.raises(ValueError, match="angles"):
        generalized_stiefel(a.float().to(torch.bfloat16), 6, 2, 1)
    with pytest.raises(ValueError, match="angles"):
        generalized_stiefel(torch.full_like(a, float("nan")), 6, 2, 1)
    with pytest.raises(ValueError, match="angles"):
        generalized_stiefel(torch.zeros(a.numel(), dtype=torch.int32), 6, 2, 1)
    with pytest.raises(ValueError, match="x"):
        generalized_apply(a, 6, 1, torch.zeros(5, 2, dtype=F64))


def test_gradients_of_a_many_level_program_match_the_dense_reference():
    """Five cosine-sine levels and nine circuits (100 = 64 + 32 + 4), a batch of two, applied
    to a matrix that needs a gradient too: the hand-written backward, which walks the state
    back from the output, against autograd through the dense matrices."""
    n, depth = 100, 2
    a = rand_angles(generalized_num_params(n, 1, depth), 31, lead=(2,)).requires_grad_()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, n, 3, dtype=F64, generator=g, requires_grad=True)
    r_cols, r_apply = torch.randn(2, n, 4, dtype=F64, generator=g), torch.randn(2, n, 3, dtype=F64, generator=g)
    got = torch.autograd.grad((r_cols * generalized_stiefel(a, n, 4, depth)).sum()
                              + (r_apply * generalized_apply(a, n, depth, x)).sum(), (a, x))
    dense = [dense_generalized(a[b], n, depth) for b in range(2)]
    want = torch.autograd.grad(sum((r_cols[b] * dense[b][:, :4]).sum() + (r_apply[b] * (dense[b] @ x[b])).sum()
                                   for b in range(2)), (a, x))
    for got_t, want_t in zip(got, want, strict=True):
        torch.testing.assert_close(got_t, want_t, atol=1e-10, rtol=0)


@pytest.mark.parametrize("lead", [(), (3,)])
def test_the_backward_keeps_the_output_not_a_state_per_step(lead):
    """What the program's node saves: its output (one state) and small per-group matrices —
    never the input of each of its dozens of steps (11,008 rows, 4 levels, 7 circuits)."""
    n, k, depth = 11008, 8, 1
    a = rand_angles(generalized_num_params(n, k, depth), 3, lead=lead).float().requires_grad_()
    u = generalized_stiefel(a, n, k, depth, check_values=False)
    node = u.grad_fn
    while not type(node).__name__.startswith("_Program"):
        node = node.next_functions[0][0]
    saved = node.saved_tensors
    state = [t for t in saved if t.numel() >= n * k]
    assert len(state) == 1 and state[0].data_ptr() == u.data_ptr()
    # the rest: (..., d, d) group and sub-layer matrices, (..., 1, 1) cosine-sine entries
    assert all(t.shape[-1] == t.shape[-2] for t in saved if t.numel() < n * k)


def test_float32_gradients_of_a_deep_wide_program_stay_at_float32_rounding():
    """The backward's recomputed states add rounding per step: on 11,008 rows at depth 4 the
    float32 gradient still agrees with the float64 one to ~1e-5 of its size."""
    n, k, depth = 11008, 8, 4
    a = rand_angles(generalized_num_params(n, k, depth), 11)
    r = torch.randn(n, k, dtype=F64, generator=torch.Generator().manual_seed(2))
    grads = []
    for dtype in (torch.float32, F64):
        t = a.to(dtype).requires_grad_()
        (generalized_stiefel(t, n, k, depth, check_values=False) * r.to(dtype)).sum().backward()
        grads.append(t.grad.double())
    assert (grads[0] - grads[1]).abs().max() <= 1e-5 * grads[1].abs().max()

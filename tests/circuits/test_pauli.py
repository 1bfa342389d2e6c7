"""Pauli RY+CZ circuit: fast K-column evaluation vs an explicit dense Kronecker-product product."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qpeft.circuits.pauli import pauli_apply, pauli_gates, pauli_num_params, pauli_stiefel

F64 = torch.float64


def ry(t: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(t / 2), torch.sin(t / 2)
    return torch.stack((torch.stack((c, -s)), torch.stack((s, c))))


def embed_1q(g: torch.Tensor, q: int, n: int) -> torch.Tensor:
    """kron(I, ..., g, ..., I) with qubit 0 the least significant (rightmost) factor."""
    m = torch.ones(1, 1, dtype=g.dtype)
    for qq in range(n - 1, -1, -1):
        m = torch.kron(m, g if qq == q else torch.eye(2, dtype=g.dtype))
    return m


def cz_dense(q: int, n: int) -> torch.Tensor:
    """CZ on qubits (q, q+1) as kron(I.., diag(1,1,1,-1), I..) built from projectors."""
    p0, p1 = torch.diag(torch.tensor([1.0, 0.0], dtype=F64)), torch.diag(torch.tensor([0.0, 1.0], dtype=F64))
    z = torch.diag(torch.tensor([1.0, -1.0], dtype=F64))
    return embed_1q(p0, q, n) + embed_1q(p1, q, n) @ embed_1q(z, q + 1, n)


def dense_pauli(angles: torch.Tensor, n: int, depth: int) -> torch.Tensor:
    """The N x N circuit matrix, written straight from the spec (not from pauli_gates)."""
    q_mat = torch.eye(2**n, dtype=angles.dtype)
    idx = 0
    for q in range(n):
        q_mat = embed_1q(ry(angles[idx]), q, n) @ q_mat
        idx += 1
    for _ in range(depth):
        for parity in (0, 1):
            pairs = [(q, q + 1) for q in range(parity, n - 1, 2)]
            for a, _b in pairs:
                q_mat = cz_dense(a, n) @ q_mat
            for a, b in pairs:
                for q in (a, b):
                    q_mat = embed_1q(ry(angles[idx]), q, n) @ q_mat
                    idx += 1
    assert idx == angles.shape[-1]
    return q_mat


def statevector_pauli(angles: torch.Tensor, n: int, depth: int, x: torch.Tensor) -> torch.Tensor:
    """Q @ x gate by gate on the (N, m) state (each RY a 2x2 on qubit q's axis, each CZ a sign
    flip where both bits are 1), straight from the spec: the reference for registers too large
    for dense_pauli's N x N matrices."""

    def apply_ry(x, theta, q):
        v = x.reshape(2 ** (n - q - 1), 2, 2**q, x.shape[-1])
        return torch.einsum("ij,ajbm->aibm", ry(theta), v).reshape(x.shape)

    i = torch.arange(2**n)
    idx = 0
    for q in range(n):
        x = apply_ry(x, angles[idx], q)
        idx += 1
    for _ in range(depth):
        for parity in (0, 1):
            pairs = [(q, q + 1) for q in range(parity, n - 1, 2)]
            for a, b in pairs:
                both = ((i >> a) & 1) & ((i >> b) & 1)
                x = x * (1 - 2 * both).to(x.dtype)[:, None]
            for a, b in pairs:
                for q in (a, b):
                    x = apply_ry(x, angles[idx], q)
                    idx += 1
    assert idx == angles.shape[-1]
    return x


def rand_angles(p: int, seed: int, dtype=F64, lead=()) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return ((torch.rand(*lead, p, generator=g, dtype=F64) * 2 - 1) * math.pi).to(dtype)


def test_num_params_formula_and_paper_examples():
    for n in range(1, 14):
        for depth in range(0, 5):
            assert pauli_num_params(n, depth) == n + 2 * depth * (n - 1)
            assert pauli_num_params(n, depth) == (2 * depth + 1) * n - 2 * depth
    assert pauli_num_params(12, 2) == 56 and pauli_num_params(10, 2) == 46
    # adapter totals the Quantum-PEFT paper publishes: 2 * count + K at L = 1, K = 8
    assert 2 * pauli_num_params(10, 1) + 8 == 64 and 2 * pauli_num_params(12, 1) + 8 == 76


@pytest.mark.parametrize("n", range(1, 9))
@pytest.mark.parametrize("depth", range(0, 4))
def test_matches_dense_kron_reference_all_k(n, depth):
    # n odd and even: the low/high register split differs (high half padded with RY(0) = I)
    big_n = 2**n
    a = rand_angles(pauli_num_params(n, depth), seed=100 * n + depth)
    q_mat = dense_pauli(a, n, depth)
    ks = range(1, big_n + 1) if n <= 4 else (1, 2, 3, 5, big_n // 2 + 1, big_n)
    for k in ks:
        u = pauli_stiefel(a, n, depth, k)
        assert u.shape == (big_n, k)
        torch.testing.assert_close(u, q_mat[:, :k], atol=1e-12, rtol=0)
    x = torch.randn(big_n, 3, dtype=F64, generator=torch.Generator().manual_seed(n))
    torch.testing.assert_close(pauli_apply(a, n, depth, x), q_mat @ x, atol=1e-12, rtol=0)


@pytest.mark.parametrize("n,depth", [(6, 2), (11, 1), (13, 2)])
def test_three_group_registers_match_the_statevector_reference(n, depth):
    # n > 10 cuts the register into three qubit groups (the middle group's matmul broadcasts)
    a = rand_angles(pauli_num_params(n, depth), seed=n)
    g = torch.Generator().manual_seed(n)
    eye = torch.eye(2**n, 5, dtype=F64)
    x = torch.randn(2**n, 3, dtype=F64, generator=g)
    torch.testing.assert_close(
        pauli_stiefel(a, n, depth, 5), statevector_pauli(a, n, depth, eye), atol=1e-12, rtol=0
    )
    torch.testing.assert_close(
        pauli_apply(a, n, depth, x), statevector_pauli(a, n, depth, x), atol=1e-12, rtol=0
    )


def test_statevector_reference_equals_the_dense_reference():
    a = rand_angles(pauli_num_params(6, 2), seed=7)
    eye = torch.eye(64, dtype=F64)
    torch.testing.assert_close(statevector_pauli(a, 6, 2, eye), dense_pauli(a, 6, 2), atol=1e-12, rtol=0)


@pytest.mark.parametrize("n,depth", [(1, 2), (2, 1), (3, 2), (5, 3)])
def test_gate_list_builds_the_same_matrix(n, depth):
    a = rand_angles(pauli_num_params(n, depth), seed=7)
    m = torch.eye(2**n, dtype=F64)
    used = set()
    for kind, qubits, idx in pauli_gates(n, depth):
        if kind == "ry":
            m = embed_1q(ry(a[idx]), qubits[0], n) @ m
            used.add(idx)
        else:
            assert kind == "cz" and qubits[1] == qubits[0] + 1 and idx is None
            m = cz_dense(qubits[0], n) @ m
    assert used == set(range(pauli_num_params(n, depth)))
    torch.testing.assert_close(m, dense_pauli(a, n, depth), atol=1e-13, rtol=0)


def test_qubit_zero_is_least_significant_bit():
    t = 0.7
    a = torch.tensor([t, 0.0], dtype=F64)  # RY(t) on qubit 0 only
    u = pauli_stiefel(a, 2, 0, 1)[:, 0]
    expected = torch.tensor([math.cos(t / 2), math.sin(t / 2), 0.0, 0.0], dtype=F64)
    torch.testing.assert_close(u, expected)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 9), depth=st.integers(0, 3), kfrac=st.floats(0, 1), seed=st.integers(0, 99))
def test_orthonormal_columns_fp64_and_fp32(n, depth, kfrac, seed):
    big_n = 2**n
    k = max(1, min(big_n, round(kfrac * big_n)))
    for dtype, tol in ((F64, 1e-10), (torch.float32, 1e-5)):
        u = pauli_stiefel(rand_angles(pauli_num_params(n, depth), seed, dtype), n, depth, k)
        assert u.dtype == dtype
        err = (u.T @ u - torch.eye(k, dtype=dtype)).abs().max().item()
        assert err < tol


def test_large_orthonormal_fp32():
    u = pauli_stiefel(rand_angles(pauli_num_params(12, 4), 3, torch.float32), 12, 4, 8)
    assert u.shape == (4096, 8) and u.dtype == torch.float32
    assert (u.T @ u - torch.eye(8)).abs().max().item() < 1e-5


def test_batching_equals_loop_and_apply_broadcasts():
    n, depth, k = 4, 2, 3
    a = rand_angles(pauli_num_params(n, depth), 5, lead=(2, 3))
    u = pauli_stiefel(a, n, depth, k)
    assert u.shape == (2, 3, 16, k)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(u[i, j], pauli_stiefel(a[i, j], n, depth, k), atol=1e-14, rtol=0)
    x = torch.randn(16, 2, dtype=F64)
    y = pauli_apply(a, n, depth, x)  # x broadcast over the angle batch
    assert y.shape == (2, 3, 16, 2)
    torch.testing.assert_close(y[1, 2], dense_pauli(a[1, 2], n, depth) @ x, atol=1e-12, rtol=0)


def test_gradcheck_fp64():
    n, depth, k = 3, 2, 3
    a = rand_angles(pauli_num_params(n, depth), 11).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: pauli_stiefel(t, n, depth, k), (a,))
    x = torch.randn(8, 2, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, y: pauli_apply(t, n, depth, y), (a, x))


@pytest.mark.parametrize("n,depth,k", [(1, 2, 1), (2, 2, 1), (3, 1, 1), (4, 3, 2), (5, 2, 32)])
def test_every_angle_influences_the_output(n, depth, k):
    a = rand_angles(pauli_num_params(n, depth), 13)
    assert param_sensitivity(lambda t: pauli_stiefel(t, n, depth, k), a).min().item() > 1e-6


def param_sensitivity(fn, a: torch.Tensor, probes: int = 4) -> torch.Tensor:
    """Per-parameter max |d <R, fn(a)> / d a| over a few random probes R (a jacobian sketch)."""
    a = a.detach().clone().requires_grad_()
    out = fn(a)
    g = torch.Generator().manual_seed(0)
    grads = []
    for _ in range(probes):
        r = torch.randn(out.shape, generator=g, dtype=out.dtype)
        (grad,) = torch.autograd.grad((out * r).sum(), a, retain_graph=True)
        grads.append(grad.abs())
    return torch.stack(grads).amax(0)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(n_qubits=3, depth=1, k=0), "k"),
        (dict(n_qubits=3, depth=1, k=9), "k"),
        (dict(n_qubits=0, depth=1, k=1), "n_qubits"),
        (dict(n_qubits=3, depth=-1, k=1), "depth"),
        (dict(n_qubits=3, depth=1.0, k=1), "depth"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, name):
    a = rand_angles(7, 0)
    with pytest.raises(ValueError, match=name):
        pauli_stiefel(a, **kwargs)


def test_bad_angles_name_themselves():
    good = rand_angles(pauli_num_params(3, 1), 0)
    with pytest.raises(ValueError, match="angles"):
        pauli_stiefel(good[:-1], 3, 1, 2)  # wrong length
    with pytest.raises(ValueError, match="angles"):
        pauli_stiefel(torch.cat((good, good[:1])), 3, 1, 2)
    bad = good.clone()
    bad[2] = float("nan")
    with pytest.raises(ValueError, match="angles"):
        pauli_stiefel(bad, 3, 1, 2)
    with pytest.raises(ValueError, match="angles"):
        pauli_stiefel(torch.zeros(7, dtype=torch.int64), 3, 1, 2)
    with pytest.raises(ValueError, match="angles"):
        pauli_stiefel(good.to(torch.bfloat16), 3, 1, 2)
    with pytest.raises(ValueError, match="x"):
        pauli_apply(good, 3, 1, torch.zeros(7, 2, dtype=F64))
    with pytest.raises(ValueError, match="x"):
        pauli_apply(good, 3, 1, torch.zeros(8, 2, dtype=torch.float32))


@pytest.mark.parametrize("n", range(1, 9))
@pytest.mark.parametrize("depth", [0, 1, 2])
def test_gradients_match_autograd_through_the_dense_reference(n, depth):
    # the circuit's backward is hand-written (one autograd node); the dense reference is plain
    # torch ops, so autograd through it is an independent derivation of the same gradients
    big_n, k = 2**n, min(2**n, 5)
    a = rand_angles(pauli_num_params(n, depth), seed=7 * n + depth).requires_grad_()
    g = torch.Generator().manual_seed(n)
    x = torch.randn(big_n, 3, dtype=F64, generator=g, requires_grad=True)
    r_cols, r_apply = torch.randn(big_n, k, dtype=F64, generator=g), torch.randn(big_n, 3, dtype=F64, generator=g)

    def loss(cols, applied):
        return (r_cols * cols).sum() + (r_apply * applied).sum()

    got = torch.autograd.grad(loss(pauli_stiefel(a, n, depth, k), pauli_apply(a, n, depth, x)), (a, x))
    q_mat = dense_pauli(a, n, depth)
    want = torch.autograd.grad(loss(q_mat[:, :k], q_mat @ x), (a, x))
    for got_t, want_t in zip(got, want, strict=True):
        torch.testing.assert_close(got_t, want_t, atol=1e-10, rtol=0)


@pytest.mark.parametrize("n,depth", [(7, 2), (11, 1), (13, 2)])
def test_gradients_of_multi_group_registers_and_a_batch(n, depth):
    # two groups (4 + 3 qubits: stages merged across the even CZ layer) and three (4 + 4 + 3,
    # 4 + 4 + 5: the middle group's batched product); a batch of two circuits runs as batched
    # products.  Reference: autograd through the gate-by-gate statevector simulation.
    a = rand_angles(pauli_num_params(n, depth), seed=n, lead=(2,)).requires_grad_()
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2**n, 3, dtype=F64, generator=g, requires_grad=True)
    r_cols = torch.randn(2, 2**n, 4, dtype=F64, generator=g)
    r_apply = torch.randn(2, 2**n, 3, dtype=F64, generator=g)
    eye = torch.eye(2**n, 4, dtype=F64)
    got = torch.autograd.grad(
        (r_cols * pauli_stiefel(a, n, depth, 4)).sum() + (r_apply * pauli_apply(a, n, depth, x)).sum(),
        (a, x),
    )
    want = torch.autograd.grad(
        sum((r_cols[b] * statevector_pauli(a[b], n, depth, eye)).sum()
            + (r_apply[b] * statevector_pauli(a[b], n, depth, x)).sum() for b in range(2)),
        (a, x),
    )
    for got_t, want_t in zip(got, want, strict=True):
        torch.testing.assert_close(got_t, want_t, atol=1e-10, rtol=0)
    assert torch.autograd.gradcheck(lambda t: pauli_stiefel(t, 7, 1, 2), (a[:, :19],))


def test_a_second_derivative_raises_instead_of_returning_a_wrong_one():
    a = rand_angles(pauli_num_params(4, 1), seed=3).requires_grad_()
    (grad,) = torch.autograd.grad(pauli_stiefel(a, 4, 1, 2).sum(), a, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(grad.sum(), a)


@pytest.mark.parametrize("n", range(1, 25))
def test_qubit_groups_sit_on_even_boundaries(n):
    # every group boundary at an even qubit: the even CZ layer never straddles two groups,
    # which is what lets a stage fold it into the group matrices
    from qpeft.circuits.pauli import GROUP_QUBITS, _group_sizes

    sizes = _group_sizes(n)
    assert sum(sizes) == n and len(sizes) <= max(1, -(-n // 4))
    assert all(1 <= s <= GROUP_QUBITS for s in sizes) and (len(sizes) == 1) == (n <= GROUP_QUBITS)
    assert all(s % 2 == 0 for s in sizes[:-1])

"""QPA's QNN simulator against slow, obvious references: dense Kronecker-built gate matrices applied
to an explicit statevector (float64, 1e-10), Qiskit's Statevector, and gradcheck."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qpeft.circuits.statevector import (
    GROUP_QUBITS,
    MAX_QUBITS,
    cnot_ladder_permutation,
    qnn_num_params,
    qnn_probabilities,
    qnn_statevector,
    qubit_groups,
)


def _ry(t: float) -> torch.Tensor:
    c, s = math.cos(t / 2), math.sin(t / 2)
    return torch.tensor([[c, -s], [s, c]], dtype=torch.float64)


def _single(gate: torch.Tensor, q: int, n: int) -> torch.Tensor:
    # qubit 0 = least significant bit: it is the LAST Kronecker factor
    return torch.kron(torch.kron(torch.eye(2 ** (n - 1 - q), dtype=torch.float64), gate),
                      torch.eye(2**q, dtype=torch.float64))


def _cnot(control: int, target: int, n: int) -> torch.Tensor:
    dim = 2**n
    m = torch.zeros(dim, dim, dtype=torch.float64)
    for i in range(dim):
        j = i ^ (1 << target) if (i >> control) & 1 else i
        m[j, i] = 1.0
    return m


def _dense_state(theta: torch.Tensor) -> torch.Tensor:
    depth, n = theta.shape
    psi = torch.zeros(2**n, dtype=torch.float64)
    psi[0] = 1.0
    for layer in range(depth):
        for q in range(n):
            psi = _single(_ry(float(theta[layer, q])), q, n) @ psi
        for q in range(n - 1):
            psi = _cnot(q, q + 1, n) @ psi
    return psi


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), depth=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_statevector_matches_dense_kron_reference(n, depth, seed):
    g = torch.Generator().manual_seed(seed)
    theta = (torch.rand(depth, n, generator=g, dtype=torch.float64) * 2 - 1) * math.pi
    got = qnn_statevector(theta)
    want = _dense_state(theta)
    assert got.shape == (2**n,)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    probs = qnn_probabilities(theta)
    torch.testing.assert_close(probs, want**2, atol=1e-10, rtol=0)
    assert abs(float(probs.sum()) - 1.0) < 1e-12


@pytest.mark.parametrize("n, depth", [(7, 3), (10, 2), (11, 2)])
def test_multi_group_registers_match_dense_reference(n, depth):
    # n > GROUP_QUBITS: the RY layer runs as 2 or 3 group rotations (the middle one of 11 qubits
    # sits between a higher and a lower group: the general contraction path)
    assert len(qubit_groups(n)) == -(-n // GROUP_QUBITS) >= 2
    theta = (torch.rand(depth, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
             * 2 - 1) * math.pi
    torch.testing.assert_close(qnn_statevector(theta), _dense_state(theta), atol=1e-10, rtol=0)


@pytest.mark.parametrize("n", range(1, MAX_QUBITS + 1))
def test_qubit_groups_cover_the_register_in_order(n):
    groups = qubit_groups(n)
    sizes = [size for _, size in groups]
    assert max(sizes) <= GROUP_QUBITS and max(sizes) - min(sizes) <= 1
    covered = [q for low, size in reversed(groups) for q in range(low, low + size)]
    assert covered == list(range(n))  # consecutive, most significant group first


def test_batched_leading_dims_match_loop():
    theta = torch.randn(3, 2, 5, 4, dtype=torch.float64)
    out = qnn_probabilities(theta)
    assert out.shape == (3, 2, 16)
    for i in range(3):
        for j in range(2):
            torch.testing.assert_close(out[i, j], _dense_state(theta[i, j]) ** 2, atol=1e-10, rtol=0)


def test_basis_convention_little_endian():
    # RY(pi) on qubit 0 only flips |0..0> to |..01> = index 1 (qubit 0 is the least significant bit)
    n = 3
    theta = torch.zeros(1, n, dtype=torch.float64)
    theta[0, 0] = math.pi
    probs = qnn_probabilities(theta)
    # then the CNOT ladder 0->1, 1->2 turns |001> into |011> and then |111> = index 7
    assert int(probs.argmax()) == 7
    theta = torch.zeros(1, n, dtype=torch.float64)
    theta[0, 2] = math.pi  # flip the most significant qubit: ladder does nothing (controls are 0)
    assert int(qnn_probabilities(theta).argmax()) == 4


def test_matches_qiskit():
    qiskit = pytest.importorskip("qiskit")
    from qiskit.quantum_info import Statevector

    n, depth = 4, 3
    theta = torch.randn(depth, n, dtype=torch.float64)
    qc = qiskit.QuantumCircuit(n)
    for layer in range(depth):
        for q in range(n):
            qc.ry(float(theta[layer, q]), q)
        for q in range(n - 1):
            qc.cx(q, q + 1)
    want = torch.tensor(Statevector(qc).probabilities(), dtype=torch.float64)
    torch.testing.assert_close(qnn_probabilities(theta), want, atol=1e-10, rtol=0)


def test_ladder_permutation_is_the_dense_product():
    n = 4
    gather = cnot_ladder_permutation(n)
    dense = torch.eye(2**n, dtype=torch.float64)
    for q in range(n - 1):
        dense = _cnot(q, q + 1, n) @ dense
    x = torch.randn(2**n, dtype=torch.float64)
    torch.testing.assert_close(x[gather], dense @ x, atol=0, rtol=0)
    assert torch.equal(cnot_ladder_permutation(1), torch.arange(2))


def test_gradcheck_fp64():
    theta = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(qnn_probabilities, (theta,))
    batched = torch.randn(2, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(qnn_statevector, (batched,))
    # two unequal groups (4 + 3 qubits): the angle gradients of both groups, in qubit order
    theta = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2**7, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: (qnn_probabilities(t) * weights).sum(), (theta,))
    # several qubit groups, batched: a weighted sum keeps the Jacobian one row
    theta = torch.randn(2, 3, 11, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 2**11, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: (qnn_statevector(t) * weights).sum(), (theta,))


def test_gradients_do_not_vanish_at_depth_8():
    # QPA's setting: L = 8, N <= 10. The probabilities (not their sum) must carry gradient to theta.
    torch.manual_seed(0)
    for n in (2, 6, 10):
        theta = ((torch.rand(8, n, dtype=torch.float64) * 2 - 1) * math.pi).requires_grad_()
        probs = qnn_probabilities(theta)
        weights = torch.randn(2**n, dtype=torch.float64)
        (probs * weights * 2**n).sum().backward()
        grad = theta.grad
        assert torch.isfinite(grad).all()
        assert int((grad.abs() > 1e-6).sum()) == grad.numel(), f"n={n}: some angles get no gradient"


def test_num_params():
    assert qnn_num_params(7, 8) == 56
    theta = torch.zeros(8, 7)
    assert theta.numel() == qnn_num_params(7, 8)


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.zeros(4), "theta must have shape"),
        (torch.zeros(2, 3, dtype=torch.int64), "float32 or float64"),
        (torch.zeros(0, 3), "depth"),
        (torch.zeros(2, 0), "n_qubits"),
        (torch.zeros(1, MAX_QUBITS + 1), "n_qubits"),
        (torch.full((2, 2), float("nan")), "non-finite"),
    ],
)
def test_bad_input_names_itself(bad, match):
    with pytest.raises(ValueError, match=match):
        qnn_probabilities(bad)


def test_bad_counts():
    with pytest.raises(ValueError, match="n_qubits"):
        qnn_num_params(25, 8)
    with pytest.raises(ValueError, match="depth"):
        qnn_num_params(3, 0)
    with pytest.raises(ValueError, match="n_qubits"):
        cnot_ladder_permutation(0)
def test_validate_false_skips_checks_but_computes_the_same():
    theta = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(qnn_probabilities(theta, validate=False), qnn_probabilities(theta),
                               atol=0, rtol=0)
    nan = torch.full((2, 2), float("nan"))
    assert torch.isnan(qnn_probabilities(nan, validate=False)).all()  # no check: NaN out


def test_second_derivatives_are_refused_clearly():
    # the circuit is one first-order autograd node: a double backward must fail loudly, not
    # return a silently wrong Hessian
    theta = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(qnn_probabilities(theta)[0], theta, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate"):
        grad.sum().backward()

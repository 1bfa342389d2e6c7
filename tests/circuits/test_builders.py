"""Exported circuits vs qpeft's matrices, computed by Qiskit (Operator / Statevector) at 1e-10,
for the gate lists alone (no peft): Pauli, generalized (any N), RBS layouts, compiled orthogonal
matrices, the QPA QNN; OpenQASM 3 round trips; the basis ordering; depth and counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qpeft.circuits import (
    compound,
    generalized_num_params,
    generalized_stiefel,
    givens_matrix,
    givens_num_params,
    k_subsets,
    pauli_num_params,
    pauli_stiefel,
    qnn_probabilities,
    qnn_statevector,
)
from qpeft.circuits.builders import (
    generalized_circuit,
    orthogonal_rbs_circuit,
    pauli_circuit,
    qnn_circuit,
    qubits_for_dim,
    rbs_circuit,
)
from qpeft.circuits.ir import Circuit, Gate, circuit_depth, expand_rbs, gate_counts
from qpeft.export.qasm import to_qasm3

pytest.importorskip("qiskit")
pytest.importorskip("qiskit_qasm3_import")

from qiskit.quantum_info import Operator, Statevector  # noqa: E402

from qpeft.export.qiskit_io import qasm3_loads, rbs_gate, to_qiskit  # noqa: E402

TOL = 1e-10


def _op(circuit: Circuit) -> np.ndarray:
    return Operator(to_qiskit(circuit)).data


def _op_qasm(circuit: Circuit) -> np.ndarray:
    return Operator(qasm3_loads(to_qasm3(circuit))).data


def _angles(p: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(p, generator=g, dtype=torch.float64) * 2 - 1) * math.pi


def _sector(n: int, k: int) -> list[int]:
    """Basis indices of the Hamming-weight-k states, k-subsets in lexicographic order."""
    return [sum(1 << q for q in s) for s in k_subsets(n, k)]


# ---------------------------------------------------------------------------------- RBS gate


def test_rbs_gate_matrix_and_standard_decomposition():
    t = 0.731
    c, s = math.cos(t), math.sin(t)
    want = np.array([[1, 0, 0, 0], [0, c, -s, 0], [0, s, c, 0], [0, 0, 0, 1]])
    one = Circuit("g", 2, [Gate("rbs", (0, 1), t)])
    assert np.abs(_op(one) - want).max() < TOL  # Qiskit gate with our definition
    assert np.abs(_op(expand_rbs(one)) - want).max() < TOL  # h, cz, ry only
    assert np.abs(_op_qasm(one) - want).max() < TOL  # the QASM `gate rbs` definition
    assert np.abs(Operator(rbs_gate(t)).data - want).max() < TOL
    assert gate_counts(expand_rbs(one)) == {"cz": 2, "h": 4, "ry": 2}
    # the other orientation is a different gate: the test can fail
    assert np.abs(Operator(rbs_gate(-t)).data - want).max() > 0.1


# ------------------------------------------------------------------------------ Quantum-PEFT


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 5), depth=st.integers(0, 3), seed=st.integers(0, 10**6))
def test_pauli_circuit_columns_equal_pauli_stiefel(n, depth, seed):
    a = _angles(pauli_num_params(n, depth), seed)
    c = pauli_circuit(a, n, depth)
    op = _op(c)
    q = pauli_stiefel(a, n, depth, 2**n).numpy()
    assert np.abs(op.imag).max() < TOL
    assert np.abs(op - q).max() < TOL
    assert gate_counts(c) == {
        k: v for k, v in {"cz": depth * (n - 1), "ry": pauli_num_params(n, depth)}.items() if v
    }


@pytest.mark.parametrize("n", [2, 3, 5, 6, 7, 11, 12, 13, 24, 97])
@pytest.mark.parametrize("depth", [1, 2])
def test_generalized_circuit_equals_generalized_stiefel(n, depth):
    a = _angles(generalized_num_params(n, 1, depth), n * 10 + depth)
    c = generalized_circuit(a, n, depth)
    assert c.num_qubits == qubits_for_dim(n)
    op = _op(c)
    q = generalized_stiefel(a, n, n, depth).numpy()
    assert np.abs(op[:n, :n] - q).max() < TOL
    assert np.allclose(op[n:, :n], 0, atol=TOL)  # the embedded subspace is invariant
    k = min(n, 3)
    assert np.abs(op[:n, :k] - generalized_stiefel(a, n, k, depth).numpy()).max() < TOL


def test_generalized_circuit_minilm_width_384():
    """MiniLM's hidden size: 384 = 256 + 128 on 9 qubits; controls on qubits 7 and 8 only."""
    a = _angles(generalized_num_params(384, 1, 1), 7)
    c = generalized_circuit(a, 384, 1)
    assert c.num_qubits == 9
    assert max(len(g.controls) for g in c.gates) == 1
    op = _op(c)
    q = generalized_stiefel(a, 384, 8, 1).numpy()
    assert np.abs(op[:384, :8] - q).max() < TOL
    assert np.abs(op[384:, :8]).max() < TOL


def test_generalized_equals_pauli_for_power_of_two():
    a = _angles(pauli_num_params(3, 2), 3)
    assert generalized_circuit(a, 8, 2).gates == pauli_circuit(a, 3, 2).gates


# ------------------------------------------------------------------------------------- QuIC


@pytest.mark.parametrize("layout", ["pyramid", "brick", "butterfly"])
@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
def test_rbs_circuit_sectors_are_compounds(layout, n):
    a = _angles(givens_num_params(n, layout), 31 * n)
    c = rbs_circuit(a, n, layout)
    op = _op(c)
    mat = givens_matrix(a, n, layout)
    for k in range(1, n + 1):
        idx = _sector(n, k)
        assert np.abs(op[np.ix_(idx, idx)] - compound(mat, k).numpy()).max() < TOL, k
    assert np.abs(_op_qasm(c) - op).max() < TOL


def test_butterfly_needs_the_fermionic_signs():
    """Plain (non-fermionic) RBS on non-adjacent wires would not give the compound."""
    n, layout = 4, "butterfly"
    a = _angles(givens_num_params(n, layout), 5)
    plain = Circuit("plain", n, [g for g in rbs_circuit(a, n, layout).gates if g.name == "rbs"])
    idx = _sector(n, 2)
    err = np.abs(_op(plain)[np.ix_(idx, idx)] - compound(givens_matrix(a, n, layout), 2).numpy())
    assert err.max() > 1e-3


@pytest.mark.parametrize("n", [2, 4, 5])
@pytest.mark.parametrize("det", [1, -1])
def test_orthogonal_matrix_compiled_to_givens(n, det):
    g = torch.Generator().manual_seed(n)
    s = torch.randn(n, n, generator=g, dtype=torch.float64)
    a = torch.linalg.matrix_exp(s - s.T)
    if det < 0:
        a[-1] = -a[-1]
    c, angles = orthogonal_rbs_circuit(a)
    assert angles.numel() == n * (n - 1) // 2
    assert gate_counts(c) == ({"rbs": n * (n - 1) // 2} | ({"z": 1} if det < 0 else {}))
    op = _op(c)
    for k in range(1, n + 1):
        idx = _sector(n, k)
        assert np.abs(op[np.ix_(idx, idx)] - compound(a, k).numpy()).max() < TOL


def test_orthogonal_rbs_circuit_rejects_non_orthogonal():
    with pytest.raises(ValueError, match="orthogonal"):
        orthogonal_rbs_circuit(torch.eye(3, dtype=torch.float64) * 2)
    with pytest.raises(ValueError, match="square"):
        orthogonal_rbs_circuit(torch.zeros(2, 3, dtype=torch.float64))


# -------------------------------------------------------------------------------------- QPA


@pytest.mark.parametrize("depth,n", [(1, 1), (2, 3), (8, 5)])
def test_qnn_circuit_probabilities_equal_qpeft(depth, n):
    theta = _angles(depth * n, depth + n).reshape(depth, n)
    c = qnn_circuit(theta)
    assert c.has_measurements and gate_counts(c)["measure"] == n
    qc = to_qiskit(c)
    qc.remove_final_measurements()
    sv = Statevector(qc)
    assert np.abs(sv.data - qnn_statevector(theta).numpy()).max() < TOL
    assert np.abs(sv.probabilities() - qnn_probabilities(theta).numpy()).max() < TOL
    back = qasm3_loads(to_qasm3(c))
    assert back.num_clbits == n
    back.remove_final_measurements()
    assert np.abs(Statevector(back).probabilities() - sv.probabilities()).max() < TOL


# --------------------------------------------------------------------------- conventions


def test_basis_ordering_is_little_endian():
    """Qubit 0 is the least significant bit: an RY on qubit 0 moves |0> to |1> (index 1), and
    the reversed (big-endian) reading of a Pauli circuit does not equal qpeft's matrix."""
    c = Circuit("x", 3, [Gate("ry", (0,), math.pi)])
    sv = Statevector(to_qiskit(c))
    assert abs(abs(sv.data[1]) - 1) < TOL
    a = _angles(pauli_num_params(3, 1), 11)
    qc = to_qiskit(pauli_circuit(a, 3, 1))
    q = pauli_stiefel(a, 3, 1, 8).numpy()
    assert np.abs(Operator(qc).data - q).max() < TOL
    assert np.abs(Operator(qc.reverse_bits()).data - q).max() > 1e-3


@pytest.mark.parametrize(
    "circuit",
    [
        pauli_circuit(_angles(pauli_num_params(4, 2), 1), 4, 2),
        generalized_circuit(_angles(generalized_num_params(13, 1, 1), 2), 13, 1),
        rbs_circuit(_angles(givens_num_params(6, "butterfly"), 3), 6, "butterfly"),
        qnn_circuit(_angles(12, 4).reshape(3, 4)),
    ],
    ids=["pauli", "generalized", "butterfly", "qnn"],
)
def test_depth_and_counts_agree_with_qiskit(circuit):
    qc = to_qiskit(circuit)
    assert circuit_depth(circuit) == qc.depth()
    assert sum(gate_counts(circuit).values()) == qc.size()
    std = expand_rbs(circuit)
    assert circuit_depth(std) == to_qiskit(std).depth()
    assert qasm3_loads(to_qasm3(circuit)).depth() == qc.depth()


def test_qasm_text_is_plain_openqasm3():
    c = generalized_circuit(_angles(generalized_num_params(5, 1, 1), 9), 5, 1)
    text = to_qasm3(c, header="line one\nline two")
    assert text.startswith("// line one\n// line two\nOPENQASM 3.0;\ninclude \"stdgates.inc\";")
    assert "negctrl @ ry(" in text and "ctrl @ " in text
    assert "gate rbs" not in text  # only files with RBS gates define it
    # angles are written with repr: the float64 value round-trips exactly
    ry = [g.param for g in c.gates if g.name == "ry"]
    assert all(repr(float(p)) in text for p in ry)


# ------------------------------------------------------------------------------- bad input


def test_bad_input_raises_value_error_naming_the_argument():
    with pytest.raises(ValueError, match="angles must hold 7 angles"):
        pauli_circuit(torch.zeros(6), 3, 1)
    with pytest.raises(ValueError, match="non-finite"):
        pauli_circuit(torch.full((7,), float("nan")), 3, 1)
    with pytest.raises(ValueError, match="n must be >= 2"):
        generalized_circuit(torch.zeros(0), 1, 1)
    with pytest.raises(ValueError, match="layout must be one of"):
        rbs_circuit(torch.zeros(3), 3, "ring")
    with pytest.raises(ValueError, match=r"theta must have shape \[L, n_qubits\]"):
        qnn_circuit(torch.zeros(4))
    with pytest.raises(ValueError, match="gate name must be one of"):
        Gate("rx", (0,), 0.1)
    with pytest.raises(ValueError, match="takes 2 qubit"):
        Gate("cz", (0,))
    with pytest.raises(ValueError, match="repeated qubit"):
        Gate("ry", (0,), 0.1, ((0, 1),))
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        Circuit("c", 2, [Gate("ry", (2,), 0.1)])
    with pytest.raises(ValueError, match="num_qubits must be"):
        Circuit("c", 0)

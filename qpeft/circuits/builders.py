"""Gate lists of qpeft's circuits with concrete angles (pure torch + ``qpeft.circuits``).

Every builder reads the angle layout from ``qpeft.circuits`` (``pauli_gates``, ``split_sizes``,
``givens_pairs``, ``givens_decompose``) instead of re-deriving it, and returns an
:class:`~qpeft.circuits.ir.Circuit` in the little-endian convention of ``qpeft.circuits.ir``.

* :func:`pauli_circuit`: Quantum-PEFT's RY + CZ circuit on ``log2 N`` qubits; its first K
  columns are ``pauli_stiefel``.
* :func:`generalized_circuit`: the binary cosine-sine circuit ``Q_N`` of ``qpeft.circuits.qsd``
  for any N, embedded in ``ceil(log2 N)`` qubits (basis states ``0..N-1``; the states ``>= N``
  are never reached from them): the direct sums become open/closed controls on the top qubit of
  each level, the cosine-sine layer an RY on that qubit controlled on "low bits < N2".
* :func:`rbs_circuit` / :func:`orthogonal_rbs_circuit`: QuIC's Givens circuits as RBS gates on
  ``n`` qubits (wire q = qubit q); an arbitrary orthogonal A is first factored into the pyramid
  (``givens_decompose``) plus a Z per ``-1`` sign.  Non-adjacent gates (butterfly) become
  *fermionic* RBS gates (the Givens angle flips sign when an odd number of qubits strictly between
  the pair is set: a CZ from each in-between qubit onto the first wire, before and after), which
  is what makes the Hamming-weight-k sector act as the compound ``C_k(A)``.
* :func:`qnn_circuit`: QPA's RY layer + CNOT ladder, repeated, then measurement.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qpeft.circuits._checks import check_positive_int
from qpeft.circuits.givens import givens_decompose, givens_num_params, givens_pairs
from qpeft.circuits.ir import Circuit, Gate
from qpeft.circuits.pauli import is_power_of_two, pauli_gates, pauli_num_params
from qpeft.circuits.qsd import generalized_num_params, split_sizes

__all__ = [
    "qubits_for_dim",
    "pauli_circuit",
    "generalized_circuit",
    "generalized_circuit_num_params",
    "rbs_circuit",
    "orthogonal_rbs_circuit",
    "qnn_circuit",
]


def qubits_for_dim(n: int) -> int:
    """Qubits needed to hold dimension ``n`` as basis states 0..n-1: ``ceil(log2 n)`` (at least
    1).  O(1)."""
    check_positive_int("n", n)
    return max(1, (n - 1).bit_length())


def _angles(name: str, angles: torch.Tensor | Sequence[float], expected: int) -> list[float]:
    values = angles.detach().double().reshape(-1).tolist() if isinstance(angles, torch.Tensor) else [
        float(a) for a in angles
    ]
    if len(values) != expected:
        raise ValueError(f"{name} must hold {expected} angles, got {len(values)}")
    bad = [a for a in values if a != a or a in (float("inf"), float("-inf"))]
    if bad:
        raise ValueError(f"{name} holds {len(bad)} non-finite value(s)")
    return values


def _pauli_gates(
    values: list[float], n_qubits: int, depth: int, wires: Sequence[int], controls: tuple
) -> list[Gate]:
    out = []
    for name, qs, idx in pauli_gates(n_qubits, depth):
        targets = tuple(wires[q] for q in qs)
        out.append(Gate(name, targets, None if idx is None else values[idx], controls))
    return out


def pauli_circuit(
    angles: torch.Tensor | Sequence[float], n_qubits: int, depth: int, name: str = "pauli"
) -> Circuit:
    """Quantum-PEFT's Pauli circuit ``Q`` (2**n x 2**n) with these angles, gate for gate.

    ``angles``: ``P = pauli_num_params(n_qubits, depth)`` numbers in the layout of
    ``qpeft.circuits.pauli``.  ``Operator(circuit)[:, :K] == pauli_stiefel(angles, n, L, K)``.
    Gates: ``n + 2L(n-1)`` RY and ``L(n-1)`` CZ; O(L n)."""
    check_positive_int("n_qubits", n_qubits)
    values = _angles("angles", angles, pauli_num_params(n_qubits, depth))
    return Circuit(name, n_qubits, _pauli_gates(values, n_qubits, depth, range(n_qubits), ()))


def generalized_circuit_num_params(n: int, depth: int) -> int:
    """Angles consumed by :func:`generalized_circuit` (= ``generalized_num_params(n, 1, L)``)."""
    return generalized_num_params(n, 1, depth)


def _less_than(value: int, wires: Sequence[int]) -> list[tuple[tuple[int, int], ...]]:
    """Disjoint control patterns whose union is "the number held on ``wires`` (low bit first)
    is < ``value``": one pattern per 1-bit b of ``value`` (higher bits equal, bit b = 0)."""
    m = len(wires)
    patterns = []
    for b in range(m - 1, -1, -1):
        if (value >> b) & 1:
            higher = tuple((wires[h], (value >> h) & 1) for h in range(m - 1, b, -1))
            patterns.append(higher + ((wires[b], 0),))
    return patterns


def _generalized_gates(
    values: list[float], n: int, depth: int, wires: Sequence[int], controls: tuple
) -> list[Gate]:
    """Gates of ``Q_n`` on ``wires`` (low qubit first), every gate under ``controls``."""
    if n == 1:
        return []
    if is_power_of_two(n):
        return _pauli_gates(values, n.bit_length() - 1, depth, wires, controls)
    n1, n2 = split_sizes(n)
    m = n1.bit_length() - 1
    top = wires[m]
    p1 = pauli_num_params(m, depth)
    b1, phi, a1, a2 = values[:p1], values[p1], values[p1 + 1 : 2 * p1 + 1], values[2 * p1 + 1 :]
    low = wires[:m]
    off, on = controls + ((top, 0),), controls + ((top, 1),)
    gates = _pauli_gates(b1, m, depth, low, off)  # B1 (+) I
    for pattern in _less_than(n2, low):  # CS(phi): pairs (i, n1 + i), i < n2
        gates.append(Gate("ry", (top,), 2.0 * phi, controls + pattern))
    gates += _pauli_gates(a1, m, depth, low, off)  # A1 (+) .
    gates += _generalized_gates(a2, n2, depth, wires[: qubits_for_dim(n2)], on)  # . (+) A2
    return gates


def generalized_circuit(
    angles: torch.Tensor | Sequence[float], n: int, depth: int, name: str = "generalized"
) -> Circuit:
    """The generalized circuit ``Q_n`` of ``qpeft.circuits.qsd`` (any ``n >= 2``) on
    ``qubits_for_dim(n)`` qubits, dimension ``n`` embedded as the basis states ``0..n-1``.

    ``Operator(circuit)[:n, :k] == generalized_stiefel(angles, n, k, L)`` for every k, and the
    ``n``-dimensional subspace is invariant.  Equal to :func:`pauli_circuit` for a power of two.
    Uses RY and CZ gates with up to one control per recursion level plus a "< N2" comparator
    (at most ``log2 n`` controls); O(L log**2 n) gates."""
    check_positive_int("n", n, minimum=2)
    values = _angles("angles", angles, generalized_circuit_num_params(n, depth))
    nq = qubits_for_dim(n)
    return Circuit(name, nq, _generalized_gates(values, n, depth, range(nq), ()))


def _rbs_gate(i: int, j: int, theta: float) -> list[Gate]:
    """An RBS on wires i < j; fermionic (parity-conjugated) when they are not adjacent."""
    between = [Gate("cz", (k, i)) for k in range(i + 1, j)]
    return between + [Gate("rbs", (i, j), theta)] + between


def rbs_circuit(
    angles: torch.Tensor | Sequence[float],
    n: int,
    layout: str,
    name: str = "rbs",
    circuit: Circuit | None = None,
) -> Circuit:
    """The Givens circuit ``givens_matrix(angles, n, layout)`` as RBS gates on ``n`` qubits.

    Restricted to the Hamming-weight-k basis states (qubit q set <=> q in the k-subset, subsets in
    lexicographic order) the unitary is ``compound(A, k)``.  ``circuit``: append to it instead of
    starting a new one (chained adapters).  ``givens_num_params(n, layout)`` RBS gates (plus 2
    CZ per in-between qubit for non-adjacent pairs); O(n**2)."""
    check_positive_int("n", n, minimum=2)
    values = _angles("angles", angles, givens_num_params(n, layout))
    out = circuit if circuit is not None else Circuit(name, n)
    if out.num_qubits != n:
        raise ValueError(f"circuit has {out.num_qubits} qubits, the layout needs n={n}")
    g = 0
    for layer in givens_pairs(n, layout):
        for i, j in layer:
            for gate in _rbs_gate(i, j, values[g]):
                out.append(gate)
            g += 1
    return out


def orthogonal_rbs_circuit(
    a: torch.Tensor, name: str = "rbs", atol: float | None = None
) -> tuple[Circuit, torch.Tensor]:
    """Compile an orthogonal ``a`` (n x n, float64 recommended) into a pyramid of n(n-1)/2 RBS
    gates followed by a Z on every qubit whose ``givens_decompose`` sign is -1 (only the last,
    when det a = -1).  Returns ``(circuit, angles)``.  Exact: C_k(D M) = C_k(D) C_k(M) and the
    order-k compound of a sign diagonal D is the Z gates' diagonal.  O(n**3)."""
    if not isinstance(a, torch.Tensor) or a.dim() != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"a must be a square matrix tensor, got {getattr(a, 'shape', a)!r}")
    n = a.shape[0]
    check_positive_int("a.shape[0]", n, minimum=2)
    angles, signs = givens_decompose(a.detach().double(), atol=atol)
    circuit = rbs_circuit(angles, n, "pyramid", name)
    for q in range(n):
        if float(signs[q]) < 0:
            circuit.append(Gate("z", (q,)))
    return circuit, angles


def qnn_circuit(
    theta: torch.Tensor | Sequence[Sequence[float]], name: str = "qnn", measure: bool = True
) -> Circuit:
    """QPA's QNN: for each of the L layers, RY(theta[l, q]) on every qubit q, then CNOT(q, q+1)
    for q = 0..n-2; then (``measure``) every qubit q measured into bit q.

    ``theta``: [L, n].  Its state before measurement is ``qnn_statevector(theta)``; the
    measurement probabilities are ``qnn_probabilities(theta)``.  ``L n`` RY, ``L (n-1)`` CX; O(L n).
    """
    t = torch.as_tensor(theta, dtype=torch.float64).detach()
    if t.dim() != 2:
        raise ValueError(f"theta must have shape [L, n_qubits], got {tuple(t.shape)}")
    depth, n = t.shape
    check_positive_int("theta.shape[0] (depth L)", int(depth))
    check_positive_int("theta.shape[1] (n_qubits)", int(n))
    values = _angles("theta", t, depth * n)
    out = Circuit(name, int(n))
    for layer in range(depth):
        for q in range(n):
            out.append(Gate("ry", (q,), values[layer * n + q]))
        for q in range(n - 1):
            out.append(Gate("cx", (q, q + 1)))
    if measure:
        for q in range(n):
            out.append(Gate("measure", (q,)))
    return out

"""A tiny gate-list representation of the circuits qpeft exports (no qiskit needed).

Conventions, shared by every writer (OpenQASM 3 text, Qiskit circuits):

* **Basis ordering: little-endian**, as in Qiskit: qubit ``q`` is bit ``q`` of the basis index
  ``i = sum_q b_q 2**q`` (qubit 0 is the least significant bit), so a product of one-qubit gates
  has the matrix ``kron(G_{n-1}, ..., G_0)``.  ``qpeft.circuits`` uses the same convention.
* ``ry(t) = [[cos t/2, -sin t/2], [sin t/2, cos t/2]]``; ``cz = diag(1, 1, 1, -1)``; ``z``;
  ``h``; ``cx`` (control first); ``measure`` (one qubit into the classical bit of the same
  index).
* ``rbs(t)`` on ``(a, b)`` is the Givens rotation of ``qpeft.circuits.givens`` in the
  ``{|a=1,b=0>, |a=0,b=1>}`` subspace: ``|1_a> -> cos t |1_a> + sin t |1_b>``,
  ``|1_b> -> -sin t |1_a> + cos t |1_b>``, identity on ``|00>`` and ``|11>``.  In standard gates
  (:data:`RBS_DECOMPOSITION`): ``h a; h b; cz a, b; ry(t) a; ry(-t) b; cz a, b; h a; h b``.
* A gate may carry extra ``controls``: ``(qubit, state)`` pairs, state 1 = control on ``|1>``,
  state 0 = control on ``|0>`` (OpenQASM 3 ``ctrl @`` / ``negctrl @``).

Gate lists are in application order: gate 0 acts first on the input state.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

__all__ = [
    "GATE_ARITY",
    "RBS_DECOMPOSITION",
    "Gate",
    "Circuit",
    "circuit_depth",
    "gate_counts",
    "expand_rbs",
]

#: number of target qubits of each gate name
GATE_ARITY = {"ry": 1, "z": 1, "h": 1, "cz": 2, "cx": 2, "rbs": 2, "measure": 1}
_PARAMETRIC = {"ry", "rbs"}

#: RBS(t) on (a, b) as standard gates, (name, targets as positions in (a, b), angle factor)
RBS_DECOMPOSITION: tuple[tuple[str, tuple[int, ...], float | None], ...] = (
    ("h", (0,), None),
    ("h", (1,), None),
    ("cz", (0, 1), None),
    ("ry", (0,), 1.0),
    ("ry", (1,), -1.0),
    ("cz", (0, 1), None),
    ("h", (0,), None),
    ("h", (1,), None),
)


@dataclass(frozen=True)
class Gate:
    """One gate: ``name`` (a key of :data:`GATE_ARITY`), target ``qubits``, an angle for
    ``ry``/``rbs`` (else None) and extra ``controls`` ``((qubit, state), ...)``."""

    name: str
    qubits: tuple[int, ...]
    param: float | None = None
    controls: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if self.name not in GATE_ARITY:
            raise ValueError(f"gate name must be one of {sorted(GATE_ARITY)}, got {self.name!r}")
        if len(self.qubits) != GATE_ARITY[self.name]:
            raise ValueError(
                f"gate {self.name!r} takes {GATE_ARITY[self.name]} qubit(s), got {self.qubits}"
            )
        if (self.param is None) == (self.name in _PARAMETRIC):
            raise ValueError(f"gate {self.name!r}: param must be given exactly for ry/rbs")
        wires = list(self.qubits) + [q for q, _ in self.controls]
        if len(set(wires)) != len(wires):
            raise ValueError(f"gate {self.name!r}: repeated qubit in {wires}")
        if any(s not in (0, 1) for _, s in self.controls):
            raise ValueError(f"gate {self.name!r}: control states must be 0 or 1: {self.controls}")

    @property
    def wires(self) -> tuple[int, ...]:
        """Every qubit the gate touches: controls then targets."""
        return tuple(q for q, _ in self.controls) + self.qubits

    @property
    def label(self) -> str:
        """Count label: the name with one ``c`` per control (``cry``, ``ccz``) up to two
        controls, ``c{k}{name}`` beyond."""
        k = len(self.controls)
        return self.name if k == 0 else ("c" * k + self.name if k <= 2 else f"c{k}{self.name}")


@dataclass
class Circuit:
    """A named circuit on ``num_qubits`` qubits (gate list in application order).

    ``measure`` circuits end with one ``measure`` per qubit (qubit q into bit q)."""

    name: str
    num_qubits: int
    gates: list[Gate] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.num_qubits, bool) or not isinstance(self.num_qubits, int):
            raise ValueError(f"num_qubits must be an integer >= 1, got {self.num_qubits!r}")
        if self.num_qubits < 1:
            raise ValueError(f"num_qubits must be >= 1, got {self.num_qubits}")
        for g in self.gates:
            self._check(g)

    def _check(self, gate: Gate) -> None:
        bad = [q for q in gate.wires if not 0 <= q < self.num_qubits]
        if bad:
            raise ValueError(
                f"gate {gate.name!r} uses qubit(s) {bad} outside [0, {self.num_qubits - 1}]"
            )

    def append(self, gate: Gate) -> None:
        """Add ``gate`` at the end (checks its qubits). O(1)."""
        self._check(gate)
        self.gates.append(gate)

    @property
    def has_measurements(self) -> bool:
        return any(g.name == "measure" for g in self.gates)

    def without_measurements(self) -> Circuit:
        """The same circuit with the ``measure`` gates dropped."""
        return Circuit(self.name, self.num_qubits, [g for g in self.gates if g.name != "measure"])


def circuit_depth(circuit: Circuit) -> int:
    """Number of layers when every gate occupies all its wires (controls included), the same
    definition as Qiskit's ``QuantumCircuit.depth()``.  O(number of gates * arity)."""
    level = [0] * circuit.num_qubits
    depth = 0
    for g in circuit.gates:
        t = max(level[q] for q in g.wires) + 1
        for q in g.wires:
            level[q] = t
        depth = max(depth, t)
    return depth


def gate_counts(circuit: Circuit) -> dict[str, int]:
    """Gate counts by :attr:`Gate.label`, sorted by label.  O(number of gates)."""
    return dict(sorted(Counter(g.label for g in circuit.gates).items()))


def expand_rbs(circuit: Circuit) -> Circuit:
    """The circuit with every ``rbs`` replaced by :data:`RBS_DECOMPOSITION` (its controls, if
    any, copied onto each standard gate; exact because the conjugating ``h``/``cz`` pairs
    cancel when a control is off).  O(number of gates)."""
    out = Circuit(circuit.name, circuit.num_qubits)
    for g in circuit.gates:
        if g.name != "rbs":
            out.append(g)
            continue
        for name, pos, factor in RBS_DECOMPOSITION:
            param = None if factor is None else factor * float(g.param)  # type: ignore[arg-type]
            out.append(Gate(name, tuple(g.qubits[p] for p in pos), param, g.controls))
    return out

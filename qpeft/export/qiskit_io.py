"""Qiskit side of the export (optional dependency: ``pip install qpeft[qiskit]``).

Everything here imports qiskit inside the functions, so ``import qpeft.export`` works without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qpeft.circuits.ir import RBS_DECOMPOSITION, Circuit

__all__ = ["require_qiskit", "to_qiskit", "rbs_gate", "write_qpy", "read_qpy", "qasm3_loads"]

_INSTALL = "pip install 'qpeft[qiskit]'"


def require_qiskit() -> Any:
    """Import and return the ``qiskit`` module, or raise ImportError saying how to install it."""
    try:
        import qiskit
    except ImportError as err:  # pragma: no cover - exercised only without qiskit
        raise ImportError(f"this needs qiskit, which is not installed: {_INSTALL}") from err
    return qiskit


def rbs_gate(theta: float) -> Any:
    """The RBS gate as a Qiskit ``Gate`` named ``rbs`` whose definition is the standard-gate
    decomposition of ``qpeft.circuits.ir.RBS_DECOMPOSITION`` (qubit 0 of the gate = first wire)."""
    require_qiskit()
    from qiskit.circuit import Gate as QGate
    from qiskit.circuit import QuantumCircuit

    definition = QuantumCircuit(2, name="rbs")
    for name, pos, factor in RBS_DECOMPOSITION:
        if factor is None:
            getattr(definition, name)(*pos)
        else:
            definition.ry(factor * theta, pos[0])
    gate = QGate("rbs", 2, [theta])
    gate.definition = definition
    return gate


def _base_gate(name: str, param: float | None) -> Any:
    from qiskit.circuit.library import CXGate, CZGate, HGate, RYGate, ZGate

    if name == "ry":
        return RYGate(param)
    if name == "rbs":
        return rbs_gate(float(param))  # type: ignore[arg-type]
    return {"z": ZGate, "h": HGate, "cz": CZGate, "cx": CXGate}[name]()


def to_qiskit(circuit: Circuit) -> Any:
    """A ``qiskit.QuantumCircuit`` with the same gates (qubit q of ``circuit`` = Qiskit qubit q,
    so the basis orderings agree; measurements go to classical bit q).  Controlled gates use
    ``Gate.control(k, ctrl_state=...)``.  O(number of gates)."""
    require_qiskit()
    from qiskit import QuantumCircuit

    measures = circuit.has_measurements
    qc = (
        QuantumCircuit(circuit.num_qubits, circuit.num_qubits, name=circuit.name)
        if measures
        else QuantumCircuit(circuit.num_qubits, name=circuit.name)
    )
    for g in circuit.gates:
        if g.name == "measure":
            qc.measure(g.qubits[0], g.qubits[0])
            continue
        gate = _base_gate(g.name, g.param)
        if g.controls:
            # Qiskit's ctrl_state is an integer whose bit i is the state of control i
            state = sum(s << i for i, (_, s) in enumerate(g.controls))
            gate = gate.control(len(g.controls), ctrl_state=state)
        qc.append(gate, list(g.wires))
    return qc


def write_qpy(circuit: Circuit, path: str | Path) -> Path:
    """Write ``circuit`` as a QPY file (Qiskit's binary circuit format).  Returns the path."""
    require_qiskit()
    from qiskit import qpy

    path = Path(path)
    with path.open("wb") as fh:
        qpy.dump(to_qiskit(circuit), fh)
    return path


def read_qpy(path: str | Path) -> Any:
    """The first circuit of a QPY file."""
    require_qiskit()
    from qiskit import qpy

    with Path(path).open("rb") as fh:
        return qpy.load(fh)[0]


def qasm3_loads(text: str) -> Any:
    """Parse OpenQASM 3 text with Qiskit (``qiskit.qasm3.loads``; needs the
    ``qiskit-qasm3-import`` package, part of ``qpeft[qiskit]``)."""
    require_qiskit()
    from qiskit import qasm3

    try:
        return qasm3.loads(text)
    except Exception as err:
        if "qiskit_qasm3_import" in str(err) or isinstance(err, ImportError):
            raise ImportError(f"parsing OpenQASM 3 needs qiskit-qasm3-import: {_INSTALL}") from err
        raise

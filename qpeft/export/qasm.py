"""OpenQASM 3 text for :class:`~qpeft.circuits.ir.Circuit` (written by qpeft, no qiskit needed).

The file uses ``stdgates.inc`` (``ry``, ``z``, ``h``, ``cz``, ``cx``), the ``ctrl @`` /
``negctrl @`` modifiers for controlled gates, and, when the circuit has RBS gates, one gate
definition ``rbs(theta) a, b`` in those standard gates (see ``qpeft.circuits.ir``).  Angles are
written with ``repr`` (the shortest decimal that round-trips the float64 value exactly).
"""

from __future__ import annotations

from qpeft.circuits.ir import RBS_DECOMPOSITION, Circuit, Gate

__all__ = ["to_qasm3", "RBS_QASM_DEFINITION"]


def _rbs_definition() -> str:
    body = []
    for name, pos, factor in RBS_DECOMPOSITION:
        wires = ", ".join("ab"[p] for p in pos)
        if factor is None:
            body.append(f"  {name} {wires};")
        else:
            arg = "theta" if factor == 1.0 else ("-theta" if factor == -1.0 else f"{factor!r}*theta")
            body.append(f"  {name}({arg}) {wires};")
    return "gate rbs(theta) a, b {\n" + "\n".join(body) + "\n}"


#: the gate definition written into files that use RBS gates
RBS_QASM_DEFINITION = _rbs_definition()


def _gate_line(g: Gate) -> str:
    if g.name == "measure":
        return f"c[{g.qubits[0]}] = measure q[{g.qubits[0]}];"
    mods = "".join("ctrl @ " if s == 1 else "negctrl @ " for _, s in g.controls)
    call = g.name if g.param is None else f"{g.name}({float(g.param)!r})"
    wires = ", ".join(f"q[{q}]" for q in g.wires)
    return f"{mods}{call} {wires};"


def to_qasm3(circuit: Circuit, header: str = "") -> str:
    """OpenQASM 3 program for ``circuit``: one ``qubit[n] q`` register (qubit q = bit q of the
    basis index, little-endian), a ``bit[n] c`` register when it measures.  ``header``: comment
    lines put at the top (each prefixed with ``//``).  O(number of gates)."""
    lines = [f"// {line}" if line else "//" for line in header.splitlines()]
    lines += ["OPENQASM 3.0;", 'include "stdgates.inc";']
    if any(g.name == "rbs" for g in circuit.gates):
        lines.append(RBS_QASM_DEFINITION)
    lines.append(f"qubit[{circuit.num_qubits}] q;")
    if circuit.has_measurements:
        lines.append(f"bit[{circuit.num_qubits}] c;")
    lines += [_gate_line(g) for g in circuit.gates]
    return "\n".join(lines) + "\n"

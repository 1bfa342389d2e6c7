"""Export trained adapters' circuits to OpenQASM 3 or Qiskit QPY, with a JSON manifest.

``export_circuits(adapter_dir, out_dir, format="qasm3")`` (a saved adapter folder) and
``export_model_circuits(model, out_dir, ...)`` (an in-memory peft model) write, per adapted
module, the circuits that generate it (see ``qpeft.export.adapters``) and ``manifest.json``;
``qpeft.export.stock`` writes an adapter as a stock peft LoRA or OFT checkpoint where its method can.
The ``qasm3`` format is written by qpeft itself and needs no qiskit; ``qiskit-qpy`` needs
``pip install 'qpeft[qiskit]'``.  Importing this package never imports qiskit.

CLI wiring (``qpeft/cli.py``): ``add_export_circuits_parser(subparsers)`` adds
``export-circuits ADAPTER_DIR OUT_DIR [--format qasm3|qiskit-qpy] [--base-model X]
[--max-qubits N] [--adapter-name NAME]`` and sets ``func``.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from qpeft.circuits.ir import RBS_DECOMPOSITION, Circuit, circuit_depth, expand_rbs, gate_counts
from qpeft.export.adapters import (
    DEFAULT_MAX_QUBITS,
    CircuitRecord,
    SkipRecord,
    circuits_from_checkpoint,
    circuits_from_model,
)
from qpeft.export.qasm import to_qasm3

__all__ = [
    "FORMATS",
    "DEFAULT_MAX_QUBITS",
    "BASIS_ORDERING",
    "CircuitRecord",
    "SkipRecord",
    "Circuit",
    "export_circuits",
    "export_model_circuits",
    "write_circuits",
    "add_export_circuits_parser",
    "circuits_from_model",
    "circuits_from_checkpoint",
    "to_qasm3",
]

FORMATS = ("qasm3", "qiskit-qpy")
_SUFFIX = {"qasm3": ".qasm", "qiskit-qpy": ".qpy"}

#: the basis-state ordering convention, written into every manifest
BASIS_ORDERING = (
    "little-endian (Qiskit's convention): qubit q is bit q of the basis-state index "
    "i = sum_q b_q 2**q, so qubit 0 is the least significant bit and the matrix of a layer of "
    "one-qubit gates is kron(G_{n-1}, ..., G_0); qpeft.circuits uses the same convention"
)
_GATES = {
    "ry(t)": "[[cos t/2, -sin t/2], [sin t/2, cos t/2]]",
    "cz": "diag(1, 1, 1, -1)",
    "cx a, b": "NOT on b controlled by a",
    "rbs(t) a, b": "Givens rotation in span{|a=1,b=0>, |a=0,b=1>}: |1_a> -> cos t |1_a> + "
    "sin t |1_b>, |1_b> -> -sin t |1_a> + cos t |1_b>; = "
    + "; ".join(
        f"{n}{'' if f is None else '(' + ('t' if f == 1 else '-t') + ')'} "
        + ", ".join("ab"[p] for p in pos)
        for n, pos, f in RBS_DECOMPOSITION
    ),
    "ctrl @ / negctrl @": "control on |1> / on |0> (Qiskit ctrl_state), controls listed first",
    "fermionic rbs": "an RBS on non-adjacent qubits (i, j) is wrapped in CZ(k, i) for every k "
    "strictly between (before and after): the angle flips sign when an odd number of them is "
    "set, which makes the Hamming-weight sectors the compounds (Jordan-Wigner)",
}


def _check_format(format: str) -> str:
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    return format


def _file_name(record: CircuitRecord, suffix: str, used: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{record.module}.{record.role}")
    name, i = f"{stem}{suffix}", 1
    while name in used:
        name, i = f"{stem}-{i}{suffix}", i + 1
    used.add(name)
    return name


def write_circuits(
    peft_type: str, circuits: list[CircuitRecord], skipped: list[SkipRecord],
    out_dir: str | Path, format: str = "qasm3", source: str = "",
) -> Path:
    """Write each circuit to ``out_dir`` (one file each) and ``out_dir/manifest.json``.

    Manifest entries: file, module, role, method, num_qubits, gate_counts, depth (every gate on
    all its wires, Qiskit's definition), the same after expanding RBS into standard gates,
    construction details; plus ``skipped`` parts with the reason and the conventions.
    Returns the manifest path.  O(total gates)."""
    _check_format(format)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if format == "qiskit-qpy":
        from qpeft.export.qiskit_io import require_qiskit, write_qpy

        require_qiskit()
    used: set[str] = set()
    entries = []
    for rec in circuits:
        fname = _file_name(rec, _SUFFIX[format], used)
        c = rec.circuit
        header = (
            f"qpeft export-circuits: {rec.method} module {rec.module!r}, {rec.role}\n"
            f"basis ordering: {BASIS_ORDERING}\n{rec.info.get('reads_as', '')}"
        )
        if format == "qasm3":
            (out / fname).write_text(to_qasm3(c, header))
        else:
            write_qpy(c, out / fname)
        std = expand_rbs(c)
        entries.append({
            "file": fname, "module": rec.module, "role": rec.role, "method": rec.method,
            "num_qubits": c.num_qubits, "num_gates": len(c.gates), "gate_counts": gate_counts(c),
            "depth": circuit_depth(c), "measures": c.has_measurements,
            "standard_gate_counts": gate_counts(std), "standard_depth": circuit_depth(std),
            **rec.info,
        })
    manifest = {
        "qpeft_export": 1, "source": source, "peft_type": peft_type, "format": format,
        "basis_ordering": BASIS_ORDERING, "gates": _GATES,
        "circuits": entries,
        "skipped": [{"module": s.module, "role": s.role, "reason": s.reason} for s in skipped],
    }
    path = out / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def export_model_circuits(
    model: Any, out_dir: str | Path, format: str = "qasm3", adapter_name: str = "default",
    max_qubits: int = DEFAULT_MAX_QUBITS,
) -> Path:
    """Export adapter ``adapter_name`` of an in-memory peft model (a method with a circuit form).

    Returns ``out_dir``.  ValueError for adapters without a circuit form (e.g. LoRA), a bad
    ``format`` or a circuit wider than ``max_qubits``."""
    _check_format(format)
    peft_type, circuits, skipped = circuits_from_model(model, adapter_name, max_qubits)
    write_circuits(peft_type, circuits, skipped, out_dir, format, f"model adapter {adapter_name!r}")
    return Path(out_dir)


def export_circuits(
    adapter_dir: str | Path, out_dir: str | Path, format: str = "qasm3", *,
    base_model: Any = None, max_qubits: int = DEFAULT_MAX_QUBITS,
) -> Path:
    """Export the circuits of the saved adapter in ``adapter_dir`` to ``out_dir``.

    ``format``: "qasm3" (OpenQASM 3 text, no qiskit needed) or "qiskit-qpy" (needs qiskit).
    ``base_model``: where Quantum-PEFT layer sizes come from when the adapter's
    ``base_model_name_or_path`` cannot be read (see ``circuits_from_checkpoint``).
    Returns ``out_dir`` (holding the circuit files and ``manifest.json``)."""
    _check_format(format)
    peft_type, circuits, skipped = circuits_from_checkpoint(adapter_dir, base_model, max_qubits)
    write_circuits(peft_type, circuits, skipped, out_dir, format, str(adapter_dir))
    return Path(out_dir)


def add_export_circuits_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``export-circuits ADAPTER_DIR OUT_DIR [--format ...] [--base-model ...]
    [--max-qubits N]`` to an argparse ``subparsers``; ``args.func(args)`` runs it (returns 0)."""
    parser = subparsers.add_parser(
        "export-circuits",
        help="write a qpeft adapter's circuits (Quantum-PEFT, QuIC, QPA) as OpenQASM 3 or "
        "Qiskit QPY",
    )
    parser.add_argument("adapter_dir", help="folder of a saved qpeft adapter")
    parser.add_argument("out_dir", help="folder to write the circuits and manifest.json to")
    parser.add_argument("--format", choices=FORMATS, default="qasm3",
                        help="qasm3 (no qiskit needed) or qiskit-qpy (pip install 'qpeft[qiskit]')")
    parser.add_argument("--base-model", default=None, metavar="PATH_OR_NAME",
                        help="base model (for Quantum-PEFT layer sizes) if the adapter's "
                        "base_model_name_or_path is not readable")
    parser.add_argument("--max-qubits", type=int, default=DEFAULT_MAX_QUBITS, metavar="N",
                        help=f"refuse circuits wider than N qubits (default {DEFAULT_MAX_QUBITS})")
    parser.set_defaults(func=_run)
    return parser


def _run(args: argparse.Namespace) -> int:
    out = export_circuits(args.adapter_dir, args.out_dir, args.format,
                          base_model=args.base_model, max_qubits=args.max_qubits)
    manifest = json.loads((out / "manifest.json").read_text())
    for e in manifest["circuits"]:
        print(f"{e['file']}: {e['num_qubits']} qubits, depth {e['depth']}, {e['num_gates']} gates")
    for s in manifest["skipped"]:
        print(f"skipped {s['module']} ({s['role']}): {s['reason']}")
    print(f"wrote {len(manifest['circuits'])} circuit(s) and manifest.json to {out}")
    return 0

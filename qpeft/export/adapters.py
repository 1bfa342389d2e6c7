"""Which circuits generate a trained adapter: per adapted module, the circuits with their angles.

Two entry points produce the same records: :func:`circuits_from_model` (an in-memory peft model)
and :func:`circuits_from_checkpoint` (an adapter folder written by ``save_pretrained``).

* Quantum-PEFT: for each module, the circuit of U (``d_out``) and of V (``d_in``); the first K
  columns of its unitary, restricted to the basis states ``0..d-1``, are U (V).  Lie-algebra
  parameterizations have no circuit form here (recorded as skipped, with the reason).
* QuIC: one RBS circuit on ``n`` qubits per block (one per shared A with ``block_share``); its
  Hamming-weight-k sector is the compound ``C_k(A)``.  ``base_map="rbs"`` exports the trained
  angles as they are; ``"cayley"``/``"exp"`` compile A into pyramid Givens rotations (+ Z for a
  -1 sign); ``"free"`` (not orthogonal) and ``combine="sum"`` with several adapters (a mean of
  unitaries) have no circuit form (skipped, with the reason).
* QPA: the one model-wide QNN (RY + CNOT ladder, trained angles) with its measurement.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qpeft.circuits.compound import compound_dim
from qpeft.circuits.stiefel import stiefel_num_params
from qpeft.export.builders import (
    generalized_circuit,
    orthogonal_rbs_circuit,
    pauli_circuit,
    qnn_circuit,
    rbs_circuit,
)
from qpeft.export.ir import Circuit

__all__ = [
    "DEFAULT_MAX_QUBITS",
    "CIRCUIT_PEFT_TYPES",
    "CircuitRecord",
    "SkipRecord",
    "quantum_peft_records",
    "quic_records",
    "qpa_records",
    "circuits_from_model",
    "circuits_from_checkpoint",
]

#: circuits wider than this raise ValueError unless the caller raises the limit
DEFAULT_MAX_QUBITS = 32
#: peft_type values that have a circuit form
CIRCUIT_PEFT_TYPES = ("QUANTUM_PEFT", "QUIC", "QPA")


@dataclass
class CircuitRecord:
    """One exported circuit: the ``module`` it generates, its ``role`` there ("U", "V",
    "block3", "blocks", "qnn") and construction details in ``info`` (JSON-able)."""

    circuit: Circuit
    module: str
    role: str
    method: str
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class SkipRecord:
    """A part of an adapter with no circuit form, and why."""

    module: str
    role: str
    reason: str


def _check_width(circuit: Circuit, module: str, role: str, max_qubits: int) -> None:
    if circuit.num_qubits > max_qubits:
        raise ValueError(
            f"module {module!r} ({role}) needs a circuit of {circuit.num_qubits} qubits, more than "
            f"max_qubits={max_qubits}; raise max_qubits (--max-qubits) to export it anyway, or "
            "leave the module out"
        )


def _check_max_qubits(max_qubits: int) -> None:
    if isinstance(max_qubits, bool) or not isinstance(max_qubits, int) or max_qubits < 1:
        raise ValueError(f"max_qubits must be an integer >= 1, got {max_qubits!r}")


def _side_record(
    module: str, role: str, angles: torch.Tensor, method: str, d: int, k: int, depth: int,
    max_qubits: int,
) -> CircuitRecord | SkipRecord:
    if method not in ("pauli", "generalized"):
        return SkipRecord(
            module, role,
            f"parameterization {method!r}: {role} = exp(S)[:, :K] (Lie algebra) is a dense "
            f"{d}x{d} orthogonal map with no compact gate form; use parameterization='pauli' or "
            "'generalized' for circuits",
        )
    if d == 1:
        return SkipRecord(module, role, "dimension 1: the 1x1 identity, no qubits")
    name = f"{module}.{role}"
    if method == "pauli":
        circuit = pauli_circuit(angles, int(math.log2(d)), depth, name)
        construction = "pauli"
    else:
        circuit = generalized_circuit(angles, d, depth, name)
        construction = "pauli" if d & (d - 1) == 0 else "generalized (binary cosine-sine split)"
    _check_width(circuit, module, role, max_qubits)
    info = {
        "dim": d, "k": k, "depth_L": depth, "construction": construction,
        "num_params": stiefel_num_params(method, d, k, depth),
        "reads_as": (
            f"{role} = first {k} columns of the circuit's unitary, rows 0..{d - 1}"
            + (f" (dimension {d} embedded in the first {d} of {2 ** circuit.num_qubits} basis "
               "states; the others are never reached from them)" if d & (d - 1) else "")
        ),
    }
    return CircuitRecord(circuit, module, role, "quantum_peft", info)


def quantum_peft_records(
    module: str, angles_u: torch.Tensor, angles_v: torch.Tensor, method_u: str, method_v: str,
    d_out: int, d_in: int, r: int, depth: int, quantize_bits: int | None = None,
    max_qubits: int = DEFAULT_MAX_QUBITS,
) -> list[CircuitRecord | SkipRecord]:
    """Circuits of U (``d_out``) and V (``d_in``) of one Quantum-PEFT module.

    Angles are used as the forward pass uses them: quantized to ``quantize_bits`` when set.
    O(L log**2 d) gates per side."""
    from qpeft.tuners.quantum_peft.layer import ANGLE_PARAMETERIZATIONS, quantize_angles

    out: list[CircuitRecord | SkipRecord] = []
    for role, angles, method, d in (("U", angles_u, method_u, d_out), ("V", angles_v, method_v, d_in)):
        a = angles.detach().double()
        if quantize_bits is not None and method in ANGLE_PARAMETERIZATIONS:
            a = quantize_angles(a, quantize_bits)
        out.append(_side_record(module, role, a, method, d, r, depth, max_qubits))
    return out


def _n_from_count(p: int, base_map: str, layout: str) -> int:
    from qpeft.tuners.quic.config import base_map_num_params

    n = 2
    while True:
        got = base_map_num_params(n, base_map, layout)
        if got == p:
            return n
        if got > p:
            raise ValueError(f"no block size n has {p} parameters under base_map={base_map!r}")
        n += 1


def quic_records(
    module: str, params: torch.Tensor, n: int, orders: list[int], base_map: str,
    rbs_layout: str, combine: str, num_blocks: int, block_share: bool,
    block_size: int | None = None, max_qubits: int = DEFAULT_MAX_QUBITS, side: str = "output",
) -> list[CircuitRecord | SkipRecord]:
    """One circuit per block (or per shared A) of one QuIC module.

    ``params``: [num_adapters, N_A, P] as stored by the layer.  Chained adapters (``product``)
    become one circuit, adapter 0's gates first (Q = C_k(A_m ... A_1)).  ``block_size``: rows
    per block, recorded when known.  O(N_A m n**2) gates; O(N_A n**3) to compile Cayley/exp."""
    from qpeft.tuners.quic.layer import base_matrices

    m, n_a, _ = params.shape
    if base_map == "free":
        return [SkipRecord(module, "blocks", "base_map='free': A = I + P is not orthogonal, "
                           "so C_k(A) is not a unitary and has no circuit")]
    if combine == "sum" and m > 1:
        return [SkipRecord(module, "blocks", f"combine='sum' with {m} adapters: Q is a mean of "
                           "unitaries, not a unitary, and has no single circuit")]
    p = params.detach().double()
    out: list[CircuitRecord | SkipRecord] = []
    for i in range(n_a):
        role = "blocks" if block_share else f"block{i}"
        name = f"{module}.{role}"
        if base_map == "rbs":
            circuit = Circuit(name, n)
            for j in range(m):
                rbs_circuit(p[j, i], n, rbs_layout, circuit=circuit)
            construction = f"rbs layout {rbs_layout!r}, trained angles"
        else:
            a = base_matrices(p[:, i], n, base_map, rbs_layout)  # [m, n, n]
            prod = a[0]
            for j in range(1, m):
                prod = a[j] @ prod
            circuit, _ = orthogonal_rbs_circuit(prod, name)
            construction = f"{base_map} base compiled into a pyramid of n(n-1)/2 Givens rotations"
        _check_width(circuit, module, role, max_qubits)
        info: dict[str, Any] = {
            "n": n, "orders": list(orders), "construction": construction,
            "num_adapters_chained": m,
            "side": side + (": W' = Q W" if side == "output" else ": W' = W Q^T"),
            "blocks": list(range(num_blocks)) if block_share else [i],
            "sectors": {str(k): compound_dim(n, k) for k in orders},
            "reads_as": "restricted to the Hamming-weight-k basis states (qubit q set <=> q in the "
            "k-subset; subsets in lexicographic order) the unitary is C_k(A), the block's "
            "order-k compound",
        }
        if block_size is not None:
            info["block_rows"] = [[b * block_size, (b + 1) * block_size] for b in info["blocks"]]
        out.append(CircuitRecord(circuit, module, role, "quic", info))
    return out


def qpa_records(
    theta: torch.Tensor, n_chunks: int, module: str = "qpa_generator",
    max_qubits: int = DEFAULT_MAX_QUBITS,
) -> list[CircuitRecord | SkipRecord]:
    """The model-wide QPA circuit: theta [L, N] -> RY/CNOT-ladder QNN plus measurement.  O(L N)."""
    circuit = qnn_circuit(theta, f"{module}.qnn", measure=True)
    _check_width(circuit, module, "qnn", max_qubits)
    n = circuit.num_qubits
    info = {
        "n_qubits": n, "depth_L": int(theta.shape[0]), "n_chunks_used": int(n_chunks),
        "reads_as": "measurement probabilities p_i, i = 0..2**N-1 (little-endian), of which the "
        f"first {n_chunks} feed the generator MLP",
        "shots_note": "estimating every p_i to a relative error eps needs about 2**N / eps**2 "
        "shots (p_i is about 2**-N)",
    }
    return [CircuitRecord(circuit, module, "qnn", "qpa", info)]


# ---------------------------------------------------------------------------------- models


def _peft_type_name(config: Any) -> str:
    pt = getattr(config, "peft_type", None)
    return str(getattr(pt, "value", pt))


def _no_circuit_error(peft_type: str, where: str) -> ValueError:
    return ValueError(
        f"{where} holds a {peft_type!r} adapter, which has no circuit form; export-circuits "
        f"supports peft_type in {CIRCUIT_PEFT_TYPES} (Quantum-PEFT, QuIC, QPA)"
    )


def circuits_from_model(
    model: Any, adapter_name: str = "default", max_qubits: int = DEFAULT_MAX_QUBITS
) -> tuple[str, list[CircuitRecord], list[SkipRecord]]:
    """``(peft_type, circuits, skipped)`` for adapter ``adapter_name`` of a peft model.

    ValueError for an adapter without a circuit form (e.g. LoRA), an unknown adapter name, or a
    circuit wider than ``max_qubits``.  O(total gates)."""
    _check_max_qubits(max_qubits)
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, Mapping) or adapter_name not in configs:
        known = sorted(configs) if isinstance(configs, Mapping) else []
        raise ValueError(f"adapter_name {adapter_name!r} is not an adapter of this model: {known}")
    config = configs[adapter_name]
    peft_type = _peft_type_name(config)
    if peft_type not in CIRCUIT_PEFT_TYPES:
        raise _no_circuit_error(peft_type, f"adapter {adapter_name!r}")
    records: list[CircuitRecord | SkipRecord] = []
    if peft_type == "QPA":
        tuner = model.base_model if hasattr(model, "base_model") else model
        gen = tuner.generator(adapter_name)
        records += qpa_records(gen.theta, gen.n_chunks, max_qubits=max_qubits)
    for name, module in model.named_modules():
        name = name.removeprefix("base_model.model.")
        if peft_type == "QUANTUM_PEFT" and adapter_name in getattr(module, "qpeft_spec", {}):
            s = module.qpeft_spec[adapter_name]
            records += quantum_peft_records(
                name, *module.angles(adapter_name),
                s.method_u, s.method_v, s.out_features, s.in_features, s.r, s.depth,
                s.quantize_bits, max_qubits,
            )
        elif peft_type == "QUIC" and adapter_name in getattr(module, "quic_plan", {}):
            plan, st = module.quic_plan[adapter_name], module.quic_settings[adapter_name]
            records += quic_records(
                name, module.quic_params[adapter_name], plan.n, list(plan.orders), st.base_map,
                st.rbs_layout, st.combine, plan.num_blocks, st.block_share, plan.block_size,
                max_qubits, st.side,
            )
    return _split(peft_type, records)


def _natural(record: CircuitRecord | SkipRecord) -> tuple:
    """Sort key: module then role, numbers compared as numbers (layer.2 before layer.10)."""
    parts = re.split(r"(\d+)", f"{record.module}\0{record.role}")
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


def _split(peft_type: str, records: list) -> tuple[str, list[CircuitRecord], list[SkipRecord]]:
    """Circuits and skipped parts, each in natural module order (the same from a model and
    from its checkpoint)."""
    circuits = sorted((r for r in records if isinstance(r, CircuitRecord)), key=_natural)
    skipped = sorted((r for r in records if isinstance(r, SkipRecord)), key=_natural)
    return peft_type, circuits, skipped


# ------------------------------------------------------------------------------ checkpoints

_TASK_AUTO = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}
_PREFIX = "base_model.model."


def _read_dir(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    if not adapter_dir.is_dir():
        raise ValueError(f"adapter_dir {str(adapter_dir)!r} is not a directory")
    cfg_file = adapter_dir / "adapter_config.json"
    if not cfg_file.is_file():
        raise ValueError(f"adapter_dir {str(adapter_dir)!r} has no adapter_config.json")
    config = json.loads(cfg_file.read_text())
    peft_type = str(config.get("peft_type"))
    if peft_type not in CIRCUIT_PEFT_TYPES:
        raise _no_circuit_error(peft_type, f"adapter_dir {str(adapter_dir)!r}")
    weights = adapter_dir / "adapter_model.safetensors"
    if weights.is_file():
        tensors = load_file(str(weights))
    elif (adapter_dir / "adapter_model.bin").is_file():
        tensors = torch.load(adapter_dir / "adapter_model.bin", weights_only=True)
    else:
        raise ValueError(f"adapter_dir {str(adapter_dir)!r} has no adapter_model.safetensors")
    return config, tensors


def _by_module(tensors: dict[str, torch.Tensor], suffix: str) -> dict[str, torch.Tensor]:
    """{module name: tensor} for keys ``base_model.model.<module>.<suffix>[.<adapter>]``."""
    out = {}
    for key, value in tensors.items():
        body = key.removeprefix(_PREFIX)
        head, sep, tail = body.rpartition(f".{suffix}")
        if sep and (tail == "" or tail.count(".") == 1):
            out[head] = value
    return out


def _config_obj(cls: type, config: dict[str, Any]) -> Any:
    known = set(cls.__dataclass_fields__)
    return cls(**{k: v for k, v in config.items() if k in known and k != "peft_type"})


def _meta_shapes(config: dict[str, Any], base_model: Any) -> Any:
    """A module tree to read layer shapes from: ``base_model`` (an nn.Module, or a path / hub
    name) or the adapter's ``base_model_name_or_path``, built on the meta device."""
    from torch import nn

    if isinstance(base_model, nn.Module):
        return base_model
    source = base_model or config.get("base_model_name_or_path")
    if not source:
        return None
    import transformers

    from qpeft.counting import model_from_config

    auto = getattr(transformers, _TASK_AUTO.get(str(config.get("task_type")), "AutoModel"))
    path = Path(str(source))
    try:
        if path.is_dir() or path.is_file():
            return model_from_config(path, auto)
        cfg = transformers.AutoConfig.from_pretrained(str(source))
        return model_from_config(cfg, auto)
    except (OSError, ValueError, KeyError, ImportError, RuntimeError):
        return None  # not a readable transformers model: fall back to inferring the sizes


def _infer_dim(p: int, k: int, depth: int, parameterization: str, auto_generalize: bool,
               max_qubits: int) -> int | None:
    """The one dimension d (K <= d <= 2**min(max_qubits, 16)) whose Stiefel count is ``p``, or
    None when there is none or several."""
    from qpeft.tuners.quantum_peft.config import resolve_parameterization

    found = []
    for d in range(max(k, 1), 2 ** min(max_qubits, 16) + 1):
        try:
            method = resolve_parameterization(parameterization, d, auto_generalize)
        except ValueError:
            continue
        if stiefel_num_params(method, d, k, depth) == p:
            found.append(d)
            if len(found) > 1:
                return None
    return found[0] if found else None


def circuits_from_checkpoint(
    adapter_dir: str | Path, base_model: Any = None, max_qubits: int = DEFAULT_MAX_QUBITS
) -> tuple[str, list[CircuitRecord], list[SkipRecord]]:
    """``(peft_type, circuits, skipped)`` read from a saved adapter folder, without loading the
    base model's weights.

    QPA and QuIC need the folder only.  Quantum-PEFT needs each layer's ``(d_out, d_in)``: read
    from ``base_model`` (an nn.Module, a local folder or a hub name) or the adapter's
    ``base_model_name_or_path`` instantiated on the meta device; failing that, inferred from the
    angle counts when exactly one size fits (ValueError otherwise, naming the module)."""
    _check_max_qubits(max_qubits)
    adapter_dir = Path(adapter_dir)
    config, tensors = _read_dir(adapter_dir)
    peft_type = str(config["peft_type"])
    records: list[CircuitRecord | SkipRecord] = []
    if peft_type == "QPA":
        from qpeft.tuners.qpa.export import _generator_from_checkpoint

        _, gen = _generator_from_checkpoint(config, tensors)
        records += qpa_records(gen.theta, gen.n_chunks, max_qubits=max_qubits)
    elif peft_type == "QUIC":
        from qpeft.tuners.quic.config import QuICConfig

        qc = _config_obj(QuICConfig, config)
        for module, params in sorted(_by_module(tensors, "quic_params").items()):
            n = _n_from_count(int(params.shape[-1]), qc.base_map, qc.rbs_layout)
            records += quic_records(
                module, params, n, list(qc.orders), qc.base_map, qc.rbs_layout, qc.combine,
                qc.num_blocks, qc.block_share, None, max_qubits, qc.side,
            )
    else:
        from qpeft.tuners._common import matrix_shape
        from qpeft.tuners.quantum_peft.config import QuantumPEFTConfig

        qc = _config_obj(QuantumPEFTConfig, config)
        us = _by_module(tensors, "qpeft_angles_u")
        vs = _by_module(tensors, "qpeft_angles_v")
        tree = _meta_shapes(config, base_model)
        for module in sorted(set(us) | set(vs)):  # a side of width 1 stores no angles
            empty = next(iter((us | vs).values())).new_zeros(0)
            us.setdefault(module, empty)
            vs.setdefault(module, empty)
            shape = None
            if tree is not None:
                try:
                    shape = matrix_shape(tree.get_submodule(module))
                except (AttributeError, ValueError):
                    shape = None
            if shape is None:
                dims = [
                    _infer_dim(int(t.numel()), qc.r, qc.depth, qc.parameterization,
                               qc.auto_generalize, max_qubits)
                    for t in (us[module], vs[module])
                ]
                if None in dims:
                    raise ValueError(
                        f"module {module!r}: its layer sizes cannot be read from the checkpoint "
                        "alone (the angle counts fit several sizes); pass base_model= (the base "
                        "model or its folder) or export from the loaded model with "
                        "export_model_circuits"
                    )
                shape = (dims[0], dims[1])
            method_u, method_v = qc.side_methods(shape[0], shape[1], f"module {module!r}")
            records += quantum_peft_records(
                module, us[module], vs[module], method_u, method_v, shape[0], shape[1], qc.r,
                qc.depth, qc.quantize_bits, max_qubits,
            )
    return _split(peft_type, records)

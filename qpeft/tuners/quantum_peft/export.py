"""Quantum-PEFT's circuits: per adapted module, the circuit of U (``d_out``) and of V (``d_in``);
with the offset start also the start's, U0 and V0 (ΔW = U·diag(λ_eff)·Vᵀ − U0·diag(λ₀_eff)·V0ᵀ).

The first K columns of each circuit's unitary, restricted to the basis states ``0..d-1``, are U
(V). Lie-algebra parameterizations have no circuit form here (recorded as skipped, with the
reason). Used by ``qpeft export-circuits`` through the method registry.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from qpeft.circuits.builders import generalized_circuit, pauli_circuit
from qpeft.circuits.stiefel import stiefel_num_params
from qpeft.tuners._common import layer_kind, matrix_shape
from qpeft.tuners._export import (
    DEFAULT_MAX_QUBITS,
    CircuitRecord,
    SkipRecord,
    check_width,
    config_from_dict,
    stand_in_layer,
    submodule_of,
    tensors_by_module,
)
from qpeft.tuners.quantum_peft.config import QuantumPEFTConfig, resolve_parameterization
from qpeft.tuners.quantum_peft.layer import ANGLE_PARAMETERIZATIONS, quantize_angles

Record = CircuitRecord | SkipRecord


def _side_record(module: str, role: str, angles: torch.Tensor, method: str, d: int, k: int,
                 depth: int, max_qubits: int) -> Record:
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
    check_width(circuit, module, role, max_qubits)
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


def module_records(
    module: str, angles_u: torch.Tensor, angles_v: torch.Tensor, method_u: str, method_v: str,
    d_out: int, d_in: int, r: int, depth: int, quantize_bits: int | None, max_qubits: int,
    gains: tuple[float, float] = (1.0, 1.0), dtype: torch.dtype = torch.float64,
    start: tuple[torch.Tensor, ...] = (),
) -> list[Record]:
    """Circuits of U (``d_out``) and V (``d_in``) of one module, with the angles as the forward
    pass uses them: the stored angles in the circuit ``dtype`` times the side's angle gain
    (``QuantumPEFTConfig.angle_gains``), quantized to ``quantize_bits`` when set; then, given the
    offset ``start`` (angles_u₀, angles_v₀[, λ₀]), U0 and V0 the same way. O(L log**2 d) gates
    per side."""
    out: list[Record] = []
    sides = [("U", angles_u, method_u, d_out, gains[0]), ("V", angles_v, method_v, d_in, gains[1])]
    if start:
        sides += [("U0", start[0], method_u, d_out, gains[0]), ("V0", start[1], method_v, d_in, gains[1])]
    for role, angles, method, d, gain in sides:
        a = (angles.detach().to(dtype) * gain).double()
        if quantize_bits is not None and method in ANGLE_PARAMETERIZATIONS:
            a = quantize_angles(a, quantize_bits)
        out.append(_side_record(module, role, a, method, d, r, depth, max_qubits))
    return out


def circuits_from_model(model: nn.Module, adapter_name: str, max_qubits: int) -> list[Record]:
    """Records of adapter ``adapter_name`` of a loaded peft model. O(total gates)."""
    records: list[Record] = []
    for name, module in model.named_modules():
        if adapter_name in getattr(module, "qpeft_spec", {}):
            s = module.qpeft_spec[adapter_name]
            records += module_records(
                name.removeprefix("base_model.model."), *module.angles(adapter_name),
                s.method_u, s.method_v, s.out_features, s.in_features, s.r, s.depth,
                s.quantize_bits, max_qubits, s.angle_gains, s.circuit_dtype,
                module.start(adapter_name))
    return records


def _infer_dim(p: int, k: int, depth: int, parameterization: str, auto_generalize: bool,
               max_qubits: int) -> int | None:
    """The one dimension d (K <= d <= 2**min(max_qubits, 16)) whose Stiefel count is ``p``, or
    None when there is none or several."""
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


def _module_shape(module: str, tree: nn.Module | None, qc: QuantumPEFTConfig, counts: list[int],
                  max_qubits: int) -> tuple[int, int]:
    base = submodule_of(tree, module)
    if base is not None:
        try:
            return matrix_shape(base)
        except ValueError:
            pass
    dims = [_infer_dim(c, qc.r, qc.depth, qc.parameterization, qc.auto_generalize, max_qubits)
            for c in counts]
    if None in dims:
        raise ValueError(
            f"module {module!r}: its layer sizes cannot be read from the checkpoint alone (the "
            "angle counts fit several sizes); pass the base model (--base-model, base_model=: "
            "the model or its folder), or export from the loaded model")
    return dims[0], dims[1]


def circuits_from_checkpoint(config: dict[str, Any], tensors: dict[str, torch.Tensor],
                             base_tree: Callable[[], nn.Module | None],
                             max_qubits: int) -> list[Record]:
    """Records read from a saved adapter. Each layer's ``(d_out, d_in)`` comes from
    ``base_tree()`` (the base model, on the meta device) or, failing that, from the angle counts
    when exactly one size fits (ValueError otherwise, naming the module)."""
    qc = config_from_dict(QuantumPEFTConfig, config)
    us = tensors_by_module(tensors, "qpeft_angles_u")
    vs = tensors_by_module(tensors, "qpeft_angles_v")
    starts = [tensors_by_module(tensors, sfx) for sfx in ("qpeft_start_u", "qpeft_start_v")]
    tree = base_tree()
    records: list[Record] = []
    for module in sorted(set(us) | set(vs)):  # a side of width 1 stores no angles
        empty = next(iter((us | vs).values())).new_zeros(0)
        u, v = us.get(module, empty), vs.get(module, empty)
        d_out, d_in = _module_shape(module, tree, qc, [int(u.numel()), int(v.numel())], max_qubits)
        method_u, method_v = qc.side_methods(d_out, d_in, f"module {module!r}")
        start = tuple(s.get(module, empty) for s in starts) if qc.offset_start else ()
        records += module_records(module, u, v, method_u, method_v, d_out, d_in, qc.r, qc.depth,
                                  qc.quantize_bits, max_qubits, qc.angle_gains(d_out, d_in),
                                  getattr(torch, qc.circuit_dtype), start)
    return records


# ---------------------------------------------------------------------------- as a LoRA adapter


def _lora_factors(layer: Any, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lora_B [d_out, rank], lora_A [rank, d_in])`` with ``B @ A = ΔW`` exactly:
    B = U·diag(λ_eff) (λ_eff holds every scale), A = Vᵀ; with the offset start B = [U·diag(λ_eff),
    −U0·diag(λ₀_eff)], A = [V, V0]ᵀ (rank 2K)."""
    with torch.no_grad():
        b, a = layer.factors(adapter_name)
        return b.float(), a.T.float()


def lora_from_checkpoint(config: dict[str, Any], tensors: dict[str, torch.Tensor],
                         base_tree: Callable[[], nn.Module | None],
                         ) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(LoraConfig, tensors)``: the saved adapter as the rank-K LoRA it is —
    ``lora_B = U·diag(λ_eff)``, ``lora_A = Vᵀ``, ``lora_alpha = r`` (LoRA's scale 1), so
    ``lora_B @ lora_A`` is ΔW to float rounding (with the offset start, rank 2K: the start's
    factors appended, negated). Layer shapes and kinds come from ``base_tree()``
    (the base model on the meta device) or, without it, from the angle counts (read as Linear
    layers). ``modules_to_save`` copies are carried over. O(circuit generation) per layer."""
    from peft import LoraConfig

    from qpeft.tuners.quantum_peft.layer import (
        QuantumPEFTConv2d,
        QuantumPEFTLayer,
        QuantumPEFTLinear,
    )

    qc = config_from_dict(QuantumPEFTConfig, {**config, "inference_mode": True})
    suffixes = (*QuantumPEFTLayer.adapter_layer_names, *QuantumPEFTLayer.start_names)
    by_suffix = {sfx: tensors_by_module(tensors, sfx) for sfx in suffixes}
    tree = base_tree()
    lora: dict[str, torch.Tensor] = {}
    kinds = set()
    rank = 2 * qc.r if qc.offset_start else qc.r
    for module in sorted(by_suffix["qpeft_lambda"]):
        empty = torch.zeros(0)
        counts = [int(by_suffix[s].get(module, empty).numel()) for s in suffixes[:2]]
        d_out, d_in = _module_shape(module, tree, qc, counts, DEFAULT_MAX_QUBITS)
        base = submodule_of(tree, module)
        kind = layer_kind(base) if base is not None else "linear"
        kinds.add(kind)
        shape = tuple(base.weight.shape) if base is not None else None
        cls = QuantumPEFTConv2d if kind == "conv2d" else QuantumPEFTLinear
        layer = cls(stand_in_layer(kind, d_out, d_in, shape), "default", config=qc, module_name=module)
        with torch.no_grad():
            for suffix in suffixes:
                if module in by_suffix[suffix]:
                    getattr(layer, suffix)["default"].copy_(by_suffix[suffix][module])
        lora_b, lora_a = _lora_factors(layer, "default")
        if kind == "conv2d":
            lora_a = lora_a.reshape(rank, *shape[1:])
            lora_b = lora_b.reshape(d_out, rank, 1, 1)
        lora[f"base_model.model.{module}.lora_A.weight"] = lora_a.contiguous()
        lora[f"base_model.model.{module}.lora_B.weight"] = lora_b.contiguous()
    for key, value in tensors.items():  # modules_to_save copies (a classifier head)
        if not any(f".{s}" in key for s in suffixes):
            lora[key] = value
    lora_config = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=sorted(by_suffix["qpeft_lambda"]),
        fan_in_fan_out=kinds == {"conv1d"}, modules_to_save=qc.modules_to_save,
        base_model_name_or_path=config.get("base_model_name_or_path"),
        task_type=config.get("task_type"), inference_mode=True)
    return lora_config, lora

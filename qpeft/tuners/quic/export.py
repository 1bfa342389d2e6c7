"""QuIC's circuits: one RBS circuit on ``n`` qubits per block (one per shared A with
``block_share``); its Hamming-weight-k sector is the compound ``C_k(A)``.

``base_map="rbs"`` exports the trained angles as they are; ``"cayley"``/``"exp"`` compile A into
pyramid Givens rotations (+ Z for a -1 sign); ``"free"`` (not orthogonal) and ``combine="sum"``
with several adapters (a mean of unitaries) have no circuit form (skipped, with the reason).
Used by ``qpeft export-circuits`` through the method registry.

As a stock peft adapter (``qpeft export-oft``, :func:`oft_from_checkpoint`): a QuIC adapter that
rotates the *input* side of linear layers (W' = W·Qᵀ) with Q orthogonal and every row inside a
block is exactly a peft OFT adapter — OFT rotates the input of ``nn.Linear`` layers by a
block-diagonal orthogonal R (W' = W·Rᵀ), each b x b block the Cayley transform
R = (I − S)(I + S)⁻¹ of a skew-symmetric S, so S = (I − R)(I + R)⁻¹ recovers it. The default
(output side, W' = Q·W) has no OFT form: it is refused, and ``qpeft export-merged`` serves it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from qpeft.circuits.builders import orthogonal_rbs_circuit, rbs_circuit
from qpeft.circuits.compound import compound_dim
from qpeft.circuits.compound_rotation import base_matrices
from qpeft.circuits.ir import Circuit
from qpeft.tuners._export import (
    CircuitRecord,
    SkipRecord,
    check_width,
    config_from_dict,
    stand_in_layer,
    submodule_of,
    tensors_by_module,
)
from qpeft.tuners.quic.config import QuICConfig, base_map_num_params

Record = CircuitRecord | SkipRecord


def _n_from_count(p: int, base_map: str, layout: str) -> int:
    n = 2
    while True:
        got = base_map_num_params(n, base_map, layout)
        if got == p:
            return n
        if got > p:
            raise ValueError(f"no block size n has {p} parameters under base_map={base_map!r}")
        n += 1


def module_records(
    module: str, params: torch.Tensor, n: int, orders: list[int], base_map: str,
    rbs_layout: str, combine: str, num_blocks: int, block_share: bool,
    block_size: int | None, max_qubits: int, side: str,
) -> list[Record]:
    """One circuit per block (or per shared A) of one module.

    ``params``: [num_adapters, N_A, P] as stored by the layer. Chained adapters (``product``)
    become one circuit, adapter 0's gates first (Q = C_k(A_m ... A_1)). ``block_size``: rows
    per block, recorded when known. O(N_A m n**2) gates; O(N_A n**3) to compile Cayley/exp."""
    m, n_a, _ = params.shape
    if base_map == "free":
        return [SkipRecord(module, "blocks", "base_map='free': A = I + P is not orthogonal, "
                           "so C_k(A) is not a unitary and has no circuit")]
    if combine == "sum" and m > 1:
        return [SkipRecord(module, "blocks", f"combine='sum' with {m} adapters: Q is a mean of "
                           "unitaries, not a unitary, and has no single circuit")]
    p = params.detach().double()
    out: list[Record] = []
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
        check_width(circuit, module, role, max_qubits)
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


def circuits_from_model(model: nn.Module, adapter_name: str, max_qubits: int) -> list[Record]:
    """Records of adapter ``adapter_name`` of a loaded peft model."""
    records: list[Record] = []
    for name, module in model.named_modules():
        if adapter_name in getattr(module, "quic_plan", {}):
            plan, st = module.quic_plan[adapter_name], module.quic_settings[adapter_name]
            records += module_records(
                name.removeprefix("base_model.model."),
                module.quic_params[adapter_name].detach().double() * st.param_gain, plan.n,
                list(plan.orders), st.base_map, st.rbs_layout, st.combine, plan.num_blocks,
                st.block_share, plan.block_size, max_qubits, st.side)
    return records


def circuits_from_checkpoint(config: dict[str, Any], tensors: dict[str, torch.Tensor],
                             base_tree: Callable[[], nn.Module | None],
                             max_qubits: int) -> list[Record]:
    """Records read from a saved adapter (the folder alone: block sizes follow from the
    parameter counts)."""
    qc = config_from_dict(QuICConfig, config)
    records: list[Record] = []
    for module, params in sorted(tensors_by_module(tensors, "quic_params").items()):
        n = _n_from_count(int(params.shape[-1]), qc.base_map, qc.rbs_layout)
        records += module_records(
            module, params.double() * qc.param_gain, n, list(qc.orders), qc.base_map, qc.rbs_layout,
            qc.combine,
            qc.num_blocks, qc.block_share, None, max_qubits, qc.side)
    return records


# ---------------------------------------------------------------------------- as a peft OFT adapter

#: largest |R − Cayley(S)| accepted in float64: beyond it R has an eigenvalue near −1, which
#: the Cayley transform cannot reach
_CAYLEY_TOLERANCE = 1e-9


def _no_oft_form(reason: str) -> ValueError:
    return ValueError(f"this QuIC adapter has no exact peft OFT form: {reason}; "
                      "`qpeft export-merged` folds it into the base model instead")


def _check_oft_config(qc: QuICConfig) -> None:
    if qc.side != "input":
        raise _no_oft_form("it rotates the output side (side='output', W' = Q·W) and peft OFT "
                           "rotates the input (W' = W·Rᵀ); train with side='input' to export it")
    if not qc.is_orthogonal:
        raise _no_oft_form(f"Q is not orthogonal (base_map={qc.base_map!r}, "
                           f"combine={qc.combine!r} with {qc.num_adapters} adapters)")


def cayley_skew(rotation: torch.Tensor) -> torch.Tensor:
    """The skew-symmetric S [..., b, b] with (I − S)(I + S)⁻¹ = ``rotation`` (orthogonal,
    [..., b, b]; peft OFT's Cayley map), computed and checked in float64. ValueError when the
    rotation has an eigenvalue at −1 (no such S). O(b³) per block."""
    r = rotation.double()
    eye = torch.eye(r.shape[-1], dtype=r.dtype).expand_as(r)
    s, singular = torch.linalg.solve_ex(eye + r, eye - r, left=False)  # (I − R)(I + R)⁻¹
    back = torch.linalg.solve_ex(eye + s, eye - s, left=False)[0]
    if (singular.any() or not torch.isfinite(s).all()
            or (back - r).abs().max() > _CAYLEY_TOLERANCE):
        raise _no_oft_form("a block has an eigenvalue at -1, which peft OFT's Cayley map "
                           "cannot represent")
    return (s - s.mT) / 2


def _oft_blocks(layer: Any, module: str) -> torch.Tensor:
    """The QuIC rotation of ``layer`` as OFT's blocks [N, b, b] (float64)."""
    plan = layer.quic_plan["default"]
    if plan.leftover:
        raise _no_oft_form(
            f"module {module!r}: {plan.leftover} of its {plan.d} inputs lie outside the "
            f"{plan.num_blocks} blocks (d % num_blocks), and peft OFT blocks tile every input")
    q = layer.rotation_matrix("default", torch.float64)
    b = plan.block_size
    return torch.stack([q[i * b:(i + 1) * b, i * b:(i + 1) * b] for i in range(plan.num_blocks)])


def oft_from_checkpoint(config: dict[str, Any], tensors: dict[str, torch.Tensor],
                        base_tree: Callable[[], nn.Module | None],
                        ) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(OFTConfig, tensors)``: a saved input-side QuIC adapter as the peft OFT adapter that
    computes the same layers — ``r = num_blocks`` blocks of ``b = in_features // num_blocks``,
    exact Cayley (``use_cayley_neumann=False``), ``oft_R.weight`` [N or 1, b(b−1)/2] the upper
    triangles of S = (I − R)(I + R)⁻¹. Layer shapes come from ``base_tree()`` (needed: the block
    size is not in the checkpoint). ``modules_to_save`` copies are carried over. ValueError, in
    one line, for adapters OFT cannot express (output side, not orthogonal, rows outside the
    blocks, a layer other than ``nn.Linear``). O(N·b³) per layer."""
    from peft import OFTConfig

    from qpeft.tuners.quic.layer import QuICLinear

    qc = config_from_dict(QuICConfig, {**config, "inference_mode": True})
    _check_oft_config(qc)
    params = tensors_by_module(tensors, "quic_params")
    tree = base_tree()
    out: dict[str, torch.Tensor] = {}
    for module in sorted(params):
        base = submodule_of(tree, module)
        if base is None:
            raise ValueError(
                f"module {module!r}: the block size of an OFT export needs the layer's size; pass "
                "the base model (--base-model, base_model=: the model or its folder)")
        if type(base) is not nn.Linear:
            raise _no_oft_form(f"module {module!r} is a {type(base).__name__}; peft OFT rotates "
                               "the input of nn.Linear layers only the way QuIC does")
        layer = QuICLinear(stand_in_layer("linear", base.out_features, base.in_features),
                           "default", qc)
        with torch.no_grad():
            layer.quic_params["default"].copy_(params[module])
        skew = cayley_skew(_oft_blocks(layer, module))
        if qc.block_share:
            skew = skew[:1]
        rows, cols = torch.triu_indices(skew.shape[-1], skew.shape[-1], 1)
        out[f"base_model.model.{module}.oft_R.weight"] = skew[:, rows, cols].float().contiguous()
    for key, value in tensors.items():  # modules_to_save copies (a classifier head)
        if ".quic_params" not in key:
            out[key] = value
    oft_config = OFTConfig(
        r=qc.num_blocks, oft_block_size=0, target_modules=sorted(params),
        block_share=qc.block_share, use_cayley_neumann=False, module_dropout=0.0,
        modules_to_save=qc.modules_to_save,
        base_model_name_or_path=config.get("base_model_name_or_path"),
        task_type=config.get("task_type"), inference_mode=True)
    return oft_config, out

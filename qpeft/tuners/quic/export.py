"""QuIC's circuits: one RBS circuit on ``n`` qubits per block (one per shared A with
``block_share``); its Hamming-weight-k sector is the compound ``C_k(A)``.

``base_map="rbs"`` exports the trained angles as they are; ``"cayley"``/``"exp"`` compile A into
pyramid Givens rotations (+ Z for a -1 sign); ``"free"`` (not orthogonal) and ``combine="sum"``
with several adapters (a mean of unitaries) have no circuit form (skipped, with the reason).
Used by ``qpeft export-circuits`` through the method registry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from qpeft.circuits.builders import orthogonal_rbs_circuit, rbs_circuit
from qpeft.circuits.compound import compound_dim
from qpeft.circuits.ir import Circuit
from qpeft.tuners._export import (
    CircuitRecord,
    SkipRecord,
    check_width,
    config_from_dict,
    tensors_by_module,
)
from qpeft.tuners.quic.config import QuICConfig, base_map_num_params
from qpeft.tuners.quic.layer import base_matrices

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
                name.removeprefix("base_model.model."), module.quic_params[adapter_name], plan.n,
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
            module, params, n, list(qc.orders), qc.base_map, qc.rbs_layout, qc.combine,
            qc.num_blocks, qc.block_share, None, max_qubits, qc.side)
    return records

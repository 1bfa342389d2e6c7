"""Quantum-PEFT as the rest of qpeft sees it: one :class:`~qpeft.tuners.registry.MethodSpec`."""

from __future__ import annotations

from qpeft.tuners.quantum_peft import export
from qpeft.tuners.quantum_peft.config import QuantumPEFTConfig
from qpeft.tuners.quantum_peft.model import QuantumPEFTModel
from qpeft.tuners.quantum_peft.paper_counts import paper_count_rows
from qpeft.tuners.quantum_peft.peft_matrix import peft_matrix_rows
from qpeft.tuners.registry import MethodOption, MethodSpec, causal_lm_rate

METHOD = MethodSpec(
    name="quantum-peft",
    label="Quantum-PEFT",
    config_cls=QuantumPEFTConfig,
    model_cls=QuantumPEFTModel,
    prefix="qpeft_",
    options=(
        MethodOption("rank", "r", int, "adapter rank (LoRA/HRA r, Quantum-PEFT K, QPA LoRA rank, "
                     "OFT number of blocks)"),
        MethodOption("depth", "depth", int, "circuit depth L (Quantum-PEFT, QPA)"),
        MethodOption("stiefel", "parameterization", str,
                     "Quantum-PEFT Stiefel parametrisation (pauli, generalized, lie_exp, ...)"),
        MethodOption("alpha", "alpha", float, "scaling alpha (LoRA, QPA, Quantum-PEFT)"),
        MethodOption("init_lambda", "init_lambda", float,
                     "Quantum-PEFT: start of λ; 0 = the paper's zero start (default: the offset "
                     "start at 0.05, minus the frozen start ΔW₀)"),
    ),
    defaults={"rank": 8},
    learning_rate=1e-2,
    learning_rate_note=("default for quantum-peft: LoRA's best rate on the quality suite's "
                        "tuning task; with the angle gain the method learns at LoRA's rates "
                        "(docs/methods/quantum_peft.md, 'Learning-rate scale')"),
    learning_rate_by_kind=causal_lm_rate("quantum-peft", 3e-3),
    targets_by_kind={"causal-lm": (
        "all-linear", "default for quantum-peft on causal-LM data: every linear layer (peft's "
        "'all-linear'), where q_proj, v_proj alone limited it on the quality suite's SmolLM2 "
        "tuning task (docs/results.md)")},
    benchmark_config=lambda targets, task_type: QuantumPEFTConfig(
        r=8, depth=1, target_modules=targets, task_type=task_type),
    benchmark_label="Quantum-PEFT K=8, L=1",
    circuits_from_model=export.circuits_from_model,
    circuits_from_checkpoint=export.circuits_from_checkpoint,
    circuit_examples=lambda targets, task_type: {
        f"quantum_peft_L{depth}": QuantumPEFTConfig(target_modules=targets, r=8, depth=depth,
                                                    task_type=task_type)
        for depth in (1, 2)},
    lora_from_checkpoint=export.lora_from_checkpoint,
    peft_matrix=peft_matrix_rows,
    paper_counts=paper_count_rows,
)

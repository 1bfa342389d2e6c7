"""QPA as the rest of qpeft sees it: one :class:`~qpeft.tuners.registry.MethodSpec`."""

from __future__ import annotations

from qpeft.tuners.qpa import export
from qpeft.tuners.qpa.config import QPAConfig
from qpeft.tuners.qpa.model import QPAModel
from qpeft.tuners.qpa.paper_counts import paper_count_rows
from qpeft.tuners.qpa.peft_matrix import peft_matrix_rows
from qpeft.tuners.registry import MethodOption, MethodSpec, causal_lm_rate

METHOD = MethodSpec(
    name="qpa",
    label="QPA",
    config_cls=QPAConfig,
    model_cls=QPAModel,
    prefix="qpa_",
    options=(
        MethodOption("rank", "r", int, "adapter rank (LoRA/HRA r, Quantum-PEFT K, QPA LoRA rank, "
                     "OFT number of blocks)"),
        MethodOption("depth", "depth", int, "circuit depth L (Quantum-PEFT, QPA)"),
        MethodOption("n_mlp", "n_mlp", int, "QPA MLP hidden width"),
        MethodOption("alpha", "lora_alpha", float, "scaling alpha (LoRA, QPA, Quantum-PEFT)"),
        MethodOption("dropout", "lora_dropout", float,
                     "adapter dropout (default 0: deterministic runs)"),
    ),
    defaults={"rank": 8},
    learning_rate=1e-2,
    learning_rate_note=("default for qpa: "
                        "best rate of the learning-rate sweep on the quality suite's tuning task (docs/results.md)"),
    learning_rate_by_kind=causal_lm_rate("qpa", 3e-3),
    benchmark_config=lambda targets, task_type: QPAConfig(
        r=8, target_modules=targets, task_type=task_type),
    benchmark_label="QPA r=8",
    circuits_from_model=export.circuits_from_model,
    circuits_from_checkpoint=export.circuits_from_checkpoint,
    circuit_examples=lambda targets, task_type: {
        "qpa": QPAConfig(target_modules=targets, task_type=task_type, init_seed=0)},
    lora_from_checkpoint=export.lora_from_checkpoint,
    peft_matrix=peft_matrix_rows,
    paper_counts=paper_count_rows,
)

"""Quantum-PEFT's rows of peft's custom-model test matrix (see ``qpeft.tuners._peft_matrix``)."""

from __future__ import annotations

from qpeft.tuners._peft_matrix import MultiRow, Row, same_different
from qpeft.tuners.quantum_peft.config import QuantumPEFTConfig
from qpeft.tuners.registry import PeftMatrixRows

ROWS: list[Row] = [
    ("Vanilla MLP 1 Quantum-PEFT", "MLP", QuantumPEFTConfig, {"target_modules": ["lin0"], "r": 2}),
    ("Vanilla MLP 2 Quantum-PEFT", "MLP", QuantumPEFTConfig, {"target_modules": "lin0", "r": 4}),
    (
        "Vanilla MLP 3 Quantum-PEFT",
        "MLP",
        QuantumPEFTConfig,
        {"target_modules": ["lin0", "lin1"], "r": 2},
    ),
    (
        "Vanilla MLP 4 Quantum-PEFT modules_to_save",
        "MLP",
        QuantumPEFTConfig,
        {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "r": 2},
    ),
    (
        "Vanilla MLP 5 Quantum-PEFT lie_exp",
        "MLP",
        QuantumPEFTConfig,
        {"target_modules": ["lin0", "lin1"], "r": 2, "parameterization": "lie_exp"},
    ),
    (
        "Vanilla MLP 6 Quantum-PEFT lie_cayley positive lambda",
        "MLP",
        QuantumPEFTConfig,
        {
            "target_modules": ["lin0"], "r": 3, "parameterization": "lie_cayley",
            "lambda_domain": "positive",
        },
    ),
    (
        "Vanilla MLP 7 Quantum-PEFT lie_taylor sign lambda paper scale",
        "MLP",
        QuantumPEFTConfig,
        # the paper's scale: peft's test_parameters_after_loading_model takes 3 SGD steps at
        # lr 0.5 on inputs up to 89 with an unbounded loss; with the LoRA-rate scale (λ x5.2 on
        # lin0) the truncated Taylor map leaves the orthogonal group and the run reaches NaN
        {"target_modules": ["lin0"], "r": 2, "parameterization": "lie_taylor", "lambda_domain": "sign",
         "lr_scale": "paper"},
    ),
    (
        "Vanilla MLP 8 Quantum-PEFT depth 2 alpha intrinsic_rank",
        "MLP",
        QuantumPEFTConfig,
        {
            "target_modules": ["lin0"], "r": 4, "depth": 2, "alpha": 8, "intrinsic_rank": 2,
        },
    ),
    (
        "Vanilla MLP 9 Quantum-PEFT quantized",
        "MLP",
        QuantumPEFTConfig,
        {"target_modules": ["lin0"], "r": 2, "quantize_bits": 8},
    ),
    (
        "Vanilla MLP 10 Quantum-PEFT float64 circuits",
        "MLP",
        QuantumPEFTConfig,
        {"target_modules": ["lin0"], "r": 2, "circuit_dtype": "float64"},
    ),
    (
        "Embedding + transformers Conv1D 1 Quantum-PEFT",
        "EmbConv1D",
        QuantumPEFTConfig,
        {"target_modules": ["conv1d"], "r": 1},
    ),
    (
        "Embedding + transformers Conv1D 2 Quantum-PEFT",
        "EmbConv1D",
        QuantumPEFTConfig,
        {"target_modules": ["conv1d", "lin0"], "r": 1},
    ),
    ("Conv2d 1 Quantum-PEFT", "Conv2d", QuantumPEFTConfig, {"target_modules": ["conv2d"], "r": 2}),
    (
        "Conv2d 2 Quantum-PEFT",
        "Conv2d",
        QuantumPEFTConfig,
        {"target_modules": ["conv2d", "lin0"], "r": 2},
    ),
    (
        "Conv2d 3 Quantum-PEFT lie_exp",
        "Conv2d",
        QuantumPEFTConfig,
        {"target_modules": ["conv2d"], "r": 3, "parameterization": "lie_exp"},
    ),
]

MULTI_ADAPTER_ROWS: list[MultiRow] = [
    *same_different(
        "Quantum-PEFT", "quantum_peft", QuantumPEFTConfig, {"r": 2, "init_weights": False},
        {"r": 2, "init_weights": False}, second={"init_seed": 1},
    ),
    *same_different(
        "Quantum-PEFT lie_exp", "quantum_peft", QuantumPEFTConfig,
        {"r": 2, "parameterization": "lie_exp", "init_weights": False},
        {"r": 1, "parameterization": "lie_exp", "init_weights": False}, second={"init_seed": 1},
    ),
]


def peft_matrix_rows() -> PeftMatrixRows:
    return PeftMatrixRows(ROWS, MULTI_ADAPTER_ROWS)

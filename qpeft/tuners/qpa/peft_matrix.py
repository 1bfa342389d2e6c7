"""QPA's rows of peft's custom-model test matrix (see ``qpeft.tuners._peft_matrix``)."""

from __future__ import annotations

from typing import Any

from qpeft.tuners._peft_matrix import IDENTITY_AT_INIT_TESTS, MultiRow, Row, same_different
from qpeft.tuners.qpa.config import QPAConfig
from qpeft.tuners.registry import PeftMatrixRows

# a small QPA generator: the tests build dozens of models per row
_QPA_SMALL = {"n_mlp": 32, "mlp_hidden": [8, 16], "depth": 2}

ROWS: list[Row] = [
    ("Vanilla MLP 1 QPA", "MLP", QPAConfig, {"target_modules": ["lin0"]}),
    ("Vanilla MLP 2 QPA", "MLP", QPAConfig, {"target_modules": "lin0", "r": 2, **_QPA_SMALL}),
    (
        "Vanilla MLP 3 QPA two layers",
        "MLP",
        QPAConfig,
        {"target_modules": ["lin0", "lin1"], "r": 2, **_QPA_SMALL},
    ),
    (
        "Vanilla MLP 4 QPA modules_to_save",
        "MLP",
        QPAConfig,
        {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "r": 2, **_QPA_SMALL},
    ),
    (
        "Vanilla MLP 5 QPA reference preset",
        "MLP",
        QPAConfig,
        {"target_modules": ["lin0", "lin1"], "r": 2, "preset": "reference"},
    ),
    (
        "Vanilla MLP 6 QPA dropout alpha",
        "MLP",
        QPAConfig,
        {"target_modules": ["lin0"], "r": 4, "lora_alpha": 4, "lora_dropout": 0.1, **_QPA_SMALL},
    ),
    (
        "Vanilla MLP 7 QPA tanh no gain",
        "MLP",
        QPAConfig,
        {"target_modules": ["lin0"], "r": 2, "mlp_activation": "tanh", "output_gain": False,
         "center_output": True, "n_qubits": 3, **_QPA_SMALL},
    ),
    (
        "Embedding + transformers Conv1D 1 QPA",
        "EmbConv1D",
        QPAConfig,
        # n_mlp=4: the 12 generated numbers come from 3 chunks (2 qubits); with one chunk the
        # angles reach the output through a single probability and barely move in 3 SGD steps
        {"target_modules": ["conv1d"], "r": 2, **_QPA_SMALL, "n_mlp": 4},
    ),
    (
        "Embedding + transformers Conv1D 2 QPA reference preset",
        "EmbConv1D",
        QPAConfig,
        {"target_modules": ["conv1d", "lin0"], "r": 1, "preset": "reference"},
    ),
    ("Conv2d 1 QPA", "Conv2d", QPAConfig, {"target_modules": ["conv2d"], "r": 2, **_QPA_SMALL}),
    (
        "Conv2d 2 QPA conv2d and lin0",
        "Conv2d",
        QPAConfig,
        {"target_modules": ["conv2d", "lin0"], "r": 2, **_QPA_SMALL},
    ),
]

MULTI_ADAPTER_ROWS: list[MultiRow] = [
    *same_different(
        "QPA", "qpa", QPAConfig, {"r": 2, "init_weights": False, **_QPA_SMALL},
        {"r": 2, "init_weights": False, **_QPA_SMALL},
    ),
    *same_different(
        "QPA reference preset", "qpa", QPAConfig, {"r": 2, "preset": "reference"},
        {"r": 2, "preset": "reference"},
    ),
]


def limitation(test: str, params: dict[str, Any]) -> str | None:
    """The reason a QPA row cannot run ``test`` (peft's test function name), or None."""
    kwargs = params.get("config_kwargs") or {}
    if test == "test_parameters_after_loading_model":
        return (
            "this test trains 3 SGD steps at lr=0.5 on unnormalised inputs (0..89) with an "
            "unbounded loss (sum of log-probabilities); QPA's generator MLP diverges to NaN there, "
            "as VB-LoRA, RandLoRA, UniLoRA and OSF do, for which the test itself lowers lr to "
            "0.01 (\"otherwise we get nan\"). Save/load equality of QPA is checked by "
            "test_save_load_roundtrip, test_load_multiple_adapters and tests/tuners/qpa"
        )
    if test in IDENTITY_AT_INIT_TESTS and (
            kwargs.get("preset") == "reference" or kwargs.get("output_gain") is False):
        return (
            "QPA without its zero-initialised output gain (preset='reference', the paper's "
            "generator, or output_gain=False) starts from a random ΔW by design: the wrapped "
            "model is not the base model at init, which this test assumes"
        )
    return None


def known_failure(test: str, params: dict[str, Any]) -> str | None:
    """A diagnosed failure not fixed yet (xfail, not strict: it shows as XPASS once fixed).
    None now: the zero start's slow angles on EmbConv1D (issue 13) are trained from step 1 by
    the offset start (``init_gain``)."""
    return None


def peft_matrix_rows() -> PeftMatrixRows:
    return PeftMatrixRows(ROWS, MULTI_ADAPTER_ROWS, limitation=limitation,
                          known_failure=known_failure)

"""QuIC's rows of peft's custom-model test matrix (see ``qpeft.tuners._peft_matrix``)."""

from __future__ import annotations

from typing import Any

from qpeft.tuners._peft_matrix import MultiRow, Row, same_different
from qpeft.tuners.quic.config import QuICConfig
from qpeft.tuners.registry import PeftMatrixRows

ROWS: list[Row] = [
    ("Vanilla MLP 1 QuIC", "MLP", QuICConfig, {"target_modules": ["lin0"]}),
    ("Vanilla MLP 2 QuIC", "MLP", QuICConfig, {"target_modules": "lin0"}),
    (
        "Vanilla MLP 3 QuIC input side",
        "MLP",
        QuICConfig,
        {"target_modules": ["lin0", "lin1"], "side": "input", "num_blocks": 2},
    ),
    (
        "Vanilla MLP 4 QuIC modules_to_save",
        "MLP",
        QuICConfig,
        {"target_modules": ["lin0"], "modules_to_save": ["lin1"]},
    ),
    (
        "Vanilla MLP 5 QuIC rbs pyramid",
        "MLP",
        QuICConfig,
        {"target_modules": ["lin0"], "base_map": "rbs"},
    ),
    (
        "Vanilla MLP 6 QuIC rbs brick",
        "MLP",
        QuICConfig,
        {"target_modules": ["lin0"], "base_map": "rbs", "rbs_layout": "brick", "num_blocks": 1},
    ),
    (
        "Vanilla MLP 7 QuIC rbs butterfly",
        "MLP",
        QuICConfig,
        {
            "target_modules": ["lin0"], "base_map": "rbs", "rbs_layout": "butterfly",
            "num_blocks": 2,
        },
    ),
    (
        "Vanilla MLP 8 QuIC exp",
        "MLP",
        QuICConfig,
        {"target_modules": ["lin0"], "base_map": "exp"},
    ),
    (
        "Vanilla MLP 9 QuIC free",
        "MLP",
        QuICConfig,
        {"target_modules": ["lin0"], "base_map": "free"},
    ),
    (
        "Vanilla MLP 10 QuIC chained product",
        "MLP",
        QuICConfig,
        {"target_modules": ["lin0"], "num_adapters": 2},
    ),
    (
        "Vanilla MLP 11 QuIC chained sum",
        "MLP",
        QuICConfig,
        {"target_modules": ["lin0"], "num_adapters": 3, "combine": "sum"},
    ),
    (
        "Vanilla MLP 12 QuIC block_share orders 1 2 3",
        "MLP",
        QuICConfig,
        {"target_modules": ["lin0"], "num_blocks": 1, "orders": [1, 2, 3], "block_share": True},
    ),
    (
        "Vanilla MLP 13 QuIC module_dropout",
        "MLP",
        QuICConfig,
        {"target_modules": ["lin0", "lin1"], "side": "input", "module_dropout": 0.1},
    ),
    (
        "Vanilla MLP 14 QuIC orders 1 output side of lin1",
        "MLP",
        QuICConfig,
        {"target_modules": ["lin1"], "orders": [1], "num_blocks": 1},
    ),
    (
        "Embedding + transformers Conv1D 1 QuIC",
        "EmbConv1D",
        QuICConfig,
        {"target_modules": ["conv1d"], "side": "input", "num_blocks": 1},
    ),
    (
        "Embedding + transformers Conv1D 2 QuIC rbs",
        "EmbConv1D",
        QuICConfig,
        {"target_modules": ["conv1d"], "side": "input", "num_blocks": 1, "base_map": "rbs"},
    ),
    ("Conv2d 1 QuIC", "Conv2d", QuICConfig, {"target_modules": ["conv2d"]}),
    (
        "Conv2d 2 QuIC",
        "Conv2d",
        QuICConfig,
        {"target_modules": ["conv2d"]},
    ),
    (
        "Conv2d 3 QuIC input side",
        "Conv2d",
        QuICConfig,
        {"target_modules": ["conv2d"], "side": "input", "num_blocks": 4},
    ),
    (
        "Conv2d 4 QuIC conv2d and lin0 rbs",
        "Conv2d",
        QuICConfig,
        {"target_modules": ["conv2d", "lin0"], "side": "input", "num_blocks": 2, "base_map": "rbs"},
    ),
]

MULTI_ADAPTER_ROWS: list[MultiRow] = [
    *same_different(
        "QuIC", "quic", QuICConfig, {"init_weights": False},
        {"side": "input", "init_weights": False},
    ),
    *same_different(
        "QuIC rbs", "quic", QuICConfig, {"base_map": "rbs", "init_weights": False},
        {"base_map": "rbs", "orders": [1], "num_blocks": 1, "init_weights": False},
    ),
    *same_different(
        "QuIC chained free", "quic", QuICConfig,
        {"base_map": "free", "num_adapters": 2, "init_weights": False},
        {"base_map": "free", "num_adapters": 2, "side": "input", "init_weights": False},
    ),
]


def limitation(test: str, params: dict[str, Any]) -> str | None:
    """The reason a QuIC row cannot run ``test`` (peft's test function name), or None."""
    kwargs = params.get("config_kwargs") or {}
    if kwargs.get("module_dropout") and test == "test_training_custom_models":
        return (
            "module_dropout skips a layer's whole adapter in a training forward with probability "
            "p (as LoHa/LoKr's module_dropout), so after one forward a skipped layer's "
            "parameters have no gradient, which this test requires of every adapter tensor"
        )
    return None


def peft_matrix_rows() -> PeftMatrixRows:
    return PeftMatrixRows(ROWS, MULTI_ADAPTER_ROWS, limitation=limitation)

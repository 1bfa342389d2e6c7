"""qpeft's rows for peft's custom-model test matrix (``tests/test_custom_models.py`` of peft's
source distribution; see ``plugin.py`` for how they get there).

Row formats are peft's: ``TEST_CASES`` rows are ``(test name, model id, config class, config
kwargs)``; ``MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES`` rows are ``(test name, tuner method, config
class, kwargs of adapter 1, kwargs of adapter 2)`` on peft's ``MLP`` (``lin0``: 10 -> 20,
``lin1``: 20 -> 2). The model ids name peft's test models: ``MLP``, ``EmbConv1D`` (an embedding,
a transformers ``Conv1D`` 5 -> 1 and ``lin0`` 10 -> 2) and ``Conv2d`` (``conv2d`` 5 -> 10
channels, 3x3 kernel, and ``lin0`` 10 -> 2). qpeft does not adapt embeddings, so no row targets
``emb``.
"""

from __future__ import annotations

from typing import Any

from qpeft import QPAConfig, QuantumPEFTConfig, QuICConfig

QPEFT_CONFIG_CLASSES = (QuantumPEFTConfig, QuICConfig, QPAConfig)
METHOD_OF = {QuantumPEFTConfig: "Quantum-PEFT", QuICConfig: "QuIC", QPAConfig: "QPA"}

Row = tuple[str, str, type, dict[str, Any]]

# a small QPA generator: the tests build dozens of models per row
_QPA_SMALL = {"n_mlp": 32, "mlp_hidden": [8, 16], "depth": 2}

QUANTUM_PEFT_ROWS: list[Row] = [
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
        "Vanilla MLP 7 Quantum-PEFT lie_taylor sign lambda",
        "MLP",
        QuantumPEFTConfig,
        {"target_modules": ["lin0"], "r": 2, "parameterization": "lie_taylor", "lambda_domain": "sign"},
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

QUIC_ROWS: list[Row] = [
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

QPA_ROWS: list[Row] = [
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

TEST_CASES: list[Row] = [*QUANTUM_PEFT_ROWS, *QUIC_ROWS, *QPA_ROWS]


def _same_different(
    label: str, method: str, config_cls: type, kwargs: dict[str, Any], lin1_kwargs: dict[str, Any],
    second: dict[str, Any] | None = None,
) -> list[tuple[str, str, type, dict[str, Any], dict[str, Any]]]:
    """peft's pair of multi-adapter rows: both adapters on lin0 ("Same"), or one on lin0 and one
    on lin1 ("Different"; ``lin1_kwargs`` fit its 20 -> 2 shape). ``second`` is added to the
    second adapter's kwargs (Quantum-PEFT's init is a function of ``init_seed``, so two adapters
    made from one config are equal; peft's tests need them to differ)."""
    return [
        (f"{label} Same", method, config_cls, {"target_modules": ["lin0"], **kwargs},
         {"target_modules": ["lin0"], **kwargs, **(second or {})}),
        (f"{label} Different", method, config_cls, {"target_modules": ["lin0"], **kwargs},
         {"target_modules": ["lin1"], **lin1_kwargs}),
    ]


MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES = [
    *_same_different(
        "Quantum-PEFT", "quantum_peft", QuantumPEFTConfig, {"r": 2, "init_weights": False},
        {"r": 2, "init_weights": False}, second={"init_seed": 1},
    ),
    *_same_different(
        "Quantum-PEFT lie_exp", "quantum_peft", QuantumPEFTConfig,
        {"r": 2, "parameterization": "lie_exp", "init_weights": False},
        {"r": 1, "parameterization": "lie_exp", "init_weights": False}, second={"init_seed": 1},
    ),
    *_same_different(
        "QuIC", "quic", QuICConfig, {"init_weights": False},
        {"side": "input", "init_weights": False},
    ),
    *_same_different(
        "QuIC rbs", "quic", QuICConfig, {"base_map": "rbs", "init_weights": False},
        {"base_map": "rbs", "orders": [1], "num_blocks": 1, "init_weights": False},
    ),
    *_same_different(
        "QuIC chained free", "quic", QuICConfig,
        {"base_map": "free", "num_adapters": 2, "init_weights": False},
        {"base_map": "free", "num_adapters": 2, "side": "input", "init_weights": False},
    ),
    *_same_different(
        "QPA", "qpa", QPAConfig, {"r": 2, "init_weights": False, **_QPA_SMALL},
        {"r": 2, "init_weights": False, **_QPA_SMALL},
    ),
    *_same_different(
        "QPA reference preset", "qpa", QPAConfig, {"r": 2, "preset": "reference"},
        {"r": 2, "preset": "reference"},
    ),
]


# ---- what a method truly cannot do: (test, row) pairs skipped with the reason ---------------------
def limitation(test: str, params: dict[str, Any]) -> str | None:
    """The reason a qpeft row cannot run ``test`` (peft's test function name), or None.

    ``params`` are the test's parametrize values (``config_cls``, ``config_kwargs``, ...)."""
    config_cls, kwargs = params.get("config_cls"), params.get("config_kwargs") or {}
    if config_cls is QPAConfig and test == "test_parameters_after_loading_model":
        return (
            "this test trains 3 SGD steps at lr=0.5 on unnormalised inputs (0..89) with an "
            "unbounded loss (sum of log-probabilities); QPA's generator MLP diverges to NaN there, "
            "as VB-LoRA, RandLoRA, UniLoRA and OSF do, for which the test itself lowers lr to "
            "0.01 (\"otherwise we get nan\"). Save/load equality of QPA is checked by "
            "test_save_load_roundtrip, test_load_multiple_adapters and tests/test_qpa.py"
        )
    if config_cls is QuICConfig and kwargs.get("module_dropout") and test == "test_training_custom_models":
        return (
            "module_dropout skips a layer's whole adapter in a training forward with probability "
            "p (as LoHa/LoKr's module_dropout), so after one forward a skipped layer's "
            "parameters have no gradient, which this test requires of every adapter tensor"
        )
    if config_cls is QPAConfig and test in _IDENTITY_AT_INIT_TESTS:
        if kwargs.get("preset") == "reference" or kwargs.get("output_gain") is False:
            return (
                "QPA without its zero-initialised output gain (preset='reference', the paper's "
                "generator, or output_gain=False) starts from a random ΔW by design: the wrapped "
                "model is not the base model at init, which this test assumes"
            )
    return None


# peft tests that assert a freshly wrapped model equals its base model
_IDENTITY_AT_INIT_TESTS = ("test_disable_adapters", "test_disable_adapters_with_merging")


def known_failure(test: str, params: dict[str, Any]) -> str | None:
    """A diagnosed failure not fixed yet (the test runs as ``xfail(strict=False)``, so it shows
    as XPASS once fixed), or None."""
    if (
        params.get("config_cls") is QPAConfig
        and test == "test_only_params_are_updated"
        and params.get("test_name") == "Embedding + transformers Conv1D 1 QPA"
    ):
        return (
            "QPA's zero-initialised output gain: the first SGD step moves only the gain, and "
            "the circuit angles get gradient through gain * dMLP/dp * dp/dtheta; on EmbConv1D's "
            "small activations theta moves ~1e-4 in 3 steps, at this test's tolerance (issue 13)"
        )
    return None

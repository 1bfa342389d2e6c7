"""What the methods' rows of peft's custom-model test matrix share (``tests/peft_matrix``).

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

Row = tuple[str, str, type, dict[str, Any]]
MultiRow = tuple[str, str, type, dict[str, Any], dict[str, Any]]

#: peft tests that assert a freshly wrapped model equals its base model
IDENTITY_AT_INIT_TESTS = ("test_disable_adapters", "test_disable_adapters_with_merging")


def same_different(
    label: str, method: str, config_cls: type, kwargs: dict[str, Any], lin1_kwargs: dict[str, Any],
    second: dict[str, Any] | None = None,
) -> list[MultiRow]:
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

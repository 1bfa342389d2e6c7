"""qpeft's rows for peft's custom-model test matrix (``tests/test_custom_models.py`` of peft's
source distribution; see ``plugin.py`` for how they get there).

Every registered qpeft method brings its own rows (``peft_matrix`` of its
:class:`~qpeft.tuners.registry.MethodSpec`, in ``qpeft/tuners/<method>/peft_matrix.py``); this
module only gathers them, so a new method's rows run here without editing this file.
"""

from __future__ import annotations

from typing import Any

import qpeft  # noqa: F401  (registers the methods)
from qpeft.tuners.registry import MethodSpec, PeftMatrixRows, methods


def _with_rows() -> list[tuple[MethodSpec, PeftMatrixRows]]:
    return [(spec, spec.peft_matrix()) for spec in methods(ours=True) if spec.peft_matrix]


def collect() -> tuple[list, list, dict[type, str]]:
    """``(TEST_CASES rows, MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES rows, {config class: label})``
    of every registered qpeft method (read at call time: methods registered later count)."""
    test_cases, multi, method_of = [], [], {}
    for spec, rows in _with_rows():
        test_cases += rows.test_cases
        multi += rows.multi_adapter_cases
        method_of[spec.config_cls] = spec.label
    return test_cases, multi, method_of


def _rows_of(params: dict[str, Any]) -> PeftMatrixRows | None:
    cls = params.get("config_cls")
    return next((rows for spec, rows in _with_rows() if spec.config_cls is cls), None)


def limitation(test: str, params: dict[str, Any]) -> str | None:
    """The reason a qpeft row cannot run ``test`` (peft's test function name), or None.

    ``params`` are the test's parametrize values (``config_cls``, ``config_kwargs``, ...)."""
    rows = _rows_of(params)
    return None if rows is None else rows.limitation(test, params)


def known_failure(test: str, params: dict[str, Any]) -> str | None:
    """A diagnosed failure not fixed yet (the test runs as ``xfail(strict=False)``, so it shows
    as XPASS once fixed), or None."""
    rows = _rows_of(params)
    return None if rows is None else rows.known_failure(test, params)

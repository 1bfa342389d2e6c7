"""pytest plugin: run peft's own custom-model test matrix on qpeft's rows.

Use (``make test-peft`` does this)::

    python -m pytest -p tests.peft_matrix.plugin .cache/peft-tests/<ver>/peft_tests/test_custom_models.py

What it does, without changing peft's test file:
- when pytest has imported peft's ``test_custom_models`` module and before it collects its test
  classes, appends every registered qpeft method's rows (:func:`rows.collect`) to the module's
  ``TEST_CASES`` and ``MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES``, and their config classes to
  ``ALL_PEFT_CONFIG_CLASSES`` (the parametrize marks hold these very
  lists, so the new rows become ordinary parametrized tests);
- deselects every test that is not a qpeft row (``QPEFT_PEFT_MATRIX_ALL=1`` keeps peft's own);
- skips the (test, row) pairs :func:`rows.limitation` names, each with its stated reason, and
  marks the diagnosed, not yet fixed ones of :func:`rows.known_failure` ``xfail(strict=False)``;
- ends with a per-method table of passed / failed / skipped tests.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import pytest

from tests.peft_matrix import rows

_INJECTED = "_qpeft_rows_injected"
_METHOD_OF: dict[type, str] = {}  # config class -> method label, filled by _inject


def _inject(module: Any) -> None:
    """Add qpeft's rows to peft's lists (once per module object)."""
    if getattr(module, _INJECTED, False):
        return
    test_cases, multi, method_of = rows.collect()
    module.TEST_CASES.extend(test_cases)
    module.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES.extend(multi)
    classes = getattr(module, "ALL_PEFT_CONFIG_CLASSES", None)
    if classes is not None:
        classes.extend(cls for cls in method_of if cls not in classes)
    _METHOD_OF.update(method_of)
    setattr(module, _INJECTED, True)


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: Any) -> None:
    # called for every name of a freshly imported test module, before its classes are collected
    if isinstance(collector, pytest.Module) and collector.path.name == "test_custom_models.py":
        module = collector.obj
        if hasattr(module, "TEST_CASES") and hasattr(module, "MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES"):
            _inject(module)


def method_of(item: pytest.Item) -> str | None:
    """The qpeft method a collected test exercises, or None for peft's own rows."""
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return None
    return _METHOD_OF.get(callspec.params.get("config_cls"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("QPEFT_PEFT_MATRIX_ALL") == "1":
        return
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and method_of(item) is not None:
            reason = rows.known_failure(item.originalname, callspec.params)
            if reason is not None:
                item.add_marker(pytest.mark.xfail(strict=False, reason=reason))
    keep = [item for item in items if method_of(item) is not None]
    dropped = [item for item in items if method_of(item) is None]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep


def pytest_runtest_setup(item: pytest.Item) -> None:
    callspec = getattr(item, "callspec", None)
    if callspec is None or method_of(item) is None:
        return
    reason = rows.limitation(item.originalname, callspec.params)
    if reason is not None:
        pytest.skip(reason)


_OUTCOMES: Counter[tuple[str, str]] = Counter()
_METHODS: dict[str, str] = {}


def pytest_itemcollected(item: pytest.Item) -> None:
    method = method_of(item)
    if method is not None:
        _METHODS[item.nodeid] = method


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    method = _METHODS.get(report.nodeid)
    if method is None:
        return
    if report.when == "call" or (report.when == "setup" and not report.passed):
        outcome = "error" if report.when == "setup" and report.failed else report.outcome
        if hasattr(report, "wasxfail"):
            outcome = "xpassed" if report.passed else "xfailed"
        _OUTCOMES[(method, outcome)] += 1


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _OUTCOMES:
        return
    import peft

    tr = terminalreporter
    tr.section(f"qpeft rows of peft {peft.__version__}'s custom-model matrix")
    kinds = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
    tr.write_line(f"{'method':<14}{'tests':>7}" + "".join(f"{k:>9}" for k in kinds))
    for method in sorted({m for m, _ in _OUTCOMES}):
        counts = [_OUTCOMES[(method, k)] for k in kinds]
        tr.write_line(f"{method:<14}{sum(counts):>7}" + "".join(f"{c:>9}" for c in counts))

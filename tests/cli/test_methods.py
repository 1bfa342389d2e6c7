"""build_peft_config: every method builds, options reach the right fields, bad options fail."""

from __future__ import annotations

import peft
import pytest

import qpeft  # noqa: F401  (registers our methods)
from qpeft.train.methods import METHOD_OPTIONS, METHODS, build_peft_config, resolve_options


def _available(method: str) -> bool:
    from qpeft.train.methods import config_class

    try:
        config_class(method)
        return True
    except ValueError:
        return False


@pytest.mark.parametrize("method", METHODS)
def test_every_method_builds_a_peft_config(method: str) -> None:
    if not _available(method):
        pytest.skip(f"{method} not in this install yet")
    config = build_peft_config(method, ["query", "value"], ["classifier"], task_type="SEQ_CLS")
    assert isinstance(config, peft.PeftConfig)
    assert set(config.target_modules) == {"query", "value"}
    assert list(config.modules_to_save) == ["classifier"]


def test_options_map_to_config_fields() -> None:
    c = build_peft_config("lora", ["q"], options={"rank": 4, "alpha": 8.0})
    assert (c.r, c.lora_alpha) == (4, 8.0)
    c = build_peft_config("oft", ["q"], options={"rank": 4})
    assert (c.r, c.oft_block_size) == (4, 0)
    c = build_peft_config("boft", ["q"], options={"oft_block_size": 2, "butterfly": 2})
    assert (c.boft_block_size, c.boft_n_butterfly_factor) == (2, 2)
    if _available("quic"):
        c = build_peft_config("quic", ["q"], options={"orders": "1,3", "num_blocks": 2})
        assert list(c.orders) == [1, 3] and c.num_blocks == 2
    if _available("qpa"):
        c = build_peft_config("qpa", ["q"], options={"rank": 2, "depth": 3, "n_mlp": 16})
        assert (c.r, c.depth, c.n_mlp) == (2, 3, 16)


def test_unknown_method_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown method 'loRA'.*quantum-peft, quic, qpa, lora"):
        build_peft_config("loRA", ["q"])


def test_option_that_does_not_apply_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"--depth does not apply to method 'lora'.*quantum-peft"):
        resolve_options("lora", {"depth": 2})
    with pytest.raises(ValueError, match="--orders must be a comma-separated list"):
        resolve_options("quic", {"orders": "1,x"})


def test_value_rejected_by_the_config_names_the_method() -> None:
    with pytest.raises(ValueError, match="invalid options for method 'oft'"):
        build_peft_config("oft", ["q"], options={"rank": 4, "oft_block_size": 8})


def test_option_table_is_consistent() -> None:
    from qpeft.train.methods import METHOD_DEFAULTS, OPTION_NAMES

    for method in METHODS:
        assert set(METHOD_OPTIONS[method]) <= set(OPTION_NAMES)
        assert set(METHOD_DEFAULTS[method]) <= set(METHOD_OPTIONS[method])

"""build_peft_config: every method builds, options reach the right fields, bad options fail."""

from __future__ import annotations

import peft
import pytest

from qpeft.train.methods import (
    build_peft_config,
    default_learning_rate,
    method_names,
    resolve_options,
)
from qpeft.tuners.registry import all_options, get_method


def test_the_registered_methods_are_ours_then_peft_baselines() -> None:
    assert method_names()[:7] == ("quantum-peft", "quic", "qpa", "lora", "oft", "boft", "hra")


@pytest.mark.parametrize("method", method_names())
def test_every_method_builds_a_peft_config(method: str) -> None:
    config = build_peft_config(method, ["query", "value"], ["classifier"], task_type="SEQ_CLS")
    assert isinstance(config, peft.PeftConfig) and type(config) is get_method(method).config_cls
    assert set(config.target_modules) == {"query", "value"}
    assert list(config.modules_to_save) == ["classifier"]


def test_options_map_to_config_fields() -> None:
    c = build_peft_config("lora", ["q"], options={"rank": 4, "alpha": 8.0})
    assert (c.r, c.lora_alpha) == (4, 8.0)
    c = build_peft_config("oft", ["q"], options={"rank": 4})
    assert (c.r, c.oft_block_size) == (4, 0)
    c = build_peft_config("boft", ["q"], options={"oft_block_size": 2, "butterfly": 2})
    assert (c.boft_block_size, c.boft_n_butterfly_factor) == (2, 2)
    c = build_peft_config("quic", ["q"], options={"orders": "1,3", "num_blocks": 2})
    assert list(c.orders) == [1, 3] and c.num_blocks == 2
    c = build_peft_config("qpa", ["q"], options={"rank": 2, "depth": 3, "n_mlp": 16})
    assert (c.r, c.depth, c.n_mlp) == (2, 3, 16)
    c = build_peft_config("quantum-peft", ["q"], options={"rank": 3, "stiefel": "lie_exp"})
    assert (c.r, c.parameterization) == (3, "lie_exp")


def test_unknown_method_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown method 'loRA'.*quantum-peft, quic, qpa, lora"):
        build_peft_config("loRA", ["q"])


def test_option_that_does_not_apply_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"--depth does not apply to method 'lora'.*quantum-peft"):
        resolve_options("lora", {"depth": 2})
    with pytest.raises(ValueError, match="--orders must be a comma-separated list"):
        resolve_options("quic", {"orders": "1,x"})
    with pytest.raises(ValueError, match="unknown method option"):
        resolve_options("lora", {"no_such_option": 1})


def test_value_rejected_by_the_config_names_the_method() -> None:
    with pytest.raises(ValueError, match="invalid options for method 'oft'"):
        build_peft_config("oft", ["q"], options={"rank": 4, "oft_block_size": 8})


@pytest.mark.parametrize("method", method_names())
def test_defaults_are_options_of_the_method(method: str) -> None:
    spec = get_method(method)
    assert set(spec.defaults) <= {o.name for o in spec.options} <= set(all_options())
    lr, why = default_learning_rate(method)
    assert lr > 0 and why


def test_options_for_own_default_targets_apply_only_to_those_targets() -> None:
    """QuIC's 12 blocks go with its own causal-LM targets (every linear layer), as its rate
    does: not with targets the user names, not where an option is given, not on classifiers;
    and the config the CLI builds carries them."""
    from qpeft.train.methods import resolve_options

    assert resolve_options("quic", {}, kind="causal-lm")["num_blocks"] == 12
    assert resolve_options("quic", {}, kind="causal-lm", targets="all-linear")["num_blocks"] == 12
    assert "num_blocks" not in resolve_options("quic", {}, kind="causal-lm",
                                               targets=["q_proj", "v_proj"])
    assert resolve_options("quic", {"num_blocks": 5}, kind="causal-lm")["num_blocks"] == 5
    assert "num_blocks" not in resolve_options("quic", {}, kind="text-classification")
    assert build_peft_config("quic", "all-linear", kind="causal-lm").num_blocks == 12
    assert build_peft_config("quic", ["q_proj", "v_proj"], kind="causal-lm").num_blocks == 3
    assert resolve_options("quantum-peft", {}, kind="causal-lm") == resolve_options(
        "quantum-peft", {})


def test_a_rate_for_own_default_targets_applies_only_to_those_targets() -> None:
    """QuIC's causal-LM default rate goes with its own default targets (every linear layer);
    targets the user names get its rate for them, unless they are the same targets; data
    without own targets, and methods without an own-targets rate, are unaffected."""
    own = default_learning_rate("quic", "causal-lm")
    named = default_learning_rate("quic", "causal-lm", ["q_proj", "v_proj"])
    assert own[0] == 3e-4 and named[0] == 1e-3 and own[1] != named[1]
    assert default_learning_rate("quic", "causal-lm", "all-linear") == own
    assert default_learning_rate("quic", "causal-lm", ["all-linear"]) == own
    assert default_learning_rate("quic", "text-classification") == default_learning_rate("quic")
    assert (default_learning_rate("quantum-peft", "causal-lm", ["q_proj"])
            == default_learning_rate("quantum-peft", "causal-lm"))

"""QuIC against the peft contract matrix (tests/contract/harness.py) on the tiny models."""

from __future__ import annotations

import pytest
import torch

import qpeft  # noqa: F401  (registers QuIC with peft)

# the default base map (Cayley) comes from the circuits core's Lie module
pytest.importorskip("qpeft.circuits.lie", reason="qpeft.circuits.lie (cayley/expm) not present")
from qpeft.tuners.quic import QuICConfig
from tests.contract import harness as h


def quic(case: str, **kw) -> QuICConfig:
    """A QuIC config for a tiny case: 2 blocks so that even 8-channel layers fit orders {1,2}."""
    c = h.TINY_MODELS[case]
    kw.setdefault("num_blocks", 2)
    return QuICConfig(
        target_modules=list(c.target_modules),
        modules_to_save=list(c.modules_to_save or []) or None,
        **kw,
    )


@pytest.mark.parametrize("case", sorted(h.TINY_MODELS))
def test_quic_passes_the_contract(case):
    h.check_identity_at_init(case, quic(case))
    h.check_only_adapter_params_change(case, quic(case), prefix="quic_")
    h.check_merge_equivalence(case, quic(case))
    h.check_disable_adapter(case, quic(case))
    h.check_multiple_adapters(case, quic(case), quic(case, orders=[1, 2, 3], num_blocks=1))


VARIANTS = {
    "exp": {"base_map": "exp"},
    "rbs_pyramid": {"base_map": "rbs", "rbs_layout": "pyramid"},
    "rbs_brick": {"base_map": "rbs", "rbs_layout": "brick"},
    "rbs_butterfly": {"base_map": "rbs", "rbs_layout": "butterfly"},
    "free": {"base_map": "free"},
    "input_side": {"side": "input"},
    "block_share": {"block_share": True},
    "chain_product": {"num_adapters": 3},
    "chain_sum": {"num_adapters": 2, "combine": "sum"},
    "orders_123": {"orders": [1, 2, 3], "num_blocks": 1},
    "orders_2_only": {"orders": [2]},
}


# every variant on the MLP; the ones with a Conv2d-specific code path also on the CNN
VARIANT_CASES = [("mlp", v) for v in sorted(VARIANTS)] + [
    ("cnn", v) for v in ("input_side", "chain_sum")
]


@pytest.mark.parametrize(("case", "variant"), VARIANT_CASES)
def test_quic_variants_pass_the_contract(case, variant):
    kw = VARIANTS[variant]
    h.check_identity_at_init(case, quic(case, **kw))
    h.check_only_adapter_params_change(case, quic(case, **kw), prefix="quic_")
    h.check_merge_equivalence(case, quic(case, **kw))
    h.check_disable_adapter(case, quic(case, **kw))


def test_input_and_output_side_adapters_together():
    """Adapters on both sides active at once (two on the input side, whose order matters);
    merging all of them matches the forward."""
    from peft import get_peft_model

    model = get_peft_model(h.build_tiny("gpt2"), quic("gpt2", init_weights=False))
    model.add_adapter("inp", quic("gpt2", side="input", init_weights=False, num_adapters=2))
    model.add_adapter("inp2", quic("gpt2", side="input", init_weights=False, orders=[2]))
    model.base_model.set_adapter(["default", "inp", "inp2"])
    active = h.run(model, "gpt2")
    model.base_model.merge_adapter()
    torch.testing.assert_close(h.run(model, "gpt2"), active, atol=1e-5, rtol=1e-5)
    model.base_model.unmerge_adapter()
    torch.testing.assert_close(h.run(model, "gpt2"), active, atol=1e-5, rtol=1e-5)


def test_save_load_in_a_fresh_process(tmp_path):
    h.check_save_load_subprocess("bert", quic("bert"), tmp_path)


def test_save_load_of_a_variant_in_a_fresh_process(tmp_path):
    cfg = quic("mlp", side="input", base_map="rbs", rbs_layout="brick", num_adapters=2,
               combine="sum", orders=[1, 3], num_blocks=1)
    h.check_save_load_subprocess("mlp", cfg, tmp_path)


def test_half_precision_base_merges():
    """bf16 base: circuits run in float32, the merged bf16 model matches the adapted one."""
    h.check_merge_equivalence("mlp", quic("mlp", init_weights=False), dtype=torch.bfloat16,
                              atol=3e-2)


def test_identity_check_fails_for_random_init():
    with pytest.raises(AssertionError):
        h.check_identity_at_init("mlp", quic("mlp", init_weights=False))

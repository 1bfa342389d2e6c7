"""The contract harness itself, run on peft's LoRA: it must pass for a correct method and fail
for a broken one (so a qpeft method passing it means something)."""

import pytest
import torch
from peft import LoraConfig

from tests.contract import harness as h


def lora(case: str, **kw) -> LoraConfig:
    c = h.TINY_MODELS[case]
    return LoraConfig(r=4, target_modules=list(c.target_modules),
                      modules_to_save=list(c.modules_to_save or []) or None, **kw)


@pytest.mark.parametrize("case", sorted(h.TINY_MODELS))
def test_lora_passes_the_contract(case, tmp_path):
    h.check_identity_at_init(case, lora(case))
    h.check_only_adapter_params_change(case, lora(case), prefix="lora_")
    h.check_merge_equivalence(case, lora(case))
    h.check_disable_adapter(case, lora(case))
    h.check_multiple_adapters(case, lora(case), lora(case))


def test_lora_save_load_in_a_fresh_process(tmp_path):
    h.check_save_load_subprocess("bert", lora("bert"), tmp_path)


def test_identity_check_fails_for_a_non_identity_init():
    with pytest.raises(AssertionError):
        h.check_identity_at_init("mlp", lora("mlp", init_lora_weights=False))


def test_merge_check_fails_when_merge_is_wrong(monkeypatch):
    from peft.tuners.lora import Linear

    original = Linear.get_delta_weight
    monkeypatch.setattr(Linear, "get_delta_weight", lambda self, a: 2 * original(self, a))
    with pytest.raises(AssertionError):
        h.check_merge_equivalence("mlp", lora("mlp"))


def test_tiny_models_are_reproducible():
    a, b = h.build_tiny("gpt2"), h.build_tiny("gpt2")
    assert torch.equal(h.run(a, "gpt2"), h.run(b, "gpt2"))

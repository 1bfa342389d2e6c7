"""Hot-swapping qpeft adapters in place (qpeft.hotswap_adapter), also under torch.compile."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

import qpeft

METHODS = ("quantum_peft", "quic", "qpa")


def make_config(method: str, **overrides):
    if method == "quantum_peft":
        return qpeft.QuantumPEFTConfig(**{"r": 4, "target_modules": ["0", "2"], **overrides})
    if method == "quic":
        return qpeft.QuICConfig(**{"target_modules": ["0", "2"], **overrides})
    return qpeft.QPAConfig(**{"r": 4, "target_modules": ["0", "2"], "n_mlp": 32,
                              "mlp_hidden": [8], "depth": 2, **overrides})


def base_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 24), nn.Tanh(), nn.Linear(24, 16))


def saved_adapter(method: str, seed: int, path, **overrides) -> torch.Tensor:
    """Save an adapter with random numbers (seeded) to ``path``; return its output on X."""
    model = get_peft_model(base_model(), make_config(method, **overrides))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model.save_pretrained(path)
    model.eval()
    with torch.no_grad():
        return model(X)


X = torch.randn(5, 32, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("method", METHODS)
def test_hotswap_under_compile_switches_outputs_without_recompiling(method, tmp_path):
    out_a = saved_adapter(method, 1, tmp_path / "a")
    out_b = saved_adapter(method, 2, tmp_path / "b")
    assert not torch.allclose(out_a, out_b, atol=1e-3)
    model = PeftModel.from_pretrained(base_model(), tmp_path / "a").eval()
    tensors = {n: p for n, p in model.named_parameters() if "default" in n}
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        for _ in range(2):  # steady state (QPA's generator cache takes two calls to settle)
            torch.testing.assert_close(compiled(X), out_a, rtol=1e-5, atol=1e-6)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # really compiled
        # error_on_recompile: any recompilation from here on raises
        with torch._dynamo.config.patch(error_on_recompile=True):
            qpeft.hotswap_adapter(model, tmp_path / "b")
            torch.testing.assert_close(compiled(X), out_b, rtol=1e-5, atol=1e-6)
            qpeft.hotswap_adapter(model, tmp_path / "a")
            torch.testing.assert_close(compiled(X), out_a, rtol=1e-5, atol=1e-6)
    # in place: the very same tensor objects
    assert all(p is dict(model.named_parameters())[n] for n, p in tensors.items())


@pytest.mark.parametrize("method", METHODS)
def test_hotswap_refuses_a_different_config_and_changes_nothing(method, tmp_path):
    saved_adapter(method, 1, tmp_path / "a")
    other = {"quantum_peft": {"r": 2}, "quic": {"orders": [1]}, "qpa": {"depth": 3}}[method]
    saved_adapter(method, 2, tmp_path / "other", **other)
    model = PeftModel.from_pretrained(base_model(), tmp_path / "a").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="cannot hot-swap"):
        qpeft.hotswap_adapter(model, tmp_path / "other")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_hotswap_refuses_another_method_and_bad_state_dicts(tmp_path):
    saved_adapter("quantum_peft", 1, tmp_path / "qp")
    saved_adapter("quic", 1, tmp_path / "quic")
    model = PeftModel.from_pretrained(base_model(), tmp_path / "qp")
    with pytest.raises(ValueError, match="QuICConfig adapter into a QuantumPEFTConfig"):
        qpeft.hotswap_adapter(model, tmp_path / "quic")
    from peft.utils import get_peft_model_state_dict

    state = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    key = next(iter(state))
    with pytest.raises(ValueError, match="has shape"):
        qpeft.hotswap_adapter_from_state_dict(model, {**state, key: torch.zeros(3)})
    with pytest.raises(ValueError, match="lacks"):
        qpeft.hotswap_adapter_from_state_dict(model, {k: v for k, v in state.items() if k != key})
    with pytest.raises(ValueError, match="no adapter named"):
        qpeft.hotswap_adapter_from_state_dict(model, state, adapter_name="other")

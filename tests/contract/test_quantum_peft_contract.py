"""Quantum-PEFT through the peft contract harness, on every tiny model (MLP, Conv2d CNN, BERT,
GPT-2 Conv1D), at the default Pauli parameterization (with automatic generalisation for the
non-power-of-two sides) and at the other parameterizations / λ domains on the MLP."""

from __future__ import annotations

import pytest
import torch

import qpeft  # noqa: F401  (registers the method with peft)
from qpeft.tuners.quantum_peft import QuantumPEFTConfig
from tests.contract import harness as h

CASES = sorted(h.TINY_MODELS)


def config(case: str, **kw) -> QuantumPEFTConfig:
    c = h.TINY_MODELS[case]
    kw.setdefault("r", 2)
    return QuantumPEFTConfig(
        target_modules=list(c.target_modules),
        modules_to_save=list(c.modules_to_save) if c.modules_to_save else None,
        **kw,
    )


def check_identity(case: str, cfg: QuantumPEFTConfig) -> None:
    """Bit for bit with the paper's zero start; with the offset start the update's two rank-K
    halves cancel in one rank-2K product, to float rounding."""
    h.check_identity_at_init(case, cfg, exact=not cfg.offset_start)


@pytest.mark.parametrize("case", CASES)
def test_contract(case: str) -> None:
    check_identity(case, config(case))
    h.check_identity_at_init(case, config(case, init_lambda=0.0))
    h.check_only_adapter_params_change(case, config(case), prefix="qpeft_")
    h.check_merge_equivalence(case, config(case))
    h.check_disable_adapter(case, config(case))
    h.check_multiple_adapters(case, config(case), config(case, r=3, init_seed=7))


# Tiny BERT/GPT-2 react weakly to a random adapter: give it a visible effect (scaling 10).
_BF16 = {"bert": dict(alpha=20.0, atol=3e-4), "gpt2": dict(alpha=20.0, atol=2e-2)}


@pytest.mark.parametrize("case", CASES)
def test_merge_bf16_loose(case: str) -> None:
    extra = dict(_BF16.get(case, {}))
    atol = extra.pop("atol", 2e-2)
    h.check_merge_equivalence(
        case, config(case, init_weights=False, **extra), dtype=torch.bfloat16, atol=atol
    )


@pytest.mark.parametrize(
    "case",
    ["gpt2", pytest.param("bert", marks=pytest.mark.slow), pytest.param("cnn", marks=pytest.mark.slow)],
)
def test_save_load_in_a_fresh_process(case: str, tmp_path) -> None:
    """A fresh interpreter each (a few seconds apiece): GPT-2 (Conv1D + generalized 192 side) by
    default, Linear and Conv2d in the slow suite; in-process round trips of all cases below."""
    h.check_save_load_subprocess(case, config(case), tmp_path)


@pytest.mark.parametrize(
    "kw",
    [
        dict(parameterization="generalized"),
        dict(parameterization="lie_exp"),
        dict(parameterization="lie_cayley"),
        dict(parameterization="lie_taylor"),
        dict(depth=3),
        dict(lambda_domain="positive"),
        dict(lambda_domain="sign"),
        dict(quantize_bits=4),
        dict(r=4, intrinsic_rank=2),
        dict(alpha=8.0, circuit_dtype="float64"),
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()),
)
def test_options_keep_the_contract(kw: dict) -> None:
    check_identity("mlp", config("mlp", **kw))
    h.check_only_adapter_params_change("mlp", config("mlp", **kw), prefix="qpeft_")
    h.check_merge_equivalence("mlp", config("mlp", **kw))


def test_identity_check_fails_for_the_random_init() -> None:
    with pytest.raises(AssertionError):
        h.check_identity_at_init("mlp", config("mlp", init_weights=False))


@pytest.mark.parametrize("case", CASES)
def test_save_load_in_process_bit_for_bit(case: str, tmp_path) -> None:
    model, _ = h.wrap(case, config(case))
    h.train_steps(model, case)
    expected = h.run(model, case)
    model.save_pretrained(tmp_path / "a")
    loaded = h.load_in_process(case, tmp_path / "a")
    assert torch.equal(h.run(loaded, case), expected)


def test_merge_check_fails_for_a_wrong_merge(monkeypatch) -> None:
    from qpeft.tuners.quantum_peft import QuantumPEFTLayer

    original = QuantumPEFTLayer.get_delta_weight
    monkeypatch.setattr(QuantumPEFTLayer, "get_delta_weight", lambda self, a: 2 * original(self, a))
    with pytest.raises(AssertionError):
        h.check_merge_equivalence("mlp", config("mlp"))

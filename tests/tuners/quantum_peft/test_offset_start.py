"""Quantum-PEFT's offset start: ΔW = U·diag(λ_eff)·Vᵀ − U₀·diag(λ₀_eff)·V₀ᵀ with the start
(U₀, V₀, λ₀) frozen as buffers. The wrapped model is the base model at init, every circuit angle
gets a gradient at the first step (none does with the paper's zero start), the start is saved and
reloaded, adapters saved without the field load with the zero start, and every reader of ΔW
(forward, merge, LoRA export, circuit export) sees the same update."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

import qpeft  # noqa: F401  (registers the method with peft)
from qpeft.tuners.quantum_peft import QuantumPEFTConfig, QuantumPEFTLayer
from tests.tuners.quantum_peft.test_quantum_peft import reference_delta
from tests.tuners.tower import Tower


def _layers(model: nn.Module) -> list[QuantumPEFTLayer]:
    return [m for m in model.modules() if isinstance(m, QuantumPEFTLayer)]


def _tower(**kw) -> nn.Module:
    torch.manual_seed(0)
    cfg = QuantumPEFTConfig(r=3, depth=2, target_modules=["q", "v", "o"], **kw)
    return get_peft_model(Tower().double(), cfg)


def test_the_default_is_the_offset_start_and_is_recorded() -> None:
    assert QuantumPEFTConfig().init_lambda == 0.05
    assert QuantumPEFTConfig(lr_scale="paper").init_lambda == 0.0  # the paper's parameterization
    assert QuantumPEFTConfig(lambda_domain="sign").init_lambda == 0.0
    assert QuantumPEFTConfig(init_lambda=0).offset_start is False
    with pytest.raises(ValueError, match="needs lambda_domain='real'"):
        QuantumPEFTConfig(init_lambda=0.1, lambda_domain="positive")
    with pytest.raises(ValueError, match="finite number"):
        QuantumPEFTConfig(init_lambda=float("nan"))


def test_identity_at_init_and_exact_reference_after_a_step() -> None:
    """At init the output is the base model's (float64, 1e-12) with λ = λ₀ ≠ 0; after a step
    the forward, the merged weight and ΔW all equal the dense reference U·Λ·Vᵀ − U₀·Λ₀·V₀ᵀ."""
    model = _tower(circuit_dtype="float64")
    x = torch.randn(4, 24, dtype=torch.float64)
    with model.disable_adapter():
        base = model(x)
    torch.testing.assert_close(model(x), base, atol=1e-12, rtol=0)
    for layer in _layers(model):
        torch.testing.assert_close(layer.qpeft_lambda["default"].detach(),
                                   torch.full((3,), 0.05, dtype=torch.float64))
        assert layer.delta_matrix("default").abs().max() < 1e-12
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(x).square().sum().backward()
    opt.step()
    model.eval()
    for layer in _layers(model):
        want = reference_delta(layer)
        assert want.abs().max() > 1e-4
        torch.testing.assert_close(layer.delta_matrix("default"), want, atol=1e-12, rtol=0)
    out = model(x)
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged(x), out, atol=1e-10, rtol=0)


@pytest.mark.parametrize("init_lambda, angles_learn", [(0.05, True), (0.0, False)])
def test_the_angles_get_a_gradient_at_the_first_step_only_with_the_offset(init_lambda, angles_learn) -> None:
    """The reason for the offset: with λ = 0 the gradient of ΔW w.r.t. every angle is 0."""
    model = _tower(init_lambda=init_lambda)
    model.train()
    model(torch.randn(4, 24, dtype=torch.float64)).square().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "qpeft_angles" in n}
    assert len(grads) == 12
    assert all((g is not None and g.abs().sum() > 0) == angles_learn for g in grads.values())
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "qpeft_lambda" in n)


def test_the_start_is_saved_but_not_trained_or_counted(tmp_path) -> None:
    model = _tower(init_weights=False, circuit_dtype="float64")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any("qpeft_start" in n for n in trainable)
    config = model.peft_config["default"]
    assert model.get_nb_trainable_parameters()[0] == sum(
        config.count_module(m.out_features, m.in_features) for m in _layers(model))
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert sum("qpeft_start_u" in k for k in saved) == 6 and sum("qpeft_start_lambda" in k for k in saved) == 6
    x = torch.randn(3, 24, dtype=torch.float64)
    model.eval()
    for low_cpu_mem_usage in (False, True):
        torch.manual_seed(1)  # other base weights: the check below copies the trained base in
        loaded = PeftModel.from_pretrained(Tower().double(), tmp_path,
                                           low_cpu_mem_usage=low_cpu_mem_usage)
        loaded.base_model.model.load_state_dict(model.base_model.model.state_dict())
        torch.testing.assert_close(loaded(x), model(x), atol=1e-12, rtol=0)


def test_an_adapter_saved_before_the_field_loads_with_the_zero_start(tmp_path) -> None:
    """adapter_config.json without init_lambda (earlier qpeft): no start buffers, same logits."""
    model = _tower(init_weights=False, init_lambda=0.0, circuit_dtype="float64")
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    saved = json.loads(path.read_text())
    del saved["init_lambda"]
    path.write_text(json.dumps(saved))
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(Tower().double(), tmp_path)
    model.eval()
    assert loaded.peft_config["default"].init_lambda == 0.0
    assert not any("qpeft_start" in n for n, _ in loaded.named_buffers())
    x = torch.randn(3, 24, dtype=torch.float64)
    torch.testing.assert_close(loaded(x), model(x), atol=1e-12, rtol=0)


def test_a_bf16_base_keeps_the_identity_at_init() -> None:
    """peft casts the adapter tensors and the start buffers to the base dtype alike, so the
    start and the trainable copy stay equal: the output at init is the base's."""
    torch.manual_seed(0)
    model = get_peft_model(Tower().to(torch.bfloat16),
                           QuantumPEFTConfig(r=3, target_modules=["q", "v", "o"]))
    x = torch.randn(4, 24, dtype=torch.bfloat16)
    with model.disable_adapter():
        base = model(x)
    torch.testing.assert_close(model(x), base, atol=0, rtol=0)


def test_lora_export_is_rank_2k_and_exact(tmp_path) -> None:
    """The LoRA a server loads: rank 2K, lora_B @ lora_A = ΔW (start subtracted)."""
    from qpeft.export.stock import export_lora

    model = _tower(init_weights=False)
    model.save_pretrained(tmp_path / "q")
    export_lora(tmp_path / "q", tmp_path / "lora", base_model=Tower())
    lora_cfg = json.loads((tmp_path / "lora/adapter_config.json").read_text())
    assert lora_cfg["r"] == 6
    torch.manual_seed(0)
    base = Tower().double()
    base.load_state_dict(model.base_model.model.state_dict(), strict=False)
    lora = PeftModel.from_pretrained(base, tmp_path / "lora").double()
    x = torch.randn(3, 24, dtype=torch.float64)
    torch.testing.assert_close(lora(x), model(x), atol=1e-6, rtol=1e-6)


def test_circuit_export_has_the_start_circuits(tmp_path) -> None:
    """export-circuits writes U, V and the start's U0, V0 per module, from the loaded model
    and from the checkpoint alike."""
    from qpeft.export import circuits_from_checkpoint, circuits_from_model

    model = _tower(init_weights=False)
    _, records, skipped = circuits_from_model(model)
    assert not skipped and sorted({r.role for r in records}) == ["U", "U0", "V", "V0"]
    model.save_pretrained(tmp_path)
    _, saved, _ = circuits_from_checkpoint(tmp_path, base_model=Tower())

    def key(r):
        return r.module, r.role

    assert sorted(map(key, saved)) == sorted(map(key, records)) and len(records) == 24
    for a, b in zip(sorted(saved, key=key), sorted(records, key=key), strict=True):
        assert a.circuit == b.circuit


def test_a_written_start_is_seen_by_the_batched_generation() -> None:
    """The start's factors are kept between training steps (constants); writing the start
    buffers (a load, a hot-swap) makes the next step generate them afresh."""
    x = torch.randn(4, 24, dtype=torch.float64)
    model, other = _tower(init_weights=False, circuit_dtype="float64"), _tower(
        init_weights=False, circuit_dtype="float64", init_seed=3)
    model.train(), other.train()
    model(x)  # generates and keeps the start's factors
    state = {k: v for k, v in other.state_dict().items() if "qpeft_" in k}
    assert any("qpeft_start_u" in k for k in state)
    model.load_state_dict(state, strict=False)
    torch.testing.assert_close(model(x), other(x), atol=1e-12, rtol=0)


def test_stiefel_many_appends_constant_columns() -> None:
    from qpeft.circuits.stiefel import stiefel_many

    g = torch.Generator().manual_seed(0)
    angles = [torch.randn(7, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2)]
    extra = [torch.randn(8, 2, generator=g, dtype=torch.float64) for _ in range(2)]
    plain = stiefel_many(["pauli"] * 2, angles, [8, 8], 3, 1)
    got = stiefel_many(["pauli"] * 2, angles, [8, 8], 3, 1, append=extra)
    for p, e, out in zip(plain, extra, got, strict=True):
        assert out.shape == (8, 5)
        torch.testing.assert_close(out, torch.cat([p, e], dim=1), atol=0, rtol=0)
    sum(out.sum() for out in got).backward()
    assert all(a.grad is not None for a in angles) and all(e.grad is None for e in extra)


"""``qpeft export-lora``: every method with an exact LoRA form (Quantum-PEFT: rank K, QPA: its
generated factors) leaves qpeft as a peft LoRA checkpoint that stock peft loads with equal
outputs, that LoRA servers accept (vLLM's rules), and every other method is refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from qpeft.export.stock import export_lora, serving_notes
from qpeft.train.methods import build_peft_config
from tests.contract import harness as h

CASES = sorted(h.TINY_MODELS)
# each method at a config that makes the tiny models' adapters visible and fast
METHOD_OPTIONS = {"quantum-peft": {"rank": 3}, "qpa": {"rank": 2, "n_mlp": 64}}
#: the rank of ΔW's LoRA form: the offset starts subtract a second term of the adapter's rank
LORA_RANK = {"quantum-peft": 6, "qpa": 4}


def _trained(method: str, case: str, tmp_path, **extra):
    c = h.TINY_MODELS[case]
    config = build_peft_config(method, list(c.target_modules), c.modules_to_save,
                               options={**METHOD_OPTIONS[method], **extra})
    model, base_out = h.wrap(case, config)
    h.train_steps(model, case)
    expected = h.run(model, case)
    assert not torch.allclose(expected, base_out)  # the adapter does something
    model.save_pretrained(tmp_path / method)
    return expected


@pytest.mark.parametrize("method", sorted(METHOD_OPTIONS))
@pytest.mark.parametrize("case", CASES)
def test_the_exported_lora_gives_the_adapter_s_outputs(method, case, tmp_path):
    expected = _trained(method, case, tmp_path)
    out = export_lora(tmp_path / method, tmp_path / "lora", base_model=h.build_tiny(case))
    lora = PeftModel.from_pretrained(h.build_tiny(case), out)
    assert type(lora.base_model).__name__ == "LoraModel"
    torch.testing.assert_close(h.run(lora, case), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.run(lora.merge_and_unload(), case), expected, atol=1e-5,
                               rtol=1e-5)


@pytest.mark.parametrize("init_lambda, rank", [(None, 6), (0.0, 3)])
def test_quantum_peft_export_has_rank_k_and_scale_one(tmp_path, init_lambda, rank):
    """Rank K (2K with the offset start: A = [V, V₀]ᵀ) and LoRA's scale 1."""
    _trained("quantum-peft", "mlp", tmp_path, stiefel="lie_exp", init_lambda=init_lambda)
    export_lora(tmp_path / "quantum-peft", tmp_path / "lora", base_model=h.build_tiny("mlp"))
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["r"] == rank and cfg["lora_alpha"] == rank
    tensors = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    a = tensors["base_model.model.lin0.lora_A.weight"]
    for rows in (a[:3], a[3:]) if rank == 6 else (a,):  # Vᵀ (and V₀ᵀ): orthonormal rows
        torch.testing.assert_close(rows @ rows.T, torch.eye(3), atol=1e-5, rtol=0)


def test_without_the_base_model_shapes_come_from_the_angle_counts(tmp_path):
    # Lie-algebra counts (N K - K(K+1)/2) fit one N; Pauli counts at these sizes fit several
    expected = _trained("quantum-peft", "mlp", tmp_path, stiefel="lie_exp")
    config = json.loads((tmp_path / "quantum-peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] is None  # a plain nn.Module: nothing to read
    out = export_lora(tmp_path / "quantum-peft", tmp_path / "lora")
    lora = PeftModel.from_pretrained(h.build_tiny("mlp"), out)
    torch.testing.assert_close(h.run(lora, "mlp"), expected, atol=1e-5, rtol=1e-5)
    _trained("quantum-peft", "mlp", tmp_path / "pauli")
    with pytest.raises(ValueError, match="module 'lin0'.*pass the base model"):
        export_lora(tmp_path / "pauli" / "quantum-peft", tmp_path / "lora2")


def _vllm_problems(folder) -> list[str]:
    """vLLM's rules for a LoRA adapter, each checked."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    problems = []
    if cfg.get("peft_type") != "LORA":
        problems.append("peft_type")
    for key in ("r", "lora_alpha", "target_modules"):
        if not cfg.get(key):
            problems.append(key)
    if cfg.get("modules_to_save"):
        problems.append("modules_to_save")
    if cfg.get("bias", "none") != "none":
        problems.append("bias")
    if cfg.get("use_dora"):
        problems.append("use_dora")
    if not all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors):
        problems.append("tensors")
    if cfg["r"] > 16:  # vLLM's default max_lora_rank
        problems.append("rank")
    return problems


@pytest.mark.parametrize("method", sorted(METHOD_OPTIONS))
def test_a_causal_lm_export_meets_vllm_s_rules_and_loads_without_qpeft(method, tmp_path):
    expected = _trained(method, "gpt2", tmp_path)
    out = export_lora(tmp_path / method, tmp_path / "lora", base_model=h.build_tiny("gpt2"))
    assert _vllm_problems(out) == [] and serving_notes(out) == []
    torch.testing.assert_close(h.outputs_without_qpeft('gpt2', out, tmp_path), expected,
                               atol=1e-5, rtol=1e-5)


def test_a_head_is_carried_and_named_as_what_servers_refuse(tmp_path):
    _trained("quantum-peft", "bert", tmp_path)
    out = export_lora(tmp_path / "quantum-peft", tmp_path / "lora", base_model=h.build_tiny("bert"))
    assert _vllm_problems(out) == ["modules_to_save", "tensors"]
    assert len(serving_notes(out)) == 1 and "modules_to_save" in serving_notes(out)[0]


def test_dtype_option(tmp_path, capsys):
    from qpeft.cli import main

    _trained("quantum-peft", "mlp", tmp_path, stiefel="lie_exp")
    assert main(["export-lora", str(tmp_path / "quantum-peft"), str(tmp_path / "bf16"),
                 "--dtype", "bfloat16"]) == 0
    tensors = load_file(str(tmp_path / "bf16" / "adapter_model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}


def test_quic_is_refused_in_one_line(tmp_path, capsys):
    from qpeft.cli import main

    c = h.TINY_MODELS["mlp"]
    model, _ = h.wrap("mlp", build_peft_config("quic", list(c.target_modules)))
    model.save_pretrained(tmp_path / "quic")
    assert main(["export-lora", str(tmp_path / "quic"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "'QUIC' adapter" in err and "Quantum-PEFT" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_an_adapter_saved_before_lr_scale_exports_with_the_scale_it_trained_with(tmp_path):
    """A Quantum-PEFT config without ``lr_scale`` (an older qpeft) is the paper's scale: the
    export must read it so, as PeftModel.from_pretrained does."""
    expected = _trained("quantum-peft", "mlp", tmp_path, stiefel="lie_exp")
    config_file = tmp_path / "quantum-peft" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["lr_scale"] = "paper"
    config_file.write_text(json.dumps(config))
    paper = h.run(PeftModel.from_pretrained(h.build_tiny("mlp"), tmp_path / "quantum-peft"), "mlp")
    assert not torch.allclose(paper, expected)  # the scale matters for these tensors
    del config["lr_scale"]
    config_file.write_text(json.dumps(config))
    out = export_lora(tmp_path / "quantum-peft", tmp_path / "lora")
    lora = PeftModel.from_pretrained(h.build_tiny("mlp"), out)
    torch.testing.assert_close(h.run(lora, "mlp"), paper, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", sorted(METHOD_OPTIONS))
@pytest.mark.parametrize("case", ["mlp", "gpt2"])
def test_peft_s_own_conversion_gives_the_same_lora(method, case, tmp_path):
    """peft's ``convert_to_lora`` at the adapter's rank (SVD of get_delta_weight) reproduces the
    adapter, as qpeft's export does."""
    from peft import get_peft_model, set_peft_model_state_dict
    from peft.tuners.lora.conversion import convert_to_lora

    expected = _trained(method, case, tmp_path)
    model = PeftModel.from_pretrained(h.build_tiny(case), tmp_path / method)
    lora_config, state = convert_to_lora(model, LORA_RANK[method])
    lora = get_peft_model(h.build_tiny(case), lora_config)
    set_peft_model_state_dict(lora, state)
    torch.testing.assert_close(h.run(lora, case), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["mlp", "gpt2"])
def test_quic_converts_through_peft_as_peft_oft_does(case, tmp_path):
    """QuIC's W' − W = (Q − I)·W is full rank, so peft's ``convert_to_lora`` (which peft's OFT
    and BOFT also accept) is exact only when it keeps every singular value: at energy threshold
    1.0 the LoRA reproduces the adapter, at rank 1 it does not (an approximation the caller
    chose)."""
    from peft import get_peft_model, set_peft_model_state_dict
    from peft.tuners.lora.conversion import convert_to_lora

    c = h.TINY_MODELS[case]
    model, base_out = h.wrap(case, build_peft_config("quic", list(c.target_modules),
                                                     c.modules_to_save))
    h.train_steps(model, case)
    expected = h.run(model, case)
    assert not torch.allclose(expected, base_out)
    assert model.supports_lora_conversion()

    def converted(rank: int | float) -> torch.Tensor:
        lora_config, state = convert_to_lora(model, rank)
        lora = get_peft_model(h.build_tiny(case), lora_config)
        set_peft_model_state_dict(lora, state)
        return h.run(lora, case)

    torch.testing.assert_close(converted(1.0), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(converted(1), expected, atol=1e-5, rtol=1e-5)

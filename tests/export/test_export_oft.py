"""``qpeft export-oft``: a QuIC adapter that rotates the input side of linear layers is exactly a
peft OFT adapter (block-diagonal orthogonal rotation of the input, exact Cayley); it leaves
qpeft as one, stock peft loads it (without qpeft) with equal outputs, and every adapter OFT
cannot express is refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from qpeft import QuICConfig
from qpeft.export.stock import export_oft
from qpeft.tuners.quic.export import cayley_skew
from tests.contract import harness as h

# input side, two blocks: lin0 (16 inputs) -> b = 8 (n = 3, 2 identity rows per block),
# lin1 (32) -> b = 16; bert's query/value (32) -> b = 16
VARIANTS = {
    "cayley": {},
    "rbs": {"base_map": "rbs"},
    "exp-shared": {"base_map": "exp", "block_share": True},
    "chained": {"num_adapters": 2},
    "orders-1-2-3": {"orders": [1, 2, 3], "num_blocks": 1},
}


def _trained(case: str, tmp_path, **options):
    c = h.TINY_MODELS[case]
    options = {"num_blocks": 2, **options}
    config = QuICConfig(target_modules=list(c.target_modules), side="input", init_weights=False,
                        modules_to_save=c.modules_to_save, **options)
    model, base_out = h.wrap(case, config)
    h.train_steps(model, case)
    expected = h.run(model, case)
    assert not torch.allclose(expected, base_out)  # the adapter does something
    model.save_pretrained(tmp_path / "quic")
    return expected


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_exported_oft_gives_the_adapter_s_outputs(variant, tmp_path):
    expected = _trained("mlp", tmp_path, **VARIANTS[variant])
    out = export_oft(tmp_path / "quic", tmp_path / "oft", base_model=h.build_tiny("mlp"))
    oft = PeftModel.from_pretrained(h.build_tiny("mlp"), out)
    assert type(oft.base_model).__name__ == "OFTModel"
    torch.testing.assert_close(h.run(oft, "mlp"), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.run(oft.merge_and_unload(), "mlp"), expected, atol=1e-5,
                               rtol=1e-5)


def test_the_checkpoint_is_oft_s_layout_with_exact_cayley(tmp_path):
    _trained("mlp", tmp_path, block_share=True)
    export_oft(tmp_path / "quic", tmp_path / "oft", base_model=h.build_tiny("mlp"))
    cfg = json.loads((tmp_path / "oft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "OFT" and cfg["r"] == 2 and cfg["use_cayley_neumann"] is False
    assert cfg["block_share"] is True
    tensors = load_file(str(tmp_path / "oft" / "adapter_model.safetensors"))
    # one shared block per layer: b(b-1)/2 numbers with b = in_features / 2
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "base_model.model.lin0.oft_R.weight": (1, 28),
        "base_model.model.lin1.oft_R.weight": (1, 120),
    }


def test_cayley_skew_inverts_peft_s_cayley_map():
    torch.manual_seed(0)
    s = torch.randn(3, 6, 6, dtype=torch.float64)
    s = s - s.mT
    eye = torch.eye(6, dtype=torch.float64).expand(3, 6, 6)
    rotation = torch.linalg.solve(eye + s, eye - s, left=False)  # peft OFT's exact Cayley
    torch.testing.assert_close(cayley_skew(rotation), s, atol=1e-10, rtol=0)
    flip = torch.diag(torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=torch.float64))  # eigenvalue -1
    with pytest.raises(ValueError, match="eigenvalue at -1"):
        cayley_skew(flip)


def test_a_head_is_carried_and_the_export_loads_without_qpeft(tmp_path):
    expected = _trained("bert", tmp_path)
    out = export_oft(tmp_path / "quic", tmp_path / "oft", base_model=h.build_tiny("bert"))
    assert any("classifier" in k for k in load_file(str(out / "adapter_model.safetensors")))
    torch.testing.assert_close(h.outputs_without_qpeft('bert', out, tmp_path), expected,
                               atol=1e-5, rtol=1e-5)


def _save(case: str, tmp_path, **options) -> None:
    c = h.TINY_MODELS[case]
    model, _ = h.wrap(case, QuICConfig(target_modules=list(c.target_modules), **options))
    model.save_pretrained(tmp_path / "quic")


@pytest.mark.parametrize(("case", "options", "says"), [
    ("mlp", {}, "side='output'"),
    ("mlp", {"side": "input", "base_map": "free"}, "not orthogonal"),
    ("mlp", {"side": "input", "num_adapters": 2, "combine": "sum"}, "not orthogonal"),
    ("mlp", {"side": "input", "num_blocks": 2}, "pass the base model"),  # b is not saved
])
def test_what_oft_cannot_express_is_refused_in_one_line(case, options, says, tmp_path, capsys):
    from qpeft.cli import main

    _save(case, tmp_path, **options)
    status = main(["export-oft", str(tmp_path / "quic"), str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1, err
    assert says in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("case", "options", "says"), [
    ("mlp", {"side": "input", "num_blocks": 3}, "outside the 3 blocks"),
    ("gpt2", {"side": "input", "num_blocks": 2}, "Conv1D"),
])
def test_layer_problems_are_named_given_the_base_model(case, options, says, tmp_path):
    _save(case, tmp_path, **options)
    with pytest.raises(ValueError, match=says):
        export_oft(tmp_path / "quic", tmp_path / "out", base_model=h.build_tiny(case))


def test_other_methods_are_pointed_to_their_export(tmp_path, capsys):
    from qpeft.cli import main
    from qpeft.train.methods import build_peft_config

    c = h.TINY_MODELS["mlp"]
    model, _ = h.wrap("mlp", build_peft_config("quantum-peft", list(c.target_modules)))
    model.save_pretrained(tmp_path / "qp")
    assert main(["export-oft", str(tmp_path / "qp"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "'QUANTUM_PEFT' adapter" in err and "`qpeft export-lora`" in err and "QuIC" in err

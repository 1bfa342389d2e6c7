"""A fourth method is one new folder: a toy method defined in tests/ (``tests/tuners/toy_method``)
and registered with ``register_method`` shows up in ``qpeft count``, ``finetune``, ``compare``,
``export-circuits``, ``export-lora`` and the peft matrix rows, with no shared file edited."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from qpeft.tuners.registry import register_method, unregister_method
from tests.cli import tiny
from tests.tuners import toy_method


@pytest.fixture
def toy():
    register_method(toy_method.TOY)
    yield toy_method.TOY
    unregister_method(toy_method.NAME)


def test_count_lists_the_toy_method_and_its_option(cli, assets, toy):
    status, out, _ = cli("count", "--method", toy.name, "--model", str(assets["llama"]),
                         "--toy-scale", "3", "--json")
    assert status == 0
    table = json.loads(out)
    # q_proj and v_proj of 2 layers, each 64 -> 64 (k/v heads 2 x 32): out + in numbers each,
    # counted on the wrapped model and by the config's closed form
    assert table["method"] == toy.name and table["total"] == 4 * (64 + 64)
    assert table["closed_form_total"] == table["total"]
    assert table["peft_config"]["scale"] == 3.0


def test_finetune_and_compare_use_its_options_and_learning_rate(cli, tmp_path, assets, toy):
    common = ["--model", str(assets["bert"]), "--train-file", str(assets["table"]),
              "--batch-size", "8", "--max-steps", "3", "--no-progress"]
    status, _, err = cli("finetune", "--method", toy.name, *common,
                         "--output-dir", tmp_path / "ft")
    assert status == 0, err
    results = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert results["lr"] == toy.learning_rate and results["lr_source"] == toy.learning_rate_note
    assert results["method_options"] == {"toy_scale": 2.0}
    assert results["peft_config"]["peft_type"] == "TOY_RANK_ONE"
    status, _, err = cli("compare", "--methods", f"{toy.name},lora", *common,
                         "--output-dir", tmp_path / "cmp")
    assert status == 0, err
    rows = {r["method"]: r for r in json.loads((tmp_path / "cmp" / "compare.json").read_text())["runs"]}
    assert rows[toy.name]["lr"] == toy.learning_rate and rows["lora"]["lr"] == 2e-3


def _trained_toy(tmp_path: Path) -> tuple[PeftModel, Path]:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir = tiny.save_tiny_llama(tmp_path / "base")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           toy_method.ToyConfig(target_modules=["q_proj"], init_weights=False,
                                                scale=0.5))
    model.save_pretrained(tmp_path / "toy")
    return model, base_dir


def test_export_commands_dispatch_to_its_hooks(cli, tmp_path, toy):
    model, base_dir = _trained_toy(tmp_path)
    status, out, err = cli("export-circuits", tmp_path / "toy", tmp_path / "circuits")
    assert status == 0, err
    manifest = json.loads((tmp_path / "circuits" / "manifest.json").read_text())
    assert manifest["peft_type"] == "TOY_RANK_ONE" and len(manifest["circuits"]) == 2
    status, _, err = cli("export-lora", tmp_path / "toy", tmp_path / "lora")
    assert status == 0, err
    from transformers import AutoModelForCausalLM

    lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir),
                                     tmp_path / "lora")
    ids = torch.tensor([[2, 9, 10, 11]])
    with torch.no_grad():
        torch.testing.assert_close(lora(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_peft_matrix_gathers_its_rows(toy):
    from tests.peft_matrix import rows

    test_cases, _, method_of = rows.collect()
    assert ("Vanilla MLP 1 Toy", "MLP", toy_method.ToyConfig, {"target_modules": ["lin0"]}) in test_cases
    assert method_of[toy_method.ToyConfig] == toy.label


def test_unregistered_it_is_an_unknown_method(cli, assets):
    status, _, err = cli("count", "--method", toy_method.NAME, "--model", str(assets["llama"]))
    assert status == 2 and "unknown method" in err

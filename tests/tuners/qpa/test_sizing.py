"""QPA's default sizing: the generator trains at most half of LoRA r's count on every target set
(real architectures' shapes from configs without weights), the paper preset is unchanged, and the
chosen sizes are written into the saved config."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import BertConfig, LlamaConfig

import qpeft
from qpeft.tuners.counting import count_trainable, lora_trainable
from qpeft.tuners.qpa.config import REFERENCE_N_MLP, build_generator
from qpeft.tuners.qpa.generator import REFERENCE_HIDDEN, generator_num_params

MINILM = BertConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                    num_attention_heads=12, vocab_size=30522)
SMOLLM2 = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, vocab_size=49152)
LLAMA_7B = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
TARGETS = {
    "bert": {"q,v": ["query", "value"],
             "all-linear": ["query", "key", "value", "dense"]},
    "llama": {"q,v": ["q_proj", "v_proj"],
              "all-linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                             "down_proj"]},
}
MODELS = {"MiniLM": (MINILM, "bert"), "SmolLM2": (SMOLLM2, "llama"), "LLaMA-7B": (LLAMA_7B, "llama")}


@pytest.mark.parametrize("r", [4, 8, 16])
@pytest.mark.parametrize("targets", ["q,v", "all-linear"])
@pytest.mark.parametrize("model", list(MODELS))
def test_default_generator_is_at_most_half_of_lora(model, targets, r):
    model_config, family = MODELS[model]
    cfg = qpeft.QPAConfig(r=r, target_modules=TARGETS[family][targets])
    count = count_trainable(cfg, model_config)
    lora = count.lora_equivalent(r)
    assert lora == sum(r * (o + i) for o, i in count.module_shapes.values())
    assert lora == lora_trainable(cfg, model_config)
    assert 0 < count.total <= lora / 2, (count.total, lora)
    # the generator the tuner would build has exactly that many trainables
    generator = build_generator(cfg, list(count.module_shapes.values()))
    assert sum(p.numel() for p in generator.parameters()) == count.total


def test_minilm_query_value_was_above_lora_and_is_now_below():
    cfg = qpeft.QPAConfig(r=8, target_modules=["query", "value"])
    count = count_trainable(cfg, MINILM)
    assert count.lora_equivalent(8) == 73_728
    # the former default (paper widths, n_mlp=2048) trained 106,225 numbers, 144 % of LoRA
    former = generator_num_params(6, 8, 2048, REFERENCE_HIDDEN, True)
    assert former == 106_225
    n_mlp, hidden = cfg.resolve_sizes(list(count.module_shapes.values()))
    assert (n_mlp, hidden) == (1024, [32, 32])
    assert count.total == generator_num_params(7, 8, 1024, [32, 32], True) == 35_193


def test_reference_preset_and_explicit_sizes_are_kept():
    shapes = [(384, 384)] * 12
    ref = qpeft.QPAConfig(preset="reference", target_modules=["query"])
    assert ref.resolve_sizes(shapes) == (REFERENCE_N_MLP, list(REFERENCE_HIDDEN))
    explicit = qpeft.QPAConfig(n_mlp=100, mlp_hidden=[7], target_modules=["query"])
    assert explicit.resolve_sizes(shapes) == (100, [7])
    # one size given: the rule fills the other (within its candidates)
    only_hidden = qpeft.QPAConfig(mlp_hidden=[32, 32], target_modules=["query"])
    assert only_hidden.resolve_sizes(shapes)[1] == [32, 32]
    only_n = qpeft.QPAConfig(n_mlp=64, target_modules=["query"])
    assert only_n.resolve_sizes(shapes)[0] == 64


def test_chosen_sizes_are_saved_and_reloaded(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(96, 80), nn.Tanh(), nn.Linear(80, 96))
    cfg = qpeft.QPAConfig(r=4, target_modules=["0", "2"], init_seed=1)
    model = get_peft_model(base, cfg)
    saved = model.peft_config["default"]
    m = 4 * (96 + 80 + 80 + 96)
    assert saved.n_mlp is not None and saved.mlp_hidden is not None
    assert model.get_nb_trainable_parameters()[0] <= m / 2
    with torch.no_grad():
        model.base_model.generator().gain.fill_(0.5)
    x = torch.randn(3, 96)
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    base2 = nn.Sequential(nn.Linear(96, 80), nn.Tanh(), nn.Linear(80, 96))
    loaded = PeftModel.from_pretrained(base2, tmp_path)
    assert loaded.peft_config["default"].n_mlp == saved.n_mlp
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_no_import_cycle_between_qpa_export_and_model():
    folder = Path(qpeft.__file__).parent / "tuners" / "qpa"
    assert "qpeft.tuners.qpa.model" not in _imported_modules(folder / "export.py")
    assert "qpeft.tuners.qpa.export" in _imported_modules(folder / "model.py")

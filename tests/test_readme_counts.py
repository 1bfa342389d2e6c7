"""The README's table of trainable numbers on a LLaMA-7B-shaped layer is what qpeft computes."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import qpeft

README = Path(__file__).resolve().parent.parent / "README.md"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _table() -> dict[str, int]:
    text = README.read_text()
    block = text.split("<!-- counts-7b-layer -->")[1].split("<!-- /counts-7b-layer -->")[0]
    rows = re.findall(r"^\| ([^|]+?) \| ([\d,]+) \|$", block, flags=re.M)
    return {name: int(count.replace(",", "")) for name, count in rows}


def test_readme_7b_layer_counts_are_computed():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                      num_key_value_heads=32)
    with torch.device("meta"):
        layer = LlamaDecoderLayer(cfg, layer_idx=0)
    lora = sum(8 * (m.in_features + m.out_features) for name, m in layer.named_modules()
               if name.split(".")[-1] in TARGETS)
    computed = {
        "peft LoRA r=8": lora,
        "Quantum-PEFT (r=8, L=1)": qpeft.count_trainable(
            qpeft.QuantumPEFTConfig(target_modules=TARGETS), layer).adapter_total,
        "QuIC (N=3, orders [1, 2])": qpeft.count_trainable(
            qpeft.QuICConfig(target_modules=TARGETS), layer).adapter_total,
        "QPA (r=8)": qpeft.count_trainable(qpeft.QPAConfig(target_modules=TARGETS),
                                           layer).adapter_total,
    }
    assert _table() == computed
    assert computed["peft LoRA r=8"] == 624_640

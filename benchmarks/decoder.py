"""LLaMA-shaped decoder layers and the adapter configs the scale benchmarks put on them
(shared by ``benchmarks.scale``, ``benchmarks.scale_generation`` and ``benchmarks.scale_cuda``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from benchmarks import models as M

TARGETS_7B = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama_config(hidden: int, intermediate: int, heads: int, kv_heads: int) -> Any:
    """A ``LlamaConfig`` of one decoder layer's shape (random init, no hub)."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=hidden, intermediate_size=intermediate,
                       num_attention_heads=heads, num_key_value_heads=kv_heads)


class DecoderLayers(nn.Module):
    """``layers`` decoder layers sharing one rotary embedding: hidden [B, T, d] -> [B, T, d]."""

    def __init__(self, config: Any, layers: int = 1) -> None:
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        self.config = config
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, layer_idx=i) for i in range(layers))
        self.rotary = LlamaRotaryEmbedding(config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(hidden.shape[1], device=hidden.device)[None]
        rotary = self.rotary(hidden, pos)
        for layer in self.layers:
            out = layer(hidden, position_embeddings=rotary, position_ids=pos)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden


def method_config(method: str) -> Any:
    """LoRA/OFT/qpeft as in ``benchmarks.models``; VeRA and FourierFT with peft's defaults."""
    import peft

    if method == "vera":
        return peft.VeraConfig(target_modules=list(TARGETS_7B))
    if method == "fourierft":
        return peft.FourierFTConfig(target_modules=list(TARGETS_7B))
    return M.method_config(method, TARGETS_7B, None)

"""What the methods' paper-count rows share (``python -m benchmarks.param_counts``): the papers'
base models as transformers configs, built on the meta device (no weights); peft's own LoRA
count on them; and one row of the table, compared at the precision the paper printed (exact
integers, "0.03M" to two decimals in millions, percentages to two decimals).

Each method's ``paper_counts.py`` (the ``paper_counts`` hook of its
:class:`~qpeft.tuners.registry.MethodSpec`) returns its rows.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["count_row", "deberta_v3_base", "gemma2_2b", "gpt2", "llama_7b", "matches",
           "meta_model", "peft_lora_count", "safe_row"]


def deberta_v3_base() -> Any:
    """DeBERTaV3-base: hidden 768, 12 layers, 12 heads, FFN 3072, vocab 128,100."""
    from transformers import DebertaV2Config

    return DebertaV2Config(vocab_size=128100, hidden_size=768, num_hidden_layers=12,
                           num_attention_heads=12, intermediate_size=3072,
                           max_position_embeddings=512, relative_attention=True,
                           position_buckets=256, norm_rel_ebd="layer_norm", share_att_key=True,
                           pos_att_type=["p2c", "c2p"], position_biased_input=False)


def llama_7b() -> Any:
    """LLaMA-7B: hidden 4096, 32 layers, 32 heads, FFN 11,008, vocab 32,000."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=4096, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, intermediate_size=11008)


def gpt2(size: str = "small") -> Any:
    """GPT-2 small (768 x 12) or medium (1024 x 24), vocab 50,257."""
    from transformers import GPT2Config

    if size == "medium":
        return GPT2Config(n_embd=1024, n_layer=24, n_head=16)
    return GPT2Config()


def gemma2_2b() -> Any:
    """Gemma-2-2B: hidden 2304, 26 layers, vocab 256,000."""
    from transformers import Gemma2Config

    return Gemma2Config(vocab_size=256000, hidden_size=2304, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                        intermediate_size=9216)


def meta_model(config: Any, auto: str = "AutoModel", **kwargs: Any) -> nn.Module:
    """``auto.from_config(config)`` on the meta device (no memory)."""
    import transformers

    for key, value in kwargs.items():
        setattr(config, key, value)
    with torch.device("meta"):
        return getattr(transformers, auto).from_config(config)


def peft_lora_count(model: nn.Module, r: int, targets: list[str],
                    modules_to_save: list[str] | None = None) -> int:
    """Trainable numbers peft's LoRA adds (plus trainable modules_to_save) on ``model``."""
    import peft

    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                          modules_to_save=modules_to_save)
    with torch.device("meta"):
        wrapped = peft.get_peft_model(model, cfg)
    return sum(p.numel() for p in wrapped.parameters() if p.requires_grad)


def matches(computed: Any, published: Any) -> bool | None:
    """Match at the paper's printed precision: int exact; 'x.xxM' / 'xxK' rounded; 'x.xx%'."""
    if computed is None or published is None:
        return None
    if isinstance(computed, str):
        return computed == str(published)
    if isinstance(published, int):
        return computed == published
    if isinstance(published, str):
        text = published.strip()
        if text.endswith("%"):
            digits = len(text[:-1].split(".")[1]) if "." in text else 0
            return round(float(computed), digits) == float(text[:-1])
        if text[-1] in "MK":
            scale = 1e6 if text[-1] == "M" else 1e3
            digits = len(text[:-1].split(".")[1]) if "." in text else 0
            return round(computed / scale, digits) == float(text[:-1])
        return str(computed) == text
    return computed == published


def count_row(paper: str, item: str, computed: Any, published: Any, how: str,
              note: str = "") -> dict:
    """One row of the table: ``match`` compares at the paper's printed precision."""
    return {"paper": paper, "item": item, "computed": computed, "published": published,
            "match": matches(computed, published), "how": how, "note": note}


def safe_row(rows: list[dict], paper: str, item: str, published: Any, how: str,
             fn: Any, note: str = "") -> Any:
    """Append the row for ``fn()``'s value (or, when it raises, a row saying why it was not
    computed) to ``rows``; returns the value or None."""
    try:
        value = fn()
    except Exception as err:  # a construction not available yet: say so in the row
        rows.append(count_row(paper, item, None, published, how,
                              f"not computed: {type(err).__name__}: {err}"))
        return None
    rows.append(count_row(paper, item, value, published, how, note))
    return value

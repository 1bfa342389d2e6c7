"""Tiny random models saved to folders, and small data files, for fast CLI / loop tests.

Everything here is built by the tests themselves (no download): a word-level tokenizer over
``w0 .. w39`` (plus chat words), a 2-layer LLaMA and a 2-layer BERT saved with
``save_pretrained``, classification tables and instruction JSONL files. The CLI takes them by
path, exactly as a user's own model and data.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

WORDS = [f"w{i}" for i in range(40)]
SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
CHAT_WORDS = ["user", "assistant", "system", ":"]
#: A minimal chat template: "user : w1 w2 [EOS] assistant : w3 [EOS]".
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} [EOS] {% endfor %}"
                 "{% if add_generation_prompt %}assistant : {% endif %}")


def tokenizer(chat_template: bool = False) -> Any:
    """Word-level fast tokenizer: pad 0, unk 1, BOS 2 (added in front), EOS 3; decodes words
    joined by spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + CHAT_WORDS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A",
                                                       special_tokens=[("[BOS]", 2)])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="[BOS]", eos_token="[EOS]")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tiny_llama(folder: Path, *, chat_template: bool = False, seed: int = 0) -> Path:
    """A random 2-layer LlamaForCausalLM (hidden 64) + tokenizer, saved with save_pretrained.

    Widths of 64 and 128: bitsandbytes 0.50's CPU 4-bit kernels on AVX512-BF16 hosts fail on
    narrower layers in eval mode (input width below the 64-wide quantization block), for LoRA
    as for qpeft."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer(chat_template)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, intermediate_size=128,
                      max_position_embeddings=128, pad_token_id=0, bos_token_id=2,
                      eos_token_id=3, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def save_tiny_bert(folder: Path, *, seed: int = 0) -> Path:
    """A random 2-layer BertModel (no head, like MiniLM) + tokenizer, saved with save_pretrained."""
    from transformers import BertConfig, BertModel

    tok = tokenizer()
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)
    BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, records: list[Any]) -> Path:
    """One JSON value per line (strings are written as given: raw lines for bad-record tests)."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


def classification_records(n: int = 96, seed: int = 0) -> list[dict[str, Any]]:
    """Three classes; class c's texts use words w(10c) .. w(10c+9): learnable in a few steps."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = i % 3
        words = [WORDS[10 * label + rng.randrange(10)] for _ in range(8)]
        out.append({"text": " ".join(words), "label": "abc"[label]})
    return out


def sft_records(n: int = 64, seed: int = 0) -> list[dict[str, str]]:
    """prompt: 3 words; completion: each word's successor (w_i -> w_(i+1 mod 40))."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        idx = [rng.randrange(40) for _ in range(3)]
        out.append({"prompt": " ".join(WORDS[i] for i in idx),
                    "completion": " ".join(WORDS[(i + 1) % 40] for i in idx)})
    return out


def text_records(n: int = 32, seed: int = 0) -> list[dict[str, str]]:
    """Plain text: runs of consecutive words (w_s, w_(s+3), ...)."""
    rng = random.Random(seed)
    return [{"text": " ".join(WORDS[(s + 3 * i) % 40] for i in range(12))}
            for s in (rng.randrange(40) for _ in range(n))]


class TinyCNN(nn.Module):
    """Stem conv, two 1x1 convs (``_expand_conv``, ``_project_conv``), BN, pooled ``_fc``."""

    def __init__(self, num_labels: int):
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self._bn0 = nn.BatchNorm2d(8)
        self._expand_conv = nn.Conv2d(8, 16, 1, bias=False)
        self._project_conv = nn.Conv2d(16, 8, 1, bias=False)
        self._fc = nn.Linear(8, num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self._bn0(self._conv_stem(x)))
        h = self._project_conv(torch.relu(self._expand_conv(h)))
        return self._fc(h.mean(dim=(2, 3)))


def image_task(n_train: int = 96, n_eval: int = 32, seed: int = 0) -> Any:
    """Four classes of 8x8 images, each with one bright quadrant."""
    from qpeft.assets import TaskData

    g = torch.Generator().manual_seed(1234 + seed)

    def images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, 4, (n,), generator=g)
        x = torch.randint(0, 60, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
        for i, lab in enumerate(labels.tolist()):
            r, c = divmod(lab, 2)
            x[i, 0, 4 * r:4 * r + 4, 4 * c:4 * c + 4] += 180
        return x, labels

    return TaskData("quadrants", "image-classification", images(n_train), images(n_eval), 4,
                    ["q0", "q1", "q2", "q3"], "accuracy", {"strategy": "synthetic"})


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A random 2-layer LLaMA (hidden 32) as an fp32 GGUF file, with a GPT-2-style BPE
    tokenizer over the letters a-z (merge ``a b``) in its metadata, written with ``gguf``."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["<s>", "</s>", "<unk>", *letters, "Ġ", "ab"]
    vocab, hidden, ffn, layers = len(tokens), 32, 64, 2
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hidden // 2)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 2] + [1] * (vocab - 3))
    w.add_token_scores([0.0] * vocab)
    w.add_token_merges(["a b"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_unk_token_id(2)

    def weight(name: str, *shape: int) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.05).astype(np.float32))

    weight("token_embd.weight", vocab, hidden)
    weight("output.weight", vocab, hidden)
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            weight(f"blk.{i}.{name}.weight", hidden, hidden)
        weight(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        weight(f"blk.{i}.ffn_up.weight", ffn, hidden)
        weight(f"blk.{i}.ffn_down.weight", hidden, ffn)
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

"""Tiny random models and synthetic tasks for fast tests of the loop and the CLI.

Enabled only when the environment variable ``QPEFT_TEST_ASSETS=1`` is set: then the model names
``tiny-bert``, ``tiny-llama``, ``tiny-cnn`` and the task names ``tiny-text``, ``tiny-lm``,
``tiny-images`` resolve here instead of :mod:`qpeft.assets`. Nothing here is a real model or a
real result; it exists so that a multi-process run or a resume can be tested in seconds.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from torch import nn

from qpeft.assets import TaskData

ENV_FLAG = "QPEFT_TEST_ASSETS"
DUMP_ENV = "QPEFT_TEST_RANK_DUMP"
TINY_MODELS: dict[str, str] = {"tiny-bert": "text-classification", "tiny-llama": "causal-lm",
                               "tiny-cnn": "image-classification"}
TINY_TASKS: dict[str, str] = {"tiny-text": "text-classification", "tiny-lm": "causal-lm",
                              "tiny-images": "image-classification"}
_WORDS = [f"w{i}" for i in range(40)]


def enabled() -> bool:
    """True when ``QPEFT_TEST_ASSETS=1``."""
    return os.environ.get(ENV_FLAG) == "1"


@dataclasses.dataclass
class TinyModel:
    """Same fields as ``qpeft.assets.LoadedModel``."""

    model: nn.Module
    tokenizer: Any
    name: str
    kind: str
    default_target_modules: list[str]
    modules_to_save: list[str] | None
    image_size: int | None = None


def tokenizer() -> Any:
    """A word-level fast tokenizer over the synthetic vocabulary (pad id 0)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(_WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   eos_token="[PAD]")


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


def load_model(name: str, *, num_labels: int | None = None) -> TinyModel:
    """A freshly initialised tiny model (seed first for determinism)."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        LlamaConfig,
        LlamaForCausalLM,
    )

    tok = tokenizer()
    if name == "tiny-bert":
        cfg = BertConfig(vocab_size=len(_WORDS) + 2, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                         num_labels=num_labels or 2)
        return TinyModel(BertForSequenceClassification(cfg), tok, name, "text-classification",
                         ["query", "value"], ["classifier"])
    if name == "tiny-llama":
        cfg = LlamaConfig(vocab_size=len(_WORDS) + 2, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                          max_position_embeddings=64, pad_token_id=0)
        return TinyModel(LlamaForCausalLM(cfg), tok, name, "causal-lm", ["q_proj", "v_proj"], None)
    if name == "tiny-cnn":
        return TinyModel(TinyCNN(num_labels or 10), None, name, "image-classification",
                         ["_expand_conv", "_project_conv"], ["_fc"], image_size=8)
    raise ValueError(f"unknown tiny model {name!r}")


def load_task(name: str, *, seed: int = 0, max_train: int | None = None,
              max_eval: int | None = None) -> TaskData:
    """A deterministic synthetic task: class-keyed words, a repeating word grammar, or
    bright-quadrant images."""
    g = torch.Generator().manual_seed(1234 + seed)
    n_train, n_eval = max_train or 96, max_eval or 32
    split = {"strategy": "synthetic", "seed": seed, "train_size": n_train, "eval_size": n_eval}
    if name == "tiny-text":
        def make(n: int) -> list[dict[str, Any]]:
            labels = torch.randint(0, 3, (n,), generator=g)
            out = []
            for lab in labels.tolist():
                words = torch.randint(0, 10, (8,), generator=g) + 10 * lab
                out.append({"text": " ".join(_WORDS[i] for i in words.tolist()), "label": lab})
            return out
        return TaskData(name, "text-classification", make(n_train), make(n_eval), 3,
                        ["a", "b", "c"], "accuracy", split)
    if name == "tiny-lm":
        def docs(n: int) -> list[str]:
            out = []
            for _ in range(n):
                start = int(torch.randint(0, 40, (1,), generator=g))
                out.append(" ".join(_WORDS[(start + 3 * i) % 40] for i in range(40)))
            return out
        return TaskData(name, "causal-lm", docs(max(1, n_train // 4)), docs(max(1, n_eval // 4)),
                        None, None, "perplexity", split)
    if name == "tiny-images":
        def images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            labels = torch.randint(0, 4, (n,), generator=g)
            x = torch.randint(0, 60, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
            for i, lab in enumerate(labels.tolist()):
                r, c = divmod(lab, 2)
                x[i, 0, 4 * r:4 * r + 4, 4 * c:4 * c + 4] += 180
            return x, labels
        return TaskData(name, "image-classification", images(n_train), images(n_eval), 4,
                        ["q0", "q1", "q2", "q3"], "accuracy", split)
    raise ValueError(f"unknown tiny task {name!r}")



def dump_rank_state(model: nn.Module, rank: int) -> None:
    """With ``QPEFT_TEST_RANK_DUMP=DIR`` (and the test flag), every rank saves its trainable
    tensors to ``DIR/rank<r>.pt``, so a test can check that data-parallel ranks agree."""
    folder = os.environ.get(DUMP_ENV)
    if not (enabled() and folder):
        return
    state = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.save(state, os.path.join(folder, f"rank{rank}.pt"))

"""The models and adapter configurations the benchmarks compare.

Real models (MiniLM, SmolLM2-135M) come from :func:`qpeft.assets.load_model`; ``quick`` runs use
tiny randomly initialised BERT / Llama models with the same module names, so the smoke test
exercises exactly the code path of a full run in a second.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import qpeft  # noqa: F401  (registers every method)
from qpeft.tuners.registry import get_method, methods

# every registered method with a benchmark configuration, by its registry key ("quantum_peft")
PEFT_METHODS = tuple(s.key for s in methods(ours=False) if s.benchmark_config)
QPEFT_METHODS = tuple(s.key for s in methods(ours=True) if s.benchmark_config)
METHODS = PEFT_METHODS + QPEFT_METHODS
METHOD_LABELS = {s.key: s.benchmark_label for s in methods() if s.benchmark_config}
MODEL_KINDS = ("minilm", "smollm2")


@dataclass(frozen=True)
class ModelSpec:
    """What a training step needs to know about a model: targets, batch shape, task type."""

    kind: str
    targets: tuple[str, ...]
    batch: int
    seq_len: int
    task_type: str
    num_labels: int | None


def smollm2_shaped(layers: int = 30, vocab_size: int = 49152) -> nn.Module:
    """SmolLM2-135M's architecture (576 wide, intermediate 1536, GQA 9 / 3 heads, tied
    embeddings) with random weights (seed 0) and ``layers`` of its 30 decoder layers, in train
    mode: its shapes where its weights are not needed (or cannot travel, as to a GPU machine)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab_size, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
        num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)).train()


def model_spec(kind: str, quick: bool) -> ModelSpec:
    """Batch 16 x 128 on MiniLM (query, value), 4 x 128 on SmolLM2 (q_proj, v_proj); quick: 2 x 16."""
    if kind == "minilm":
        b, t = (2, 16) if quick else (16, 128)
        return ModelSpec(kind, ("query", "value"), b, t, "SEQ_CLS", 5)
    if kind == "smollm2":
        b, t = (2, 16) if quick else (4, 128)
        return ModelSpec(kind, ("q_proj", "v_proj"), b, t, "CAUSAL_LM", None)
    raise ValueError(f"model kind must be one of {MODEL_KINDS}, got {kind!r}")


def load_base(kind: str, quick: bool) -> nn.Module:
    """The frozen base model in fp32 eval-free train mode. Quick: a tiny random model with the
    same architecture family (BERT / Llama) and module names. Cost: ~1 s (cached assets)."""
    torch.manual_seed(0)
    if quick:
        from transformers import (
            BertConfig,
            BertForSequenceClassification,
            LlamaConfig,
            LlamaForCausalLM,
        )

        if kind == "minilm":
            cfg = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                             num_attention_heads=4, intermediate_size=128, num_labels=5)
            model = BertForSequenceClassification(cfg)
        elif kind == "smollm2":
            cfg = LlamaConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2,
                              intermediate_size=128, tie_word_embeddings=True)
            model = LlamaForCausalLM(cfg)
        else:
            raise ValueError(f"model kind must be one of {MODEL_KINDS}, got {kind!r}")
    else:
        from qpeft.assets import load_model

        if kind == "minilm":
            model = load_model("minilm", num_labels=5).model
        elif kind == "smollm2":
            model = load_model("smollm2").model
        else:
            raise ValueError(f"model kind must be one of {MODEL_KINDS}, got {kind!r}")
    model.train()
    for module in model.modules():  # dropout off: identical work for every method
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def make_batch(spec: ModelSpec, vocab_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids (fixed seed) of shape (batch, seq_len) and labels for the task."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (spec.batch, spec.seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if spec.task_type == "SEQ_CLS":
        batch["labels"] = torch.randint(0, spec.num_labels or 2, (spec.batch,), generator=g)
    else:
        batch["labels"] = ids.clone()
    return batch


def method_config(method: str, targets: Iterable[str], task_type: str | None) -> Any:
    """The adapter config of ``method`` on ``targets`` (its registry ``benchmark_config``,
    described in :data:`METHOD_LABELS`)."""
    spec = get_method(method)
    if spec.benchmark_config is None:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return spec.benchmark_config(list(targets), task_type)


def clone_sharing(model: nn.Module, keep: Callable[[str], bool] = lambda name: True) -> nn.Module:
    """A deep copy of ``model`` whose parameters/buffers named ``n`` with ``keep(n)`` are the
    *same* tensors as the original's (no extra memory); the rest are copied. Cost: O(#modules)
    plus the copied tensors."""
    memo: dict[int, Any] = {}
    for name, p in model.named_parameters():
        if keep(name):
            memo[id(p)] = p
    for name, b in model.named_buffers():
        if keep(name):
            memo[id(b)] = b
    return copy.deepcopy(model, memo)


def wrap(method: str, base: nn.Module, spec: ModelSpec, cli_defaults: bool = False) -> nn.Module:
    """``peft.get_peft_model`` of a weight-sharing clone of ``base`` for ``method``: its
    benchmark configuration on ``spec.targets`` (:func:`method_config`), or with
    ``cli_defaults`` what ``qpeft finetune`` builds (:func:`cli_default_config`)."""
    import peft

    cfg = (cli_default_config(method, spec) if cli_defaults
           else method_config(method, spec.targets, spec.task_type))
    return peft.get_peft_model(clone_sharing(base), cfg)


def cli_default_config(method: str, spec: ModelSpec) -> Any:
    """The config ``qpeft finetune`` builds for ``method`` on ``spec``'s model when the user
    names no targets and no options: the method's own targets for that kind of data and the
    options that go with them (QuIC in 12 blocks on every linear layer of a causal LM), else
    the model's (``spec.targets``)."""
    from qpeft.train.finetune import kind_of_task_type
    from qpeft.train.methods import config_at_defaults

    return config_at_defaults(get_method(method).name, kind_of_task_type(spec.task_type),
                              list(spec.targets), task_type=spec.task_type)


def trainable_count(model: nn.Module) -> int:
    """Number of trainable numbers (requires_grad) in ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def make_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    """One optimizer step (zero_grad, forward, loss.backward, AdamW.step) as a closure."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        opt.step()

    return step

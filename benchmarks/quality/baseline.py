"""The suite's no-adapter point: what the task gives without any adapter.

- Classification (a fresh head): **head only**, the base frozen and only the new classifier
  head trained, with the suite's budget and seed (a linear probe: what an adapter must beat).
- Causal-LM tasks (no new head): **the base model**, evaluated without training (the
  instruction-tuned model's zero-shot exact match, the pretrained perplexity); deterministic,
  so one run stands for every seed.

A run writes ``run.json`` (its fingerprint) and ``results.json`` with the fields the suite
reads (``trainable_params``, the task's metric, ``lr``, ``train_seconds``, ...), as a
:func:`~qpeft.train.finetune.run_finetune` run does, so the suite stores, reuses and renders it
like any other entry. Cost: a classification run is the suite's budget of forwards through the
frozen base (the backward stops at the head); a causal-LM run is one evaluation.
"""

from __future__ import annotations

import time
from typing import Any

import torch

#: the method name the suite's no-adapter entry runs under
METHOD = "head-only"


def trains_head(metric: str) -> bool:
    """Whether the no-adapter point of a task with this metric trains a head (classification)
    or only evaluates the base model (causal-LM data)."""
    return metric == "accuracy"


def freeze_all_but(model: torch.nn.Module, modules: list[str]) -> int:
    """Freeze every parameter of ``model`` except those inside a module named in ``modules``
    (a dotted-name component, as peft's ``modules_to_save`` matches); returns the trainable
    count. ValueError when nothing is left trainable."""
    count = 0
    for name, param in model.named_parameters():
        param.requires_grad_(any(part in modules for part in name.split(".")))
        count += param.numel() if param.requires_grad else 0
    if not count:
        raise ValueError(f"no parameter of the model is inside {modules}: nothing to train")
    return count


def run_baseline(spec: Any, metric: str) -> dict[str, Any]:
    """The no-adapter run of ``spec`` (a :class:`~qpeft.train.finetune.FinetuneSpec`; its
    ``method`` is ignored): results with the task's ``metric``."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from qpeft.train.finetune import data_kind, load_data, load_model, prepare_data
    from qpeft.train.loop import evaluate, train
    from qpeft.train.sft import exact_match

    task = load_data(spec)
    set_seed(spec.seed)
    loaded = load_model(spec.model, getattr(task, "num_labels", None), data_kind(spec))
    train_data, eval_data = prepare_data(spec, loaded, task)
    model = loaded.model
    out: dict[str, Any] = {"method": METHOD, "metric_before": None, "adapter_params": 0,
                           "lr": spec.train.lr, "final_train_loss": None, "losses": [],
                           "train_seconds": 0.0, "peft_config": {}, "train_size": len(train_data),
                           "eval_size": len(eval_data)}
    if trains_head(metric):
        trainable = freeze_all_but(model, loaded.modules_to_save or [])
        result = train(model, train_data, eval_data, spec.train)
        return {**out, metric: result.metric, "trainable_params": trainable,
                "head_params": trainable, "train_seconds": result.train_seconds,
                "final_train_loss": result.losses[-1] if result.losses else None,
                "losses": result.losses, "lr_source": "suite entry"}
    model.requires_grad_(False)
    t0 = time.perf_counter()
    if metric == "exact_match":
        value = exact_match(model, loaded.tokenizer,
                            eval_data.generation_examples(spec.eval_generate))["exact_match"]
    else:
        value, _ = evaluate(model, eval_data, accelerator=Accelerator(),
                            batch_size=spec.train.eval_batch_size, progress=False)
    return {**out, metric: value, "trainable_params": 0, "head_params": 0, "lr": 0.0,
            "lr_source": "no training", "eval_seconds": time.perf_counter() - t0}


__all__ = ["METHOD", "freeze_all_but", "run_baseline", "trains_head"]

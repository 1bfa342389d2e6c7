"""The suite's tasks: a model, real data and one budget shared by every method.

``role`` says what a task is for: the learning-rate defaults were chosen on ``"tuning"`` tasks
(the sweep); ``"held-out"`` tasks check that they hold on data of the same kind the choice never
saw. Budgets are sized so the whole suite (every entry, 3 seeds) fits about an hour on 2 cores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.quality.data import write_chats


@dataclass(frozen=True)
class Task:
    """One task of the suite. ``spec`` holds :class:`~qpeft.train.finetune.FinetuneSpec`
    fields (model, data, sizes); ``train`` holds :class:`~qpeft.train.loop.TrainConfig` fields
    (budget); ``chat``: the corpus whose chat form the task trains on (files made at run time)."""

    name: str
    label: str
    role: str
    spec: dict[str, Any]
    train: dict[str, Any]
    metric: str
    chat: str | None = None
    quick: dict[str, Any] = field(default_factory=dict)

    def data_files(self, root: Path, seed: int = 0) -> dict[str, Any]:
        """``train_file`` / ``eval_file`` of a chat task (written under ``root``), else {}."""
        if self.chat is None:
            return {}
        n_train, n_eval = self.spec["max_train"], self.spec["max_eval"]
        train, eval_ = write_chats(self.chat, root / "data" / self.name, seed, n_train, n_eval)
        return {"train_file": str(train), "eval_file": str(eval_)}


_MINILM = {"model": "minilm", "max_length": 96}
_CLS_BUDGET = {"max_steps": 40, "batch_size": 16}
_SMOL_BUDGET = {"max_steps": 30, "batch_size": 8}
# chats: the system message takes ~40 tokens; a few long tweets still overflow and are skipped
# (counted in each results.json)
_CHAT = {"model": "smollm2", "max_length": 128, "skip_bad_records": True}

TASKS: tuple[Task, ...] = (
    Task("minilm-bbc", "MiniLM, BBC News topics (5 classes)", "tuning",
         {**_MINILM, "task": "bbc-news", "max_train": 640, "max_eval": 300}, _CLS_BUDGET,
         "accuracy"),
    Task("minilm-tweets", "MiniLM, tweet sentiment (3 classes)", "held-out",
         {**_MINILM, "task": "tweets", "max_train": 640, "max_eval": 300}, _CLS_BUDGET,
         "accuracy"),
    Task("smollm2-bbc-sft", "SmolLM2, BBC headline -> topic chats", "tuning",
         {**_CHAT, "max_train": 240, "max_eval": 60, "eval_generate": 60}, _SMOL_BUDGET,
         "exact_match", chat="bbc-news"),
    Task("smollm2-tweets-sft", "SmolLM2, tweet -> sentiment chats", "held-out",
         {**_CHAT, "max_train": 240, "max_eval": 60, "eval_generate": 60}, _SMOL_BUDGET,
         "exact_match", chat="tweets"),
    Task("smollm2-shakespeare", "SmolLM2, Shakespeare (held-out Hamlet perplexity)", "held-out",
         {"model": "smollm2", "task": "shakespeare", "block_size": 64, "max_blocks": 400,
          "max_eval_blocks": 16}, _SMOL_BUDGET, "perplexity"),
)


def quick(task: Task) -> Task:
    """The task at a smoke-test budget (a handful of steps and examples)."""
    spec = {**task.spec, "max_train": 32, "max_eval": 16}
    if "eval_generate" in spec:
        spec["eval_generate"] = 4
    if "max_blocks" in spec:
        spec = {**task.spec, "max_blocks": 16, "max_eval_blocks": 2}
    return Task(task.name, task.label, task.role, spec, {"max_steps": 2, "batch_size": 4},
                task.metric, task.chat)

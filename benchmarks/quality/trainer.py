"""The user who swaps one config: a plain ``transformers.Trainer`` / TRL ``SFTTrainer`` script
tuned for LoRA, run with each qpeft config in place of ``LoraConfig`` and nothing else changed.

``python -m benchmarks.quality.trainer [--quick] [--seeds N] [--tasks ...] [--methods ...]``

- MiniLM sequence classification (the suite's BBC News and tweet tasks, same sizes and splits)
  in ``transformers.Trainer`` at lr 1e-3, where LoRA learns well on these tasks. Every method
  adapts ``query``/``value`` and trains the classifier head (``modules_to_save``), as LoRA's
  script did. Metric: held-out accuracy.
- SmolLM2 SFT (the suite's BBC headline -> topic chats) in TRL's ``SFTTrainer`` at lr 2e-4, the
  rate LoRA SFT recipes use, on ``q_proj``/``v_proj`` (peft's LLaMA default), prompt-completion
  chats (loss on the answer only, TRL's default for that format). Metric: exact match of greedy
  answers on held-out chats.

``TrainingArguments`` / ``SFTConfig`` stay at their defaults except the learning rate, batch size
and step count (AdamW, linear decay, no warmup, gradient clipping at 1.0; SFTConfig's gradient
checkpointing is turned off: same math, faster on a CPU). Writes
``<out>/<task>/<method>/seed<s>.json`` and the ``trainer-check`` section of ``docs/results.md``
(``--quick``: only under ``<out>``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.quality.suite import DOCS, RESULTS_ROOT, replace_section


@dataclass(frozen=True)
class Check:
    """One task of the check: the corpus, the script's learning rate and budget, the metric."""

    corpus: str
    model: str
    lr: float
    max_train: int
    max_eval: int
    max_steps: int
    batch_size: int
    metric: str

    @property
    def targets(self) -> list[str]:
        return ["query", "value"] if self.model == "minilm" else ["q_proj", "v_proj"]


TASKS = {
    "minilm-bbc": Check("bbc-news", "minilm", 1e-3, 640, 300, 80, 16, "accuracy"),
    "minilm-tweets": Check("tweets", "minilm", 1e-3, 640, 300, 80, 16, "accuracy"),
    "smollm2-bbc-sft": Check("bbc-news", "smollm2", 2e-4, 240, 60, 60, 8, "exact_match"),
}
MAX_LENGTH = 96  # MiniLM's tokens per article (the suite's)
QUICK = {"max_train": 32, "max_eval": 8, "max_steps": 2, "batch_size": 4}
METHODS = ("lora", "quantum-peft", "quic", "qpa")
TARGET_POINTS = 3.0  # the target: each method within 3 points of LoRA


def peft_config(method: str, check: Check) -> Any:
    """The one line a user changes: LoRA's config, or a qpeft config at its defaults, with the
    same targets (and trained head for classification)."""
    import peft

    from qpeft.train.methods import config_class

    common: dict[str, Any] = {"target_modules": check.targets}
    if check.model == "minilm":
        common["modules_to_save"] = ["classifier"]
    else:
        common["task_type"] = "CAUSAL_LM"
    if method == "lora":
        return peft.LoraConfig(r=8, lora_alpha=16, **common)
    return config_class(method)(**common)


def _classification(check: Check, method: str, seed: int, sizes: dict[str, int],
                    tmp: str) -> dict[str, Any]:
    """A ``transformers.Trainer`` run on MiniLM: trainable, accuracy, loss, seconds."""
    import numpy as np
    import peft
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed

    from qpeft.assets import load_model, load_task

    data = load_task(check.corpus, seed=0, max_train=sizes["max_train"],
                     max_eval=sizes["max_eval"])
    set_seed(seed)
    loaded = load_model("minilm", num_labels=data.num_labels)
    tok = loaded.tokenizer

    def encode(rows: list[dict[str, Any]]) -> Dataset:
        enc = tok([r["text"] for r in rows], truncation=True, max_length=MAX_LENGTH)
        return Dataset.from_dict({**enc, "labels": [r["label"] for r in rows]})

    model = peft.get_peft_model(loaded.model, peft_config(method, check))
    args = TrainingArguments(
        output_dir=tmp, learning_rate=check.lr, max_steps=sizes["max_steps"],
        per_device_train_batch_size=sizes["batch_size"], per_device_eval_batch_size=32,
        seed=seed, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
        disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=encode(data.train),
                      data_collator=DataCollatorWithPadding(tok))
    t0 = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - t0
    pred = trainer.predict(encode(data.eval))
    return {"trainable": _trainable(model),
            "accuracy": float((np.argmax(pred.predictions, axis=-1) == pred.label_ids).mean()),
            "train_loss": out.training_loss, "train_s": seconds}


def _sft(check: Check, method: str, seed: int, sizes: dict[str, int], tmp: str) -> dict[str, Any]:
    """A TRL ``SFTTrainer`` run on SmolLM2 chats: trainable, exact match, loss, seconds."""
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from benchmarks.quality.data import chats
    from qpeft.assets import load_model
    from qpeft.assets.sft import SFTRecord
    from qpeft.train.sft import exact_match, tokenize_record

    train, held_out = chats(check.corpus, 0, sizes["max_train"], sizes["max_eval"])
    set_seed(seed)
    loaded = load_model("smollm2")
    data = Dataset.from_list([{"prompt": c["messages"][:-1], "completion": c["messages"][-1:]}
                              for c in train])
    args = SFTConfig(
        output_dir=tmp, learning_rate=check.lr, max_steps=sizes["max_steps"],
        per_device_train_batch_size=sizes["batch_size"], seed=seed, report_to=[],
        save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
        bf16=False, gradient_checkpointing=False)
    trainer = SFTTrainer(model=loaded.model, args=args, train_dataset=data,
                         processing_class=loaded.tokenizer,
                         peft_config=peft_config(method, check))
    t0 = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - t0
    examples = [tokenize_record(SFTRecord(source="held-out chats", line=i + 1, format="messages",
                                          messages=tuple(c["messages"])), loaded.tokenizer)
                for i, c in enumerate(held_out)]
    generated = exact_match(trainer.model, loaded.tokenizer, examples)
    return {"trainable": _trainable(trainer.model), "exact_match": generated["exact_match"],
            "train_loss": out.training_loss, "train_s": seconds,
            "answers": [g["generated"] for g in generated["generations"]]}


def _trainable(model: Any) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run(task: str, method: str, seed: int, quick: bool) -> dict[str, Any]:
    """One script run (Trainer or SFTTrainer by task) with ``method``'s config. O(steps)."""
    check = TASKS[task]
    sizes = QUICK if quick else {k: getattr(check, k)
                                 for k in ("max_train", "max_eval", "max_steps", "batch_size")}
    runner = _classification if check.model == "minilm" else _sft
    with tempfile.TemporaryDirectory(prefix="qpeft-trainer-check-") as tmp:
        row = runner(check, method, seed, sizes, tmp)
    return {"task": task, "method": method, "seed": seed, "lr": check.lr, **row,
            "config": _config_record(method, check), **({} if quick else sizes)}


def _config_record(method: str, check: Check) -> dict[str, Any]:
    """The config as saved (JSON types, sets as sorted lists): a stored run is reused only when
    it matches (:func:`same_config`)."""
    def plain(value: Any) -> Any:
        return sorted(value) if isinstance(value, (set, frozenset)) else str(value)

    return json.loads(json.dumps(peft_config(method, check).to_dict(), default=plain,
                                 sort_keys=True))


#: config fields that say which peft wrote it, not how the method trains
_PROVENANCE = ("peft_version",)


def same_config(stored: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether a stored run's config is the current one, up to the peft version that wrote it
    and fields left None (a peft upgrade that only adds an unset field, as 0.22 added LoRA's
    ``astra_config``, does not make every stored run stale)."""
    def strip(config: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in config.items() if k not in _PROVENANCE and v is not None}

    return strip(stored) == strip(current)


def render(rows: list[dict[str, Any]], command: str) -> str:
    """Per task: mean ± std of its metric over seeds and the gap to LoRA against the target."""
    lines = [f"Command: `{command}`. Only the peft config differs between the runs of a task; "
             "every other `TrainingArguments` / `SFTConfig` field is at its default (SFTConfig's "
             "gradient checkpointing off). Mean ± std over seeds; target: within "
             f"{TARGET_POINTS:g} points of LoRA."]
    for task in dict.fromkeys(r["task"] for r in rows):
        check = TASKS[task]
        script = "`transformers.Trainer`" if check.model == "minilm" else "TRL `SFTTrainer`"
        by = {m: [r for r in rows if r["task"] == task and r["method"] == m] for m in METHODS}
        by = {m: rs for m, rs in by.items() if rs}
        lora = (statistics.mean(r[check.metric] for r in by["lora"]) * 100 if "lora" in by
                else None)
        budget = by[next(iter(by))][0]
        lines += ["", f"**{task}** ({script}, learning rate {check.lr:g}, "
                      f"{budget.get('max_steps', '?')} steps of {budget.get('batch_size', '?')})",
                  "", f"| method | trainable | {check.metric.replace('_', ' ')} | vs LoRA | seeds |",
                  "|---|---|---|---|---|"]
        for m, rs in by.items():
            values = [r[check.metric] * 100 for r in rs]
            mean = statistics.mean(values)
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            gap = "" if m == "lora" or lora is None else (
                f"{mean - lora:+.1f} pts ({'met' if mean >= lora - TARGET_POINTS else '**missed**'})")
            lines.append(f"| {m} | {rs[0]['trainable']:,} | {mean:.1f} ± {std:.1f} % | {gap} | "
                         f"{len(values)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality.trainer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny budget (smoke test)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--out", type=Path, default=None,
                   help="results root (default benchmarks/results/quality/trainer)")
    p.add_argument("--render-only", action="store_true",
                   help="run nothing: render the stored runs that match the current configs")
    p.add_argument("--threads", type=int, default=int(os.environ.get("QPEFT_BENCH_THREADS", 2)))
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    root = a.out or (Path(tempfile.mkdtemp(prefix="qpeft-trainer-quick-")) if a.quick
                     else RESULTS_ROOT / "trainer")
    command = "python -m benchmarks.quality.trainer " + " ".join(
        argv if argv is not None else sys.argv[1:])
    rows = []
    for task in a.tasks:
        for method in a.methods:
            for seed in range(a.seeds):
                path = root / task / method / f"seed{seed}.json"
                if path.is_file() and not a.quick:  # an interrupted check continues
                    stored = json.loads(path.read_text())
                    if same_config(stored.get("config") or {}, _config_record(method, TASKS[task])):
                        rows.append(stored)
                        continue
                if a.render_only:
                    continue
                row = run(task, method, seed, a.quick)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(row, indent=1) + "\n")
                rows.append(row)
                print(f"{task} {method} seed {seed}: "
                      f"{TASKS[task].metric} {row[TASKS[task].metric] * 100:.1f} % "
                      f"({row['train_s']:.0f} s)", file=sys.stderr, flush=True)
    body = render(rows, command)
    # the docs show full runs into the default results folder only
    docs = DOCS if a.out is None and not a.quick else root
    replace_section(docs / "results.md", "trainer-check", body)
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

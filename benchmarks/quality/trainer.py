"""The user who swaps one config: a plain ``transformers.Trainer`` script tuned for LoRA, run
with each qpeft config in place of ``LoraConfig`` and nothing else changed.

``python -m benchmarks.quality.trainer [--quick] [--seeds N] [--tasks ...] [--methods ...]``

MiniLM sequence classification (the suite's BBC News and tweet tasks, same sizes and splits),
``TrainingArguments`` at their defaults except the learning rate (1e-3, where LoRA learns well
on this task), batch size and step count: AdamW, linear decay, no warmup, gradient clipping at
1.0. Every method adapts ``query``/``value`` and trains the classifier head
(``modules_to_save``), as LoRA's script did. Writes ``<out>/<task>/<method>/seed<s>.json`` and
the ``trainer-check`` section of ``docs/results.md`` (``--quick``: only under ``<out>``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.quality.suite import DOCS, RESULTS_ROOT, replace_section

LEARNING_RATE = 1e-3
TASKS = {"minilm-bbc": "bbc-news", "minilm-tweets": "tweets"}
SIZES = {"max_train": 640, "max_eval": 300, "max_length": 96}
BUDGET = {"max_steps": 80, "batch_size": 16}
QUICK = {"max_train": 32, "max_eval": 16, "max_length": 32, "max_steps": 2, "batch_size": 4}
METHODS = ("lora", "quantum-peft", "quic", "qpa")
TARGET_POINTS = 3.0  # the target: each method within 3 points of LoRA


def peft_config(method: str) -> Any:
    """The one line a user changes: LoRA's config, or a qpeft config at its defaults, with the
    same targets and trained head."""
    import peft

    from qpeft.train.methods import config_class

    common = {"target_modules": ["query", "value"], "modules_to_save": ["classifier"]}
    if method == "lora":
        return peft.LoraConfig(r=8, lora_alpha=16, **common)
    return config_class(method)(**common)


def run(task: str, method: str, seed: int, quick: bool) -> dict[str, Any]:
    """One Trainer run: trainable numbers, held-out accuracy, train seconds. O(steps)."""
    import numpy as np
    import peft
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed

    from qpeft.assets import load_model, load_task

    sizes = QUICK if quick else {**SIZES, **BUDGET}
    data = load_task(TASKS[task], seed=0, max_train=sizes["max_train"], max_eval=sizes["max_eval"])
    set_seed(seed)
    loaded = load_model("minilm", num_labels=data.num_labels)
    tok = loaded.tokenizer

    def encode(rows: list[dict[str, Any]]) -> Dataset:
        enc = tok([r["text"] for r in rows], truncation=True, max_length=sizes["max_length"])
        return Dataset.from_dict({**enc, "labels": [r["label"] for r in rows]})

    model = peft.get_peft_model(loaded.model, peft_config(method))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with tempfile.TemporaryDirectory(prefix="qpeft-trainer-check-") as tmp:
        args = TrainingArguments(
            output_dir=tmp, learning_rate=LEARNING_RATE, max_steps=sizes["max_steps"],
            per_device_train_batch_size=sizes["batch_size"], per_device_eval_batch_size=32,
            seed=seed, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
            disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=encode(data.train),
                          data_collator=DataCollatorWithPadding(tok))
        t0 = time.perf_counter()
        out = trainer.train()
        seconds = time.perf_counter() - t0
        pred = trainer.predict(encode(data.eval))
    accuracy = float((np.argmax(pred.predictions, axis=-1) == pred.label_ids).mean())
    return {"task": task, "method": method, "seed": seed, "lr": LEARNING_RATE,
            "trainable": trainable, "accuracy": accuracy, "train_loss": out.training_loss,
            "train_s": seconds, "config": _config_record(method), **({} if quick else BUDGET)}


def _config_record(method: str) -> dict[str, Any]:
    """The config as saved (JSON types, sets as sorted lists): a stored run is reused only when
    it matches."""
    def plain(value: Any) -> Any:
        return sorted(value) if isinstance(value, (set, frozenset)) else str(value)

    return json.loads(json.dumps(peft_config(method).to_dict(), default=plain, sort_keys=True))


def render(rows: list[dict[str, Any]], command: str) -> str:
    """Per task: mean ± std accuracy over seeds and the gap to LoRA against the target."""
    lines = [f"Command: `{command}`. `transformers.Trainer`, learning rate {LEARNING_RATE:g} for "
             f"every method, {BUDGET['max_steps']} steps of {BUDGET['batch_size']}, every other "
             "`TrainingArguments` at its default; only the peft config differs. Mean ± std over "
             f"seeds; target: within {TARGET_POINTS:g} points of LoRA."]
    for task in dict.fromkeys(r["task"] for r in rows):
        by = {m: [r for r in rows if r["task"] == task and r["method"] == m] for m in METHODS}
        by = {m: rs for m, rs in by.items() if rs}
        lora = statistics.mean(r["accuracy"] for r in by["lora"]) * 100 if "lora" in by else None
        lines += ["", f"**{task}**", "",
                  "| method | trainable | accuracy | vs LoRA | seeds |", "|---|---|---|---|---|"]
        for m, rs in by.items():
            acc = [r["accuracy"] * 100 for r in rs]
            mean = statistics.mean(acc)
            std = statistics.stdev(acc) if len(acc) > 1 else 0.0
            gap = "" if m == "lora" or lora is None else (
                f"{mean - lora:+.1f} pts ({'met' if mean >= lora - TARGET_POINTS else '**missed**'})")
            lines.append(f"| {m} | {rs[0]['trainable']:,} | {mean:.1f} ± {std:.1f} % | {gap} | "
                         f"{len(rs)} |")
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
                    if stored.get("config") == _config_record(method):
                        rows.append(stored)
                        continue
                row = run(task, method, seed, a.quick)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(row, indent=1) + "\n")
                rows.append(row)
                print(f"{task} {method} seed {seed}: {row['accuracy'] * 100:.1f} % "
                      f"({row['train_s']:.0f} s)", file=sys.stderr, flush=True)
    body = render(rows, command)
    # the docs show full runs into the default results folder only
    docs = DOCS if a.out is None and not a.quick else root
    replace_section(docs / "results.md", "trainer-check", body)
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

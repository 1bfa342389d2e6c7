"""results.json: what a run records (:func:`results_record`), peak memory, package versions,
atomic JSON writes."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

RESULTS_NAME = "results.json"
RUN_NAME = "run.json"
PACKAGES: tuple[str, ...] = ("qpeft", "torch", "transformers", "peft", "accelerate",
                             "safetensors", "gguf", "tqdm")


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution in ``names`` (None where not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def reset_peak_memory() -> str:
    """Reset the peak-memory counter this process can reset; returns what will be measured.

    CUDA: ``torch.cuda.reset_peak_memory_stats``. CPU on Linux: writing 5 to
    ``/proc/self/clear_refs`` resets the process high-water mark (VmHWM), so sequential runs in
    one process each get their own peak; elsewhere the peak is the process lifetime peak RSS.
    """
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return "cuda_max_memory_allocated"
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return "cpu_peak_rss_since_run_start"
    except OSError:
        return "cpu_peak_rss_process_lifetime"


def peak_memory_mb() -> float:
    """Peak memory in MiB: CUDA max allocated, else process peak RSS (VmHWM / ru_maxrss)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    if hasattr(obj, "value") and isinstance(obj.value, str):  # enums
        return obj.value
    return str(obj)


def atomic_write_json(obj: Any, path: Path) -> None:
    """Write ``obj`` as indented JSON to ``path`` via a temporary file + ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False, default=_json_default)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    """Parse the JSON file at ``path``."""
    with open(path) as fh:
        return json.load(fh)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) numbers of parameters of ``model`` (shared tensors counted once)."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def _head_params(model: torch.nn.Module) -> int:
    """Trainable numbers in ``modules_to_save`` copies (a fresh classifier head)."""
    return sum(p.numel() for n, p in model.named_parameters()
               if p.requires_grad and "modules_to_save" in n)


def _skipped_records(task: Any, *parts: Any) -> list[Any]:
    skipped = list(getattr(task, "split", {}).get("skipped", []))
    for part in parts:
        skipped += getattr(part, "skipped", [])
    return skipped


def _targets_record(targets: str | list[str], source: str, config: Any) -> dict[str, Any]:
    """``target_modules`` (the module names the adapter was applied to: peft's ``"all-linear"``
    stands for the names it expanded to in ``config``) and ``target_source`` (given, the
    method's own default for the data and why, or the model's default)."""
    if isinstance(targets, str):  # expanded by peft into the config
        targets = sorted(config.target_modules)
    return {"target_modules": list(targets), "target_source": source}


def results_record(spec: Any, result: Any, model: torch.nn.Module, run: Any, *,
                   context: dict[str, Any], metric_before: float | None,
                   generation: dict[str, Any] | None, command: list[str] | None,
                   ) -> dict[str, Any]:
    """The results.json of a finished run: what ran (``spec``, the peft config, the versions,
    the command), what it trained (counts), how it did (``result``: metric, losses, time) and on
    what data. ``run``: the run's prepared state (data, loaded model, peft config, memory kind,
    load time); ``context``: what only the run knows how to name (``model_source``, ``task``,
    ``method_options``, ``targets``: the target modules and where they came from)."""
    trainable, total = count_parameters(model)
    head = _head_params(model)
    skipped = _skipped_records(run.task, run.train_data, run.eval_data)
    train, eval_ = run.train_data, run.eval_data
    return {
        "method": spec.method, "model": spec.model, "model_source": context["model_source"],
        "task": context["task"], "train_file": spec.train_file, "seed": spec.seed,
        "trainable_params": trainable, "adapter_params": trainable - head, "head_params": head,
        "total_params": total,
        "metric": result.metric_name, "metric_value": result.metric,
        result.metric_name: result.metric, "metric_before": metric_before,
        "eval_loss": result.eval_loss,
        "exact_match": None if generation is None else generation["exact_match"],
        "eval_generate": 0 if generation is None else generation["count"],
        "generations": None if generation is None else generation["generations"],
        "gradient_checkpointing": spec.gradient_checkpointing, "sharding": result.sharding,
        "load_in_bits": spec.load_in_bits,
        "skipped_records": len(skipped), "skipped": skipped,
        "truncated_completions": getattr(train, "truncated", 0) + getattr(eval_, "truncated", 0),
        "final_train_loss": result.losses[-1] if result.losses else None,
        "train_seconds": result.train_seconds, "load_seconds": run.load_seconds,
        "peak_memory_mb": peak_memory_mb(), "peak_memory_kind": run.memory_kind,
        "steps": result.steps, "resumed_from_step": result.resumed_from_step,
        "examples_seen": result.steps * spec.train.batch_size * spec.train.grad_accum,
        "train_size": len(train), "eval_size": len(eval_),
        "split": getattr(run.task, "split", None),
        "label_names": getattr(run.task, "label_names", None),
        **_targets_record(*context["targets"], run.config),
        "method_options": context["method_options"],
        "peft_config": run.config.to_dict(),
        "train_config": dataclasses.asdict(spec.train),
        "lr": spec.train.lr, "lr_source": spec.lr_source,
        "data_config": {k: getattr(spec, k) for k in (
            "max_length", "block_size", "max_blocks", "max_eval_blocks", "image_size",
            "max_train", "max_eval", "eval_fraction", "packing", "skip_bad_records")},
        "num_processes": run.accelerator.num_processes,
        "device": str(run.accelerator.device),
        "torch_threads": torch.get_num_threads(),
        "versions": package_versions(),
        "command": command or sys.argv,
        "losses": result.losses,
    }

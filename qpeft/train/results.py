"""results.json: what a run records, peak memory, package versions, atomic JSON writes."""

from __future__ import annotations

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

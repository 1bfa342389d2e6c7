"""Shared plumbing of the benchmarks: timing, machine facts, JSON + markdown output.

Timings are always reported as ratios against a reference measured in the same process
(machines here are noisy): :func:`round_robin` interleaves the candidates step by step and
rotates their order every round so that slow drift (thermal, other tenants) hits all alike.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
DOC_PATH = REPO_ROOT / "docs" / "benchmarks.md"
NUM_THREADS = 2  # the figures assume 2 cores; override with QPEFT_BENCH_THREADS / --threads


def bench_threads() -> int:
    """Torch threads for every benchmark process: ``$QPEFT_BENCH_THREADS`` or 2."""
    return int(os.environ.get("QPEFT_BENCH_THREADS", NUM_THREADS))


def setup_torch(threads: int | None = None) -> None:
    """Fix the thread count (default :func:`bench_threads`) and the offline flags. O(1)."""
    threads = threads or bench_threads()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(threads)


def machine_facts() -> dict[str, Any]:
    """Versions, cores and the CPU model, recorded next to every result. O(1)."""
    import peft
    import transformers

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def timed(fn: Callable[[], Any]) -> float:
    """Wall time of one call in seconds (perf_counter). O(cost of fn)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_time(fn: Callable[[], Any], warmup: int, repeats: int) -> float:
    """Median wall time of ``repeats`` calls after ``warmup`` untimed calls."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn) for _ in range(repeats))


def round_robin(
    steps: dict[str, Callable[[], Any]], warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Time each candidate ``repeats`` times, interleaved: round r runs every candidate once,
    in an order rotated by r. ``warmup`` untimed rounds first. Returns name -> list of seconds.
    Cost: (warmup + repeats) * sum of the step costs."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            times[name].append(timed(steps[name]))
    return times


def summarize(times: Sequence[float]) -> dict[str, float]:
    """Median, min and max of a list of seconds."""
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "n": len(times),
    }


def paired_ratio(times: Sequence[float], ref_times: Sequence[float]) -> float | None:
    """Median over rounds of times[r] / ref_times[r]: for round-robin timings, where both
    were measured within one round, this cancels the machine's drift between rounds (the
    ratio of the two medians does not). None when either list is empty."""
    if not times or not ref_times:
        return None
    return statistics.median(t / r for t, r in zip(times, ref_times, strict=True))


def ratio(x: float | None, ref: float | None) -> float | None:
    """x / ref, or None when either is missing or ref is 0."""
    if x is None or ref is None or ref == 0:
        return None
    return x / ref


def fmt(x: Any, digits: int = 2) -> str:
    """Compact cell text: None -> '-', floats with ``digits`` decimals, ints with separators."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if x != 0 and (abs(x) < 10 ** (-digits) or abs(x) >= 1e6):
            return f"{x:.{digits}e}"
        return f"{x:.{digits}f}"
    return str(x)


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells go through :func:`fmt` unless already strings."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in row) + " |")
    return "\n".join(lines)


def measure_and_write(name: str, bench: Any, render: Any, quick: bool, out_dir: Path,
                      ) -> dict[str, Any]:
    """The usual ``run()`` of a benchmark: torch set up, ``bench(quick)`` measured, the result
    (with the machine's facts) written by :func:`write_result` with ``render``'s markdown."""
    setup_torch()
    result = {"benchmark": name, "quick": quick, "machine": machine_facts(), **bench(quick)}
    write_result(name, result, render(result), out_dir)
    return result


def write_result(name: str, result: dict[str, Any], markdown: str, out_dir: Path) -> Path:
    """Write ``<out_dir>/<name>.json`` and ``<name>.md``; returns the JSON path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(result, indent=1, sort_keys=False, default=str) + "\n")
    (out_dir / f"{name}.md").write_text(markdown + "\n")
    return path


def load_result(name: str, out_dir: Path) -> dict[str, Any] | None:
    """The JSON written by :func:`write_result`, or None if absent."""
    path = out_dir / f"{name}.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss_of_steps(step: Callable[[], Any], steps: int) -> dict[str, float]:
    """Run ``step`` ``steps`` times after resetting the kernel's RSS high-water mark
    (``/proc/self/clear_refs`` = 5); peak RSS and its rise over the RSS before (MiB)."""
    import gc

    gc.collect()
    before = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    for _ in range(steps):
        step()
    peak = _rss_kib("VmHWM")
    return {"rss_before_mib": before / 1024, "peak_rss_mib": peak / 1024,
            "step_mem_mib": (peak - before) / 1024}


def run_memory_worker(module: str, args: Sequence[str], timeout: int) -> dict[str, Any]:
    """``python -m <module> --memory-worker <args>`` in a fresh interpreter (peak RSS is per
    process; glibc serves allocations >= 128 KiB with mmap so freed tensors leave the RSS);
    its last stdout line as JSON, or {'error': ...}."""
    import subprocess
    import sys

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS=str(bench_threads()))
    proc = subprocess.run([sys.executable, "-m", module, "--memory-worker", *args],
                          capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=timeout)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])

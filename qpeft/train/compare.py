"""Compare methods on one model/task under the same budget: table, compare.json, Pareto plot.

Runs are sequential, in this process, one per (method, seed): the data split is fixed by the
first seed (``data_seed``) so the spread over seeds measures the training randomness (adapter
and head initialisation, data order), not a change of test set. Peak memory is reset before
each run where the OS allows it (Linux ``/proc/self/clear_refs``), so it is per run.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qpeft.train.errors import RunError
from qpeft.train.finetune import (
    FinetuneSpec,
    check_output_dir,
    default_rate,
    load_data,
    run_finetune,
)
from qpeft.train.methods import check_method
from qpeft.train.results import atomic_write_json
from qpeft.tuners.registry import get_method

COMPARE_NAME = "compare.json"
PLOT_NAME = "pareto.png"


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.fmean(known) if known else None


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method: params, metric mean ± std (sample std over seeds), time, memory."""
    rows = []
    for method in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == method]
        metric, metric_std = _mean_std([r["metric_value"] for r in rs])
        secs, secs_std = _mean_std([r["train_seconds"] for r in rs])
        rows.append({
            "method": method,
            "trainable_params": rs[0]["trainable_params"],
            "adapter_params": rs[0]["adapter_params"],
            "metric": rs[0]["metric"],
            "mean": metric,
            "std": metric_std,
            "train_seconds": secs,
            "train_seconds_std": secs_std,
            "peak_memory_mb": max(r["peak_memory_mb"] for r in rs),
            "seeds": [r["seed"] for r in rs],
            "lr": rs[0]["lr"],
            "gradient_checkpointing": rs[0].get("gradient_checkpointing", False),
            "sharding": sharding_label(rs[0].get("sharding")),
            "exact_match": _mean_or_none([r.get("exact_match") for r in rs]),
            "values": [r["metric_value"] for r in rs],
        })
    return rows


def sharding_label(record: dict[str, Any] | None) -> str | None:
    """"fsdp2 x2 (qpeft)" for a run's ``results["sharding"]`` record; None when not sharded."""
    if not record:
        return None
    return f"{record['mode']} x{record['num_processes']} ({record['sharded_by']})"


def format_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table of :func:`summarise` rows. An ``exact match`` column appears when the
    runs measured it (``--eval-generate``), a ``grad ckpt`` column when any run used gradient
    checkpointing (its time and memory are not comparable with runs without), a ``sharding``
    column when any run was sharded with FSDP (``accelerate launch`` with an FSDP config)."""
    if not rows:
        return "(no runs)"
    metric = rows[0]["metric"]
    pct = metric == "accuracy"
    em = any(r.get("exact_match") is not None for r in rows)
    ckpt = any(r.get("gradient_checkpointing") for r in rows)
    shard = any(r.get("sharding") for r in rows)
    header = ("method", "trainable", "(adapter)", f"{metric} (mean ± std)",
              *(("exact match",) if em else ()), "train s", "peak MB",
              *(("grad ckpt",) if ckpt else ()), *(("sharding",) if shard else ()))
    body = []
    for r in rows:
        if pct:
            m = f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f} %"
        else:
            m = f"{r['mean']:.3f} ± {r['std']:.3f}"
        extra = ()
        if em:
            extra = ("-" if r.get("exact_match") is None else f"{100 * r['exact_match']:.1f} %",)
        body.append((r["method"], f"{r['trainable_params']:,}", f"{r['adapter_params']:,}", m,
                     *extra, f"{r['train_seconds']:.1f}", f"{r['peak_memory_mb']:.0f}",
                     *(("yes" if r.get("gradient_checkpointing") else "no",) if ckpt else ()),
                     *((r.get("sharding") or "none",) if shard else ())))
    table = [header, *body]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(row, widths, strict=False))) for row in table]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def pareto_plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """PNG: trainable parameters (log x) vs metric (± std), Pareto front marked. O(#methods^2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    higher_better = rows[0]["metric"] != "perplexity"
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for r in rows:
        ax.errorbar(r["trainable_params"], r["mean"], yerr=r["std"], fmt="o", capsize=3)
        ax.annotate(r["method"], (r["trainable_params"], r["mean"]), textcoords="offset points",
                    xytext=(5, 5), fontsize=9)

    def dominated(a: dict[str, Any]) -> bool:
        for b in rows:
            better = b["mean"] >= a["mean"] if higher_better else b["mean"] <= a["mean"]
            strictly = (b["trainable_params"] < a["trainable_params"]
                        or (b["mean"] != a["mean"]))
            if b is not a and b["trainable_params"] <= a["trainable_params"] and better and strictly:
                return True
        return False

    front = sorted((r for r in rows if not dominated(r)), key=lambda r: r["trainable_params"])
    if len(front) > 1:
        ax.plot([r["trainable_params"] for r in front], [r["mean"] for r in front], "--",
                color="gray", linewidth=1, label="Pareto front")
        ax.legend(loc="best", fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # decades only: no overlaps
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(rows[0]["metric"] + (" (higher is better)" if higher_better
                                       else " (lower is better)"))
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _learning_rate(base: FinetuneSpec, method: str,
                   lr_for: dict[str, float] | None) -> tuple[float, str]:
    """``(lr, source)`` of ``method``'s runs: ``--lr-for`` first, then a ``--lr`` given for
    all, else the method's own default."""
    if method in (lr_for or {}):
        return lr_for[method], "--lr-for"
    if base.lr_source.startswith("default"):
        return default_rate(base, method)
    return base.train.lr, base.lr_source


def _check_inputs(methods: Sequence[str], seeds: int, lr_for: dict[str, float] | None) -> None:
    """RunError for an empty or repeated method list, an unknown method, a ``--lr-for`` that
    names a method not compared or a learning rate <= 0, or ``seeds`` < 1."""
    if not methods:
        raise RunError("--methods is empty; give a comma-separated list, e.g. lora,quic")
    for m in methods:
        try:
            check_method(m)
        except ValueError as exc:
            raise RunError(str(exc)) from None
    if len(set(methods)) != len(methods):
        raise RunError(f"--methods lists a method twice: {','.join(methods)}")
    for m, lr in (lr_for or {}).items():
        if m not in methods:
            raise RunError(f"--lr-for names {m!r}, which is not in --methods")
        if not lr > 0:
            raise RunError(f"--lr-for {m}={lr}: the learning rate must be > 0")
    if seeds < 1:
        raise RunError(f"--seeds must be >= 1, got {seeds}")


def _run_specs(base: FinetuneSpec, methods: Sequence[str], seeds: int, out: Path,
               overwrite: bool, lr_for: dict[str, float] | None) -> list[FinetuneSpec]:
    """One checked FinetuneSpec per (method, seed), each writing to ``out/<method>/seed<s>``,
    with the method's own options and learning rate. RunError for bad input."""
    from qpeft.train.finetune import validate_spec

    specs = []
    for method in methods:
        usable = {k: v for k, v in base.method_options.items()
                  if v is not None and get_method(method).option(k) is not None}
        lr, lr_source = _learning_rate(base, method, lr_for)
        for s in range(seeds):
            spec = dataclasses.replace(
                base, method=method, method_options=usable, seed=base.seed + s,
                data_seed=base.seed if base.data_seed is None else base.data_seed,
                output_dir=str(out / method / f"seed{base.seed + s}"), overwrite=overwrite,
                resume=False, lr_source=lr_source,
                train=dataclasses.replace(base.train, seed=base.seed + s, lr=lr))
            validate_spec(spec)
            check_output_dir(spec)
            specs.append(spec)
    return specs


def _one_run(spec: FinetuneSpec, command: list[str] | None, task: Any,
             log: Callable[[str], None]) -> dict[str, Any]:
    """Fine-tune ``spec``, log its headline, and return its row of compare.json's ``runs``."""
    r = run_finetune(spec, command=command, task_data=task)
    value = r["metric_value"]
    shown = f"{100 * value:.2f}%" if r["metric"] == "accuracy" else f"{value:.3f}"
    log(f"    {r['metric']} {shown}, {r['trainable_params']:,} trainable, "
        f"{r['train_seconds']:.1f} s, peak {r['peak_memory_mb']:.0f} MB")
    return ({k: r[k] for k in (
        "method", "seed", "metric", "metric_value", "trainable_params", "adapter_params",
        "total_params", "train_seconds", "peak_memory_mb", "steps", "method_options",
        "exact_match", "gradient_checkpointing", "sharding", "skipped_records")}
            | {"output_dir": spec.output_dir, "lr": spec.train.lr, "lr_source": spec.lr_source})


def run_compare(base: FinetuneSpec, methods: Sequence[str], seeds: int, output_dir: str,
                *, overwrite: bool = False, command: list[str] | None = None,
                lr_for: dict[str, float] | None = None,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run each method for ``seeds`` seeds (``base.seed``, +1, ...) with ``base``'s budget.

    Method options in ``base.method_options`` are passed to the methods they apply to and
    skipped for the others. ``lr_for``: per-method learning rates replacing ``base.train.lr``
    (methods differ in the step size they tolerate; recorded per run). Writes ``output_dir/<method>/seed<s>/`` runs, ``compare.json`` and
    ``pareto.png``; returns the compare.json content. RunError before any run for bad input.
    """
    _check_inputs(methods, seeds, lr_for)
    out = Path(output_dir)
    if (out / COMPARE_NAME).exists() and not overwrite:
        raise RunError(f"--output-dir {str(out)!r} holds a comparison already (compare.json); "
                       f"pass --overwrite to replace it")
    specs = _run_specs(base, methods, seeds, out, overwrite, lr_for)
    task = load_data(specs[0]) if specs else None
    runs = []
    for i, spec in enumerate(specs, 1):
        log(f"[{i}/{len(specs)}] {spec.method} seed {spec.seed} -> {spec.output_dir}")
        runs.append(_one_run(spec, command, task, log))
    rows = summarise(runs)
    from qpeft.train.finetune import model_source

    data_name = base.task or Path(base.train_file or "table").name
    title = (f"{model_source(base.model).label} on {data_name}: {len(methods)} methods x "
             f"{seeds} seed(s)")
    main_process = os.environ.get("RANK", "0") == "0"  # one writer under a launcher
    plot = pareto_plot(rows, out / PLOT_NAME, title) if main_process else out / PLOT_NAME
    result = {
        "model": base.model, "task": base.task, "train_file": base.train_file,
        "gradient_checkpointing": base.gradient_checkpointing, "methods": list(methods), "seeds": seeds,
        "data_seed": specs[0].data_seed, "budget": dataclasses.asdict(base.train),
        "rows": rows, "runs": runs, "plot": str(plot), "command": command,
        "table": format_table(rows),
    }
    if main_process:
        atomic_write_json(result, out / COMPARE_NAME)
    return result


"""Run the suite (tasks x entries x seeds), the learning-rate sweep, and render the results.

An entry is a method with options; its learning rate is the method's default (what a user gets
without ``--lr``) unless the entry names one. qpeft's methods always run at their defaults: that
is what the suite measures. Each run is one :func:`~qpeft.train.finetune.run_finetune` call
writing its own ``results.json``; a run whose folder already holds the results of the same
run (same fingerprint) is read back, not repeated, so an interrupted suite continues.
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.quality import baseline
from benchmarks.quality.tasks import TASKS, Task, quick

RESULTS_ROOT = Path(__file__).resolve().parents[1] / "results" / "quality"
DOCS = Path(__file__).resolve().parents[2] / "docs"
SWEEP_LRS = (1e-3, 3e-3, 1e-2, 3e-2)


@dataclass(frozen=True)
class Entry:
    """A method as the suite runs it: ``options`` are CLI method options; ``lr`` maps a model
    name ("minilm", "smollm2") to the learning rate the entry runs at on that model's tasks
    (its best on the model's tuning task); a model not in it (and every model for qpeft's
    methods, ``lr`` empty) gets the method's default learning rate."""

    name: str
    label: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    lr: dict[str, float] = field(default_factory=dict)
    ours: bool = False

    def rate_for(self, task: Task) -> float | None:
        """The entry's learning rate on ``task`` (None: the method's default)."""
        return self.lr.get(task.spec["model"])


ENTRIES: tuple[Entry, ...] = (
    # LoRA at its best rate of the sweep on each model's tuning task (MiniLM BBC: 1e-2, where the
    # CLI's 2e-3 reached 90.7 % at 3e-3; SmolLM2 BBC chats: 3e-3)
    Entry("lora", "peft LoRA r=8", "lora", lr={"minilm": 1e-2, "smollm2": 3e-3}),
    # no adapter: the fresh head alone on classification (at its best rate of the MiniLM
    # sweep), the base model evaluated without training on causal-LM data
    Entry("head-only", "no adapter (head only; base model)", baseline.METHOD,
          lr={"minilm": 1e-1}),
    # peft's low-parameter methods at their best rates of each model's tuning-task sweep (on
    # SmolLM2 widened while the best sat at an edge, up to 1e-1); on MiniLM VeRA, FourierFT
    # and IA3 peaked at their default 3e-2
    Entry("lora-r1", "peft LoRA r=1", "lora", {"rank": 1, "alpha": 2.0},
          lr={"minilm": 1e-2, "smollm2": 1e-2}),
    Entry("vera", "peft VeRA", "vera", lr={"smollm2": 1e-1}),
    Entry("fourierft", "peft FourierFT", "fourierft", lr={"smollm2": 3e-2}),
    Entry("ia3", "peft IA3", "ia3", lr={"smollm2": 3e-2}),
    Entry("quantum-peft", "Quantum-PEFT", "quantum-peft", ours=True),
    Entry("quic", "QuIC", "quic", ours=True),
    Entry("qpa", "QPA", "qpa", ours=True),
)


def _metric(results: dict[str, Any], task: Task) -> float:
    return float(results[task.metric])


# fields of a peft config that say where it is applied or which versions wrote it, not how the
# method trains
_PLACEMENT = frozenset({"target_modules", "modules_to_save", "task_type", "auto_mapping",
                        "base_model_name_or_path", "peft_version", "revision", "inference_mode"})


def method_settings(entry: Entry, placement: dict[str, Any] | None = None) -> dict[str, Any]:
    """The entry's peft config fields as this code resolves them (its options over the method's
    current defaults), as JSON values: what a stored run must match to be reused. A run's
    fingerprint records only the options given, so without this check a changed default
    (say a new ``init_gain``) would silently reuse runs made with the old one. ``placement``:
    the stored run's ``modules_to_save`` and ``task_type``, from which some defaults resolve
    (QPA's ``init_gain`` is smaller beside a fresh head). Fields left None here are resolved
    from the model when the adapter is built (QPA's sizes, IA3's feed-forward modules) and are
    not compared. O(1)."""
    import qpeft.tuners  # noqa: F401  (registers qpeft's configs)
    from qpeft.train.finetune import kind_of_task_type
    from qpeft.train.methods import config_at_defaults

    placement = placement or {}
    # the suite names no targets: a method runs on its own default for the kind of data, with
    # the options that go with it (QuIC's block count on causal-LM data)
    config = config_at_defaults(entry.method, kind_of_task_type(placement.get("task_type")),
                                ["_"], task_type=placement.get("task_type"),
                                modules_to_save=placement.get("modules_to_save"),
                                options=dict(entry.options)).to_dict()
    return json.loads(json.dumps({k: v for k, v in config.items()
                                  if k not in _PLACEMENT and v is not None}, default=str))


def is_current(stored_config: dict[str, Any], settings: dict[str, Any]) -> bool:
    """Whether a stored run's ``peft_config`` has every setting of :func:`method_settings`
    (a field missing from it, e.g. one added since, counts as different)."""
    missing = object()
    return all(stored_config.get(k, missing) == v for k, v in settings.items())


def run_one(task: Task, entry: Entry, seed: int, out: Path, root: Path, lr: float | None = None,
            progress: bool = False, stored_only: bool = False) -> dict[str, Any] | None:
    """One run's results.json: read back when the same run (same fingerprint) is stored in
    ``out`` or, for seed 0, in the other place the suite keeps it (the suite's ``seed0`` and
    the sweep's folder at that rate are the same run); with ``stored_only`` None instead of
    running it. A stored run counts only when its peft config still has the method's current
    settings (:func:`is_current`). ``lr_source`` is this call's (a default or the suite entry's rate). A chat
    task's data files live under ``root/data`` (one copy for the suite and the sweep)."""
    from qpeft.train.finetune import FinetuneSpec, run_finetune, with_default_learning_rate
    from qpeft.train.loop import TrainConfig
    from qpeft.train.methods import default_learning_rate

    no_adapter = entry.method == baseline.METHOD
    lr = lr if lr is not None else entry.rate_for(task)
    if lr is None and no_adapter:  # the base model, evaluated only: no rate
        lr, source = 0.0, "no training"
    else:
        lr, source = (lr, "suite entry") if lr is not None else default_learning_rate(entry.method)
    spec = with_default_learning_rate(FinetuneSpec(
        # the no-adapter run reads the spec's data, model and budget only (the method is a
        # placeholder that keeps the spec valid; its fingerprint names the entry's method)
        method="lora" if no_adapter else entry.method, output_dir=str(out), seed=seed,
        data_seed=0, method_options={} if no_adapter else dict(entry.options),
        eval_before=entry.name == "lora",
        train=TrainConfig(lr=lr, seed=seed, progress=progress, checkpoint_every=0,
                          warmup_ratio=0.06, **task.train),
        lr_source=source, overwrite=True,
        **{**task.spec, **task.data_files(root)}))
    fingerprint = json.loads(json.dumps(spec.fingerprint(), default=str))
    if no_adapter:
        fingerprint.update(method=entry.method, method_options={})
    places = [out]
    if seed == 0:
        places += [root / task.name / entry.name / "seed0",
                   root / "sweep" / task.name / entry.name / f"lr{spec.train.lr:g}"]
    for place in places:
        done, run = place / "results.json", place / "run.json"
        if done.is_file() and run.is_file():
            if json.loads(run.read_text()).get("fingerprint") == fingerprint:
                stored = json.loads(done.read_text())
                config = stored.get("peft_config") or {}
                settings = {} if no_adapter else method_settings(entry, config)
                if is_current(config, settings):
                    return {**stored, "lr_source": spec.lr_source}
    if stored_only:
        return None
    command = [sys.argv[0], "benchmarks.quality", task.name, entry.name, f"seed{seed}"]
    if no_adapter:
        results = {**baseline.run_baseline(spec, task.metric), "command": command}
        dump({"fingerprint": fingerprint, "command": command}, out / "run.json")
        dump(results, out / "results.json")
    else:
        results = run_finetune(spec, command=command)
    gc.collect()
    return results


@dataclass(frozen=True)
class Planned:
    """One run the suite or the sweep asks for: where it is stored and at which rate (None: the
    entry's own); ``sweep_lr`` marks a sweep row."""

    task: Task
    entry: Entry
    seed: int
    out: Path
    lr: float | None = None
    sweep_lr: float | None = None


def run_suite(tasks: Sequence[Task], entries: Sequence[Entry], seeds: int, root: Path,
              log=print, stored_only: bool = False, jobs: int = 1,
              threads: int = 1) -> list[dict[str, Any]]:
    """Every (task, entry, seed): the rows :func:`summarise` reads. ``stored_only``: run
    nothing, collect the runs already stored for the current settings (render-only). ``jobs``
    > 1 runs the missing ones in that many processes of ``threads`` threads each."""
    plan = [Planned(task, entry, seed, root / task.name / entry.name / f"seed{seed}")
            for task in tasks for entry in entries for seed in range(_seeds(task, entry, seeds))]
    return _execute(plan, root, log, stored_only, jobs, threads)


def run_sweep(tasks: Sequence[Task], entries: Sequence[Entry], lrs: Iterable[float],
              root: Path, log=print, stored_only: bool = False, jobs: int = 1,
              threads: int = 1) -> list[dict[str, Any]]:
    """Seed 0 of every (task, entry, lr): the learning-rate sensitivity curves
    (``stored_only``, ``jobs`` and ``threads`` as in :func:`run_suite`)."""
    lrs = list(lrs)
    plan = [Planned(task, entry, 0, root / "sweep" / task.name / entry.name / f"lr{lr:g}", lr, lr)
            for task in tasks for entry in entries
            if _seeds(task, entry, 2) > 1  # the base model without training: no rate
            for lr in lrs]
    return _execute(plan, root, log, stored_only, jobs, threads)


def _execute(plan: list[Planned], root: Path, log, stored_only: bool, jobs: int,
             threads: int) -> list[dict[str, Any]]:
    """The rows of ``plan``, in its order: stored runs read back, the others run one after the
    other in this process (``jobs`` 1) or in ``jobs`` worker processes (each with ``threads``
    torch threads; on 2 cores two 1-thread runs finish sooner than one 2-thread run after
    another, since small batches do not split well over threads). Runs are independent: each
    writes its own folder, and a chat task's data files are written here first, once."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    results: dict[int, dict[str, Any]] = {}
    todo = list(range(len(plan)))
    if jobs > 1 or stored_only:
        for i, p in enumerate(plan):
            r = run_one(p.task, p.entry, p.seed, p.out, root, lr=p.lr, stored_only=True)
            if r is not None:
                results[i] = r
        todo = [] if stored_only else [i for i in range(len(plan)) if i not in results]

    def finished(i: int, r: dict[str, Any], seconds: float) -> None:
        results[i] = r
        p = plan[i]
        what = f"sweep {p.task.name} {p.entry.name} lr {p.sweep_lr:g}" if p.sweep_lr is not None \
            else f"{p.task.name} {p.entry.name} seed {p.seed}"
        log(f"[{len(results)}/{len(plan)}] {what}: {p.task.metric} "
            f"{_metric(r, p.task):.4f} ({seconds:.0f} s)")

    if jobs == 1:
        for i in todo:
            finished(i, *_timed_run(plan[i], root))
    elif todo:
        for task in {id(plan[i].task): plan[i].task for i in todo}.values():
            task.data_files(root)  # written once here, read by the workers
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_threads,
                                 initargs=(threads,)) as pool:
            started = {pool.submit(_timed_run, plan[i], root): i for i in todo}
            try:
                for future in as_completed(started):
                    finished(started[future], *future.result())
            except BaseException:  # a failed run stops the suite: drop the runs not started
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    return [_row(p.task, p.entry, p.seed, results[i],
                 **({} if p.sweep_lr is None else {"sweep_lr": p.sweep_lr}))
            for i, p in enumerate(plan) if i in results]


def _timed_run(p: Planned, root: Path) -> tuple[dict[str, Any], float]:
    """(:func:`run_one`'s results, seconds it took where it ran: loading, training, evaluation)."""
    t0 = time.perf_counter()
    return run_one(p.task, p.entry, p.seed, p.out, root, lr=p.lr), time.perf_counter() - t0


def _worker_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _seeds(task: Task, entry: Entry, seeds: int) -> int:
    """Seeds to run: one for the no-adapter entry where it only evaluates the base model
    (deterministic), else ``seeds``."""
    evaluates_only = entry.method == baseline.METHOD and not baseline.trains_head(task.metric)
    return 1 if evaluates_only else seeds


def _row(task: Task, entry: Entry, seed: int, r: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"task": task.name, "entry": entry.name, "label": entry.label, "ours": entry.ours,
            "seed": seed, "metric": _metric(r, task), "metric_name": task.metric,
            "metric_before": r.get("metric_before") if task.metric != "exact_match" else None,
            "trainable": r["trainable_params"], "adapter": r["adapter_params"],
            "lr": r["lr"], "lr_source": r["lr_source"], "seconds": r["train_seconds"],
            "final_train_loss": r["final_train_loss"], **extra}


def stored_rates(root: Path) -> set[float]:
    """Every learning rate a stored sweep run was made at (its ``sweep/<task>/<entry>/lr<rate>``
    folder): what rendering shows beside :data:`SWEEP_LRS`, e.g. an edge widened for one method.
    O(#folders)."""
    rates = set()
    for folder in (root / "sweep").glob("*/*/lr*"):
        try:
            rates.add(float(folder.name[2:]))
        except ValueError:
            continue
    return rates


# ------------------------------------------------------------------------------------ summary


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (task, entry): mean ± sample std of the metric over seeds, trainable numbers, lr,
    and for qpeft's methods the gap to LoRA r=8 against the targets (2 points of accuracy /
    exact match; 5 % of LoRA's perplexity gain over the untrained model)."""
    out = []
    keys = list(dict.fromkeys((r["task"], r["entry"]) for r in rows))
    for task, entry in keys:
        rs = [r for r in rows if (r["task"], r["entry"]) == (task, entry)]
        values = [r["metric"] for r in rs]
        out.append({**{k: rs[0][k] for k in ("task", "entry", "label", "ours", "metric_name",
                                              "trainable", "adapter", "lr", "lr_source")},
                    "mean": statistics.fmean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "seeds": len(values), "seconds": statistics.fmean(r["seconds"] for r in rs),
                    "before": rs[0]["metric_before"]})
    for s in out:
        lora = next((x for x in out if x["task"] == s["task"] and x["entry"] == "lora"), None)
        s["vs_lora"], s["target_met"] = _against_lora(s, lora)
    return out


def _against_lora(s: dict[str, Any], lora: dict[str, Any] | None) -> tuple[float | None, bool | None]:
    if lora is None or s["entry"] == "lora":
        return None, None
    if s["metric_name"] == "perplexity":
        before = lora["before"]
        if not before:
            return None, None
        gain, lora_gain = before - s["mean"], before - lora["mean"]
        ratio = gain / lora_gain if lora_gain else None
        return ratio, (ratio is not None and ratio >= 0.95) if s["ours"] else None
    gap = 100 * (s["mean"] - lora["mean"])
    return gap, (gap >= -2.0) if s["ours"] else None


def _fmt(s: dict[str, Any]) -> str:
    """Mean ± std of the metric (just the value for a single run: no spread was measured)."""
    pp = s["metric_name"] == "perplexity"
    mean = f"{s['mean']:.2f}" if pp else f"{100 * s['mean']:.1f}"
    spread = "" if s["seeds"] == 1 else (f" ± {s['std']:.2f}" if pp else f" ± {100 * s['std']:.1f}")
    return mean + spread + ("" if pp else " %")


def _vs(s: dict[str, Any]) -> str:
    if s["vs_lora"] is None:
        return ""
    text = (f"{100 * s['vs_lora']:.0f} % of LoRA's gain" if s["metric_name"] == "perplexity"
            else f"{s['vs_lora']:+.1f} pts")
    if s["target_met"] is not None:
        text += " (met)" if s["target_met"] else " (**missed**)"
    return text


def render(summary: list[dict[str, Any]], tasks: Sequence[Task], command: str,
           plots: dict[str, str]) -> str:
    """The docs section: per task a table and the Pareto plot."""
    parts = [f"Command: `{command}` (`--quick` is the smoke test). "
             "Every run's results.json is under `benchmarks/results/quality/`. qpeft's methods "
             "run at their defaults (no learning rate given); peft's at the rates in the lr "
             "column (each its best rate in the sweep below). "
             "Mean ± std over seeds; \"vs LoRA\" is the gap to peft LoRA r=8 and the issue's "
             "target (within 2 points; within 5 % of LoRA's perplexity gain)."]
    for task in tasks:
        rows = [s for s in summary if s["task"] == task.name]
        if not rows:
            continue
        before = next((s["before"] for s in rows if s["before"] is not None), None)
        head = f"### {task.label} ({task.role} task)\n\n"
        if before is not None:
            shown = f"{before:.2f}" if task.metric == "perplexity" else f"{100 * before:.1f} %"
            head += f"Untrained (LoRA at init, a fresh head where there is one): {shown}.\n\n"
        lines = ["| method | trainable | " + task.metric + " | vs LoRA | lr | seeds | s / run |",
                 "|---|---|---|---|---|---|---|"]
        for s in rows:
            lr = ("none (evaluated only)" if s["lr_source"] == "no training" else
                  f"{s['lr']:g} ({'default' if s['lr_source'].startswith('default') else s['lr_source']})")
            lines.append(f"| {s['label']} | {s['trainable']:,} | {_fmt(s)} | {_vs(s)} | {lr} | "
                         f"{s['seeds']} | {s['seconds']:.0f} |")
        parts.append(head + "\n".join(lines))
    for title, path in plots.items():
        parts.append(f"![{title}]({path})")
    return "\n\n".join(parts)


def pareto_plots(summary: list[dict[str, Any]], tasks: Sequence[Task], path: Path) -> Path:
    """One panel per task: trainable numbers (log) vs metric with std error bars; qpeft's
    methods filled, peft's hollow; the untrained model as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    shown = [t for t in tasks if any(s["task"] == t.name for s in summary)] or list(tasks[:1])
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.6), squeeze=False)
    for ax, task in zip(axes[0], shown, strict=True):
        rows = [s for s in summary if s["task"] == task.name]
        scale = 1.0 if task.metric == "perplexity" else 100.0
        for s in rows:
            if not s["trainable"]:  # the base model, nothing trained: a level, not a point
                ax.axhline(scale * s["mean"], ls=":", lw=1.0, color="black", label=s["label"])
                continue
            ax.errorbar(s["trainable"], scale * s["mean"], yerr=scale * s["std"], fmt="o",
                        mfc=None if s["ours"] else "none", capsize=3)
            ax.annotate(s["entry"], (s["trainable"], scale * s["mean"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 3))
        before = next((s["before"] for s in rows if s["before"] is not None), None)
        if before is not None:
            ax.axhline(scale * before, ls="--", lw=0.8, color="gray", label="untrained")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("trainable numbers")
        ax.set_ylabel(task.metric + ("" if task.metric == "perplexity" else " (%)"))
        ax.set_title(task.name, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sweep_plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Metric vs learning rate per entry, one panel per task (log x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for entry in dict.fromkeys(r["entry"] for r in rows if r["task"] == task):
            rs = sorted((r for r in rows if (r["task"], r["entry"]) == (task, entry)),
                        key=lambda r: r["sweep_lr"])
            scale = 1.0 if rs[0]["metric_name"] == "perplexity" else 100.0
            ax.plot([r["sweep_lr"] for r in rs], [scale * r["metric"] for r in rs],
                    "o-" if rs[0]["ours"] else "x--", label=entry)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_title(task, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render_sweep(rows: list[dict[str, Any]], command: str) -> str:
    """The sweep's table: metric per learning rate, the best marked."""
    parts = [f"Command: `{command}` (seed 0)."]
    for task in dict.fromkeys(r["task"] for r in rows):
        rs = [r for r in rows if r["task"] == task]
        lrs = sorted({r["sweep_lr"] for r in rs})
        lines = ["| method | " + " | ".join(f"{lr:g}" for lr in lrs) + " |",
                 "|---|" + "---|" * len(lrs)]
        for entry in dict.fromkeys(r["entry"] for r in rs):
            by_lr = {r["sweep_lr"]: r for r in rs if r["entry"] == entry}
            pp = rs[0]["metric_name"] == "perplexity"
            best = (min if pp else max)(by_lr.values(), key=lambda r: r["metric"])["sweep_lr"]
            cells = []
            for lr in lrs:
                r = by_lr.get(lr)
                text = "" if r is None else (f"{r['metric']:.2f}" if pp else f"{100 * r['metric']:.1f}")
                cells.append(f"**{text}**" if lr == best else text)
            lines.append(f"| {entry} | " + " | ".join(cells) + " |")
        parts.append(f"**{task}** ({rs[0]['metric_name']})\n\n" + "\n".join(lines))
    return "\n\n".join(parts)


def replace_section(doc: Path, marker: str, body: str) -> None:
    """Put ``body`` between ``<!-- marker -->`` and ``<!-- /marker -->`` in ``doc`` (appended
    with both markers when absent)."""
    text = doc.read_text() if doc.is_file() else ""
    start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    block = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)


def select(names: Sequence[str] | None, items: Sequence[Any], what: str) -> list[Any]:
    """The items named (all when ``names`` is None); ValueError naming an unknown one."""
    if not names:
        return list(items)
    known = {i.name: i for i in items}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; known: {', '.join(known)}")
    return [known[n] for n in names]


def tasks_for(names: Sequence[str] | None, is_quick: bool) -> list[Task]:
    chosen = select(names, TASKS, "task")
    return [quick(t) for t in chosen] if is_quick else chosen


def dump(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=str) + "\n")


__all__ = ["ENTRIES", "Entry", "is_current", "method_settings", "pareto_plots", "render", "render_sweep",
           "replace_section", "run_one", "run_suite", "run_sweep", "select", "stored_rates", "summarise",
           "sweep_plot", "tasks_for"]

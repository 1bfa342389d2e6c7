"""``python -m benchmarks.quality [--quick] [--seeds N] [--tasks ...] [--entries ...] [--sweep]
[--jobs N]``.

Runs the suite (and, with ``--sweep``, the learning-rate sweep on the tuning tasks), writes
``<out>/quality.json`` (+ ``sweep.json``) and renders the section of ``docs/results.md`` and its
plots (with ``--quick`` only under ``<out>``, so toy numbers never reach the docs).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from benchmarks.quality import suite
from benchmarks.quality.tasks import TASKS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny budgets (smoke test)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--tasks", nargs="+", default=None, choices=[t.name for t in TASKS])
    p.add_argument("--entries", nargs="+", default=None,
                   choices=[e.name for e in suite.ENTRIES])
    p.add_argument("--sweep", action="store_true",
                   help="also sweep learning rates (seed 0) on the tuning tasks")
    p.add_argument("--sweep-only", action="store_true", help="only the sweep")
    p.add_argument("--sweep-lrs", nargs="+", type=float, default=None,
                   help=f"the sweep's learning rates (default {' '.join(map(str, suite.SWEEP_LRS))})")
    p.add_argument("--render-only", action="store_true",
                   help="run nothing: render the suite and sweep from the runs already stored "
                        "for the current settings (missing runs are left out, seeds counted)")
    p.add_argument("--out", type=Path, default=None,
                   help="results root (default benchmarks/results/quality; --quick: a temp dir)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per run (default: 2 with --jobs 1, else 1)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at once, each in its own process (2 on 2 cores: small batches do "
                        "not split well over threads)")
    a = p.parse_args(argv)
    if a.jobs < 1:
        p.error(f"--jobs must be >= 1, got {a.jobs}")
    if a.threads is None:
        a.threads = int(os.environ.get("QPEFT_BENCH_THREADS", 2 if a.jobs == 1 else 1))
    import torch

    torch.set_num_threads(a.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = a.out or (Path("runs/quality-quick") if a.quick else suite.RESULTS_ROOT)
    tasks = suite.tasks_for(a.tasks, a.quick)
    entries = suite.select(a.entries, suite.ENTRIES, "entry")
    command = "python -m benchmarks.quality " + " ".join(argv if argv is not None else sys.argv[1:])
    docs = suite.DOCS if not a.quick else root
    t0 = time.perf_counter()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if not a.sweep_only:
        rows = suite.run_suite(tasks, entries, a.seeds, root, log, stored_only=a.render_only,
                               jobs=a.jobs, threads=a.threads)
        summary = suite.summarise(rows)
        suite.dump({"command": command, "rows": rows, "summary": summary,
                    "seconds": time.perf_counter() - t0}, root / "quality.json")
        plot = suite.pareto_plots(summary, tasks, docs / "quality_pareto.png")
        body = suite.render(summary, tasks, command, {"Pareto": plot.name})
        suite.replace_section(docs / "results.md", "quality-suite", body)
    if a.sweep or a.sweep_only or a.render_only:
        # the sweep runs on the tuning tasks; rendering also shows a held-out task swept after
        # the defaults were chosen (one with a sweep folder)
        tuning = [t for t in tasks if t.role == "tuning"
                  or (a.render_only and (root / "sweep" / t.name).is_dir())]
        lrs = a.sweep_lrs or (suite.SWEEP_LRS[:3] if a.quick else suite.SWEEP_LRS)
        if a.render_only and not a.sweep_lrs:  # also the rates a sweep was widened to
            lrs = sorted(set(lrs) | suite.stored_rates(root))
        rows = suite.run_sweep(tuning, entries, lrs, root, log, stored_only=a.render_only,
                               jobs=a.jobs, threads=a.threads)
        suite.dump({"command": command, "rows": rows}, root / "sweep.json")
        plot = suite.sweep_plot(rows, docs / "quality_lr.png")
        suite.replace_section(docs / "results.md", "quality-sweep",
                              suite.render_sweep(rows, command) + f"\n\n![lr]({plot.name})")
    log(f"done in {time.perf_counter() - t0:.0f} s; results under {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

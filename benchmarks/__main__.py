"""``python -m benchmarks {all,train_step,generation,compounds,merged,param_counts,many_adapters,scale,dispatch,report}``.

``all`` runs every benchmark in turn (each writes ``<out>/<name>.json`` and ``.md``), then writes
``docs/benchmarks.md``. ``--quick`` uses toy sizes (tiny random models) for a smoke test.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from benchmarks import _common as C
from benchmarks import report

NOTES = Path(__file__).resolve().parent / "findings.md"


def main(argv: list[str] | None = None) -> None:
    names = [name for name, *_ in report.SECTIONS]
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["all", "report", *names])
    p.add_argument("--quick", action="store_true", help="toy sizes (smoke test)")
    p.add_argument("--out", type=Path, default=C.RESULTS_DIR, help="results folder")
    p.add_argument("--doc", type=Path, default=None,
                   help="markdown page to write (default docs/benchmarks.md; with --quick and "
                        "no --doc: <out>/benchmarks.md, so toy numbers never overwrite the docs)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default $QPEFT_BENCH_THREADS or 2); 1 on a loaded machine")
    a = p.parse_args(argv)
    if a.threads:
        os.environ["QPEFT_BENCH_THREADS"] = str(a.threads)
    doc = a.doc or (a.out / "benchmarks.md" if a.quick else C.DOC_PATH)
    C.setup_torch()
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    modules = {name: module for name, module, *_ in report.SECTIONS}
    todo = names if a.what == "all" else ([] if a.what == "report" else [a.what])
    for name in todo:
        t = time.perf_counter()
        print(f"== {name}", file=sys.stderr, flush=True)
        modules[name].run(quick=a.quick, out_dir=a.out)
        print(f"== {name} done in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    run_info = None
    if todo:
        run_info = {"command": "python -m benchmarks " + " ".join(argv or sys.argv[1:]),
                    "total_runtime_s": round(time.perf_counter() - t0, 1),
                    "load_average_1min_start_end": f"{load0:.1f} / {os.getloadavg()[0]:.1f}"}
        C.write_result("run_info", run_info, "", a.out)
    elif C.load_result("run_info", a.out):
        run_info = C.load_result("run_info", a.out)
    notes = NOTES.read_text() if NOTES.is_file() and not a.quick else ""
    path = report.write_doc(a.out, doc, run_info, notes)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Benchmark 5: every parameter count the three papers publish, computed by qpeft next to the
published number.

Each method's rows come from its folder (``qpeft/tuners/<method>/paper_counts.py``, the
``paper_counts`` hook of its registry entry). Counts come from qpeft's own count functions (``pauli_num_params``, the configs'
``count_module`` / ``count_shared``, :func:`qpeft.tuners.counting.count_trainable`,
``qpeft.tuners.quic.config.count_reference``) on transformers configs instantiated on the meta
device (no weights). LoRA baselines are counted by peft itself (``get_peft_model`` on the same
meta models). A row's ``match`` compares at the precision the paper printed (exact integers,
"0.03M" to two decimals in millions, percentages to two decimals).

Run alone: ``python -m benchmarks.param_counts``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from benchmarks import _common as C
from qpeft.tuners._paper_counts import count_row
from qpeft.tuners.registry import methods

NAME = "param_counts"


def run(quick: bool = False, out_dir: Path = C.RESULTS_DIR) -> dict[str, Any]:
    """All rows (``quick`` is accepted for symmetry; the whole table takes seconds)."""
    C.setup_torch()
    rows: list[dict] = []
    for spec in methods(ours=True):
        if spec.paper_counts is None:
            continue
        try:
            rows += spec.paper_counts()
        except Exception as err:  # a section that cannot be computed says so in the table
            rows.append(count_row(spec.label, "(whole section)", None, None, "-",
                                  f"not computed: {type(err).__name__}: {err}"))
    result = {"benchmark": NAME, "quick": quick, "machine": C.machine_facts(), "rows": rows,
              "matched": sum(r["match"] is True for r in rows),
              "compared": sum(r["match"] is not None for r in rows)}
    C.write_result(NAME, result, render(result), out_dir)
    return result


def render(result: dict[str, Any]) -> str:
    rows = [[r["paper"], r["item"], C.fmt(r["computed"]), C.fmt(r["published"]),
             "-" if r["match"] is None else ("yes" if r["match"] else "**no**"), r["how"],
             r["note"]] for r in result["rows"]]
    return (C.md_table(["paper", "count", "qpeft computes", "published", "match", "how", "note"],
                       rows)
            + f"\n\n{result['matched']} of {result['compared']} compared rows match.")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.param_counts", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="same as a full run (it is fast)")
    p.add_argument("--out", type=Path, default=C.RESULTS_DIR)
    a = p.parse_args(argv)
    print(render(run(a.quick, a.out)))


if __name__ == "__main__":
    main()

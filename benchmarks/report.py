"""Assemble ``docs/benchmarks.md`` from the JSON results: tables, plot, targets, commands.

Run alone (re-renders from existing results): ``python -m benchmarks report``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from benchmarks import _common as C
from benchmarks import (
    compounds,
    dispatch,
    generation,
    many_adapters,
    merged,
    param_counts,
    scale,
    scale_cuda,
    train_step,
)

SECTIONS = (
    ("train_step", train_step, "1. Training step and peak memory",
     "python -m benchmarks.train_step"),
    ("generation", generation, "2. Generation scaling of the Stiefel matrix U (N x 8)",
     "python -m benchmarks.generation"),
    ("compounds", compounds, "3. Compound matrices: qpeft vs minors determinants",
     "python -m benchmarks.compounds"),
    ("merged", merged, "4. Merged inference vs the base model",
     "python -m benchmarks.merged"),
    ("param_counts", param_counts, "5. The papers' parameter counts",
     "python -m benchmarks.param_counts"),
    ("many_adapters", many_adapters, "6. Many adapters per base model: stored, hot-swapped, served in mixed batches",
     "python -m benchmarks.many_adapters"),
    ("scale", scale, "7. LLaMA-7B- and 70B-shaped decoder layers (issue 15)",
     "python -m benchmarks.scale"),
    ("dispatch", dispatch, "9. Operations dispatched per training step (kernel launches)",
     "python -m benchmarks.dispatch"),
)
#: Rendered when their results exist, never run by ``python -m benchmarks all`` (they need a GPU).
GPU_SECTIONS = (
    ("scale_cuda", scale_cuda, "8. LLaMA-7B-shaped layers on a GPU (bfloat16 base)",
     "python -m benchmarks.scale_cuda"),
)


def _number(section: tuple[Any, ...]) -> int:
    """The number a section's title starts with ("9. Operations ..." -> 9)."""
    return int(section[2].split(".", 1)[0])


def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "**missed**")


def targets(results: dict[str, Any]) -> list[list[Any]]:
    """Rows (target, measured, verdict) for the issue's targets."""
    rows: list[list[Any]] = []
    ts = results.get("train_step")
    if ts:
        for kind, block in ts["models"].items():
            m = block["methods"]

            def get(method: str, key: str, m: dict = m) -> float | None:
                return m.get(method, {}).get(key)

            for method, (t_max, mem_max) in train_step.TARGETS.items():
                r = get(method, "time_ratio")
                rows.append([f"{kind}: {M_LABEL(method)} step ≤ {t_max}× LoRA", C.fmt(r),
                             _verdict(None if r is None else r <= t_max)])
                if mem_max:
                    for key, what in (("peak_ratio", "peak RSS"),
                                      ("step_mem_ratio", "step memory")):
                        r = get(method, key)
                        rows.append([f"{kind}: {M_LABEL(method)} {what} ≤ {mem_max}× LoRA",
                                     C.fmt(r), _verdict(None if r is None else r <= mem_max)])
            r = get("quic", "oft_paired_ratio")
            rows.append([f"{kind}: QuIC step not slower than peft OFT", f"QuIC/OFT = {C.fmt(r)}",
                         _verdict(None if r is None else r <= 1.0)])
    sc = results.get("scale")
    if sc:
        rows += scale.targets(sc)
    cp = results.get("compounds")
    if cp:
        for case in cp["cases"]:
            if (case["n"], case["k"]) == (44, 2):
                for key, what in (("speedup_fwd", "forward"), ("speedup_fwdbwd", "fwd+bwd")):
                    rows.append([f"compounds n=44, k=2 ≥ 20× faster than minors ({what})",
                                 C.fmt(case[key]), _verdict(case[key] >= 20)])
    dp = results.get("dispatch")
    if dp:
        rows += [[target, measured, _verdict(ok)] for target, measured, ok in dispatch.targets(dp)]
    mg = results.get("merged")
    if mg:
        for kind, block in mg["models"].items():
            for method, r in block["methods"].items():
                ratio = r.get("ratio_to_base")
                same = r.get("same_modules_as_base")
                rows.append([f"{kind}: merged {M_LABEL(method)} forward = 1.00× base "
                             "(±5% noise, same modules)", C.fmt(ratio),
                             _verdict(None if ratio is None else
                                      bool(same) and abs(ratio - 1) <= 0.05)])
    return rows


def M_LABEL(method: str) -> str:  # noqa: N802 - short alias used in table text
    from benchmarks.models import METHOD_LABELS

    return METHOD_LABELS.get(method, method)


def headline(results: dict[str, Any]) -> list[str]:
    """One line per headline ratio (what the closing note copies)."""
    lines = []
    ts = results.get("train_step")
    if ts:
        for kind, block in ts["models"].items():
            parts = [f"{M_LABEL(m).split(' ')[0] if m in ('quantum_peft', 'quic', 'qpa') else m}"
                     f" {C.fmt(r.get('time_ratio'))}×"
                     for m, r in block["methods"].items() if m != "lora"]
            lines.append(f"{kind} training step / LoRA: " + ", ".join(parts))
    cp = results.get("compounds")
    if cp:
        lines.append("compounds speed-up over minors (fwd / fwd+bwd): " + ", ".join(
            f"n={c['n']},k={c['k']}: {C.fmt(c['speedup_fwd'], 1)}× / "
            f"{C.fmt(c['speedup_fwdbwd'], 1)}×" for c in cp["cases"]))
    mg = results.get("merged")
    if mg:
        for kind, block in mg["models"].items():
            lines.append(f"{kind} merged forward / base: " + ", ".join(
                f"{m} {C.fmt(r.get('ratio_to_base'))}×" for m, r in block["methods"].items()))
    pc = results.get("param_counts")
    if pc:
        lines.append(f"papers' counts: {pc['matched']} of {pc['compared']} compared rows match")
    return lines


def write_doc(out_dir: Path = C.RESULTS_DIR, doc: Path = C.DOC_PATH,
              run_info: dict[str, Any] | None = None, notes: str = "") -> Path:
    """Render every available result into ``doc``; returns its path."""
    results = {name: C.load_result(name, out_dir) for name, *_ in SECTIONS + GPU_SECTIONS}
    machine = next((results[name]["machine"] for name, *_ in SECTIONS if results[name]),
                   C.machine_facts())
    rel = os.path.relpath(out_dir, doc.parent)
    quick = any(r and r.get("quick") for r in results.values())
    lines = ["# Benchmarks", ""]
    if quick:
        lines += ["> **Quick (toy-size) results** — tiny random models; not the real numbers.", ""]
    lines += [
        "What qpeft costs next to what users would pick instead, measured in one process on one "
        "machine. Timings are **ratios** to a reference measured in the same run (peft LoRA for "
        "training, the base model for inference, the minors method for compounds), with the "
        "candidates interleaved round-robin; absolute seconds are printed for context only.",
        "",
        "## Reproduce",
        "```",
        "make bench                      # = .venv/bin/python -m benchmarks all (2 threads)",
        "python -m benchmarks all --threads 1   # 1 thread (each table's machine facts say which)",
        "python -m benchmarks all --quick   # toy sizes, ~1-3 minutes (what the smoke test runs)",
    ]
    lines += [f"{cmd}   # one benchmark alone" for _, _, _, cmd in SECTIONS]
    lines += [f"{cmd}   # needs a CUDA GPU; not part of `all`" for _, _, _, cmd in GPU_SECTIONS]
    lines += ["python -m benchmarks report   # re-render this page from benchmarks/results/*.json",
              "```", "", "## Machine", ""]
    facts = dict(machine)
    if run_info:
        facts.update({k: v for k, v in run_info.items() if k != "argv"})
    lines.append(C.md_table(["fact", "value"], [[k, str(v)] for k, v in facts.items()]))
    lines += ["", "## Headline", ""] + [f"- {x}" for x in headline(results)]
    rows = targets(results)
    if rows:
        lines += ["", "## Targets (from issue 6)", "",
                  C.md_table(["target", "measured", "verdict"], rows)]
    if notes:
        lines += ["", "## Findings", "", notes.strip()]
    # in the order of the titles' numbers (the GPU sections sit between the others)
    for name, module, title, cmd in sorted(SECTIONS + GPU_SECTIONS, key=_number):
        lines += ["", f"## {title}", "", f"`{cmd}` — " + (module.__doc__ or "").strip()
                  .split("\n\n")[0].replace("\n", " "), ""]
        result = results[name]
        if result is None:
            lines.append("_Not run._")
            continue
        lines.append(module.render(result))
        if name == "generation":
            lines += ["", f"![generation scaling]({rel}/{result['plot']})"]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(lines) + "\n")
    return doc

"""Benchmark 4: merged-adapter inference vs the base model's forward (target: 1.00x).

For every method: wrap a clone of the base model (sharing every tensor except the adapted
layers' weights), move all trainable numbers off their identity init (seeded noise), record the
adapter's output, ``merge_and_unload()``, then check (a) the merged model has exactly the base
model's module types (plain layers, nothing left of the adapter) and (b) its output matches the
unmerged adapter's. Forward passes (eval, no grad) of the base and every merged model are timed
round-robin; the table gives each median over the base model's median.

Run alone: ``python -m benchmarks.merged [--quick] [--models minilm smollm2]``.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks import _common as C
from benchmarks import models as M

NAME = "merged"


def _module_types(model: nn.Module) -> list[str]:
    return [type(m).__name__ for m in model.modules()]


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def merged_model(method: str, base: nn.Module, spec: M.ModelSpec,
                 batch: dict[str, torch.Tensor]) -> tuple[nn.Module, dict[str, Any]]:
    """The merged-and-unloaded model of ``method`` plus its checks and trainable count."""
    import peft

    import qpeft  # noqa: F401

    targets = spec.targets

    def shared(name: str) -> bool:
        return not any(f".{t}." in f".{name}" for t in targets)

    cfg = M.method_config(method, targets, spec.task_type)
    model = peft.get_peft_model(M.clone_sharing(base, keep=shared), cfg)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    model.eval()
    info: dict[str, Any] = {"trainable": M.trainable_count(model)}
    before = _logits(model, batch)
    merged = model.merge_and_unload()
    merged.eval()
    after = _logits(merged, batch)
    info["max_abs_diff_merged_vs_adapter"] = float((after - before).abs().max())
    info["output_changed_vs_base"] = float((after - _logits(base, batch)).abs().max())
    info["same_modules_as_base"] = _module_types(merged) == _module_types(base)
    return merged, info


def bench_model(kind: str, methods: list[str], quick: bool) -> dict[str, Any]:
    spec = M.model_spec(kind, quick)
    base = M.load_base(kind, quick)
    base.eval()
    batch = M.make_batch(spec, base.config.vocab_size)
    rows: dict[str, Any] = {}
    fns = {"base": lambda: _logits(base, batch)}
    for method in methods:
        try:
            merged, info = merged_model(method, base, spec, batch)
            rows[method] = info
            fns[method] = (lambda m: (lambda: _logits(m, batch)))(merged)
        except Exception as err:
            rows[method] = {"error": f"{type(err).__name__}: {err}"}
    warmup, repeats = (1, 2) if quick else ((1, 7) if kind == "smollm2" else (2, 11))
    times = C.round_robin(fns, warmup, repeats)
    base_times = times.pop("base")
    base_t = C.summarize(base_times)
    for method, ts in times.items():
        rows[method].update(C.summarize(ts))
        # per-round ratios: the base and the merged model are timed moments apart
        rows[method]["ratio_to_base"] = C.paired_ratio(ts, base_times)
        rows[method]["ratio_of_medians"] = C.ratio(rows[method]["median_s"], base_t["median_s"])
    for method, row in rows.items():
        row["label"] = M.METHOD_LABELS[method]
    return {"targets": list(spec.targets), "batch": spec.batch, "seq_len": spec.seq_len,
            "base": base_t, "methods": rows}


def run(quick: bool = False, out_dir: Path = C.RESULTS_DIR,
        models: tuple[str, ...] = M.MODEL_KINDS,
        methods: tuple[str, ...] = M.METHODS) -> dict[str, Any]:
    """Every model x method; writes ``merged.json`` / ``.md``."""
    C.setup_torch()
    use = list(methods)
    result: dict[str, Any] = {"benchmark": NAME, "quick": quick, "machine": C.machine_facts(),
                              "models": {}}
    for kind in models:
        result["models"][kind] = bench_model(kind, use, quick)
        gc.collect()
    C.write_result(NAME, result, render(result), out_dir)
    return result


def render(result: dict[str, Any]) -> str:
    parts = []
    for kind, block in result["models"].items():
        rows = [["base model (no adapter)", "-", block["base"]["median_s"] * 1e3, 1.0, "-", "-"]]
        for r in block["methods"].values():
            if "error" in r:
                rows.append([r["label"], "error: " + r["error"][:120], "-", "-", "-", "-"])
                continue
            rows.append([r["label"], r["same_modules_as_base"], r["median_s"] * 1e3,
                         r["ratio_to_base"], f"{r['max_abs_diff_merged_vs_adapter']:.1e}",
                         f"{r['output_changed_vs_base']:.1e}"])
        parts.append(
            f"**{kind}** (batch {block['batch']} x {block['seq_len']}, eval, no grad)\n\n"
            + C.md_table(["merged model", "same modules as base", "forward median (ms)",
                          "forward / base", "max |merged - adapter|", "max |merged - base|"],
                         rows))
    parts.append("Forward / base is the median of per-round ratios (base and merged model "
                 "timed moments apart in each round).")
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.merged", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny random models (smoke test)")
    p.add_argument("--out", type=Path, default=C.RESULTS_DIR)
    p.add_argument("--models", nargs="+", default=list(M.MODEL_KINDS), choices=M.MODEL_KINDS)
    p.add_argument("--methods", nargs="+", default=list(M.METHODS), choices=M.METHODS)
    a = p.parse_args(argv)
    print(render(run(a.quick, a.out, tuple(a.models), tuple(a.methods))))


if __name__ == "__main__":
    main()

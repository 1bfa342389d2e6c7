"""Benchmark 1: training step time and peak memory, qpeft methods vs peft methods.

Time: every method wraps a weight-sharing clone of one base model in one process; their
optimizer steps (zero_grad, forward, backward, AdamW) are interleaved round-robin and the median
after warm-up is divided by peft LoRA's median from the same rounds.

Memory: a fresh subprocess per method (peak RSS is per process). After the model is loaded and
wrapped, the RSS is read, the kernel's high-water mark is reset (``/proc/self/clear_refs`` = 5)
and the steps run; ``peak_rss`` is the high-water mark during the steps, ``step_mem`` = peak_rss
minus the RSS before the first step (gradients, optimizer state, activations, adapter work).
glibc is told to serve allocations >= 128 KiB with mmap (``MALLOC_MMAP_THRESHOLD_``) so freed
tensors leave the RSS at once and the high-water mark follows live tensors.

Configurations: each method's benchmark configuration on the model's usual targets (query and
value; ``benchmarks/models.py``), or with ``--cli-defaults`` what ``qpeft finetune`` builds when
no targets or options are named (each method's own targets for the kind of data: Quantum-PEFT
and QuIC on every linear layer of a causal LM, QuIC there in 12 blocks), written to
``train_step_cli.json`` / ``.md``: the step a user of the command-line defaults gets.

Run alone: ``python -m benchmarks.train_step [--quick] [--models minilm smollm2]
[--cli-defaults]``.
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path
from typing import Any

from benchmarks import _common as C
from benchmarks import models as M
from qpeft.tuners.registry import get_method

NAME, NAME_CLI = "train_step", "train_step_cli"


def memory_worker(kind: str, method: str, quick: bool, steps: int,
                  cli_defaults: bool = False) -> dict[str, Any]:
    """Runs inside the subprocess: load, wrap, reset the RSS high-water mark, run ``steps``
    optimizer steps, report peak RSS and its increase over the pre-step RSS (MiB)."""
    C.setup_torch()
    spec = M.model_spec(kind, quick)
    base = M.load_base(kind, quick)
    model = M.wrap(method, base, spec, cli_defaults)
    del base
    batch = M.make_batch(spec, model.get_base_model().config.vocab_size)
    return C.peak_rss_of_steps(M.make_step(model, batch), steps)


def measure_memory(kind: str, method: str, quick: bool, cli_defaults: bool = False) -> dict[str, Any]:
    """Run :func:`memory_worker` in a fresh interpreter; returns its dict or {'error': ...}."""
    steps = 2 if quick else (2 if kind == "smollm2" else 3)
    return C.run_memory_worker("benchmarks.train_step", [kind, method, "--steps", str(steps)]
                               + (["--quick"] if quick else [])
                               + (["--cli-defaults"] if cli_defaults else []), timeout=900)


def measure_time(kind: str, methods: list[str], quick: bool,
                 rounds: int | None = None, cli_defaults: bool = False) -> dict[str, Any]:
    """Round-robin step timings of ``methods`` on one model (``rounds`` timed rounds, default
    11, 4 for SmolLM2); per-method errors are recorded."""
    spec = M.model_spec(kind, quick)
    base = M.load_base(kind, quick)
    batch = M.make_batch(spec, base.config.vocab_size)
    out: dict[str, Any] = {}
    steps = {}
    for method in methods:
        try:
            model = M.wrap(method, base, spec, cli_defaults)
            targets = model.peft_config["default"].target_modules  # peft expands all-linear
            names = [targets] if isinstance(targets, str) else targets  # into full module names
            out[method] = {"trainable": M.trainable_count(model),
                           "targets": sorted({t.rsplit(".", 1)[-1] for t in names})}
            steps[method] = M.make_step(model, batch)
        except Exception as err:  # a method that cannot be built is reported, not fatal
            out[method] = {"error": f"{type(err).__name__}: {err}"}
    warmup, repeats = (1, 2) if quick else ((1, 4) if kind == "smollm2" else (2, 11))
    repeats = rounds or repeats
    times = C.round_robin(steps, warmup, repeats)
    for method, ts in times.items():
        out[method].update(C.summarize(ts))
        for ref in ("lora", "oft"):  # per-round ratios: the round-to-round drift cancels
            out[method][f"{ref}_paired_ratio"] = C.paired_ratio(ts, times.get(ref, []))
    return out


def run(quick: bool = False, out_dir: Path = C.RESULTS_DIR,
        models: tuple[str, ...] = M.MODEL_KINDS, methods: tuple[str, ...] = M.METHODS,
        memory: bool = True, rounds: int | None = None,
        cli_defaults: bool = False) -> dict[str, Any]:
    """Time and memory for every model x method; writes ``train_step.json`` / ``.md`` (with
    ``cli_defaults``: ``train_step_cli``)."""
    C.setup_torch()
    use = list(methods)
    name = NAME_CLI if cli_defaults else NAME
    result: dict[str, Any] = {"benchmark": name, "quick": quick, "machine": C.machine_facts(),
                              "cli_defaults": cli_defaults, "models": {}}
    for kind in models:
        spec = M.model_spec(kind, quick)
        rows = measure_time(kind, use, quick, rounds, cli_defaults)
        gc.collect()
        if memory:
            for method in use:
                if "error" not in rows[method]:
                    rows[method]["memory"] = measure_memory(kind, method, quick, cli_defaults)
        ref = rows.get("lora", {})
        ref_mem = ref.get("memory", {})
        for method, row in rows.items():  # the benchmark labels name the benchmark configurations
            spec_m = get_method(method)
            row["label"] = (f"{spec_m.label} (`--method {spec_m.name}`)" if cli_defaults
                            else M.METHOD_LABELS[method])
            row["time_ratio"] = row.get("lora_paired_ratio")
            row["ratio_of_medians"] = C.ratio(row.get("median_s"), ref.get("median_s"))
            mem = row.get("memory", {})
            row["peak_ratio"] = C.ratio(mem.get("peak_rss_mib"), ref_mem.get("peak_rss_mib"))
            row["step_mem_ratio"] = C.ratio(mem.get("step_mem_mib"), ref_mem.get("step_mem_mib"))
        result["models"][kind] = {"targets": list(spec.targets), "batch": spec.batch,
                                  "seq_len": spec.seq_len, "methods": rows}
    C.write_result(name, result, render(result), out_dir)
    return result


TARGETS = {  # method: (max step ratio to LoRA, max peak-memory ratio to LoRA)
    "quantum_peft": (1.10, 1.05),
    "quic": (1.5, None),
    "qpa": (1.3, None),
}


def render(result: dict[str, Any]) -> str:
    """Markdown tables, one per model (with the CLI defaults, each method's targets too)."""
    cli = result.get("cli_defaults", False)
    parts = []
    for kind, block in result["models"].items():
        rows = []
        for method, row in block["methods"].items():
            mem = row.get("memory", {})
            targets = row.get("targets", "-")
            where = [targets if isinstance(targets, str) else ", ".join(targets)] if cli else []
            if "error" in row:
                rows.append([row.get("label", method), *where, "error: " + row["error"][:120],
                             "-", "-", "-", "-", "-", "-", "-"])
                continue
            rows.append([
                row["label"], *where, row["trainable"], row.get("median_s"), row.get("time_ratio"),
                row.get("oft_paired_ratio"),
                mem.get("peak_rss_mib") if "error" not in mem else "error: " + mem["error"][:80],
                row.get("peak_ratio"), mem.get("step_mem_mib"), row.get("step_mem_ratio"),
            ])
        placed = ("each method at `qpeft finetune`'s defaults" if cli
                  else f"targets {', '.join(block['targets'])}")
        parts.append(
            f"**{kind}** ({placed}; batch {block['batch']} x {block['seq_len']})\n\n"
            + C.md_table(
                ["method", *(["targets"] if cli else []), "trainable", "step median (s)",
                 "step / LoRA", "step / OFT", "peak RSS (MiB)", "peak / LoRA",
                 "step memory (MiB)", "step mem / LoRA"], rows))
    parts.append("Step ratios are medians of per-round ratios: each round runs every method "
                 "once, interleaved, so a method and its reference are timed moments apart.")
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny random models (smoke test)")
    p.add_argument("--out", type=Path, default=C.RESULTS_DIR)
    p.add_argument("--models", nargs="+", default=list(M.MODEL_KINDS), choices=M.MODEL_KINDS)
    p.add_argument("--methods", nargs="+", default=list(M.METHODS), choices=M.METHODS)
    p.add_argument("--no-memory", action="store_true", help="skip the per-method subprocesses")
    p.add_argument("--rounds", type=int, default=None,
                   help="timed rounds per model (default 11; 4 for SmolLM2, whose steps are long)")
    p.add_argument("--cli-defaults", action="store_true",
                   help="each method as `qpeft finetune` builds it with no targets or options "
                        "named (writes train_step_cli.json / .md)")
    p.add_argument("--memory-worker", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=3, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.memory_worker:
        print(json.dumps(memory_worker(a.memory_worker[0], a.memory_worker[1], a.quick, a.steps,
                                       a.cli_defaults)))
        return
    result = run(a.quick, a.out, tuple(a.models), tuple(a.methods), not a.no_memory, a.rounds,
                 a.cli_defaults)
    print(render(result))


if __name__ == "__main__":
    main()

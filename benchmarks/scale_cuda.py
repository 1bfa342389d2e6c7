"""Benchmark 8: the LLaMA-7B-shaped decoder layer of ``benchmarks.scale`` on a CUDA GPU, with a
bfloat16 base (peft's default float32 adapters), as a user fine-tuning a 7B model on one GPU
runs it: training step time and step memory of qpeft's methods against peft LoRA and OFT.

One step = zero_grad, forward, loss = mean(out²), backward, AdamW, then a device synchronise.
Every method wraps a weight-sharing clone of one layer; steps are interleaved round-robin and
the ratio to LoRA is the median of per-round ratios (:func:`benchmarks._common.paired_ratio`).
Step memory: ``torch.cuda.max_memory_allocated`` during one step minus what was allocated
before it (the shared base weights excluded), per method, after the timing.

With ``--layers 8`` a stack of 8 such layers (all adapted): what a whole model's step looks
like, where an adapter's per-step costs (Quantum-PEFT's batched circuits, QPA's one
simulation) are shared by every layer.

Needs a GPU (it is not part of ``python -m benchmarks all``): ``python -m benchmarks.scale_cuda
[--tokens 128 2048] [--layers 1 8] [--methods ...] [--repeats 30]``; writes ``scale_cuda.json``
/ ``.md``.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path
from typing import Any

import torch

from benchmarks import _common as C
from benchmarks import models as M
from benchmarks import scale as S

NAME = "scale_cuda"
METHODS = ("lora", "oft", "quantum_peft", "quic", "qpa")


def _synchronised(step):
    def run() -> None:
        step()
        torch.cuda.synchronize()
    return run


def _step_memory_mib(step) -> float:
    """Peak bytes allocated during one step beyond what was allocated before it (MiB)."""
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def measure(methods: list[str], tokens: int, layers: int, warmup: int,
            repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    base = S.DecoderLayers(S.layer_config(False), layers).to("cuda", torch.bfloat16).train()
    hidden = torch.randn(1, tokens, base.config.hidden_size, generator=torch.Generator()
                         .manual_seed(1)).to("cuda", torch.bfloat16)
    out: dict[str, Any] = {}
    steps = {}
    for method in methods:
        try:
            model = S.wrap(method, base)
            out[method] = {"trainable": M.trainable_count(model), "label": S.LABELS[method]}
            steps[method] = _synchronised(S.make_step(model, hidden))
        except Exception as err:  # a method that cannot be built is reported, not fatal
            out[method] = {"error": f"{type(err).__name__}: {err}", "label": S.LABELS[method]}
    times = C.round_robin(steps, warmup, repeats)
    for method, ts in times.items():
        out[method].update(C.summarize(ts))
        for ref in ("lora", "oft"):
            out[method][f"{ref}_paired_ratio"] = C.paired_ratio(ts, times.get(ref, []))
    for method, step in steps.items():
        out[method]["step_memory_mib"] = _step_memory_mib(step)
    ref = out.get("lora", {}).get("step_memory_mib")
    for row in out.values():
        row["step_memory_ratio"] = C.ratio(row.get("step_memory_mib"), ref)
    return out


def run(out_dir: Path = C.RESULTS_DIR, tokens: tuple[int, ...] = S.TOKENS,
        methods: tuple[str, ...] = METHODS, layers: tuple[int, ...] = (1, 8), warmup: int = 3,
        repeats: int = 30) -> dict[str, Any]:
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.scale_cuda needs a CUDA GPU; none is visible here")
    C.setup_torch()
    cfg = S.layer_config(False)
    result: dict[str, Any] = {
        "benchmark": NAME, "machine": {**C.machine_facts(),
                                       "gpu": torch.cuda.get_device_name()},
        "layer": {"hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
                  "targets": list(S.TARGETS_7B)},
        "warmup": warmup, "repeats": repeats,
        "runs": {f"{n} layer{'s' if n > 1 else ''}, {t} tokens":
                 measure(list(methods), t, n, warmup, repeats) for n in layers for t in tokens}}
    C.write_result(NAME, result, render(result), out_dir)
    return result


def render(result: dict[str, Any]) -> str:
    lay = result["layer"]
    parts = [f"**7B-shaped layers on {result['machine']['gpu']}** — LlamaDecoderLayer hidden "
             f"{lay['hidden_size']}, intermediate {lay['intermediate_size']}; adapted: "
             f"{', '.join(lay['targets'])}; batch 1; bfloat16 base, float32 adapters; torch "
             f"{result['machine']['torch']}; {result['repeats']} interleaved rounds."]
    for what, block in result["runs"].items():
        rows = []
        for row in block.values():
            if "error" in row:
                rows.append([row["label"], "error: " + row["error"][:120]] + ["-"] * 5)
                continue
            rows.append([row["label"], row["trainable"], C.fmt(1e3 * row["median_s"], 2),
                         row.get("lora_paired_ratio"), row.get("oft_paired_ratio"),
                         row.get("step_memory_mib"), row.get("step_memory_ratio")])
        parts.append(f"**{what}**\n\n" + C.md_table(
            ["method", "trainable", "step median (ms)", "step / LoRA", "step / OFT",
             "step memory (MiB)", "step mem / LoRA"], rows))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale_cuda", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=C.RESULTS_DIR)
    p.add_argument("--tokens", type=int, nargs="+", default=list(S.TOKENS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=S.METHODS)
    p.add_argument("--layers", type=int, nargs="+", default=[1, 8],
                   help="decoder layers stacked (adapters of all of them train)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=30)
    a = p.parse_args(argv)
    print(render(run(a.out, tuple(a.tokens), tuple(a.methods), tuple(a.layers), a.warmup,
                     a.repeats)))


if __name__ == "__main__":
    main()

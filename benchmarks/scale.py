"""Benchmark 7: one LLaMA-7B-shaped decoder layer, every linear module adapted: training step
time and peak memory of qpeft's methods against peft's, at 128 and 2,048 tokens; and a
LLaMA-70B-shaped layer for the adapters' generation cost alone (``benchmarks.scale_generation``).

The layer is transformers' ``LlamaDecoderLayer`` from ``LlamaConfig(hidden_size=4096,
intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)``, random init, fp32,
batch 1; all 7 linear modules adapted; one step = zero_grad, forward, loss = mean(out²),
backward, AdamW. Time: every method wraps a weight-sharing clone of one layer in one process,
their steps are interleaved round-robin, and the ratio to peft LoRA r=8 is the median of the
per-round ratios (:func:`benchmarks._common.paired_ratio`). Memory: a fresh subprocess per method
and token count, peak RSS over the steps as in ``benchmarks.train_step``.

Run alone: ``python -m benchmarks.scale [--quick] [--tokens 128 2048] [--no-memory]
[--no-70b | --only-70b] [--max-dense-gib G]`` (``--only-70b`` replaces the 70B section of an
existing ``scale.json`` and keeps its 7B tables).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks import _common as C
from benchmarks import models as M
from benchmarks import scale_generation as G
from benchmarks.decoder import TARGETS_7B, DecoderLayers, llama_config, method_config

NAME = "scale"
METHODS = ("lora", "oft", "vera", "fourierft", "quantum_peft", "quic", "qpa")
LABELS = {**M.METHOD_LABELS, "vera": "peft VeRA (r=256)", "fourierft": "peft FourierFT (n=1000)"}
TOKENS = (128, 2048)
QUICK_TOKENS = (16, 32)
TARGETS = {  # method: (max step / LoRA, max step / OFT, max peak memory / LoRA)
    "quantum_peft": (1.10, None, 1.10),
    "qpa": (1.10, None, 1.10),
    "quic": (1.30, 1.2, 1.10),
}


def layer_config(quick: bool) -> Any:
    """The 7B shape (quick: 64 / 128, 4 heads)."""
    return llama_config(64, 128, 4, 4) if quick else llama_config(4096, 11008, 32, 32)


def build_layer(quick: bool) -> DecoderLayers:
    torch.manual_seed(0)
    return DecoderLayers(layer_config(quick)).train()


def wrap(method: str, base: DecoderLayers) -> nn.Module:
    import peft

    import qpeft  # noqa: F401  (registers the qpeft methods)

    return peft.get_peft_model(M.clone_sharing(base), method_config(method))


def make_step(model: nn.Module, hidden: torch.Tensor) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model(hidden).pow(2).mean().backward()
        opt.step()

    return step


def _hidden(quick: bool, tokens: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, tokens, layer_config(quick).hidden_size, generator=g)


def memory_worker(method: str, quick: bool, tokens: int, steps: int) -> dict[str, Any]:
    """In a fresh process: build, wrap, reset the RSS high-water mark, run steps (MiB)."""
    C.setup_torch()
    model = wrap(method, build_layer(quick))
    return C.peak_rss_of_steps(make_step(model, _hidden(quick, tokens)), steps)


def measure_memory(method: str, quick: bool, tokens: int) -> dict[str, Any]:
    return C.run_memory_worker("benchmarks.scale", [method, "--tokens", str(tokens)]
                               + (["--quick"] if quick else []), timeout=1800)


def measure_time(methods: list[str], quick: bool, tokens: int) -> dict[str, Any]:
    base = build_layer(quick)
    hidden = _hidden(quick, tokens)
    out: dict[str, Any] = {}
    steps = {}
    for method in methods:
        try:
            model = wrap(method, base)
            out[method] = {"trainable": M.trainable_count(model)}
            steps[method] = make_step(model, hidden)
        except Exception as err:  # a method that cannot be built is reported, not fatal
            out[method] = {"error": f"{type(err).__name__}: {err}"}
    warmup, repeats = (1, 2) if quick else ((1, 7) if tokens <= 512 else (1, 3))
    times = C.round_robin(steps, warmup, repeats)
    for method, ts in times.items():
        out[method].update(C.summarize(ts))
        for ref in ("lora", "oft"):
            out[method][f"{ref}_paired_ratio"] = C.paired_ratio(ts, times.get(ref, []))
    return out


def run(quick: bool = False, out_dir: Path = C.RESULTS_DIR, tokens: tuple[int, ...] | None = None,
        methods: tuple[str, ...] = METHODS, memory: bool = True, gen70b: bool = True,
        max_dense_gib: float = G.MAX_DENSE_GIB) -> dict[str, Any]:
    """Time (and memory) for every token count x method, then (``gen70b``) the 70B layer's
    generation section; writes ``scale.json`` / ``.md``."""
    C.setup_torch()
    tokens = tokens or (QUICK_TOKENS if quick else TOKENS)
    cfg = layer_config(quick)
    result: dict[str, Any] = {
        "benchmark": NAME, "quick": quick, "machine": C.machine_facts(),
        "layer": {"hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
                  "num_attention_heads": cfg.num_attention_heads, "targets": list(TARGETS_7B)},
        "tokens": {}}
    for t in tokens:
        rows = measure_time(list(methods), quick, t)
        gc.collect()
        if memory:
            for method in methods:
                if "error" not in rows[method]:
                    rows[method]["memory"] = measure_memory(method, quick, t)
        ref_mem = rows.get("lora", {}).get("memory", {})
        for method, row in rows.items():
            row["label"] = LABELS[method]
            mem = row.get("memory", {})
            row["peak_ratio"] = C.ratio(mem.get("peak_rss_mib"), ref_mem.get("peak_rss_mib"))
        result["tokens"][str(t)] = rows
    result["load_average_1min_end"] = round(os.getloadavg()[0], 1)
    if gen70b:
        result[G.KEY] = G.measure(quick, methods, memory, max_dense_gib)
    C.write_result(NAME, result, render(result), out_dir)
    return result


def run_70b_only(quick: bool = False, out_dir: Path = C.RESULTS_DIR,
                 methods: tuple[str, ...] = METHODS, memory: bool = True,
                 max_dense_gib: float = G.MAX_DENSE_GIB) -> dict[str, Any]:
    """The 70B generation section alone, stored into the existing ``scale.json`` (its 7B
    tables kept; a new result with no 7B table if there is none)."""
    C.setup_torch()
    result = C.load_result(NAME, out_dir)
    if result is None or bool(result.get("quick")) != quick:
        cfg = layer_config(quick)
        result = {"benchmark": NAME, "quick": quick, "machine": C.machine_facts(),
                  "layer": {"hidden_size": cfg.hidden_size,
                            "intermediate_size": cfg.intermediate_size,
                            "num_attention_heads": cfg.num_attention_heads,
                            "targets": list(TARGETS_7B)},
                  "tokens": {}}
    result[G.KEY] = G.measure(quick, methods, memory, max_dense_gib)
    C.write_result(NAME, result, render(result), out_dir)
    return result


def targets(result: dict[str, Any]) -> list[list[Any]]:
    """(target, measured, verdict) rows for issue 15's targets."""
    rows = []
    for t, block in result["tokens"].items():
        for method, (t_lora, t_oft, mem) in TARGETS.items():
            row = block.get(method, {})
            for key, limit, what in (("lora_paired_ratio", t_lora, "step / LoRA"),
                                     ("oft_paired_ratio", t_oft, "step / OFT"),
                                     ("peak_ratio", mem, "peak memory / LoRA")):
                if limit is None:
                    continue
                r = row.get(key)
                verdict = "-" if r is None else ("met" if r <= limit else "**missed**")
                rows.append([f"7B layer, {t} tokens: {LABELS[method]} {what} ≤ {limit}",
                             C.fmt(r), verdict])
    return rows


def render(result: dict[str, Any]) -> str:
    lay = result["layer"]
    parts = []
    if result["tokens"]:
        parts.append(f"**7B-shaped layer, training step** — LlamaDecoderLayer hidden "
                     f"{lay['hidden_size']}, intermediate {lay['intermediate_size']}, "
                     f"{lay['num_attention_heads']} heads; adapted: {', '.join(lay['targets'])}; "
                     f"batch 1; fp32; {result['machine']['torch_threads']} threads; load average "
                     f"{result['machine']['load_average_1min']} at start, "
                     f"{result.get('load_average_1min_end', '-')} at end.")
    for t, block in result["tokens"].items():
        rows = []
        for method, row in block.items():
            if "error" in row:
                rows.append([row.get("label", method), "error: " + row["error"][:120]] + ["-"] * 5)
                continue
            mem = row.get("memory", {})
            rows.append([row["label"], row["trainable"], row.get("median_s"),
                         row.get("lora_paired_ratio"), row.get("oft_paired_ratio"),
                         mem.get("peak_rss_mib") if "error" not in mem
                         else "error: " + mem["error"][:80], row.get("peak_ratio")])
        parts.append(f"**{t} tokens**\n\n" + C.md_table(
            ["method", "trainable", "step median (s)", "step / LoRA", "step / OFT",
             "peak RSS (MiB)", "peak / LoRA"], rows))
    if result["tokens"]:
        parts.append(C.md_table(["target (issue 15)", "measured", "verdict"], targets(result)))
    if G.KEY in result:
        parts.append(G.render(result[G.KEY], LABELS))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a 64-wide layer (smoke test)")
    p.add_argument("--out", type=Path, default=C.RESULTS_DIR)
    p.add_argument("--tokens", type=int, nargs="+", default=None)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--no-memory", action="store_true")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--no-70b", action="store_true", help="skip the 70B generation section")
    which.add_argument("--only-70b", action="store_true",
                       help="run only the 70B generation section (keeps the 7B tables)")
    p.add_argument("--max-dense-gib", type=float, default=G.MAX_DENSE_GIB,
                   help="largest dense ΔW (all 7 modules, fp32) a method may build in the 70B "
                        "section (default %(default)s; FourierFT's is 3.19 GiB)")
    p.add_argument("--memory-worker", metavar="METHOD", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=2, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.memory_worker:
        t = a.tokens[0] if a.tokens else QUICK_TOKENS[0]
        print(json.dumps(memory_worker(a.memory_worker, a.quick, t, a.steps)))
        return
    if a.only_70b:
        result = run_70b_only(a.quick, a.out, tuple(a.methods), not a.no_memory,
                              a.max_dense_gib)
    else:
        result = run(a.quick, a.out, tuple(a.tokens) if a.tokens else None, tuple(a.methods),
                     not a.no_memory, not a.no_70b, a.max_dense_gib)
    print(render(result))


if __name__ == "__main__":
    main()

"""Benchmark 6: serving many adapters in one mixed batch (peft's ``adapter_names``).

SmolLM2-135M (q_proj, v_proj; the real model, or a tiny random LLaMA with ``--quick``) carries
8 adapters of one method; a batch of 64 rows x 32 tokens is routed 8 rows per adapter. Timed:
the mixed forward (eval, no grad) as a ratio to the same model's single-adapter forward of the
same batch, and, across methods, to peft LoRA r=8 doing the same mixed batch (round-robin,
median of per-round ratios). Also checked: the mixed output equals the row-by-row outputs.

Run alone: ``python -m benchmarks.mixed_batch [--quick]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from benchmarks import _common as C
from benchmarks import models as M

NAME = "mixed_batch"
NUM_ADAPTERS = 8
METHODS = ("lora", "quantum_peft", "quic", "qpa")


def _model_with_adapters(method: str, base: torch.nn.Module, spec: M.ModelSpec):
    """``base`` (weight-sharing clone) with adapters a0..a7 of ``method``, each perturbed
    away from the identity so the routing matters. Eval mode."""
    import peft

    import qpeft  # noqa: F401

    names = [f"a{i}" for i in range(NUM_ADAPTERS)]
    model = peft.get_peft_model(M.clone_sharing(base), M.method_config(method, spec.targets, None),
                                adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, M.method_config(method, spec.targets, None))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if any(f".{n}" in pname for n in names) and p.is_floating_point():
                p.add_(0.01 * torch.randn(p.shape, generator=g).to(p.dtype))
    return model.eval(), names


def bench(quick: bool) -> dict[str, Any]:
    spec = M.ModelSpec("smollm2", ("q_proj", "v_proj"), 16 if quick else 64, 8 if quick else 32,
                       "CAUSAL_LM", None)
    base = M.load_base("smollm2", quick).eval()
    vocab = base.config.vocab_size
    ids = M.make_batch(spec, vocab)["input_ids"]
    rows_per = spec.batch // NUM_ADAPTERS
    steps: dict[str, Any] = {}
    out: dict[str, Any] = {"batch": spec.batch, "seq_len": spec.seq_len,
                           "adapters": NUM_ADAPTERS, "methods": {}}
    for method in METHODS:
        model, names = _model_with_adapters(method, base, spec)
        routing = [names[i // rows_per] for i in range(spec.batch)]

        def mixed(model=model, routing=routing):
            with torch.no_grad():
                return model(input_ids=ids, adapter_names=routing).logits

        def single(model=model):
            with torch.no_grad():
                return model(input_ids=ids).logits

        # correctness first: the mixed batch equals each adapter on its own rows
        got = mixed()
        worst = 0.0
        for i, name in enumerate(names):
            model.set_adapter(name)
            rows = slice(i * rows_per, (i + 1) * rows_per)
            with torch.no_grad():
                want = model(input_ids=ids[rows]).logits
            worst = max(worst, float((got[rows] - want).abs().max()))
        model.set_adapter(names[0])
        out["methods"][method] = {"label": M.METHOD_LABELS[method], "max_abs_diff_vs_rows": worst}
        steps[f"{method}/mixed"] = mixed
        steps[f"{method}/single"] = single
    warmup, repeats = (1, 3) if quick else (2, 9)
    times = C.round_robin(steps, warmup=warmup, repeats=repeats)
    for method, r in out["methods"].items():
        r["mixed"] = C.summarize(times[f"{method}/mixed"])
        r["mixed_over_single"] = C.paired_ratio(times[f"{method}/mixed"], times[f"{method}/single"])
        r["mixed_over_lora_mixed"] = C.paired_ratio(times[f"{method}/mixed"], times["lora/mixed"])
    return out


def run(quick: bool = False, out_dir: Path = C.RESULTS_DIR) -> dict[str, Any]:
    return C.measure_and_write(NAME, bench, render, quick, out_dir)


def render(result: dict[str, Any]) -> str:
    rows = [[r["label"], r["mixed"]["median_s"] * 1e3, r["mixed_over_single"],
             r["mixed_over_lora_mixed"], f"{r['max_abs_diff_vs_rows']:.1e}"]
            for r in result["methods"].values()]
    return (f"SmolLM2 q,v: {result['batch']} rows x {result['seq_len']} tokens over "
            f"{result['adapters']} adapters (eval, no grad)\n\n"
            + C.md_table(["method", "mixed forward median (ms)", "mixed / one adapter",
                          "mixed / LoRA mixed", "max |mixed − row by row|"], rows))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=C.RESULTS_DIR)
    a = p.parse_args(argv)
    print(render(run(quick=a.quick, out_dir=a.out)))


if __name__ == "__main__":
    main()

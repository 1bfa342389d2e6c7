"""Benchmark 6: many adapters per base model — stored, loaded, hot-swapped and served in mixed
batches (peft's ``adapter_names``), each method against peft LoRA r=8 doing the same.

SmolLM2-135M (q_proj, v_proj; a tiny random LLaMA with ``--quick``). Per method:

1. **1,000 distinct adapters** written to disk (the method's benchmark config, each adapter its
   own random perturbation of a saved one): bytes on disk per adapter (config + safetensors).
2. **Load**: ``load_adapter`` of 64 of them into one model (seconds per adapter, median).
3. **Hot-swap**: every one of the 1,000 swapped into one loaded adapter slot in place
   (``qpeft.hotswap.hotswap_adapter``; peft's ``hotswap_adapter`` for LoRA): seconds per adapter.
4. **Mixed batches**: 64 rows x 8 tokens, eval, no grad, routed over 8 and over 64 distinct
   adapters; throughput relative to peft LoRA's mixed batch with the same routing (each method
   and LoRA timed back to back, 5 rounds, median of the per-round ratios), and checked against
   the same rows run adapter by adapter.
5. **As LoRA**: the methods with an exact LoRA form (``qpeft export-lora``) served through peft's
   LoRA path: export seconds per adapter, bytes, the same mixed batches, the largest difference
   to qpeft's own outputs.

Run alone: ``python -m benchmarks.many_adapters [--quick]`` (about 30 minutes on 2 cores);
``--methods quic --written 64 --out /tmp/x`` re-measures one method against LoRA in a few minutes.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import _common as C
from benchmarks import models as M

NAME = "many_adapters"
METHODS = ("lora", "quantum_peft", "quic", "qpa")
NUM_WRITTEN = 1000
NUM_LOADED = 64
ROUTINGS = (8, 64)  # distinct adapters per mixed batch of NUM_LOADED rows
QUICK = {"written": 12, "loaded": 8, "routings": (2, 8), "seq_len": 8}
PERTURBATION = 0.01  # every adapter tensor moves by this much x N(0, 1) away from the saved one


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def write_adapters(method: str, base: torch.nn.Module, targets: tuple[str, ...], root: Path,
                   count: int) -> list[Path]:
    """``count`` distinct adapters of ``method`` saved under ``root/method/a0000`` ...: one
    ``save_pretrained`` of the benchmark config, then ``count`` copies of its config with every
    adapter tensor perturbed by its own seed. O(count x adapter size)."""
    import peft
    from safetensors.torch import load_file, save_file

    import qpeft  # noqa: F401

    model = peft.get_peft_model(M.clone_sharing(base), M.method_config(method, targets, None))
    template = root / method / "template"
    model.save_pretrained(template)
    tensors = load_file(str(template / "adapter_model.safetensors"))
    folders = []
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        folder = root / method / f"a{i:04d}"
        folder.mkdir(parents=True)
        shutil.copy(template / "adapter_config.json", folder)
        save_file({k: (v + PERTURBATION * torch.randn(v.shape, generator=g).to(v.dtype)
                       if v.is_floating_point() else v).contiguous()
                   for k, v in tensors.items()},
                  str(folder / "adapter_model.safetensors"))
        folders.append(folder)
    return folders


def load_many(base: torch.nn.Module, folders: list[Path]) -> tuple[Any, list[float]]:
    """A PeftModel over a weight-sharing clone of ``base`` holding ``folders`` as adapters
    x0, x1, ... (eval), and the seconds each ``load_adapter`` took."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(M.clone_sharing(base), folders[0], adapter_name="x0")
    seconds = []
    for i, folder in enumerate(folders[1:], start=1):
        t0 = time.perf_counter()
        model.load_adapter(folder, adapter_name=f"x{i}")
        seconds.append(time.perf_counter() - t0)
    return model.eval(), seconds


def hotswap_all(method: str, model: Any, folders: list[Path]) -> list[float]:
    """Seconds per in-place swap of each of ``folders`` into slot x0; x0 restored after."""
    if method == "lora":
        from peft.utils.hotswap import hotswap_adapter
    else:
        from qpeft.hotswap import hotswap_adapter
    seconds = []
    for folder in folders:
        t0 = time.perf_counter()
        hotswap_adapter(model, str(folder), adapter_name="x0")
        seconds.append(time.perf_counter() - t0)
    hotswap_adapter(model, str(folders[0]), adapter_name="x0")
    return seconds


def _routing(distinct: int, rows: int) -> list[str]:
    return [f"x{i * distinct // rows}" for i in range(rows)]


def _mixed(model: Any, ids: torch.Tensor, routing: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, adapter_names=routing).logits


def _worst_row_difference(model: Any, ids: torch.Tensor, routing: list[str], got: torch.Tensor,
                          rows: list[int]) -> float:
    """Largest |mixed − the row run with its adapter set| over ``rows``."""
    worst = 0.0
    for row in rows:
        model.set_adapter(routing[row])
        with torch.no_grad():
            want = model(input_ids=ids[row:row + 1]).logits
        worst = max(worst, float((got[row:row + 1] - want).abs().max()))
    model.set_adapter("x0")
    return worst


def _median_ms(seconds: list[float]) -> float | None:
    return statistics.median(seconds) * 1e3 if seconds else None


def _export_all(folders: list[Path], root: Path,
                base: torch.nn.Module) -> tuple[list[Path], list[float]]:
    from qpeft.export.stock import export_lora

    out, seconds = [], []
    for folder in folders:
        t0 = time.perf_counter()
        out.append(export_lora(folder, root / folder.name, base_model=base))
        seconds.append(time.perf_counter() - t0)
    return out, seconds


def bench(quick: bool, methods: tuple[str, ...] = METHODS,
          written: int | None = None) -> dict[str, Any]:
    """Every measurement above for ``methods`` (LoRA, the reference, always runs first);
    ``written`` adapters per method (default 1,000; 12 with ``quick``)."""
    from qpeft.tuners.registry import get_method

    methods = ("lora", *(m for m in methods if m != "lora"))
    written = written or (QUICK["written"] if quick else NUM_WRITTEN)
    loaded = QUICK["loaded"] if quick else NUM_LOADED
    routings = QUICK["routings"] if quick else ROUTINGS
    seq_len = QUICK["seq_len"] if quick else 8
    targets = ("q_proj", "v_proj")
    base = M.load_base("smollm2", quick).eval()
    ids = torch.randint(0, base.config.vocab_size, (loaded, seq_len),
                        generator=torch.Generator().manual_seed(0))
    check_rows = sorted({0, loaded // 3, loaded - 1})
    out: dict[str, Any] = {"rows": loaded, "seq_len": seq_len, "written": written,
                           "loaded": loaded, "routings": list(routings), "methods": {},
                           "as_lora": {}}
    steps: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="qpeft-many-adapters-") as tmp:
        root = Path(tmp)
        for method in methods:
            folders = write_adapters(method, base, targets, root, written)
            model, load_s = load_many(base, folders[:loaded])
            swap_s = hotswap_all(method, model, folders)
            r: dict[str, Any] = {
                "label": M.METHOD_LABELS[method],
                "bytes_per_adapter": statistics.median(_folder_bytes(f) for f in folders),
                "load_ms": _median_ms(load_s), "hotswap_ms": _median_ms(swap_s),
                "hotswap_total_s": sum(swap_s), "max_abs_diff_vs_rows": 0.0,
            }
            outputs = {}
            for distinct in routings:
                routing = _routing(distinct, loaded)
                outputs[distinct] = _mixed(model, ids, routing)
                r["max_abs_diff_vs_rows"] = max(r["max_abs_diff_vs_rows"], _worst_row_difference(
                    model, ids, routing, outputs[distinct], check_rows))
                steps[f"{method}/{distinct}"] = (
                    lambda model=model, routing=routing: _mixed(model, ids, routing))
            out["methods"][method] = r
            if method != "lora" and get_method(method).lora_from_checkpoint is not None:
                exported, export_s = _export_all(folders[:loaded], root / f"{method}-as-lora", base)
                lora, _ = load_many(base, exported)
                e: dict[str, Any] = {
                    "label": f"{r['label']} as LoRA",
                    "export_ms": _median_ms(export_s),
                    "bytes_per_adapter": statistics.median(_folder_bytes(f) for f in exported),
                    "max_abs_diff_vs_qpeft": max(
                        float((_mixed(lora, ids, _routing(d, loaded)) - outputs[d]).abs().max())
                        for d in routings),
                }
                out["as_lora"][method] = e
                for distinct in routings:
                    routing = _routing(distinct, loaded)
                    steps[f"{method}-as-lora/{distinct}"] = (
                        lambda lora=lora, routing=routing: _mixed(lora, ids, routing))
            shutil.rmtree(root / method)  # 1,000 LoRA adapters are ~2 GB
    warmup, repeats = (1, 2) if quick else (1, 5)
    for method, r in [*out["methods"].items(), *((f"{m}-as-lora", e)
                                                  for m, e in out["as_lora"].items())]:
        r["mixed"] = {}
        for distinct in routings:
            key, ref = f"{method}/{distinct}", f"lora/{distinct}"
            # each candidate against LoRA in its own interleaved rounds: the two calls of a
            # round run back to back, so the machine's drift cancels in their ratio
            pair = {"candidate": steps[key]} | ({} if key == ref else {"lora": steps[ref]})
            times = C.round_robin(pair, warmup=warmup, repeats=repeats)
            ratio = C.paired_ratio(times["candidate"], times.get("lora", times["candidate"]))
            r["mixed"][str(distinct)] = {
                **C.summarize(times["candidate"]),
                "rows_per_s": loaded / statistics.median(times["candidate"]),
                "throughput_vs_lora": None if ratio is None else 1 / ratio,
            }
    return out


def run(quick: bool = False, out_dir: Path = C.RESULTS_DIR, methods: tuple[str, ...] = METHODS,
        written: int | None = None) -> dict[str, Any]:
    return C.measure_and_write(
        NAME, lambda quick: bench(quick, methods, written), render, quick, out_dir)


def render(result: dict[str, Any]) -> str:
    routings = result["routings"]
    head = ["method", "bytes / adapter", "load (ms)", "hot-swap (ms)"]
    head += [f"rows/s, {d} adapters" for d in routings]
    head += [f"vs LoRA, {d}" for d in routings] + ["largest difference to row by row"]
    rows = []
    for r in result["methods"].values():
        rows.append([r["label"], int(r["bytes_per_adapter"]), r["load_ms"], r["hotswap_ms"],
                     *(r["mixed"][str(d)]["rows_per_s"] for d in routings),
                     *(r["mixed"][str(d)]["throughput_vs_lora"] for d in routings),
                     f"{r['max_abs_diff_vs_rows']:.1e}"])
    text = (f"SmolLM2 q,v: {result['written']:,} adapters written per method, "
            f"{result['loaded']} loaded in one model, mixed batches of {result['rows']} rows x "
            f"{result['seq_len']} tokens (eval, no grad); throughput relative to peft LoRA r=8 "
            "with the same routing (higher is better).\n\n" + C.md_table(head, rows))
    if result["as_lora"]:
        head = ["exported with `qpeft export-lora`", "bytes / adapter", "export (ms)"]
        head += [f"vs LoRA, {d}" for d in routings] + ["largest difference to qpeft"]
        rows = [[e["label"], int(e["bytes_per_adapter"]), e["export_ms"],
                 *(e["mixed"][str(d)]["throughput_vs_lora"] for d in routings),
                 f"{e['max_abs_diff_vs_qpeft']:.1e}"] for e in result["as_lora"].values()]
        text += "\n\n" + C.md_table(head, rows)
    for note in result.get("notes", []):  # rows re-measured alone since the full run
        text += "\n\n" + note
    return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=C.RESULTS_DIR)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                   help="methods to measure (LoRA, the reference, always runs)")
    p.add_argument("--written", type=int, default=None,
                   help=f"adapters written per method (default {NUM_WRITTEN:,}; >= the 64 loaded)")
    a = p.parse_args(argv)
    if a.written is not None and a.written < (QUICK["loaded"] if a.quick else NUM_LOADED):
        p.error(f"--written must be at least the {NUM_LOADED} adapters loaded (8 with --quick)")
    C.setup_torch()
    print(render(run(quick=a.quick, out_dir=a.out, methods=tuple(a.methods), written=a.written)))


if __name__ == "__main__":
    main()

"""The GPU checks of issue 26 as one short command, sized for a 15-minute device lease.

On a machine with a CUDA GPU (the ``device`` tool's; its ``python3`` holds PyTorch):

    PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_check --out "$OUT"

1. **No host sync in a training step**: ``tests/ecosystem/test_devices.py -k never_syncs`` (a
   step of every method under ``torch.cuda.set_sync_debug_mode("error")``), its pytest summary
   kept.
2. **Step time and memory against LoRA and OFT**: ``benchmarks.scale_cuda`` (7B-shaped decoder
   layers, bf16 base, fp32 adapters; 1 and 8 layers x 128 and 2,048 tokens), ``--repeats``
   rounds.
3. **A SmolLM2-shaped bf16 training step per method under ``torch.profiler``**: the real
   model's widths and depth (30 layers of 576, GQA 9 / 3 heads; random weights: no weights
   travel to the device machine), q_proj / v_proj adapted, batch 8 x 256: GPU kernels per step,
   host-side synchronisations (``cudaDeviceSynchronize``, ``cudaStreamSynchronize``,
   ``cudaMemcpy``-to-host and ``aten::_local_scalar_dense`` calls) and the top kernels by GPU
   time.

Writes ``gpu_check.json`` / ``gpu_check.md`` (and ``scale_cuda.json`` / ``.md``) to ``--out``:
the files to bring back and render into docs/benchmarks.md. Each part is timed and a failing
part is reported, not fatal, so one lease gives every answer it can. ``--quick`` (the tests,
on CPU): a 2-layer model, CPU activity only, parts 1 and 2 skipped without CUDA.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import _common as C
from benchmarks import models as M

NAME = "gpu_check"
METHODS = ("lora", "oft", "quantum_peft", "quic", "qpa")
TARGETS = ("q_proj", "v_proj")
#: host-side calls that wait for the GPU (a device sync each)
SYNC_EVENTS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize")
#: a tensor's value read on the host (``.item()``): a sync when the tensor is on the GPU; AdamW
#: reads its step counters (CPU tensors unless ``capturable``) this way, one per parameter
HOST_READ = "aten::_local_scalar_dense"
TOP = 8


def _reader(event: Any) -> str:
    """Who read a value on the host: the nearest ``aten::`` operator above the read (one that
    reads inside its C++ kernel, e.g. ``aten::linalg_lu_solve``), else ``python .item()``."""
    parent = event.cpu_parent
    while parent is not None and parent.name in ("aten::item", HOST_READ):
        parent = parent.cpu_parent
    return parent.name if parent is not None and parent.name.startswith("aten::") else "python .item()"


def profile_summary(prof: Any, steps: int, on_gpu: bool) -> dict[str, Any]:
    """Per-step counts from a finished ``torch.profiler.profile``: ``kernels`` (GPU kernel
    launches; on CPU the ``aten::`` operator calls instead), ``syncs`` by name
    (:data:`SYNC_EVENTS`, plus device-to-host copies on a GPU), ``host_reads`` (:data:`HOST_READ`
    calls by :func:`_reader`) and the ``top`` operators / kernels by self time (GPU time on a
    GPU)."""
    events = prof.events()
    if on_gpu:
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    else:
        kernels = [e for e in events if e.name.startswith("aten::")]
    syncs: collections.Counter[str] = collections.Counter(
        e.name for e in events if e.name in SYNC_EVENTS)
    if on_gpu:
        syncs["memcpy to host"] = sum(1 for e in events if "DtoH" in e.name)
    averages = prof.key_averages()
    key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    ranked = sorted(averages, key=lambda a: getattr(a, key, 0.0), reverse=True)
    return {"kernels_per_step": len(kernels) / steps,
            "syncs_per_step": {k: v / steps for k, v in syncs.items() if v},
            "host_reads_per_step": {k: v / steps for k, v in collections.Counter(
                _reader(e) for e in events if e.name == HOST_READ).items()},
            "top": [[a.key, round(getattr(a, key, 0.0) / steps, 1)] for a in ranked[:TOP]]}


def profile_methods(device: str, layers: int, tokens: int, batch: int, steps: int,
                    methods: tuple[str, ...] = METHODS) -> dict[str, Any]:
    """Part 3: one warm-up step, then ``steps`` profiled training steps of every method on the
    SmolLM2-shaped model (bf16 base on a GPU, fp32 on CPU), each as :func:`profile_summary`,
    with the ratio of kernels to LoRA's."""
    import peft
    from torch.profiler import ProfilerActivity, profile

    import qpeft  # noqa: F401  (registers the qpeft methods)

    on_gpu = device.startswith("cuda")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    base = M.smollm2_shaped(layers).to(device, dtype)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (batch, tokens), generator=g).to(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    out: dict[str, Any] = {}
    for method in methods:
        try:
            model = peft.get_peft_model(M.clone_sharing(base),
                                        M.method_config(method, TARGETS, "CAUSAL_LM"))
            step = M.make_step(model, {"input_ids": ids, "labels": ids})
            step()
            if on_gpu:
                torch.cuda.synchronize()
            with profile(activities=activities) as prof:
                for _ in range(steps):
                    step()
                if on_gpu:
                    torch.cuda.synchronize()
            out[method] = {"label": M.METHOD_LABELS[method],
                           "trainable_tensors": sum(p.requires_grad for p in model.parameters()),
                           **profile_summary(prof, steps, on_gpu)}
        except Exception as err:  # reported, so one lease still answers for the others
            out[method] = {"label": M.METHOD_LABELS.get(method, method),
                           "error": f"{type(err).__name__}: {err}"}
    lora = out.get("lora", {}).get("kernels_per_step")
    for row in out.values():
        if lora and "kernels_per_step" in row:
            row["kernels_over_lora"] = row["kernels_per_step"] / lora
    return out


def sync_test(root: Path) -> dict[str, Any]:
    """Part 1: the no-sync pytest (its exit status and summary line)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/ecosystem/test_devices.py", "-k", "never_syncs"],
                          cwd=root, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return {"returncode": proc.returncode, "summary": lines[-1] if lines else proc.stderr[-500:],
            "failures": [line for line in lines if line.startswith("FAILED")][:20]}


def _scale_cuda(out: Path, repeats: int) -> dict[str, Any]:
    """Part 2: ``benchmarks.scale_cuda`` at its default shapes, written to ``out``."""
    from benchmarks import scale_cuda

    scale_cuda.run(out_dir=out, repeats=repeats)
    return {"written": str(out / "scale_cuda.json")}


def _timed(part: str, record: dict[str, Any], fn: Any, *args: Any, **kwargs: Any) -> None:
    t0 = time.perf_counter()
    try:
        record[part] = fn(*args, **kwargs)
    except (Exception, SystemExit) as err:  # noqa: BLE001  (every part reports, none stops the check)
        record[part] = {"error": f"{type(err).__name__}: {err}"}
    record.setdefault("seconds", {})[part] = round(time.perf_counter() - t0, 1)
    print(f"[gpu_check] {part}: {record['seconds'][part]} s", file=sys.stderr, flush=True)


def render(result: dict[str, Any]) -> str:
    """The markdown summary: the sync test's line and the profile table."""
    parts = [f"Device: {result.get('device')}; parts' seconds: {result.get('seconds')}."]
    sync = result.get("sync_test")
    if sync:
        parts.append(f"No-sync test: `{sync.get('summary', sync.get('error'))}`")
    prof = result.get("profile", {})
    if "error" in prof:
        parts.append(f"Profile: {prof['error']}")
    elif prof:
        rows = []
        for row in prof.values():
            if "error" in row:
                rows.append([row["label"], "error", row["error"][:80], ""])
                continue
            syncs = ", ".join(f"{k} {v:g}" for k, v in row["syncs_per_step"].items()) or "0"
            reads = ", ".join(f"{k} {v:g}" for k, v in row["host_reads_per_step"].items())
            syncs += f" (host reads: {reads or 0}; trainable tensors {row['trainable_tensors']})"
            top = ", ".join(f"{name} {t:g} µs" for name, t in row["top"][:4])
            rows.append([row["label"], f"{row['kernels_per_step']:.0f} "
                         f"({row.get('kernels_over_lora', float('nan')):.2f}x LoRA)", syncs, top])
        parts.append("SmolLM2-shaped training step (per step):\n\n" + C.md_table(
            ["method", "kernels", "syncs", "top by self time"], rows))
    return "\n\n".join(parts)


def run(out: Path, quick: bool = False, repeats: int = 20, profile_steps: int = 3) -> dict[str, Any]:
    """Every part whose hardware is here; writes ``gpu_check.json`` / ``.md`` to ``out``."""
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    result: dict[str, Any] = {"device": torch.cuda.get_device_name() if on_gpu else "cpu",
                              "torch": torch.__version__}
    if on_gpu:
        _timed("sync_test", result, sync_test, C.REPO_ROOT)
        _timed("scale_cuda", result, _scale_cuda, out, repeats)
    layers, tokens, batch = (2, 16, 2) if quick else (30, 256, 8)
    _timed("profile", result, profile_methods, device, layers, tokens, batch,
           1 if quick else profile_steps)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (out / f"{NAME}.md").write_text(render(result) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=C.RESULTS_DIR)
    p.add_argument("--quick", action="store_true", help="2-layer profile only (CPU smoke test)")
    p.add_argument("--repeats", type=int, default=20, help="scale_cuda's timed rounds")
    p.add_argument("--profile-steps", type=int, default=3)
    a = p.parse_args(argv)
    print(render(run(a.out, a.quick, a.repeats, a.profile_steps)))


if __name__ == "__main__":
    main()

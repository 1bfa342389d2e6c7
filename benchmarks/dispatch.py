"""Benchmark 9: operations dispatched per training step, qpeft methods vs peft LoRA and OFT.

Counted, not timed: every ATen operation that one training step (forward + ``loss.backward()``,
after one warm-up optimizer step that builds every cached table and the optimizer state)
dispatches, seen by a ``TorchDispatchMode``. On a GPU each dispatched operation is a kernel
launch (views and other metadata-only operations launch none; they are counted apart), so
where the arithmetic is small, as in an adapter's, the step's time follows this count. Also
counted: operations that read a value back to the host (``.item()``, ``torch.equal``,
``nonzero``, ...), each a device sync on a GPU. A read made inside an operator's own C++
kernel (``torch.linalg.lu_solve`` on CPU reads values this way) never reaches the Python
dispatch level and is not counted here; ``benchmarks/gpu_check.py``'s profiler summary sees
those too.

Models: LLaMA-shaped (``transformers.LlamaConfig``: hidden 64, 4 heads, 2 KV heads,
intermediate 128; the count does not grow with the width), 8 and 32 decoder layers, all 7
linear layers of each block adapted, batch 2 x 32 tokens; the adapter configurations of
``benchmarks/models.py``. Two paths: the CPU's, and the accelerator's — where qpeft picks
kernels by device (``qpeft.circuits._device``: QuIC's order-2 action and its cost model), the
accelerator's choice, forced on CPU tensors with ``force_accelerator_path()``; peft's methods
have one path.

Also measured, exactly: the activations each method keeps for the backward (bytes of the
distinct storages autograd saves in one training step, the model's own parameters and buffers
left out; ``torch.autograd.graph.saved_tensors_hooks``), on MiniLM- and SmolLM2-shaped models
(their real widths, random weights, query/value adapted) and on one LLaMA-7B-shaped layer with
a bfloat16 base (``benchmarks.scale_cuda``'s GPU configuration), on both paths: the step's
activation memory, where QuIC's target is peft OFT's (and the GPU step memory's, 1.10x LoRA).

Run alone: ``python -m benchmarks.dispatch [--quick]``.
"""

from __future__ import annotations

import argparse
import collections
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import _common as C
from benchmarks import models as M

NAME = "dispatch"
METHODS = ("lora", "oft", "quantum_peft", "quic", "qpa")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LAYERS, QUICK_LAYERS = (8, 32), (2,)
PATHS = ("cpu", "accelerator")
BATCH, SEQ_LEN = 2, 32
#: the issue's target: dispatched operations per step at 32 layers, for every qpeft method
TARGET_RATIO = 1.15
#: operations that read a tensor's value on the host: each one a device sync on an accelerator
SYNCING = frozenset({"_local_scalar_dense", "item", "equal", "is_nonzero", "nonzero",
                     "_linalg_check_errors", "masked_select", "_unique2", "unique_consecutive",
                     "unique_dim"})
TOP = 10
#: operations that launch no kernel though ATen does not mark them as views: ``_unsafe_view``
#: (``reshape`` / ``flatten`` of a tensor whose layout allows it, ``matmul``'s folding) only
#: writes new sizes and strides on fresh metadata
METADATA_ONLY = frozenset({"_unsafe_view"})


class OpCounter(TorchDispatchMode):
    """Counts every ATen operation dispatched inside it, by name (``aten.mm``, ...); ``views``:
    those that launch no kernel — whose result aliases an input, or :data:`METADATA_ONLY`."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.views = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        self.ops[func.overloadpacket.__name__] += 1
        self.views += bool(func.is_view) or func.overloadpacket.__name__ in METADATA_ONLY
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def syncs(self) -> dict[str, int]:
        return {name: n for name, n in self.ops.items() if name in SYNCING}


def llama(layers: int) -> torch.nn.Module:
    """The LLaMA-shaped base (random weights, fixed seed, train mode, no dropout)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2 * SEQ_LEN, attention_dropout=0.0)
    return LlamaForCausalLM(cfg).train()


def count_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> OpCounter:
    """One optimizer step as warm-up, then the counted forward + backward."""
    M.make_step(model, batch)()
    model.zero_grad(set_to_none=True)
    counter = OpCounter()
    with counter:
        model(**batch).loss.backward()
    return counter


def profile_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """``(bytes, kernels)`` of one training step of ``model`` (after a warm-up optimizer step):
    the bytes autograd keeps for the backward — the distinct storages of every saved tensor
    that is not one of the model's parameters or buffers (a frozen weight saved costs no extra
    memory), the shared generation's own graph included (``qpeft.tuners._batched_generation``
    records it under saved-tensor hooks of its own, which an outer hook never sees; here that
    hook counts too) — and the operations that launch a kernel (views and
    :data:`METADATA_ONLY` left out) the forward + backward dispatch. Exact;
    O(one step)."""
    from unittest import mock

    from qpeft.tuners import _batched_generation as shared

    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    M.make_step(model, batch)()
    model.zero_grad(set_to_none=True)
    with OpCounter() as counter:
        with (torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
              mock.patch.object(shared, "_keep", pack)):
            loss = model(**batch).loss
        loss.backward()
    return sum(saved.values()), counter.total - counter.views


def saved_activation_bytes(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """The bytes of :func:`profile_step`."""
    return profile_step(model, batch)[0]


class _MeanSquareLoss(torch.nn.Module):
    """``model(hidden)`` with ``benchmarks.scale``'s loss, mean(out²), as a ``.loss`` (the call
    convention of :func:`profile_step`)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, hidden: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(loss=self.model(hidden).float().pow(2).mean())


def _profile_model(shape: str, quick: bool = False
                   ) -> tuple[torch.nn.Module, dict[str, torch.Tensor], tuple[str, ...], str | None]:
    """``(model, batch, targets, peft task type)`` of a saved-activation profile shape."""
    from transformers import BertConfig, BertForSequenceClassification

    from benchmarks import scale as S

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if shape == "minilm":  # all-MiniLM-L6: 6 layers of 384, batch 16 x 96 (the suite's)
        model = BertForSequenceClassification(BertConfig(
            hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
            num_labels=5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
        ids = torch.randint(0, 1000, (16, 96), generator=g)
        return model.train(), {"input_ids": ids, "labels": ids[:, 0] % 5}, ("query", "value"), "SEQ_CLS"
    if shape == "llama7b-bf16":  # benchmarks.scale_cuda's 1 layer x 128 tokens, on the CPU
        base = S.build_layer(quick).to(torch.bfloat16)
        hidden = torch.randn(1, 128, base.config.hidden_size, generator=g).to(torch.bfloat16)
        return base, {"hidden": hidden}, TARGETS, None
    # SmolLM2-135M's widths, 4 of its 30 layers, a 1,000-token vocabulary, batch 8 x 64
    model = M.smollm2_shaped(4, vocab_size=1000)
    ids = torch.randint(0, 1000, (8, 64), generator=g)
    return model, {"input_ids": ids, "labels": ids}, ("q_proj", "v_proj"), "CAUSAL_LM"


#: saved-activation profiles: MiniLM- and SmolLM2-shaped models in float32; one LLaMA-7B-shaped
#: decoder layer with a bfloat16 base and float32 adapters, as ``benchmarks.scale_cuda`` runs it
#: on a GPU (its step-memory row, seen here as what autograd keeps)
PROFILE_SHAPES = ("minilm", "smollm2", "llama7b-bf16")


def measure_saved(shape: str, path: str = "cpu", methods: tuple[str, ...] = METHODS,
                  quick: bool = False) -> dict[str, Any]:
    """:func:`profile_step` of every method on the ``shape``-shaped model along ``path``, as
    ratios to LoRA and OFT; ``quick``: the 7B-shaped layer at toy widths."""
    import peft

    import qpeft  # noqa: F401  (registers the qpeft methods)

    base, batch, targets, task_type = _profile_model(shape, quick)
    out = {}
    for m in methods:
        with _path(path):
            model = peft.get_peft_model(M.clone_sharing(base), M.method_config(m, targets, task_type))
            out[m] = profile_step(model if task_type else _MeanSquareLoss(model), batch)
    (lora_bytes, lora_kernels), (oft_bytes, _) = out["lora"], out["oft"]
    return {m: {"bytes": b, "over_lora": b / lora_bytes, "over_oft": b / oft_bytes,
                "kernels": k, "kernels_over_lora": k / lora_kernels}
            for m, (b, k) in out.items()}


def _path(path: str) -> Any:
    from contextlib import nullcontext

    from qpeft.circuits._device import force_accelerator_path

    return force_accelerator_path() if path == "accelerator" else nullcontext()


def measure(layers: int, path: str, methods: tuple[str, ...] = METHODS,
            on_model: Callable[[str, torch.nn.Module], None] | None = None) -> dict[str, Any]:
    """Counts of every method on the ``layers``-layer model along ``path``."""
    import peft

    import qpeft  # noqa: F401  (registers the qpeft methods)

    base = llama(layers)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (BATCH, SEQ_LEN), generator=g)
    batch = {"input_ids": ids, "labels": ids}
    out: dict[str, Any] = {}
    for method in methods:
        with _path(path):
            model = peft.get_peft_model(M.clone_sharing(base),
                                        M.method_config(method, TARGETS, "CAUSAL_LM"))
            if on_model is not None:
                on_model(method, model)
            counter = count_step(model, batch)
        out[method] = {"label": M.METHOD_LABELS[method], "ops": counter.total,
                       "views": counter.views, "kernels": counter.total - counter.views,
                       "syncs": counter.syncs, "top": counter.ops.most_common(TOP)}
    for row in out.values():
        for ref in ("lora", "oft"):
            if ref in out:
                row[f"ops_over_{ref}"] = row["ops"] / out[ref]["ops"]
                row[f"kernels_over_{ref}"] = row["kernels"] / out[ref]["kernels"]
    return out


def bench(quick: bool) -> dict[str, Any]:
    layer_counts = QUICK_LAYERS if quick else LAYERS
    runs = {f"{path}/{layers}": measure(layers, path) for path in PATHS for layers in layer_counts}
    out: dict[str, Any] = {"layers": list(layer_counts), "paths": list(PATHS),
                           "targets": list(TARGETS), "batch": BATCH, "seq_len": SEQ_LEN,
                           "runs": runs,
                           "saved": {f"{shape}/{path}": measure_saved(shape, path, quick=quick)
                                     for shape in PROFILE_SHAPES for path in PATHS}}
    if len(layer_counts) > 1:  # operations each further decoder layer adds
        lo, hi = layer_counts[0], layer_counts[-1]
        out["per_layer"] = {
            path: {m: (runs[f"{path}/{hi}"][m]["ops"] - runs[f"{path}/{lo}"][m]["ops"]) / (hi - lo)
                   for m in METHODS}
            for path in PATHS}
    return out


def run(quick: bool = False, out_dir: Path = C.RESULTS_DIR) -> dict[str, Any]:
    return C.measure_and_write(NAME, bench, render, quick, out_dir)


def targets(result: dict[str, Any]) -> list[list[Any]]:
    """Rows (target, measured, verdict) at the largest layer count, for each path."""
    layers = result["layers"][-1]
    rows = []
    for path in result["paths"]:
        block = result["runs"][f"{path}/{layers}"]
        for method in M.QPEFT_METHODS:
            r = block[method]["ops_over_lora"]
            rows.append([f"{layers} layers, {path} path: {M.METHOD_LABELS[method]} dispatched "
                         f"ops per step ≤ {TARGET_RATIO}× LoRA", C.fmt(r), r <= TARGET_RATIO])
            syncs = sum(block[method]["syncs"].values())
            rows.append([f"{layers} layers, {path} path: {M.METHOD_LABELS[method]}: no host "
                         "read-back in a step", str(syncs), syncs == 0])
    for key, saved in result.get("saved", {}).items():
        shape, path = key.split("/")
        r = saved["quic"]["over_oft"]
        rows.append([f"{shape} shape, {path} path: QuIC's activations saved for the backward "
                     "≤ peft OFT's", C.fmt(r), r <= 1.0])
    return rows


def render(result: dict[str, Any]) -> str:
    """One table per path (methods x layer counts), then the most dispatched operations."""
    parts = []
    layer_counts = result["layers"]
    for path in result["paths"]:
        rows = []
        for method in METHODS:
            row: list[Any] = [result["runs"][f"{path}/{layer_counts[0]}"][method]["label"]]
            for layers in layer_counts:
                r = result["runs"][f"{path}/{layers}"][method]
                row += [r["ops"], r["ops_over_lora"], r["ops_over_oft"], r["kernels_over_lora"]]
            if "per_layer" in result:
                row.append(result["per_layer"][path][method])
            syncs = result["runs"][f"{path}/{layer_counts[-1]}"][method]["syncs"]
            row.append(", ".join(f"{k} {v}" for k, v in syncs.items()) or "0")
            rows.append(row)
        header = ["method"]
        for layers in layer_counts:
            header += [f"ops ({layers} layers)", "/ LoRA", "/ OFT", "non-view / LoRA"]
        if "per_layer" in result:
            header.append("ops per extra layer")
        header.append("host read-backs")
        parts.append(f"**{path} path**\n\n" + C.md_table(header, rows))
    layers, path = layer_counts[-1], result["paths"][-1]
    top = result["runs"][f"{path}/{layers}"]
    parts.append(f"Most dispatched operations ({path} path, {layers} layers):\n\n" + C.md_table(
        ["method", "operations (count)"],
        [[top[m]["label"], ", ".join(f"{name} {n}" for name, n in top[m]["top"])]
         for m in METHODS]))
    if "saved" in result:
        parts.append("Activations saved for the backward in one training step (MiB; distinct "
                     "storages, the model's parameters and buffers left out), query/value "
                     "adapted, random weights at the real widths: MiniLM-shaped (6 x 384, batch "
                     "16 x 96), SmolLM2-shaped (4 of its 30 layers of 576, batch 8 x 64), both "
                     "float32; and one LLaMA-7B-shaped decoder layer (4,096 / 11,008) with a "
                     "bfloat16 base and float32 adapters on all 7 linear layers, 128 tokens, as "
                     "`benchmarks.scale_cuda` runs it on a GPU. QuIC forms its order-2 blocks "
                     "on the MiniLM and SmolLM2 widths and applies them as their action on the "
                     "7B layer, on both paths (its kernels differ by path):\n\n"
                     + C.md_table(
                         ["method", *[f"{key.replace('/', ', ')} path: MiB, / LoRA, / OFT"
                                      for key in result["saved"]]],
                         [[M.METHOD_LABELS[m] if m in M.METHOD_LABELS else m,
                           *[f"{v[m]['bytes'] / 2**20:.1f}, {v[m]['over_lora']:.3f}, "
                             f"{v[m]['over_oft']:.3f}" for v in result["saved"].values()]]
                          for m in METHODS]))
        parts.append("Kernels (non-view operations dispatched) in the same steps, and / LoRA — "
                     "on a GPU, where these models' steps are short, each one a launch:\n\n"
                     + C.md_table(
                         ["method", *[f"{key.replace('/', ', ')} path" for key in result["saved"]]],
                         [[M.METHOD_LABELS[m] if m in M.METHOD_LABELS else m,
                           *[f"{v[m]['kernels']:,}, {v[m]['kernels_over_lora']:.2f}"
                             if "kernels" in v[m] else "-" for v in result["saved"].values()]]
                          for m in METHODS]))
    parts.append(f"One step = forward + backward of batch {result['batch']} x "
                 f"{result['seq_len']} after a warm-up optimizer step, on LLaMA-shaped models "
                 "(hidden 64, 4 heads, 2 KV heads, intermediate 128) with "
                 f"{', '.join(result['targets'])} adapted in every layer. Accelerator path: "
                 "the kernels qpeft picks on a GPU (QuIC's order-2 action and cost model), "
                 "forced on CPU tensors (`qpeft.circuits._device.force_accelerator_path`); "
                 "peft's methods have one path. 'non-view' leaves out views and `_unsafe_view` "
                 "(metadata only: no kernel); host "
                 "read-backs: operations that read a value to the host (each a device sync on "
                 "a GPU). Counts are exact and repeat run to run.")
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 layers only (smoke test)")
    p.add_argument("--out", type=Path, default=C.RESULTS_DIR)
    a = p.parse_args(argv)
    print(render(run(quick=a.quick, out_dir=a.out)))


if __name__ == "__main__":
    main()

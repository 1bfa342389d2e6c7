"""Benchmark 7, second part: a LLaMA-70B-shaped decoder layer, the adapters' generation alone.

Shape: ``LlamaConfig(hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
num_key_value_heads=8)``, all 7 linear modules adapted (q 8192→8192, k/v 8192→1024, o 8192→8192,
gate/up 8192→28672, down 28672→8192), each method with the same settings as the 7B table
(:func:`benchmarks.decoder.method_config`). The adapted modules wrap stand-in linears whose weights
take no memory (zero-stride views of one zero): only the adapters exist, and no base matmul runs.

Timed, per method: one forward+backward of what each adapted layer's forward builds from its
trainable parameters, for all 7 modules, then ``sum(out.sum())`` back to the parameters
(:data:`GENERATED` says exactly what, per method; LoRA and VeRA build nothing per step). Methods
are interleaved round-robin with the base layer's own forward+backward at 128 tokens (the real
layer in fp32, frozen, gradient to its input only), so "generation / base" is the median of
per-round ratios. Peak memory: rise of the peak RSS over the RSS before, over two generation
steps in a fresh process per method (stand-in bases: the rise is the generation's own memory).

Run alone (keeps the 7B tables of ``scale.json``): ``python -m benchmarks.scale --only-70b``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks import _common as C
from benchmarks import models as M

KEY = "generation_70b"
TOKENS = 128
QUICK_TOKENS = 16
ADAPTER = "default"
#: per method: what one generation step builds (None: the forward uses the parameters directly)
GENERATED: dict[str, str | None] = {
    "lora": None,
    "vera": None,
    "oft": "the rotation blocks R = Cayley–Neumann(skew(θ)) of every module, as its forward "
           "builds them (OFTRotationModule._cayley_batch)",
    "fourierft": "the dense ΔW = ifft2(spectrum) of every module, as its forward builds it "
                 "(get_delta_weight)",
    "quantum_peft": "U [d_out, K], V [d_in, K] (Stiefel circuits) and λ_eff [K] of every module "
                    "(stiefel_factors + effective_lambda)",
    "quic": "per module and order, the blocks' operators as the forward at this token count "
            "uses them: base matrices A = Cayley(skew(θ)) (forward_matrices), and C_k(A) formed "
            "for the orders where the cost model picks the explicit form",
    "qpa": "lora_B [d_out, r], lora_A [r, d_in] of every module from the shared generator, one "
           "QPAGenerator.factors(index) call per module as each layer's forward does (with the "
           "offset start, the default, each with the start's kept r columns appended: rank 2r)",
}
NOT_GENERATED = "nothing: its forward uses the trainable tensors directly"
#: methods whose generation materialises a dense d_out x d_in matrix per module
DENSE = ("fourierft",)
MAX_DENSE_GIB = 1.0
#: free memory the base layer's timing leaves besides its weights (GiB)
BASE_MARGIN_GIB = 4.0
GIB = 1024**3


def layer_config(quick: bool) -> Any:
    """The 70B shape (quick: 64 / 160, 4 heads, 2 KV heads: the same grouped-query layout)."""
    from benchmarks.decoder import llama_config

    return llama_config(64, 160, 4, 2) if quick else llama_config(8192, 28672, 64, 8)


def linear_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """``{module name: (out, in)}`` of the 7 linears of a LlamaDecoderLayer with ``config``."""
    h, i = config.hidden_size, config.intermediate_size
    head = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head, config.num_key_value_heads * head
    return {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h),
            "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, q),
            "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}


class StandInLinears(nn.Module):
    """The 7 linear modules of a decoder layer, named as in ``LlamaDecoderLayer``, whose weights
    are zero-stride views of one zero: O(1) memory whatever the shape. The adapters are built on
    them; the generation never reads the base weight."""

    def __init__(self, shapes: dict[str, tuple[int, int]]) -> None:
        super().__init__()
        self.self_attn, self.mlp = nn.Module(), nn.Module()
        for name, (d_out, d_in) in shapes.items():
            parent, leaf = name.split(".")
            linear = nn.Linear(d_in, d_out, bias=False, device="meta")
            linear.weight = nn.Parameter(torch.zeros(()).expand(d_out, d_in), requires_grad=False)
            setattr(getattr(self, parent), leaf, linear)


def dense_gib(shapes: dict[str, tuple[int, int]]) -> float:
    """Size of a dense fp32 d_out x d_in matrix per module, summed (GiB)."""
    return 4 * sum(o * i for o, i in shapes.values()) / GIB


def wrap(method: str, shapes: dict[str, tuple[int, int]]) -> nn.Module:
    import peft

    import qpeft  # noqa: F401  (registers the qpeft methods)
    from benchmarks.decoder import method_config

    return peft.get_peft_model(StandInLinears(shapes), method_config(method))


def _layers(model: nn.Module, cls: type) -> list[Any]:
    return [m for m in model.modules() if isinstance(m, cls)]


def _quic_vectors(layer: Any, ops: list[Any], tokens: int) -> int:
    """How many vectors the QuIC forward at ``tokens`` rotates with gradient: the tokens, or W's
    other side when rotating the weight is counted cheaper (``_forward_rotated_weight``)."""
    from qpeft.circuits.compound_rotation import rotation_costs

    plan, side = layer.quic_plan[ADAPTER], layer.quic_settings[ADAPTER].side
    other = layer.in_features if side == "output" else layer.out_features
    costs = rotation_costs(ops, plan, tokens, other, needs_grad=True)
    return other if costs["weight"] < costs["activations"] else tokens


def _uses_action(op: Any, vectors: int, n_blocks: int) -> bool:
    """block_rotate's rule: a compound is applied as its action when counted cheaper."""
    from qpeft.circuits.compound_rotation import CompoundOperator, order_costs

    if not isinstance(op, CompoundOperator):
        return False
    costs = order_costs(op, vectors, n_blocks)
    return costs.get("action", math.inf) < costs["explicit"]


def _quic_operators(layer: Any, tokens: int) -> list[torch.Tensor]:
    """The layer's per-order operators as its forward at ``tokens`` uses them (one adapter on
    an ``nn.Linear``): base matrices A for orders applied as the action, the explicit C_k(A)
    otherwise (A itself for k = 1)."""
    from qpeft.circuits.compound_rotation import as_matrix

    ops = layer.forward_matrices(ADAPTER)
    vectors = _quic_vectors(layer, ops, tokens)
    n_blocks = layer.quic_plan[ADAPTER].num_blocks
    return [op.base if _uses_action(op, vectors, n_blocks) else as_matrix(op) for op in ops]


def quic_forms(model: nn.Module, tokens: int) -> list[str]:
    """Per rotated size d, how the QuIC forward at ``tokens`` uses each order: C1 is A itself;
    a higher order is ``explicit`` (C_k(A) formed) or ``action`` (applied from A); ``weight
    path`` when it rotates W instead of the tokens."""
    from qpeft.tuners.quic.layer import QuICLayer

    forms = []
    for layer in _layers(model, QuICLayer):
        plan = layer.quic_plan[ADAPTER]
        with torch.no_grad():
            ops = layer.forward_matrices(ADAPTER)
        vectors = _quic_vectors(layer, ops, tokens)
        parts = ["weight path"] if vectors != tokens else []
        for k, op in zip(plan.orders, ops, strict=True):
            form = "= A" if k == 1 else (
                "action" if _uses_action(op, vectors, plan.num_blocks) else "explicit")
            parts.append(f"C{k} {form}")
        text = f"d={plan.d} ({plan.num_blocks} blocks, n={plan.n}): {', '.join(parts)}"
        if text not in forms:
            forms.append(text)
    return forms


def generation(method: str, model: nn.Module, tokens: int) -> Callable[[], list[torch.Tensor]] | None:
    """A closure returning what ``method``'s adapted layers build from their trainable
    parameters in one forward (see :data:`GENERATED`); None when nothing is built."""
    if GENERATED.get(method, "") is None:
        return None
    if method == "quantum_peft":
        from qpeft.tuners.quantum_peft.layer import QuantumPEFTLayer

        layers = _layers(model, QuantumPEFTLayer)
        return lambda: [t for layer in layers for t in
                        (*layer.stiefel_factors(ADAPTER), layer.effective_lambda(ADAPTER))]
    if method == "quic":
        from qpeft.tuners.quic.layer import QuICLayer

        layers = _layers(model, QuICLayer)
        return lambda: [t for layer in layers for t in _quic_operators(layer, tokens)]
    if method == "qpa":
        from qpeft.tuners.qpa.layer import QPALayer

        layers = _layers(model, QPALayer)
        gen = model.base_model.generator(ADAPTER)
        return lambda: [t for layer in layers for t in gen.factors(layer.qpa_index[ADAPTER])]
    if method == "oft":
        from peft.tuners.oft.layer import OFTLayer

        rots = [layer.oft_R[ADAPTER] for layer in _layers(model, OFTLayer)]
        return lambda: [r._cayley_batch(r.weight, r.block_size, r.use_cayley_neumann,
                                        r.num_cayley_neumann_terms) for r in rots]
    if method == "fourierft":
        from peft.tuners.fourierft.layer import FourierFTLayer

        layers = _layers(model, FourierFTLayer)
        return lambda: [layer.get_delta_weight(ADAPTER) for layer in layers]
    raise ValueError(f"no generation known for method {method!r}; one of {sorted(GENERATED)}")


def generation_step(model: nn.Module, fn: Callable[[], list[torch.Tensor]]) -> Callable[[], None]:
    """One forward+backward of the generation: build, ``sum(out.sum())``, backward to the
    trainable parameters (their gradients reset first)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        for p in params:
            p.grad = None
        sum(t.sum() for t in fn()).backward()

    return step


def skip_reason(method: str, shapes: dict[str, tuple[int, int]], max_dense_gib: float) -> str | None:
    """Why ``method`` is not built here (its dense ΔW over the allowed memory), or None."""
    gib = dense_gib(shapes)
    if method in DENSE and gib > max_dense_gib:
        return (f"not run: its forward builds a dense ΔW per module, {gib:.2f} GiB fp32 for the "
                f"7 modules before ifft2's complex intermediates (and peft's init draws a "
                f"randperm of d_out·d_in int64 per module); over --max-dense-gib {max_dense_gib}")
    return None


def _mem_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / GIB
    return 0.0


def base_step(quick: bool, tokens: int) -> tuple[Callable[[], None] | None, dict[str, Any]]:
    """The real layer's forward+backward at ``tokens`` (fp32, frozen weights, gradient to the
    input only), or None with the reason when its weights do not fit with the margin."""
    from benchmarks.decoder import DecoderLayers

    config = layer_config(quick)
    weights_gib = dense_gib(linear_shapes(config))
    free = _mem_available_gib()
    info: dict[str, Any] = {"weights_gib": round(weights_gib, 2), "dtype": "float32",
                            "mem_available_gib": round(free, 1)}
    if weights_gib + BASE_MARGIN_GIB > free:
        info["skipped"] = (f"not run: the 7 linears' fp32 weights are {weights_gib:.2f} GiB and "
                           f"{free:.1f} GiB is available (needs {BASE_MARGIN_GIB:.0f} GiB more)")
        return None, info
    torch.manual_seed(0)
    layer = DecoderLayers(config).requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, tokens, config.hidden_size, generator=g).requires_grad_(True)

    def step() -> None:
        hidden.grad = None
        layer(hidden).pow(2).mean().backward()

    return step, info


def measure(quick: bool, methods: tuple[str, ...], memory: bool = True,
            max_dense_gib: float = MAX_DENSE_GIB, base: bool = True) -> dict[str, Any]:
    """Time every method's generation against the base layer; counts and (optionally) memory."""
    machine = C.machine_facts()  # its load average: at the start
    config = layer_config(quick)
    shapes = linear_shapes(config)
    tokens = QUICK_TOKENS if quick else TOKENS
    rows: dict[str, Any] = {}
    steps: dict[str, Callable[[], None]] = {}
    for method in methods:
        row: dict[str, Any] = {"generated": GENERATED.get(method) or NOT_GENERATED}
        rows[method] = row
        reason = skip_reason(method, shapes, max_dense_gib)
        if reason:
            row["skipped"] = reason
            continue
        try:
            model = wrap(method, shapes)
            row["trainable"] = M.trainable_count(model)
            fn = generation(method, model, tokens)
            if fn is None:
                continue
            row["numbers_generated"] = sum(t.numel() for t in fn())
            if method == "quic":
                row["forms"] = quic_forms(model, tokens)
            steps[method] = generation_step(model, fn)
        except Exception as err:  # a method that cannot be built is reported, not fatal
            row["error"] = f"{type(err).__name__}: {err}"
    base_info: dict[str, Any] = {}
    if base:
        step, base_info = base_step(quick, tokens)
        if step is not None:
            steps["base"] = step
    warmup, repeats = (1, 2) if quick else (1, 5)
    times = C.round_robin(steps, warmup, repeats) if steps else {}
    if "base" in times:
        base_info.update(C.summarize(times["base"]))
    for method, ts in times.items():
        if method == "base":
            continue
        rows[method].update(C.summarize(ts))
        rows[method]["base_paired_ratio"] = C.paired_ratio(ts, times.get("base", []))
    if memory:
        for method in steps:
            if method != "base":
                rows[method]["memory"] = C.run_memory_worker(
                    "benchmarks.scale_generation", [method] + (["--quick"] if quick else []),
                    timeout=1800)
    return {"layer": {"hidden_size": config.hidden_size,
                      "intermediate_size": config.intermediate_size,
                      "num_attention_heads": config.num_attention_heads,
                      "num_key_value_heads": config.num_key_value_heads,
                      "shapes": {k: list(v) for k, v in shapes.items()}},
            "tokens": tokens, "base": base_info, "methods": rows, "machine": machine,
            "load_average_1min_end": round(os.getloadavg()[0], 1)}


def memory_worker(method: str, quick: bool, steps: int = 2) -> dict[str, Any]:
    """In a fresh process: wrap the stand-ins, then peak RSS over ``steps`` generation steps."""
    C.setup_torch()
    model = wrap(method, linear_shapes(layer_config(quick)))
    fn = generation(method, model, QUICK_TOKENS if quick else TOKENS)
    if fn is None:
        raise ValueError(f"{method} generates nothing per step")
    return C.peak_rss_of_steps(generation_step(model, fn), steps)


def render(section: dict[str, Any], labels: dict[str, str]) -> str:
    """The 70B table, the base layer's line and what each method's generation is."""
    lay, base = section["layer"], section["base"]
    shapes = ", ".join(f"{k.split('.')[1]} {i}→{o}" for k, (o, i) in lay["shapes"].items())
    head = (f"**70B-shaped layer, generation alone** — hidden {lay['hidden_size']}, intermediate "
            f"{lay['intermediate_size']}, {lay['num_attention_heads']} heads, "
            f"{lay['num_key_value_heads']} KV heads ({shapes}); fp32; "
            f"{section['machine']['torch_threads']} threads; {section['machine']['date']}; "
            f"load average {section['machine']['load_average_1min']} at start, "
            f"{section.get('load_average_1min_end', '-')} at end. Run alone: "
            f"`python -m benchmarks.scale --only-70b` (`make bench` runs it after the 7B "
            f"tables).")
    if "median_s" in base:
        head += (f" Base layer forward+backward at {section['tokens']} tokens (fp32 weights "
                 f"{base['weights_gib']} GiB, frozen, gradient to the input only): median "
                 f"{C.fmt(base['median_s'])} s over {base['n']} rounds.")
    elif "skipped" in base:
        head += f" Base layer: {base['skipped']}."
    rows = []
    for method, row in section["methods"].items():
        label = labels.get(method, method)
        if "skipped" in row or "error" in row:
            rows.append([label, row.get("trainable", "-"), row.get("skipped") or
                         "error: " + row["error"][:120]] + ["-"] * 4)
            continue
        mem = row.get("memory", {})
        ms = row.get("median_s")
        rows.append([label, row["trainable"],
                     row.get("numbers_generated", "nothing generated"),
                     None if ms is None else ms * 1e3, row.get("base_paired_ratio"),
                     mem.get("step_mem_mib") if "error" not in mem
                     else "error: " + mem["error"][:80],
                     "; ".join(row.get("forms", [])) or "-"])
    table = C.md_table(["method", "trainable", "numbers generated", "generation fwd+bwd (ms)",
                        f"generation / base layer fwd+bwd ({section['tokens']} tokens)",
                        "generation peak RSS rise (MiB)", "QuIC forms"], rows)
    what = "\n".join(f"- {labels.get(m, m)}: {row['generated']}"
                     for m, row in section["methods"].items())
    return "\n\n".join([head, table, "What is timed, per method:\n\n" + what])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale_generation",
                                description="memory worker of the 70B generation section "
                                            "(run the section with python -m benchmarks.scale "
                                            "--only-70b)")
    p.add_argument("--memory-worker", metavar="METHOD", required=True)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    print(json.dumps(memory_worker(a.memory_worker, a.quick)))


if __name__ == "__main__":
    main()

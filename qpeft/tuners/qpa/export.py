"""QPA out of qpeft: as a plain peft LoRA checkpoint, and as its circuit.

LoRA (``qpeft export-lora``): the generator runs once; its factors become ``lora_A`` /
``lora_B`` tensors with ``lora_alpha / r`` equal to QPA's scaling, so ``delta_W`` is identical.
With the offset start (``init_gain`` nonzero) the factors are rank 2r, ``[g B, -g0 B0]`` and
``[A; A0]``, so the exported LoRA has ``r = 2 r_QPA`` and ``lora_alpha = 2 alpha_QPA``.
Needs only the adapter folder (the layer layout is recorded in ``adapter_config.json`` at
injection), not the base model; stock peft loads the result without qpeft.

Circuit (``qpeft export-circuits``): the one model-wide QNN (RY + CNOT ladder, trained angles)
with its measurement.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qpeft.circuits.builders import qnn_circuit
from qpeft.tuners._export import (
    CircuitRecord,
    SkipRecord,
    check_width,
    config_from_dict,
    read_adapter_dir,
    write_stock_adapter,
)
from qpeft.tuners.qpa.config import QPAConfig, build_generator
from qpeft.tuners.qpa.generator import QPAGenerator

__all__ = ["circuits_from_checkpoint", "circuits_from_model", "export_lora",
           "generator_from_checkpoint", "lora_from_checkpoint", "lora_tensors"]

_GEN_KEY = ".qpa_generator."


def lora_tensors(generator: QPAGenerator, layout: Sequence[Sequence[Any]]) -> dict[str, torch.Tensor]:
    """Detached fp32 LoRA tensors for every layer of ``layout`` ([name, kind, d_out, d_in,
    weight_shape] rows), keyed like a saved peft LoRA checkpoint. One generation, O(m)."""
    if len(layout) != len(generator.shapes):
        raise ValueError(
            f"layout lists {len(layout)} layers but the generator was built for "
            f"{len(generator.shapes)}"
        )
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        factors = generator.all_factors()
        for (name, kind, d_out, _d_in, weight_shape), (lora_b, lora_a) in zip(
            layout, factors, strict=True
        ):
            lora_b = lora_b.detach().float().cpu().contiguous()
            lora_a = lora_a.detach().float().cpu().contiguous()
            if kind == "conv2d":
                r = lora_a.shape[0]
                lora_a = lora_a.reshape(r, *weight_shape[1:]).contiguous()
                lora_b = lora_b.reshape(d_out, r, 1, 1).contiguous()
            out[f"base_model.model.{name}.lora_A.weight"] = lora_a
            out[f"base_model.model.{name}.lora_B.weight"] = lora_b
    return out


def generator_from_checkpoint(
    config: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> tuple[QPAConfig, QPAGenerator]:
    """``(config, generator)`` rebuilt from a saved QPA adapter's config dict and tensors, in
    the dtype it was trained in. ValueError when the tensors do not fit the config."""
    qpa_config = config_from_dict(QPAConfig, config)
    shapes = [(int(o), int(i)) for _, _, o, i, _ in qpa_config.layout]
    generator = build_generator(qpa_config, shapes)
    known = set(generator.state_dict())
    state = {}
    for key, value in tensors.items():
        if _GEN_KEY not in key:
            continue
        rest = key.split(_GEN_KEY, 1)[1]
        # peft strips the adapter name only where it is the second-to-last key component
        # ("qpa_generator.theta" but "qpa_generator.default.mlp.0.weight"): accept both forms
        if rest not in known and rest.partition(".")[2] in known:
            rest = rest.partition(".")[2]
        state[rest] = value
    # the training dtype (float32 unless the base was float64): the same numbers the model used
    generator.to(state["theta"].dtype if "theta" in state else torch.float32)
    missing, unexpected = generator.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"the checkpoint's generator tensors do not match its config: missing {missing}, "
            f"unexpected {unexpected}"
        )
    return qpa_config, generator


def lora_from_checkpoint(config: dict[str, Any], tensors: dict[str, torch.Tensor],
                         base_tree: Callable[[], nn.Module | None] | None = None,
                         ) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(LoraConfig, tensors)``: the saved QPA adapter as the plain LoRA adapter it is. The
    generator runs once in its saved dtype; ``lora_alpha / r`` equals QPA's scaling, so
    ``delta_W`` is identical (rank 2r with the offset start); ``modules_to_save`` copies are carried over as they are. Needs the
    folder only (the layer layout is recorded at injection). O(generation + m)."""
    from peft import LoraConfig

    if not config.get("layout"):
        raise ValueError(
            "the QPA adapter's config has no 'layout' (saved by an older qpeft?); load it with "
            "PeftModel.from_pretrained and call merge_and_unload instead")
    qpa_config, generator = generator_from_checkpoint(config, tensors)
    lora = lora_tensors(generator, qpa_config.layout)
    kinds = {row[1] for row in qpa_config.layout}
    # the offset start doubles the factors' rank: alpha doubles with it, the scaling is kept
    rank_factor = 2 if generator.has_start else 1
    lora_config = LoraConfig(
        r=rank_factor * qpa_config.r,
        lora_alpha=rank_factor * qpa_config.effective_alpha,
        lora_dropout=float(qpa_config.lora_dropout),
        target_modules=[row[0] for row in qpa_config.layout],
        fan_in_fan_out=kinds == {"conv1d"},
        modules_to_save=qpa_config.modules_to_save,
        base_model_name_or_path=config.get("base_model_name_or_path"),
        task_type=config.get("task_type"),
        inference_mode=True,
    )
    for key, value in tensors.items():  # modules_to_save copies (a classifier head)
        if _GEN_KEY not in key:
            lora[key] = value
    return lora_config, lora


def export_lora(
    adapter_dir: str | Path, out_dir: str | Path, base_model: str | None = None
) -> Path:
    """Write the QPA adapter in ``adapter_dir`` as a plain peft LoRA adapter in ``out_dir``
    (float32; ``qpeft export-lora`` offers other dtypes). ``base_model``: name or path recorded
    as ``base_model_name_or_path`` (default: the QPA adapter's). Returns ``out_dir``.
    ValueError for a missing folder or a non-QPA adapter."""
    config, tensors = read_adapter_dir(adapter_dir)
    if config.get("peft_type") != "QPA":
        raise ValueError(
            f"adapter_dir {str(adapter_dir)!r} holds a {config.get('peft_type')!r} adapter, not "
            "a QPA one (peft_type must be 'QPA')")
    lora_config, lora = lora_from_checkpoint(config, tensors)
    if base_model:
        lora_config.base_model_name_or_path = base_model
    return write_stock_adapter(out_dir, lora_config, lora)


def _qnn_records(theta: torch.Tensor, n_chunks: int, max_qubits: int,
                 module: str = "qpa_generator") -> list[CircuitRecord | SkipRecord]:
    """The model-wide QPA circuit: theta [L, N] -> RY/CNOT-ladder QNN plus measurement. O(L N)."""
    circuit = qnn_circuit(theta, f"{module}.qnn", measure=True)
    check_width(circuit, module, "qnn", max_qubits)
    n = circuit.num_qubits
    info = {
        "n_qubits": n, "depth_L": int(theta.shape[0]), "n_chunks_used": int(n_chunks),
        "reads_as": "measurement probabilities p_i, i = 0..2**N-1 (little-endian), of which the "
        f"first {n_chunks} feed the generator MLP",
        "shots_note": "estimating every p_i to a relative error eps needs about 2**N / eps**2 "
        "shots (p_i is about 2**-N)",
    }
    return [CircuitRecord(circuit, module, "qnn", "qpa", info)]


def circuits_from_model(model: nn.Module, adapter_name: str,
                        max_qubits: int) -> list[CircuitRecord | SkipRecord]:
    """The QNN of adapter ``adapter_name`` of a loaded peft model."""
    tuner = model.base_model if hasattr(model, "base_model") else model
    generator = tuner.generator(adapter_name)
    return _qnn_records(generator.theta, generator.n_chunks, max_qubits)


def circuits_from_checkpoint(config: dict[str, Any], tensors: dict[str, torch.Tensor],
                             base_tree: Callable[[], nn.Module | None],
                             max_qubits: int) -> list[CircuitRecord | SkipRecord]:
    """The QNN read from a saved adapter (the folder alone)."""
    _, generator = generator_from_checkpoint(config, tensors)
    return _qnn_records(generator.theta, generator.n_chunks, max_qubits)

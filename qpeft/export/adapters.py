"""Which circuits generate a trained adapter: per adapted module, the circuits with their angles.

Two entry points produce the same records: :func:`circuits_from_model` (an in-memory peft model)
and :func:`circuits_from_checkpoint` (an adapter folder written by ``save_pretrained``). Each
method says how its adapter reads as circuits in its own folder (the ``circuits_from_model`` /
``circuits_from_checkpoint`` hooks of its :class:`~qpeft.tuners.registry.MethodSpec`); this
module finds the method, checks the arguments and orders the records.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qpeft.tuners._export import (
    DEFAULT_MAX_QUBITS,
    CircuitRecord,
    SkipRecord,
    read_adapter_config,
    read_adapter_dir,
)
from qpeft.tuners.registry import MethodSpec, method_for_config, methods

__all__ = [
    "DEFAULT_MAX_QUBITS",
    "CircuitRecord",
    "SkipRecord",
    "circuit_peft_types",
    "circuits_from_model",
    "circuits_from_checkpoint",
]


def circuit_peft_types() -> tuple[str, ...]:
    """``peft_type`` values of the registered methods that have a circuit form."""
    return tuple(s.peft_type for s in methods() if s.circuits_from_model is not None)


def _check_max_qubits(max_qubits: int) -> None:
    if isinstance(max_qubits, bool) or not isinstance(max_qubits, int) or max_qubits < 1:
        raise ValueError(f"max_qubits must be an integer >= 1, got {max_qubits!r}")


def _circuit_method(config: Any, where: str) -> MethodSpec:
    spec = method_for_config(config)
    if spec is None or spec.circuits_from_model is None:
        pt = config.get("peft_type") if isinstance(config, Mapping) else getattr(
            config, "peft_type", None)
        peft_type = str(getattr(pt, "value", pt))
        labels = ", ".join(s.label for s in methods() if s.circuits_from_model is not None)
        raise ValueError(
            f"{where} holds a {peft_type!r} adapter, which has no circuit form; export-circuits "
            f"supports peft_type in {circuit_peft_types()} ({labels})"
        )
    return spec


def circuits_from_model(
    model: Any, adapter_name: str = "default", max_qubits: int = DEFAULT_MAX_QUBITS
) -> tuple[str, list[CircuitRecord], list[SkipRecord]]:
    """``(peft_type, circuits, skipped)`` for adapter ``adapter_name`` of a peft model.

    ValueError for an adapter without a circuit form (e.g. LoRA), an unknown adapter name, or a
    circuit wider than ``max_qubits``.  O(total gates)."""
    _check_max_qubits(max_qubits)
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, Mapping) or adapter_name not in configs:
        known = sorted(configs) if isinstance(configs, Mapping) else []
        raise ValueError(f"adapter_name {adapter_name!r} is not an adapter of this model: {known}")
    spec = _circuit_method(configs[adapter_name], f"adapter {adapter_name!r}")
    return _split(spec.peft_type, spec.circuits_from_model(model, adapter_name, max_qubits))


def _natural(record: CircuitRecord | SkipRecord) -> tuple:
    """Sort key: module then role, numbers compared as numbers (layer.2 before layer.10)."""
    parts = re.split(r"(\d+)", f"{record.module}\0{record.role}")
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


def _split(peft_type: str, records: list) -> tuple[str, list[CircuitRecord], list[SkipRecord]]:
    """Circuits and skipped parts, each in natural module order (the same from a model and
    from its checkpoint)."""
    circuits = sorted((r for r in records if isinstance(r, CircuitRecord)), key=_natural)
    skipped = sorted((r for r in records if isinstance(r, SkipRecord)), key=_natural)
    return peft_type, circuits, skipped


_TASK_AUTO = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}


def _meta_shapes(config: dict[str, Any], base_model: Any) -> Any:
    """A module tree to read layer shapes from: ``base_model`` (an nn.Module, or a path / hub
    name) or the adapter's ``base_model_name_or_path``, built on the meta device; None when
    there is none or it cannot be read."""
    from torch import nn

    if isinstance(base_model, nn.Module):
        return base_model
    source = base_model or config.get("base_model_name_or_path")
    if not source:
        return None
    import transformers

    from qpeft.tuners.counting import model_from_config

    auto = getattr(transformers, _TASK_AUTO.get(str(config.get("task_type")), "AutoModel"))
    path = Path(str(source))
    try:
        if path.is_dir() or path.is_file():
            return model_from_config(path, auto)
        cfg = transformers.AutoConfig.from_pretrained(str(source))
        return model_from_config(cfg, auto)
    except (OSError, ValueError, KeyError, ImportError, RuntimeError):
        return None  # not a readable transformers model: the method infers sizes if it can


def circuits_from_checkpoint(
    adapter_dir: str | Path, base_model: Any = None, max_qubits: int = DEFAULT_MAX_QUBITS
) -> tuple[str, list[CircuitRecord], list[SkipRecord]]:
    """``(peft_type, circuits, skipped)`` read from a saved adapter folder, without loading the
    base model's weights.

    Methods that need each layer's ``(d_out, d_in)`` (Quantum-PEFT) read them from ``base_model``
    (an nn.Module, a local folder or a hub name) or the adapter's ``base_model_name_or_path``
    instantiated on the meta device, built only when asked for."""
    _check_max_qubits(max_qubits)
    spec = _circuit_method(read_adapter_config(adapter_dir), f"adapter_dir {str(adapter_dir)!r}")
    config, tensors = read_adapter_dir(adapter_dir)
    records = spec.circuits_from_checkpoint(
        config, tensors, lambda: _meta_shapes(config, base_model), max_qubits)
    return _split(spec.peft_type, records)

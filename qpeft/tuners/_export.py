"""What the methods' export hooks share: reading a saved adapter folder, and the records of
exported circuits (``qpeft export-circuits``; written to files by :mod:`qpeft.export`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qpeft.circuits.ir import Circuit

#: circuits wider than this raise ValueError unless the caller raises the limit
DEFAULT_MAX_QUBITS = 32
_PREFIX = "base_model.model."


@dataclass
class CircuitRecord:
    """One exported circuit: the ``module`` it generates, its ``role`` there ("U", "V",
    "block3", "blocks", "qnn"), the ``method`` (registry key) and construction details in
    ``info`` (JSON-able)."""

    circuit: Circuit
    module: str
    role: str
    method: str
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class SkipRecord:
    """A part of an adapter with no circuit form, and why."""

    module: str
    role: str
    reason: str


def check_width(circuit: Circuit, module: str, role: str, max_qubits: int) -> None:
    """ValueError naming the module when ``circuit`` is wider than ``max_qubits``."""
    if circuit.num_qubits > max_qubits:
        raise ValueError(
            f"module {module!r} ({role}) needs a circuit of {circuit.num_qubits} qubits, more than "
            f"max_qubits={max_qubits}; raise max_qubits (--max-qubits) to export it anyway, or "
            "leave the module out"
        )


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    """``adapter_config.json`` of a folder written by ``save_pretrained``, as a dict;
    ValueError naming the folder when it or the file is missing."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise ValueError(f"adapter_dir {str(adapter_dir)!r} is not a directory")
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise ValueError(f"adapter_dir {str(adapter_dir)!r} has no adapter_config.json")
    return json.loads(config_file.read_text())


def read_adapter_dir(adapter_dir: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(adapter_config.json as a dict, {key: tensor})`` of a folder written by
    ``save_pretrained``; ValueError naming the folder when it or either file is missing."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    weights = adapter_dir / "adapter_model.safetensors"
    if weights.is_file():
        return config, load_file(str(weights))
    if (adapter_dir / "adapter_model.bin").is_file():
        return config, torch.load(adapter_dir / "adapter_model.bin", weights_only=True)
    raise ValueError(f"adapter_dir {str(adapter_dir)!r} has no adapter_model.safetensors")


def tensors_by_module(tensors: Mapping[str, torch.Tensor], suffix: str) -> dict[str, torch.Tensor]:
    """``{module name: tensor}`` for keys ``base_model.model.<module>.<suffix>[.<adapter>]``."""
    out = {}
    for key, value in tensors.items():
        body = key.removeprefix(_PREFIX)
        head, sep, tail = body.rpartition(f".{suffix}")
        if sep and (tail == "" or tail.count(".") == 1):
            out[head] = value
    return out


def config_from_dict(cls: type, config: Mapping[str, Any]) -> Any:
    """``cls`` built from a saved config dict as peft builds it on load: keys the class does
    not know are dropped, and the class's ``check_kwargs`` fills what older versions did not
    save (a Quantum-PEFT / QPA config saved before ``lr_scale`` keeps the paper's scale)."""
    known = set(cls.__dataclass_fields__)
    kwargs = {k: v for k, v in config.items() if k in known and k != "peft_type"}
    return cls(**cls.check_kwargs(**kwargs))


#: the dtypes a LoRA export can be written in
LORA_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def write_lora_adapter(out_dir: str | Path, lora_config: Any, tensors: dict[str, torch.Tensor],
                       dtype: str = "float32") -> Path:
    """Write a peft LoRA adapter folder: ``adapter_config.json`` and
    ``adapter_model.safetensors`` with ``lora_A`` / ``lora_B`` in ``dtype`` (other tensors,
    e.g. ``modules_to_save`` copies, as they are). Returns ``out_dir``."""
    from safetensors.torch import save_file

    if dtype not in LORA_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(LORA_DTYPES)}, got {dtype!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cast = {k: (v.to(LORA_DTYPES[dtype]) if ".lora_" in k else v).contiguous()
            for k, v in tensors.items()}
    lora_config.save_pretrained(str(out))
    save_file(cast, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out

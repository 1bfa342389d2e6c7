"""What the methods' export hooks share: reading a saved adapter folder, and the records of
exported circuits (``qpeft export-circuits``; written to files by :mod:`qpeft.export`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

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


#: the dtypes an export to a stock peft method can write its adapter tensors in
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def write_stock_adapter(out_dir: str | Path, peft_config: Any, tensors: dict[str, torch.Tensor],
                        dtype: str = "float32", adapter_key: str = ".lora_") -> Path:
    """Write a stock peft adapter folder: ``adapter_config.json`` and
    ``adapter_model.safetensors``, the adapter's tensors (keys holding ``adapter_key``, e.g.
    ``.lora_`` or ``.oft_R.``) in ``dtype``, other tensors (``modules_to_save`` copies) as they
    are. Returns ``out_dir``."""
    from safetensors.torch import save_file

    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(EXPORT_DTYPES)}, got {dtype!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cast = {k: (v.to(EXPORT_DTYPES[dtype]) if adapter_key in k else v).contiguous()
            for k, v in tensors.items()}
    peft_config.save_pretrained(str(out))
    save_file(cast, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def submodule_of(tree: nn.Module | None, module: str) -> nn.Module | None:
    """``tree``'s module ``module``, or None (no tree, or no such module)."""
    if tree is None:
        return None
    try:
        return tree.get_submodule(module)
    except AttributeError:
        return None


def stand_in_layer(kind: str, d_out: int, d_in: int,
                   weight_shape: tuple[int, ...] | None = None) -> nn.Module:
    """A base layer of an adapted layer's shape whose weight takes no memory (an expanded
    zero): enough to build the adapter on it and read its matrices. ``kind``: "linear" or
    "conv2d" (then ``weight_shape`` is the conv weight's)."""
    if kind == "conv2d":
        layer = nn.Conv2d(weight_shape[1], d_out, tuple(weight_shape[2:]), bias=False,
                          device="meta")
        layer.weight = nn.Parameter(torch.zeros(()).expand(*weight_shape), requires_grad=False)
        return layer
    layer = nn.Linear(d_in, d_out, bias=False, device="meta")
    layer.weight = nn.Parameter(torch.zeros(()).expand(d_out, d_in), requires_grad=False)
    return layer

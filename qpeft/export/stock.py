"""``qpeft export-lora`` / ``qpeft export-oft``: a saved adapter as a stock peft checkpoint —
LoRA or OFT — that stock peft loads without qpeft, for every method whose adapter is exactly
such an adapter. LoRA checkpoints are what LoRA servers (vLLM, TGI, LoRAX) serve.

The method's own folder computes the tensors (the ``lora_from_checkpoint`` /
``oft_from_checkpoint`` hook of its :class:`~qpeft.tuners.registry.MethodSpec`); this module
reads the folder, finds the method, writes the result (``--dtype``) and refuses, in one line,
adapters of any other method.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qpeft.export.adapters import _meta_shapes
from qpeft.tuners._export import (
    EXPORT_DTYPES,
    read_adapter_config,
    read_adapter_dir,
    write_stock_adapter,
)
from qpeft.tuners.registry import method_for_config, methods

__all__ = ["FORMATS", "add_export_parser", "export_lora", "export_oft", "export_stock",
           "exportable", "serving_notes"]


@dataclass(frozen=True)
class StockFormat:
    """A stock peft method an adapter can be written as: its name, the MethodSpec hook that
    computes it, the marker of its adapter tensors' keys, and what the command says about it."""

    name: str
    label: str
    hook: str
    adapter_key: str
    help: str


FORMATS = {
    "lora": StockFormat(
        "lora", "LoRA", "lora_from_checkpoint", ".lora_",
        "write a qpeft adapter as a plain peft LoRA checkpoint (loads without qpeft, serves "
        "with vLLM / TGI / LoRAX)"),
    "oft": StockFormat(
        "oft", "OFT", "oft_from_checkpoint", ".oft_R.",
        "write a qpeft adapter as a peft OFT checkpoint (an input-side QuIC adapter; loads "
        "without qpeft)"),
}


def exportable(fmt: str) -> tuple[str, ...]:
    """Labels of the registered methods with an exact ``fmt`` ("lora" / "oft") form."""
    return tuple(s.label for s in methods() if getattr(s, FORMATS[fmt].hook) is not None)


def export_stock(fmt: str, adapter_dir: str | Path, out_dir: str | Path, base_model: Any = None,
                 dtype: str = "float32") -> Path:
    """Write the adapter saved in ``adapter_dir`` as a stock peft ``fmt`` adapter in ``out_dir``.

    ``base_model``: the base model (an nn.Module, a folder or a hub id) where a method needs
    layer shapes it did not save, recorded as ``base_model_name_or_path`` when it is a name
    (default: the adapter's). ``dtype``: of the adapter tensors. Returns ``out_dir``. ValueError
    (one line) for a missing folder or config, or an adapter without an exact ``fmt`` form."""
    stock = FORMATS[fmt]
    config = read_adapter_config(adapter_dir)
    spec = method_for_config(config)
    hook = getattr(spec, stock.hook) if spec is not None else None
    if hook is None:
        others = [f"`qpeft export-{f.name}`" for f in FORMATS.values()
                  if f is not stock and spec is not None and getattr(spec, f.hook) is not None]
        hint = f" (for this method see {', '.join(others)})" if others else ""
        raise ValueError(
            f"adapter_dir {str(adapter_dir)!r} holds a {config.get('peft_type')!r} adapter, "
            f"which has no exact {stock.label} form{hint}; export-{stock.name} supports: "
            f"{', '.join(exportable(fmt))}")
    config, tensors = read_adapter_dir(adapter_dir)
    peft_config, out = hook(config, tensors, lambda: _meta_shapes(config, base_model))
    if isinstance(base_model, (str, Path)):
        peft_config.base_model_name_or_path = str(base_model)
    return write_stock_adapter(out_dir, peft_config, out, dtype, stock.adapter_key)


def export_lora(adapter_dir: str | Path, out_dir: str | Path, base_model: Any = None,
                dtype: str = "float32") -> Path:
    """:func:`export_stock` as a peft LoRA adapter (Quantum-PEFT: rank K; QPA: its factors)."""
    return export_stock("lora", adapter_dir, out_dir, base_model, dtype)


def export_oft(adapter_dir: str | Path, out_dir: str | Path, base_model: Any = None,
               dtype: str = "float32") -> Path:
    """:func:`export_stock` as a peft OFT adapter (QuIC rotating the input side)."""
    return export_stock("oft", adapter_dir, out_dir, base_model, dtype)


def serving_notes(out_dir: str | Path) -> list[str]:
    """What in an exported LoRA adapter a LoRA server (vLLM's rules) would refuse."""
    config = json.loads((Path(out_dir) / "adapter_config.json").read_text())
    notes = []
    if config.get("modules_to_save"):
        notes.append(f"modules_to_save {config['modules_to_save']} (a trained head): LoRA servers "
                     "such as vLLM refuse adapters with modules_to_save; serve the merged model "
                     "instead")
    return notes


def add_export_parser(subparsers: Any, fmt: str) -> argparse.ArgumentParser:
    """Add ``export-<fmt> ADAPTER_DIR OUT_DIR [--base-model X] [--dtype D]`` to an argparse
    ``subparsers``; the parsed namespace's ``func(args)`` runs the export."""
    stock = FORMATS[fmt]
    parser = subparsers.add_parser(f"export-{fmt}", help=stock.help)
    parser.add_argument("adapter_dir", help="folder of a saved qpeft adapter")
    parser.add_argument("out_dir", help=f"folder to write the {stock.label} adapter to")
    parser.add_argument(
        "--base-model", default=None,
        help="the base model (folder or hub id): layer shapes where the adapter did not save "
             "them, and base_model_name_or_path to record (default: the adapter's)")
    parser.add_argument("--dtype", choices=sorted(EXPORT_DTYPES), default="float32",
                        help=f"dtype of the {stock.label} tensors (default float32)")
    parser.set_defaults(func=lambda args: _run(fmt, args))
    return parser


def _run(fmt: str, args: argparse.Namespace) -> int:
    path = export_stock(fmt, args.adapter_dir, args.out_dir, base_model=args.base_model,
                        dtype=args.dtype)
    if fmt == "lora":
        for note in serving_notes(path):
            print(f"note: {note}")
    print(f"wrote {FORMATS[fmt].label} adapter to {path}")
    return 0

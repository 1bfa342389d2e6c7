"""``qpeft export-lora``: a saved adapter as a plain peft LoRA checkpoint that stock peft and
LoRA servers (vLLM, TGI, LoRAX) load without qpeft, for every method whose adapter is exactly
a low-rank update.

The method's own folder computes the LoRA factors (the ``lora_from_checkpoint`` hook of its
:class:`~qpeft.tuners.registry.MethodSpec`); this module reads the folder, finds the method,
writes the result (``--dtype``) and refuses, in one line, adapters of any other method.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from qpeft.export.adapters import _meta_shapes
from qpeft.tuners._export import (
    LORA_DTYPES,
    read_adapter_config,
    read_adapter_dir,
    write_lora_adapter,
)
from qpeft.tuners.registry import method_for_config, methods

__all__ = ["add_export_lora_parser", "export_lora", "lora_exportable", "serving_notes"]


def lora_exportable() -> tuple[str, ...]:
    """Labels of the registered methods with an exact LoRA export."""
    return tuple(s.label for s in methods() if s.lora_from_checkpoint is not None)


def export_lora(adapter_dir: str | Path, out_dir: str | Path, base_model: Any = None,
                dtype: str = "float32") -> Path:
    """Write the adapter saved in ``adapter_dir`` as a peft LoRA adapter in ``out_dir``.

    ``base_model``: the base model (an nn.Module, a folder or a hub id) where a method needs
    layer shapes it did not save, recorded as ``base_model_name_or_path`` when it is a name
    (default: the adapter's). ``dtype``: of the LoRA tensors. Returns ``out_dir``. ValueError
    for a missing folder or config, or a method without an exact LoRA form."""
    config = read_adapter_config(adapter_dir)
    spec = method_for_config(config)
    if spec is None or spec.lora_from_checkpoint is None:
        raise ValueError(
            f"adapter_dir {str(adapter_dir)!r} holds a {config.get('peft_type')!r} adapter, "
            f"which has no exact LoRA form here; export-lora supports: "
            f"{', '.join(lora_exportable())}")
    config, tensors = read_adapter_dir(adapter_dir)
    lora_config, lora = spec.lora_from_checkpoint(
        config, tensors, lambda: _meta_shapes(config, base_model))
    if isinstance(base_model, (str, Path)):
        lora_config.base_model_name_or_path = str(base_model)
    return write_lora_adapter(out_dir, lora_config, lora, dtype)


def serving_notes(out_dir: str | Path) -> list[str]:
    """What in an exported LoRA adapter a LoRA server (vLLM's rules) would refuse."""
    import json

    config = json.loads((Path(out_dir) / "adapter_config.json").read_text())
    notes = []
    if config.get("modules_to_save"):
        notes.append(f"modules_to_save {config['modules_to_save']} (a trained head): LoRA servers "
                     "such as vLLM refuse adapters with modules_to_save; serve the merged model "
                     "instead")
    return notes


def add_export_lora_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``export-lora ADAPTER_DIR OUT_DIR [--base-model X] [--dtype D]`` to an argparse
    ``subparsers``; the parsed namespace's ``func(args)`` runs the export."""
    parser = subparsers.add_parser(
        "export-lora",
        help="write a qpeft adapter as a plain peft LoRA checkpoint (loads without qpeft, "
             "serves with vLLM / TGI / LoRAX)",
    )
    parser.add_argument("adapter_dir", help="folder of a saved qpeft adapter")
    parser.add_argument("out_dir", help="folder to write the LoRA adapter to")
    parser.add_argument(
        "--base-model", default=None,
        help="the base model (folder or hub id): layer shapes where the adapter did not save "
             "them, and base_model_name_or_path to record (default: the adapter's)")
    parser.add_argument("--dtype", choices=sorted(LORA_DTYPES), default="float32",
                        help="dtype of the LoRA tensors (default float32)")
    parser.set_defaults(func=_run)
    return parser


def _run(args: argparse.Namespace) -> int:
    path = export_lora(args.adapter_dir, args.out_dir, base_model=args.base_model,
                       dtype=args.dtype)
    for note in serving_notes(path):
        print(f"note: {note}")
    print(f"wrote LoRA adapter to {path}")
    return 0

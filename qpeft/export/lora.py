"""``qpeft export-lora``: a saved adapter as a plain peft LoRA checkpoint that stock peft (and
LoRA servers) load without qpeft, for every method whose adapter is exactly a low-rank update.

The method's own folder does the conversion (the ``export_lora`` hook of its
:class:`~qpeft.tuners.registry.MethodSpec`); an adapter of any other method is refused with one
line naming the methods that can be exported.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from qpeft.tuners.registry import method_for_config, methods

__all__ = ["add_export_lora_parser", "export_lora", "lora_exportable"]


def lora_exportable() -> tuple[str, ...]:
    """Labels of the registered methods with an exact LoRA export."""
    return tuple(s.label for s in methods() if s.export_lora is not None)


def export_lora(adapter_dir: str | Path, out_dir: str | Path, base_model: str | None = None) -> Path:
    """Write the adapter saved in ``adapter_dir`` as a peft LoRA adapter in ``out_dir``.

    ``base_model``: ``base_model_name_or_path`` to record (default: the adapter's). Returns
    ``out_dir``. ValueError for a missing folder or config, or a method without an exact LoRA
    form."""
    adapter_dir = Path(adapter_dir)
    config_file = adapter_dir / "adapter_config.json"
    if not adapter_dir.is_dir():
        raise ValueError(f"adapter_dir {str(adapter_dir)!r} is not a directory")
    if not config_file.is_file():
        raise ValueError(f"adapter_dir {str(adapter_dir)!r} has no adapter_config.json")
    config = json.loads(config_file.read_text())
    spec = method_for_config(config)
    if spec is None or spec.export_lora is None:
        raise ValueError(
            f"adapter_dir {str(adapter_dir)!r} holds a {config.get('peft_type')!r} adapter, "
            f"which has no exact LoRA form here; export-lora supports: "
            f"{', '.join(lora_exportable())}")
    return spec.export_lora(adapter_dir, Path(out_dir), base_model)


def add_export_lora_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``export-lora ADAPTER_DIR OUT_DIR [--base-model X]`` to an argparse ``subparsers``;
    the parsed namespace's ``func(args)`` runs the export and prints the output folder."""
    parser = subparsers.add_parser(
        "export-lora",
        help="write a qpeft adapter as a plain peft LoRA checkpoint (loads without qpeft)",
    )
    parser.add_argument("adapter_dir", help="folder of a saved qpeft adapter")
    parser.add_argument("out_dir", help="folder to write the LoRA adapter to")
    parser.add_argument(
        "--base-model", default=None,
        help="base_model_name_or_path to record (default: the adapter's)")
    parser.set_defaults(func=_run)
    return parser


def _run(args: argparse.Namespace) -> int:
    path = export_lora(args.adapter_dir, args.out_dir, base_model=args.base_model)
    print(f"wrote LoRA adapter to {path}")
    return 0

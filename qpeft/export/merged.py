"""``qpeft export-merged``: the base model with an adapter folded in, as a plain transformers
folder (safetensors + tokenizer) that loads with transformers alone — the way out for every
method, multiplicative ones (QuIC) included, and what a server that takes no adapters serves.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from qpeft.tuners._export import read_adapter_config, read_adapter_dir

__all__ = ["add_export_merged_parser", "export_merged"]

_KINDS = {"SEQ_CLS": "text-classification", "CAUSAL_LM": "causal-lm"}


def _num_labels(adapter_dir: Path) -> int | None:
    """Rows of a saved classifier head (``modules_to_save``), or None."""
    from qpeft.assets.sources import HEAD_NAMES

    _, tensors = read_adapter_dir(adapter_dir)
    for key, value in tensors.items():
        parts = key.split(".")
        if len(parts) >= 2 and parts[-1] == "weight" and any(h in parts for h in HEAD_NAMES):
            return int(value.shape[0])
    return None


def export_merged(adapter_dir: str | Path, out_dir: str | Path, base_model: str | None = None,
                  ) -> Path:
    """Load the adapter's base model (``base_model`` or its ``base_model_name_or_path``), fold
    the adapter in (``merge_and_unload``) and save model and tokenizer to ``out_dir``. Returns
    ``out_dir``. ValueError when the base model is unknown or the task type is not one the
    loaders know (sequence classification, causal LM)."""
    from peft import PeftModel

    import qpeft.tuners  # noqa: F401  (registers every method's config)
    from qpeft.assets.sources import load_model_source

    adapter_dir, out = Path(adapter_dir), Path(out_dir)
    config = read_adapter_config(adapter_dir)
    source = base_model or config.get("base_model_name_or_path")
    if not source:
        raise ValueError(f"adapter_dir {str(adapter_dir)!r} does not name its base model; pass "
                         "--base-model (a folder or a bundled name)")
    kind = _KINDS.get(str(config.get("task_type")))
    if kind is None:
        raise ValueError(f"adapter_dir {str(adapter_dir)!r} has task_type "
                         f"{config.get('task_type')!r}; export-merged knows {sorted(_KINDS)}: "
                         "merge it in Python with PeftModel.merge_and_unload instead")
    num_labels = _num_labels(adapter_dir) if kind == "text-classification" else None
    loaded = load_model_source(str(source), kind=kind, num_labels=num_labels)
    merged = PeftModel.from_pretrained(loaded.model, str(adapter_dir)).merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out), safe_serialization=True)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(str(out))
    return out


def add_export_merged_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``export-merged ADAPTER_DIR OUT_DIR [--base-model X]``."""
    parser = subparsers.add_parser(
        "export-merged",
        help="write the base model with an adapter folded in (any method; loads with "
             "transformers alone)")
    parser.add_argument("adapter_dir", help="folder of a saved adapter")
    parser.add_argument("out_dir", help="folder to write the merged model to")
    parser.add_argument("--base-model", default=None,
                        help="the base model (folder or bundled name; default: the adapter's)")
    parser.set_defaults(func=_run)
    return parser


def _run(args: argparse.Namespace) -> int:
    path = export_merged(args.adapter_dir, args.out_dir, base_model=args.base_model)
    print(f"wrote merged model to {path}")
    return 0

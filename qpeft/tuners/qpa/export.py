"""Export a trained QPA adapter as a plain peft LoRA checkpoint (no qpeft needed to load it).

The generator runs once; its factors become ``lora_A`` / ``lora_B`` tensors with
``lora_alpha / r`` equal to QPA's scaling, so ``delta_W`` is identical. Needs only the adapter
folder (the layer layout is recorded in ``adapter_config.json`` at injection), not the base model.

CLI wiring (qpeft/cli.py): ``add_export_lora_parser(subparsers)`` adds ``export-lora ADAPTER_DIR
OUT_DIR [--base-model NAME_OR_PATH]`` and sets ``func``; or call ``main_export_lora(argv)``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from qpeft.tuners.qpa.config import QPAConfig, build_generator
from qpeft.tuners.qpa.generator import QPAGenerator

__all__ = ["add_export_lora_parser", "export_lora", "lora_tensors", "main_export_lora"]

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


def _read_qpa_adapter(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise ValueError(f"adapter_dir {str(adapter_dir)!r} has no adapter_config.json")
    config = json.loads(config_file.read_text())
    peft_type = config.get("peft_type")
    if peft_type != "QPA":
        raise ValueError(
            f"adapter_dir {str(adapter_dir)!r} holds a {peft_type!r} adapter, not a QPA one "
            "(peft_type must be 'QPA'); only QPA adapters can be exported to LoRA"
        )
    if not config.get("layout"):
        raise ValueError(
            f"adapter_dir {str(adapter_dir)!r}: its config has no 'layout' (saved by an older "
            "qpeft?); load it with PeftModel.from_pretrained and call merge_and_unload instead"
        )
    weights_file = adapter_dir / "adapter_model.safetensors"
    if weights_file.is_file():
        tensors = load_file(str(weights_file))
    elif (adapter_dir / "adapter_model.bin").is_file():
        tensors = torch.load(adapter_dir / "adapter_model.bin", weights_only=True)
    else:
        raise ValueError(f"adapter_dir {str(adapter_dir)!r} has no adapter_model.safetensors")
    return config, tensors


def _generator_from_checkpoint(config: dict[str, Any], tensors: dict[str, torch.Tensor]):
    known = set(QPAConfig.__dataclass_fields__)
    # check_kwargs: a config saved before lr_scale existed keeps its (paper) parameterization
    kwargs = QPAConfig.check_kwargs(**{k: v for k, v in config.items() if k in known})
    kwargs.pop("peft_type", None)
    qpa_config = QPAConfig(**kwargs)
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


def export_lora(
    adapter_dir: str | Path, out_dir: str | Path, base_model: str | None = None
) -> Path:
    """Write the QPA adapter in ``adapter_dir`` as a plain peft LoRA adapter in ``out_dir``.

    ``base_model``: name or path recorded as ``base_model_name_or_path`` (default: the QPA
    adapter's). The generator runs once in its saved dtype; factors are saved in float32. Returns
    ``out_dir``. ValueError for a missing folder or a non-QPA adapter. O(generation + m)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if not adapter_dir.is_dir():
        raise ValueError(f"adapter_dir {str(adapter_dir)!r} is not a directory")
    config, tensors = _read_qpa_adapter(adapter_dir)
    qpa_config, generator = _generator_from_checkpoint(config, tensors)
    lora = lora_tensors(generator, qpa_config.layout)
    kinds = {row[1] for row in qpa_config.layout}
    lora_config = LoraConfig(
        r=qpa_config.r,
        lora_alpha=qpa_config.effective_alpha,
        lora_dropout=float(qpa_config.lora_dropout),
        target_modules=[row[0] for row in qpa_config.layout],
        fan_in_fan_out=kinds == {"conv1d"},
        modules_to_save=qpa_config.modules_to_save,
        base_model_name_or_path=base_model or config.get("base_model_name_or_path"),
        task_type=config.get("task_type"),
        inference_mode=True,
    )
    # modules_to_save copies (e.g. a classifier head) are plain tensors: carry them over as is.
    for key, value in tensors.items():
        if _GEN_KEY not in key:
            lora[key] = value.contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    lora_config.save_pretrained(str(out_dir))
    save_file(lora, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out_dir


def add_export_lora_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``export-lora ADAPTER_DIR OUT_DIR [--base-model X]`` to an argparse ``subparsers``;
    the parsed namespace's ``func(args)`` runs the export and prints the output folder."""
    parser = subparsers.add_parser(
        "export-lora",
        help="write a QPA adapter as a plain peft LoRA checkpoint (loads without qpeft)",
    )
    parser.add_argument("adapter_dir", help="folder of a saved QPA adapter")
    parser.add_argument("out_dir", help="folder to write the LoRA adapter to")
    parser.add_argument(
        "--base-model", default=None, help="base_model_name_or_path to record (default: QPA's)"
    )
    parser.set_defaults(func=_run_export)
    return parser


def _run_export(args: argparse.Namespace) -> int:
    path = export_lora(args.adapter_dir, args.out_dir, base_model=args.base_model)
    print(f"wrote LoRA adapter to {path}")
    return 0


def main_export_lora(argv: Sequence[str] | None = None) -> int:
    """``qpeft export-lora`` as a standalone entry point: parses ``argv`` and exports."""
    parser = argparse.ArgumentParser(prog="qpeft")
    sub = parser.add_subparsers(dest="command", required=True)
    add_export_lora_parser(sub)
    args = parser.parse_args(["export-lora", *(argv or [])])
    return args.func(args)

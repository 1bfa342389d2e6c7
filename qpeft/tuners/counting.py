"""Trainable-parameter counts without training, from a model or from a config without weights.

Every qpeft config implements two small methods (the formulas live next to each construction):

- ``count_module(out_features, in_features) -> int``: trainable numbers added to one adapted
  layer whose weight reads as an ``out x in`` matrix (see ``qpeft.tuners._common``);
- ``count_shared(module_shapes) -> int``: model-wide trainables (QPA's one generator), 0 otherwise.

:func:`count_trainable` finds the layers the config would adapt (peft's own matching rules) and adds
the trainable ``modules_to_save`` (e.g. a classifier head). Tests check its total against peft's
``get_nb_trainable_parameters`` on the wrapped model.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qpeft.tuners._common import layer_kind, matrix_shape


@dataclass
class ParameterCount:
    """Per-module trainable counts. ``total = sum(per_module) + shared + modules_to_save``."""

    per_module: dict[str, int] = field(default_factory=dict)
    module_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    shared: int = 0
    modules_to_save: dict[str, int] = field(default_factory=dict)

    @property
    def adapter_total(self) -> int:
        """Trainable numbers of the adapter alone (no classifier head)."""
        return sum(self.per_module.values()) + self.shared

    def lora_equivalent(self, r: int) -> int:
        """Trainables of peft's LoRA at rank ``r`` on the same modules (no bias, no head):
        ``r * sum(out + in)``. The yardstick the adapters are compared with."""
        return sum(int(r) * (o + i) for o, i in self.module_shapes.values())

    @property
    def total(self) -> int:
        return self.adapter_total + sum(self.modules_to_save.values())

    def table(self) -> str:
        """A plain-text table: one row per adapted module, then the shared and head rows."""
        rows = [("module", "shape (out x in)", "trainable")]
        for name, count in self.per_module.items():
            out_f, in_f = self.module_shapes[name]
            rows.append((name, f"{out_f} x {in_f}", f"{count:,}"))
        if self.shared:
            rows.append(("(shared generator)", "", f"{self.shared:,}"))
        for name, count in self.modules_to_save.items():
            rows.append((f"{name} (modules_to_save)", "", f"{count:,}"))
        rows.append(("total", "", f"{self.total:,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}" for a, b, c in rows]
        lines.insert(1, "-" * len(lines[0]))
        return "\n".join(lines)


def read_model_config(path: str | os.PathLike) -> dict[str, Any]:
    """The dict in a transformers ``config.json`` (or the one inside folder ``path``); ValueError
    naming the file if it is missing, not JSON, or has no ``model_type``."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"model config file {str(path)!r} does not exist")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"model config file {str(path)!r} is not valid JSON: {err}") from err
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ValueError(
            f"model config file {str(path)!r} has no 'model_type': not a transformers config"
        )
    return raw


def model_from_config(model_config: Any, auto_class: Any = None) -> nn.Module:
    """Instantiate a transformers model on the meta device (no memory, no weights).

    ``model_config``: a ``PretrainedConfig``, a dict, or a path to ``config.json`` (or its folder).
    ``auto_class``: e.g. ``AutoModelForCausalLM``; default ``AutoModel`` (no task head)."""
    from transformers import AutoConfig, AutoModel, PretrainedConfig

    if isinstance(model_config, (str, os.PathLike)):
        model_config = read_model_config(model_config)
    if isinstance(model_config, dict):
        model_config = dict(model_config)
        if "model_type" not in model_config:
            raise ValueError("model config has no 'model_type': not a transformers config")
        model_config = AutoConfig.for_model(model_config.pop("model_type"), **model_config)
    if not isinstance(model_config, PretrainedConfig):
        raise ValueError(f"expected a transformers config, got {type(model_config).__name__}")
    auto_class = auto_class or AutoModel
    with torch.device("meta"):
        return auto_class.from_config(model_config)


def count_trainable(config: Any, model_or_config: Any, auto_class: Any = None) -> ParameterCount:
    """Count what ``get_peft_model(model, config)`` would train, without building adapters.

    ``config``: a qpeft config (needs ``count_module``/``count_shared``) or any peft config with
    ``target_modules``. ``model_or_config``: an ``nn.Module`` (left untouched) or a transformers
    config / ``config.json`` path, instantiated on the meta device. Cost: one pass over the
    module names."""
    from peft.tuners.tuners_utils import check_target_module_exists

    if not hasattr(config, "count_module"):
        raise ValueError(
            f"{type(config).__name__} has no count_module(); count_trainable supports qpeft configs"
        )
    if getattr(config, "target_modules", None) is None:
        raise ValueError("config.target_modules is None: name the modules to adapt to count them")
    model = model_or_config
    if not isinstance(model, nn.Module):
        model = model_from_config(model_or_config, auto_class)
    if isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear":
        # peft's own expansion (every linear but the output embedding / classifier head), as
        # get_peft_model applies it; on a copy, so the caller's config keeps "all-linear"
        from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

        config = _maybe_include_all_linear_layers(copy.copy(config), model)

    result = ParameterCount()
    for name, module in model.named_modules():
        match = check_target_module_exists(config, name) if name else None
        if not match or type(match).__name__ == "_ExcludedModule":
            continue
        try:
            layer_kind(module)
        except ValueError as err:
            raise ValueError(f"target module {name!r}: {err}") from err
        shape = matrix_shape(module)
        result.module_shapes[name] = shape
        result.per_module[name] = int(config.count_module(*shape))
    if not result.per_module:
        raise ValueError(
            f"no module of {type(model).__name__} matches target_modules={config.target_modules!r}"
        )
    result.shared = int(config.count_shared(dict(result.module_shapes)))
    for wanted in getattr(config, "modules_to_save", None) or []:
        for name, module in model.named_modules():
            if name == wanted or name.endswith("." + wanted):
                result.modules_to_save[name] = sum(p.numel() for p in module.parameters())
    return result


def lora_trainable(config: Any, model_or_config: Any, r: int | None = None,
                   auto_class: Any = None) -> int:
    """Trainables of peft's LoRA at rank ``r`` (default ``config.r``, else 8) on the modules
    ``config`` targets in ``model_or_config`` (as :func:`count_trainable`; no bias, no head).
    QPA generates exactly this many numbers; its default sizing keeps its generator at or below
    half of it. O(module names)."""
    rank = r if r is not None else getattr(config, "r", None) or 8
    return count_trainable(config, model_or_config, auto_class).lora_equivalent(rank)

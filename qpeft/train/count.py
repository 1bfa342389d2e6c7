"""``qpeft count``: the trainable-parameter table of a method on a model, without training.

The table comes from the wrapped model itself (``get_peft_model`` on a bundled model, or on a
transformers config instantiated on the meta device: no weights, no memory — for a
``--config-file``, a local model folder, a ``.gguf`` file or a hub id), grouped by the adapted
module. Default target modules of non-bundled models are peft's per-architecture LoRA defaults. For qpeft's own methods, ``qpeft.count_trainable`` (the closed-form counts next
to each construction) is computed too and must agree; a disagreement is reported, not hidden.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from qpeft.train.errors import RunError
from qpeft.train.methods import build_peft_config, check_method, choose_targets


def _auto_class(config: Any, num_labels: int | None = None) -> tuple[Any, str | None]:
    """(Auto class, peft task type) for a config: sequence classification when ``num_labels``
    is given, else the head its ``architectures`` name (none: the bare model)."""
    import transformers

    if num_labels is not None:
        return transformers.AutoModelForSequenceClassification, "SEQ_CLS"
    archs = (config.get("architectures") if isinstance(config, dict)
             else getattr(config, "architectures", None)) or []
    for arch in archs:
        if arch.endswith("ForCausalLM"):
            return transformers.AutoModelForCausalLM, "CAUSAL_LM"
        if arch.endswith("ForSequenceClassification"):
            return transformers.AutoModelForSequenceClassification, "SEQ_CLS"
    return transformers.AutoModel, None


def _group(model: torch.nn.Module) -> tuple[dict[str, int], dict[str, int], int]:
    """(per adapted module, per modules_to_save copy, other trainables) of a peft model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    per_module: dict[str, int] = {}
    heads: dict[str, int] = {}
    owner: dict[int, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            for p in module.parameters():
                owner.setdefault(id(p), name)
    other = 0
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in owner:
            key = owner[id(p)].removeprefix("base_model.model.")
            per_module[key] = per_module.get(key, 0) + p.numel()
        elif ".modules_to_save." in name:
            key = name.split(".modules_to_save.")[0].removeprefix("base_model.model.")
            heads[key] = heads.get(key, 0) + p.numel()
        else:
            other += p.numel()
    return per_module, heads, other


@dataclass
class _Base:
    """The model a count wraps, where it came from and what the config needs to know."""

    model: torch.nn.Module
    source: str
    targets: list[str] | str
    modules_to_save: list[str] | None
    task_type: str | None


def _meta_base(model: str | None, config_file: str | None, num_labels: int | None,
               target_modules: list[str] | None) -> _Base:
    """A transformers config (a ``config.json``, a folder, a GGUF file or a hub id) built on
    the meta device: no weights are read."""
    from qpeft.assets.sources import HEAD_NAMES, default_target_modules, read_source_config
    from qpeft.train.finetune import model_source
    from qpeft.tuners.counting import model_from_config, read_model_config

    try:
        if config_file is not None:
            raw: Any = read_model_config(config_file)
            model_type, source = raw["model_type"], str(config_file)
        else:
            raw = read_source_config(model_source(model))
            model_type, source = raw.model_type, model
    except ValueError as exc:
        raise RunError(f"--config-file: {exc}" if config_file else str(exc)) from None
    auto, task_type = _auto_class(raw, num_labels)
    if num_labels is not None:
        if isinstance(raw, dict):
            raw = {**raw, "num_labels": num_labels}
            raw.pop("id2label", None)
            raw.pop("label2id", None)
        else:
            raw.num_labels = num_labels
    targets = target_modules or default_target_modules(model_type)
    if not targets:
        raise RunError(f"peft has no default target modules for model_type {model_type!r}; "
                       "pass --target-modules")
    try:
        base = model_from_config(raw, auto)
    except (ValueError, KeyError) as exc:
        raise RunError(f"{source!r}: cannot build {auto.__name__} from its config: "
                       f"{exc}") from None
    modules_to_save = None
    if task_type == "SEQ_CLS":  # the fresh head trains in full, as in finetune
        names = {n.rsplit(".", 1)[-1] for n, _ in base.named_modules()}
        modules_to_save = [h for h in HEAD_NAMES if h in names] or None
    return _Base(base, source, targets, modules_to_save, task_type)


def _bundled_base(model: str, num_labels: int | None,
                  target_modules: list[str] | None) -> _Base:
    """A bundled model, loaded as ``finetune`` loads it (its default head and targets)."""
    from accelerate.utils import set_seed

    from qpeft.train.finetune import PEFT_TASK_TYPES, load_model, model_kind

    kind = model_kind(model)
    if kind != "causal-lm" and num_labels is None:
        num_labels = 5 if kind == "text-classification" else 10
    set_seed(0)
    try:
        loaded = load_model(model, num_labels if kind != "causal-lm" else None)
    except ValueError as exc:
        raise RunError(str(exc)) from None
    return _Base(loaded.model, model, target_modules or loaded.default_target_modules,
                 loaded.modules_to_save, PEFT_TASK_TYPES[loaded.kind])


def _closed_form(config: Any, base: torch.nn.Module) -> tuple[int | None, int | None]:
    """(closed-form total, LoRA at the same rank on the same modules) for configs that count
    themselves (``count_module``), else (None, None)."""
    if not hasattr(config, "count_module"):
        return None, None
    from qpeft.tuners.counting import count_trainable

    try:
        counts = count_trainable(config, base)
    except ValueError:
        return None, None
    return counts.total, counts.lora_equivalent(getattr(config, "r", None) or 8)


def _table(method: str, source: str, adapted: int, per_module: dict[str, int],
           heads: dict[str, int], other: int, total_base: int, lora: int | None,
           rank: int, closed_form: int | None) -> str:
    total = sum(per_module.values()) + sum(heads.values()) + other
    rows = [("module", "trainable")]
    rows += [(k, f"{v:,}") for k, v in per_module.items()]
    if other:
        rows.append(("(shared, model-wide)", f"{other:,}"))
    rows += [(f"{k} (modules_to_save)", f"{v:,}") for k, v in heads.items()]
    rows.append(("total trainable", f"{total:,}"))
    adapter = total - sum(heads.values())
    if lora:
        rows.append((f"LoRA r={rank} on the same modules", f"{lora:,}"))
        rows.append(("adapter / LoRA", f"{100 * adapter / lora:.2f} %"))
    rows.append(("base model parameters", f"{total_base:,}"))
    rows.append(("trainable / base", f"{100 * total / max(1, total_base):.4f} %"))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{a:<{w0}}  {b:>{w1}}" for a, b in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - (5 if lora else 3), "-" * len(lines[0]))
    header = f"{method} on {source}: {adapted} adapted modules"
    if closed_form is not None and closed_form != total:
        header += f"  [WARNING: closed-form count_trainable says {closed_form:,}]"
    return header + "\n" + "\n".join(lines)


def count_for_cli(method: str, *, model: str | None = None, config_file: str | None = None,
                  num_labels: int | None = None, target_modules: list[str] | None = None,
                  options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The count table as a dict (``text`` holds the printed table). O(model modules).

    ``model``: an installed model name; ``config_file``: a transformers ``config.json`` for a
    model that need not be installed. Raises ``RunError`` (exit 2) for bad input.
    """
    import peft
    from peft.tuners.tuners_utils import BaseTunerLayer

    from qpeft.train.finetune import kind_of_task_type, model_source

    try:
        check_method(method)
    except ValueError as exc:
        raise RunError(str(exc)) from None
    if config_file is not None or model_source(model).kind != "bundled":
        base = _meta_base(model, config_file, num_labels, target_modules)
    else:
        base = _bundled_base(model, num_labels, target_modules)
    total_base = sum(p.numel() for p in base.model.parameters())
    # the method's own default where it has one, as finetune chooses
    kind = kind_of_task_type(base.task_type)
    base.targets, _ = choose_targets(method, kind, target_modules, base.targets)
    try:
        config = build_peft_config(method, base.targets, base.modules_to_save,
                                   task_type=base.task_type, options=options, kind=kind)
    except ValueError as exc:
        raise RunError(str(exc)) from None
    closed_form, lora = _closed_form(config, base.model)
    try:
        wrapped = peft.get_peft_model(base.model, config)
    except (ValueError, NotImplementedError, RuntimeError) as exc:
        raise RunError(f"cannot apply {method} to {base.source}: {exc}") from None
    per_module, heads, other = _group(wrapped)
    adapted = sum(isinstance(m, BaseTunerLayer) for m in wrapped.modules())
    text = _table(method, base.source, adapted, per_module, heads, other, total_base, lora,
                  getattr(config, "r", None) or 8, closed_form)
    return {"method": method, "source": base.source, "per_module": per_module,
            "modules_to_save": heads, "shared": other,
            "total": sum(per_module.values()) + sum(heads.values()) + other,
            "base_params": total_base, "closed_form_total": closed_form,
            "lora_equivalent": lora, "peft_config": config.to_dict(), "text": text}

"""``qpeft count``: the trainable-parameter table of a method on a model, without training.

The table comes from the wrapped model itself (``get_peft_model`` on a bundled model, or on a
transformers config instantiated on the meta device: no weights, no memory — for a
``--config-file``, a local model folder, a ``.gguf`` file or a hub id), grouped by the adapted
module. Default target modules of non-bundled models are peft's per-architecture LoRA defaults. For qpeft's own methods, ``qpeft.count_trainable`` (the closed-form counts next
to each construction) is computed too and must agree; a disagreement is reported, not hidden.
"""

from __future__ import annotations

from typing import Any

import torch

from qpeft.train.methods import build_peft_config, check_method


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


def count_for_cli(method: str, *, model: str | None = None, config_file: str | None = None,
                  num_labels: int | None = None, target_modules: list[str] | None = None,
                  options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The count table as a dict (``text`` holds the printed table). O(model modules).

    ``model``: an installed model name; ``config_file``: a transformers ``config.json`` for a
    model that need not be installed. Raises ``RunError`` (exit 2) for bad input.
    """
    import peft

    import qpeft
    from qpeft.train.finetune import RunError, model_kind

    try:
        check_method(method)
    except ValueError as exc:
        raise RunError(str(exc)) from None
    modules_to_save = None
    source_kind = "bundled"
    if model is not None:
        from qpeft.train.finetune import model_source

        source_kind = model_source(model).kind
    if config_file is not None or source_kind != "bundled":
        from qpeft.assets.sources import default_target_modules, read_source_config

        try:
            if config_file is not None:
                raw: Any = qpeft.counting.read_model_config(config_file)
                model_type = raw["model_type"]
                source = str(config_file)
            else:
                raw = read_source_config(model_source(model))
                model_type = raw.model_type
                source = model
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
            raise RunError(f"peft has no default target modules for model_type "
                           f"{model_type!r}; pass --target-modules")
        try:
            base = qpeft.counting.model_from_config(raw, auto)
        except (ValueError, KeyError) as exc:
            raise RunError(f"{source!r}: cannot build {auto.__name__} from its config: "
                           f"{exc}") from None
        if task_type == "SEQ_CLS":  # the fresh head trains in full, as in finetune
            from qpeft.assets.sources import HEAD_NAMES

            names = {n.rsplit(".", 1)[-1] for n, _ in base.named_modules()}
            modules_to_save = [h for h in HEAD_NAMES if h in names] or None
    else:
        from accelerate.utils import set_seed

        from qpeft.train.finetune import PEFT_TASK_TYPES, load_model

        kind = model_kind(model)
        if kind != "causal-lm" and num_labels is None:
            num_labels = 5 if kind == "text-classification" else 10
        set_seed(0)
        try:
            loaded = load_model(model, num_labels if kind != "causal-lm" else None)
        except ValueError as exc:
            raise RunError(str(exc)) from None
        base, task_type = loaded.model, PEFT_TASK_TYPES[loaded.kind]
        targets = target_modules or loaded.default_target_modules
        modules_to_save = loaded.modules_to_save
        source = model
    total_base = sum(p.numel() for p in base.parameters())
    try:
        config = build_peft_config(method, targets, modules_to_save, task_type=task_type,
                                   options=options)
    except ValueError as exc:
        raise RunError(str(exc)) from None
    closed_form = lora = None
    if hasattr(config, "count_module"):
        try:
            counts = qpeft.count_trainable(config, base)
            closed_form = counts.total
            # what peft's LoRA at the same rank (default 8) trains on the same modules
            lora = counts.lora_equivalent(getattr(config, "r", None) or 8)
        except ValueError:
            closed_form = lora = None
    try:
        wrapped = peft.get_peft_model(base, config)
    except (ValueError, NotImplementedError, RuntimeError) as exc:
        raise RunError(f"cannot apply {method} to {source}: {exc}") from None
    per_module, heads, other = _group(wrapped)
    total = sum(per_module.values()) + sum(heads.values()) + other
    rows = [("module", "trainable")]
    rows += [(k, f"{v:,}") for k, v in per_module.items()]
    if other:
        rows.append(("(shared, model-wide)", f"{other:,}"))
    rows += [(f"{k} (modules_to_save)", f"{v:,}") for k, v in heads.items()]
    rows.append(("total trainable", f"{total:,}"))
    adapter = total - sum(heads.values())
    if lora:
        rank = getattr(config, "r", None) or 8
        rows.append((f"LoRA r={rank} on the same modules", f"{lora:,}"))
        rows.append(("adapter / LoRA", f"{100 * adapter / lora:.2f} %"))
    rows.append(("base model parameters", f"{total_base:,}"))
    rows.append(("trainable / base", f"{100 * total / max(1, total_base):.4f} %"))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{a:<{w0}}  {b:>{w1}}" for a, b in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - (5 if lora else 3), "-" * len(lines[0]))
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapted = sum(isinstance(m, BaseTunerLayer) for m in wrapped.modules())
    header = f"{method} on {source}: {adapted} adapted modules"
    if closed_form is not None and closed_form != total:
        header += f"  [WARNING: closed-form count_trainable says {closed_form:,}]"
    return {"method": method, "source": source, "per_module": per_module,
            "modules_to_save": heads, "shared": other, "total": total,
            "base_params": total_base, "closed_form_total": closed_form,
            "lora_equivalent": lora,
            "peft_config": config.to_dict(), "text": header + "\n" + "\n".join(lines)}

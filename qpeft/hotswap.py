"""Hot-swap a qpeft adapter: load adapter B's numbers into a model prepared with adapter A, in place.

The idea of peft's ``hotswap_adapter`` (written for LoRA) for Quantum-PEFT, QuIC and QPA: every
adapter tensor of the loaded model keeps its identity, shape, dtype and device; only its values
change (``copy_``). Nothing is re-wrapped, so a ``torch.compile``-d model keeps its compiled
graphs (no recompilation) and optimizers / hooks holding the tensors stay valid.

Only adapters of the same method with the same configuration (same layers, rank, circuit
structure, scaling...) can be swapped: their tensors have the same shapes and the layers' static
settings (which a compiled graph bakes in) agree. Anything else raises one ValueError naming the
difference; then load B with ``PeftModel.from_pretrained`` / ``load_adapter`` instead.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

__all__ = ["check_hotswap_configs_compatible", "hotswap_adapter", "hotswap_adapter_from_state_dict"]

#: config fields that may differ between two swappable adapters (bookkeeping, or only used when
#: an adapter is created: its start values are overwritten by the swap anyway)
IGNORED_CONFIG_FIELDS = frozenset({
    "base_model_name_or_path", "revision", "inference_mode", "init_weights", "init_seed",
    "task_type", "auto_mapping", "peft_version", "modules_to_save",
})


def check_hotswap_configs_compatible(current: Any, new: Any) -> None:
    """ValueError unless ``new`` describes an adapter with the same tensors and static settings
    as ``current`` (fields in :data:`IGNORED_CONFIG_FIELDS` aside). O(#fields)."""
    if type(current) is not type(new):
        raise ValueError(
            f"cannot hot-swap a {type(new).__name__} adapter into a {type(current).__name__} "
            "one: load it with PeftModel.from_pretrained / load_adapter instead"
        )
    old_d, new_d = current.to_dict(), new.to_dict()
    differing = sorted(
        k for k in set(old_d) | set(new_d)
        if k not in IGNORED_CONFIG_FIELDS and _normalized(old_d.get(k)) != _normalized(new_d.get(k))
    )
    if differing:
        details = ", ".join(f"{k}: {old_d.get(k)!r} -> {new_d.get(k)!r}" for k in differing[:4])
        raise ValueError(
            f"cannot hot-swap: the adapters' configs differ in {differing} ({details}); "
            "hot-swapping needs the same layers and settings — load the new adapter with "
            "PeftModel.from_pretrained / load_adapter instead"
        )


def _normalized(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def hotswap_adapter_from_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], adapter_name: str = "default",
    config: Any | None = None,
) -> None:
    """Copy ``state_dict`` (keys as saved by ``save_pretrained``) into ``adapter_name``'s tensors
    of the ``PeftModel`` ``model``, in place. ``config``: the new adapter's config, checked with
    :func:`check_hotswap_configs_compatible` when given. Every key must match a tensor of the same
    shape, and every tensor of the adapter must be given: otherwise ValueError and nothing is
    changed. O(adapter size)."""
    from peft.utils import get_peft_model_state_dict

    if not hasattr(model, "peft_config"):
        raise ValueError(
            f"hot-swapping needs a PeftModel prepared with an adapter, got {type(model).__name__}"
        )
    if adapter_name not in model.peft_config:
        raise ValueError(
            f"no adapter named {adapter_name!r} to swap into; loaded: {sorted(model.peft_config)}"
        )
    if config is not None:
        check_hotswap_configs_compatible(model.peft_config[adapter_name], config)
    # peft's own key conversion: its tensors share storage with the model's parameters
    current = get_peft_model_state_dict(model, adapter_name=adapter_name)
    missing = sorted(set(current) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(current))
    if missing or unexpected:
        raise ValueError(
            f"cannot hot-swap: the new adapter lacks {missing[:3]} and has unknown tensors "
            f"{unexpected[:3]} (of {len(missing)} / {len(unexpected)}); it was saved for other "
            "layers or another method"
        )
    for key, target in current.items():
        if tuple(state_dict[key].shape) != tuple(target.shape):
            raise ValueError(
                f"cannot hot-swap: tensor {key!r} has shape {tuple(state_dict[key].shape)} in "
                f"the new adapter but {tuple(target.shape)} in the loaded one"
            )
    with torch.no_grad():
        for key, target in current.items():
            target.copy_(state_dict[key].to(device=target.device, dtype=target.dtype))


def hotswap_adapter(
    model: nn.Module, model_name_or_path: str | os.PathLike, adapter_name: str = "default",
    torch_device: str | None = None,
) -> None:
    """Replace the numbers of ``adapter_name`` in the ``PeftModel`` ``model`` by those of the
    adapter saved in folder ``model_name_or_path``, in place (see the module docstring).

    ``torch_device``: where to read the checkpoint (default: CPU; tensors are copied to each
    parameter's own device). ValueError for another method, a different config or other
    tensor shapes; nothing is changed then. O(adapter size)."""
    from peft import PeftConfig
    from peft.utils import load_peft_weights

    import qpeft.tuners  # noqa: F401  (registers qpeft's methods so their configs load)

    path = os.fspath(model_name_or_path)
    config = PeftConfig.from_pretrained(path)
    config_cls = _config_class(config.peft_type)
    config = config_cls.from_pretrained(path)
    state_dict = load_peft_weights(path, device=torch_device or "cpu")
    hotswap_adapter_from_state_dict(model, state_dict, adapter_name, config)


def _config_class(peft_type: Any) -> type:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    key = getattr(peft_type, "value", peft_type)
    for known, cls in PEFT_TYPE_TO_CONFIG_MAPPING.items():
        if getattr(known, "value", known) == key:
            return cls
    raise ValueError(f"unknown peft_type {key!r} in the adapter's config")

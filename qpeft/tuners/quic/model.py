"""QuICModel: peft's tuner for QuIC compound adapters (``peft_type = "QUIC"``, prefix ``quic_``)."""

from __future__ import annotations

from typing import Any

import torch
from peft.utils import TRANSFORMERS_MODELS_TO_OFT_TARGET_MODULES_MAPPING
from torch import nn

from qpeft.tuners._common import QpeftTuner

from .layer import QuICGroup, QuICLayer, groupable, quic_layer_class


class QuICModel(QpeftTuner):
    """Wraps the target modules of a model with QuIC layers (:class:`QuICLinear` for
    ``nn.Linear`` / ``Conv1D``, :class:`QuICConv2d`).

    Use through peft: ``get_peft_model(model, QuICConfig(target_modules=[...]))`` after
    ``import qpeft``. Default target modules per architecture follow peft's OFT table."""

    prefix: str = "quic_"
    method_label = "QuIC"
    tuner_layer_cls = QuICLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_OFT_TARGET_MODULES_MAPPING

    def _update_layer(self, target: nn.Module, adapter_name: str, config: Any, module_name: str) -> None:
        target.update_layer(adapter_name, config)

    def _new_layer(self, target: nn.Module, adapter_name: str, config: Any, module_name: str) -> nn.Module:
        return quic_layer_class(target)(target, adapter_name, config)

    @property
    def quic_groups(self) -> dict[str, list[QuICGroup]]:
        """Adapter name -> its :class:`QuICGroup` s (one per block plan, settings and parameter
        shape with at least two layers). The tuner owns them; member layers reference theirs
        (``quic_group``) and hold their slot (``quic_index``)."""
        return self.__dict__.setdefault("_quic_groups", {})

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """peft's injection (``BaseTuner.inject_adapter``, same signature), then the adapter's
        :class:`QuICGroup` s, so a training step generates each group's matrices in one
        batched call."""
        super().inject_adapter(
            model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict,
        )
        members: dict[tuple[Any, ...], list[QuICLayer]] = {}
        for module in model.modules():
            if not isinstance(module, QuICLayer):
                continue
            module.quic_group.pop(adapter_name, None)
            module.quic_index.pop(adapter_name, None)
            if adapter_name not in module.quic_params:
                continue
            settings = module.quic_settings[adapter_name]
            if groupable(settings):
                key = (module.quic_plan[adapter_name], settings,
                       tuple(module.quic_params[adapter_name].shape))
                members.setdefault(key, []).append(module)
        groups = []
        for (plan, settings, _), layers in members.items():
            if len(layers) < 2:  # one layer: nothing to batch
                continue
            group = QuICGroup(adapter_name, plan, settings, [layer.quic_params for layer in layers])
            for index, layer in enumerate(layers):
                layer.quic_group[adapter_name] = group
                layer.quic_index[adapter_name] = index
            groups.append(group)
        self.quic_groups[adapter_name] = groups

    def delete_adapter(self, adapter_name: str) -> None:
        """peft's ``delete_adapter`` (the layers drop their group entries), and the groups."""
        super().delete_adapter(adapter_name)
        self.quic_groups.pop(adapter_name, None)

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any) -> nn.Module:
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        self.quic_groups.clear()
        return model

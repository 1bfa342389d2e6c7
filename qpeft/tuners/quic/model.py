"""QuICModel: peft's tuner for QuIC compound adapters (``peft_type = "QUIC"``, prefix ``quic_``)."""

from __future__ import annotations

from typing import Any

from peft.utils import TRANSFORMERS_MODELS_TO_OFT_TARGET_MODULES_MAPPING
from torch import nn

from qpeft.tuners._common import GroupedTuner

from .layer import QuICGroup, QuICLayer, groupable, quic_layer_class


class QuICModel(GroupedTuner):
    """Wraps the target modules of a model with QuIC layers (:class:`QuICLinear` for
    ``nn.Linear`` / ``Conv1D``, :class:`QuICConv2d`).

    Use through peft: ``get_peft_model(model, QuICConfig(target_modules=[...]))`` after
    ``import qpeft``. Default target modules per architecture follow peft's OFT table."""

    prefix: str = "quic_"
    method_label = "QuIC"
    tuner_layer_cls = QuICLayer
    group_attrs = ("quic_group", "quic_index")
    target_module_mapping = TRANSFORMERS_MODELS_TO_OFT_TARGET_MODULES_MAPPING

    def _update_layer(self, target: nn.Module, adapter_name: str, config: Any, module_name: str) -> None:
        target.update_layer(adapter_name, config)

    def _new_layer(self, target: nn.Module, adapter_name: str, config: Any, module_name: str) -> nn.Module:
        return quic_layer_class(target)(target, adapter_name, config)

    def _group_key(self, layer: nn.Module, adapter_name: str) -> Any | None:
        """Block plan, settings and parameter shape (None: not groupable, see
        :func:`groupable`, or no such adapter)."""
        if adapter_name not in layer.quic_params:
            return None
        settings = layer.quic_settings[adapter_name]
        if not groupable(settings):
            return None
        return (layer.quic_plan[adapter_name], settings,
                tuple(layer.quic_params[adapter_name].shape))

    def _new_group(self, adapter_name: str, key: Any, layers: list[nn.Module]) -> QuICGroup:
        plan, settings, _ = key
        return QuICGroup(adapter_name, plan, settings, [layer.quic_params for layer in layers])

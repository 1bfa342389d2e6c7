"""QuICModel: peft's tuner for QuIC compound adapters (``peft_type = "QUIC"``, prefix ``quic_``)."""

from __future__ import annotations

from typing import Any

from peft.utils import TRANSFORMERS_MODELS_TO_OFT_TARGET_MODULES_MAPPING
from torch import nn

from qpeft.tuners._common import QpeftTuner

from .layer import QuICLayer, quic_layer_class


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

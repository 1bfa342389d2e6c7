"""QuICModel: peft's tuner for QuIC compound adapters (``peft_type = "QUIC"``, prefix ``quic_``)."""

from __future__ import annotations

from typing import Any

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_OFT_TARGET_MODULES_MAPPING
from torch import nn

from .config import QuICConfig
from .layer import QuICLayer, QuICModule


class QuICModel(BaseTuner):
    """Wraps the target modules of a model with :class:`QuICModule` layers.

    Use through peft: ``get_peft_model(model, QuICConfig(target_modules=[...]))`` after
    ``import qpeft``. Default target modules per architecture follow peft's OFT table."""

    prefix: str = "quic_"
    tuner_layer_cls = QuICLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_OFT_TARGET_MODULES_MAPPING

    def _create_and_replace(
        self,
        quic_config: QuICConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if current_key is None:
            raise ValueError("current_key must not be None")
        try:
            if isinstance(target, QuICLayer):
                target.update_layer(adapter_name, quic_config)
                return
            if isinstance(target, BaseTunerLayer):
                raise ValueError(
                    f"{type(target).__name__} is another peft method's layer; QuIC wraps plain "
                    "nn.Linear, Conv1D and nn.Conv2d modules"
                )
            new_module = QuICModule(target, adapter_name, quic_config)
        except ValueError as err:
            raise ValueError(f"QuIC cannot adapt module {current_key!r}: {err}") from err
        if adapter_name not in self.active_adapters:
            # an additional adapter is not trainable until set_adapter() selects it
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

"""QuICModel: peft's tuner for QuIC compound adapters (``peft_type = "QUIC"``, prefix ``quic_``)."""

from __future__ import annotations

from typing import Any

import torch
from peft.utils import TRANSFORMERS_MODELS_TO_OFT_TARGET_MODULES_MAPPING
from torch import nn

from qpeft.tuners._common import QpeftTuner

from .layer import QuICLayer, QuICModule, compound_blocks


class QuICModel(QpeftTuner):
    """Wraps the target modules of a model with :class:`QuICModule` layers.

    Use through peft: ``get_peft_model(model, QuICConfig(target_modules=[...]))`` after
    ``import qpeft``. Default target modules per architecture follow peft's OFT table."""

    prefix: str = "quic_"
    method_label = "QuIC"
    tuner_layer_cls = QuICLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_OFT_TARGET_MODULES_MAPPING

    # ---- one batched compound call per group of layers with the same plan, per model forward ----
    batch_generation = True

    def _batch_requests(self, layer: QuICLayer, adapter_name: str) -> list[tuple[tuple, torch.Tensor]]:
        """The adapter's parameters, grouped by (block plan, settings, dtype, device): one
        base-map + compound call per group and forward instead of one per layer."""
        params = layer.generator_params(adapter_name)
        key = (layer.quic_plan[adapter_name], layer.quic_settings[adapter_name], params.dtype,
               params.device, tuple(params.shape))
        return [(key, params)]

    def _batch_generate(self, key: tuple, params: torch.Tensor) -> list[list[torch.Tensor]]:
        plan, settings = key[:2]
        mats = compound_blocks(params, plan, settings)  # per order [G, N_A, c, c]
        return [list(per_layer) for per_layer in zip(*mats, strict=True)]

    def _update_layer(self, target: nn.Module, adapter_name: str, config: Any, module_name: str) -> None:
        target.update_layer(adapter_name, config)

    def _new_layer(self, target: nn.Module, adapter_name: str, config: Any, module_name: str) -> nn.Module:
        return QuICModule(target, adapter_name, config)

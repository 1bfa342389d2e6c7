"""The Quantum-PEFT tuner: peft's ``BaseTuner`` that swaps target layers for Quantum-PEFT layers."""

from __future__ import annotations

from typing import Any

import torch
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from qpeft.tuners._common import GroupedTuner, layer_kind

from .layer import (
    CircuitGroup,
    QuantumPEFTConv2d,
    QuantumPEFTLayer,
    QuantumPEFTLinear,
    is_circuit_layer,
)

_ADAPTER_TENSORS = (*QuantumPEFTLayer.adapter_layer_names, *QuantumPEFTLayer.start_names)


class QuantumPEFTModel(GroupedTuner):
    """Quantum-PEFT (Koike-Akino et al., ICLR 2025) as a peft tuner.

    Use through peft: ``get_peft_model(base, QuantumPEFTConfig(r=8, target_modules=[...]))``
    after ``import qpeft``. Adapted layers: nn.Linear, transformers' Conv1D, nn.Conv2d (groups=1).
    Default target modules per architecture are LoRA's (e.g. query/value for BERT)."""

    prefix: str = "qpeft_"
    method_label = "Quantum-PEFT"
    tuner_layer_cls = QuantumPEFTLayer
    group_attrs = ("qpeft_group", "qpeft_index")
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _update_layer(self, target: nn.Module, adapter_name: str, config: Any, module_name: str) -> None:
        target.update_layer(adapter_name, config, module_name=module_name)

    def _new_layer(self, target: nn.Module, adapter_name: str, config: Any, module_name: str) -> nn.Module:
        cls = QuantumPEFTConv2d if layer_kind(target) == "conv2d" else QuantumPEFTLinear
        return cls(target, adapter_name, config=config, module_name=module_name)

    def _group_key(self, layer: nn.Module, adapter_name: str) -> Any | None:
        """r, depth and circuit dtype of a circuit layer (None: not a circuit layer)."""
        spec = layer.qpeft_spec.get(adapter_name)
        if spec is None or not is_circuit_layer(spec, layer.angles(adapter_name)):
            return None
        return (spec.r, spec.depth, spec.circuit_dtype)

    def _new_group(self, adapter_name: str, key: Any, layers: list[nn.Module]) -> CircuitGroup:
        return CircuitGroup(
            adapter_name, [layer.qpeft_spec[adapter_name] for layer in layers],
            [(layer.qpeft_angles_u, layer.qpeft_angles_v) for layer in layers],
            [(layer.qpeft_lambda, layer.qpeft_gain) for layer in layers],
            [layer._start_stores() if layer.qpeft_spec[adapter_name].offset else ()
             for layer in layers])

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls,
        model: nn.Module,
        config: Any,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """peft's key remapping, then a check that every Quantum-PEFT tensor of the checkpoint
        has a place of the same shape in ``model``: a checkpoint made for another architecture
        (other widths, other module names) gets one ValueError naming the module, the shapes
        and the fix, instead of a size-mismatch error or a silent partial load."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        model_state = model.state_dict()
        # checkpoints of earlier qpeft versions hold an empty angle tensor for a side of width 1
        remapped = {k: v for k, v in remapped.items() if v.numel() or k in model_state}
        for key, value in remapped.items():
            parts = key.split(".")
            hit = [i for i, p in enumerate(parts) if p in _ADAPTER_TENSORS]
            if not hit:
                continue
            module = ".".join(parts[: hit[0]]).removeprefix("base_model.model.")
            if key not in model_state:
                raise ValueError(
                    f"the Quantum-PEFT checkpoint has tensor {parts[hit[0]]!r} for module "
                    f"{module!r}, which this model has not adapted (or does not have); the "
                    "adapter was saved for another architecture — load it onto the base model "
                    "it was trained on"
                )
            expected = tuple(model_state[key].shape)
            if tuple(value.shape) != expected:
                raise ValueError(
                    f"the Quantum-PEFT checkpoint does not fit module {module!r}: "
                    f"{parts[hit[0]]} has shape {tuple(value.shape)} in the checkpoint but "
                    f"{expected} here (the layer's shape, r, depth or parameterization differ); "
                    "the adapter was saved for another architecture — load it onto the base "
                    "model it was trained on"
                )
        return remapped

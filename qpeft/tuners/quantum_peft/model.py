"""The Quantum-PEFT tuner: peft's ``BaseTuner`` that swaps target layers for Quantum-PEFT layers."""

from __future__ import annotations

from typing import Any

import torch
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from qpeft.tuners._common import QpeftTuner, layer_kind

from .layer import (
    CircuitGroup,
    QuantumPEFTConv2d,
    QuantumPEFTLayer,
    QuantumPEFTLinear,
    is_circuit_layer,
)

_ADAPTER_TENSORS = QuantumPEFTLayer.adapter_layer_names


class QuantumPEFTModel(QpeftTuner):
    """Quantum-PEFT (Koike-Akino et al., ICLR 2025) as a peft tuner.

    Use through peft: ``get_peft_model(base, QuantumPEFTConfig(r=8, target_modules=[...]))``
    after ``import qpeft``. Adapted layers: nn.Linear, transformers' Conv1D, nn.Conv2d (groups=1).
    Default target modules per architecture are LoRA's (e.g. query/value for BERT)."""

    prefix: str = "qpeft_"
    method_label = "Quantum-PEFT"
    tuner_layer_cls = QuantumPEFTLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _update_layer(self, target: nn.Module, adapter_name: str, config: Any, module_name: str) -> None:
        target.update_layer(adapter_name, config, module_name=module_name)

    def _new_layer(self, target: nn.Module, adapter_name: str, config: Any, module_name: str) -> nn.Module:
        cls = QuantumPEFTConv2d if layer_kind(target) == "conv2d" else QuantumPEFTLinear
        return cls(target, adapter_name, config=config, module_name=module_name)

    @property
    def circuit_groups(self) -> dict[str, list[CircuitGroup]]:
        """Adapter name -> its :class:`CircuitGroup` s (one per r / depth / circuit dtype with at
        least two circuit layers). The tuner owns them; member layers reference theirs
        (``qpeft_group``) and hold their slot (``qpeft_index``)."""
        return self.__dict__.setdefault("_circuit_groups", {})

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """peft's injection (``BaseTuner.inject_adapter``, same signature), then the adapter's
        :class:`CircuitGroup` s (its circuit layers per r / depth / circuit dtype), so a training
        step generates each group in one batched call."""
        super().inject_adapter(
            model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict,
        )
        members: dict[tuple[Any, ...], list[QuantumPEFTLayer]] = {}
        for module in model.modules():
            if not isinstance(module, QuantumPEFTLayer):
                continue
            module.qpeft_group.pop(adapter_name, None)
            module.qpeft_index.pop(adapter_name, None)
            spec = module.qpeft_spec.get(adapter_name)
            if spec is not None and is_circuit_layer(spec, module.angles(adapter_name)):
                members.setdefault((spec.r, spec.depth, spec.circuit_dtype), []).append(module)
        groups = []
        for layers in members.values():
            if len(layers) < 2:  # one layer: nothing to batch
                continue
            group = CircuitGroup(
                adapter_name, [layer.qpeft_spec[adapter_name] for layer in layers],
                [(layer.qpeft_angles_u, layer.qpeft_angles_v) for layer in layers],
                [(layer.qpeft_lambda, layer.qpeft_gain) for layer in layers])
            for index, layer in enumerate(layers):
                layer.qpeft_group[adapter_name] = group
                layer.qpeft_index[adapter_name] = index
            groups.append(group)
        self.circuit_groups[adapter_name] = groups

    def delete_adapter(self, adapter_name: str) -> None:
        """peft's ``delete_adapter`` (the layers drop their group entries), and the groups."""
        super().delete_adapter(adapter_name)
        self.circuit_groups.pop(adapter_name, None)

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any) -> nn.Module:
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        self.circuit_groups.clear()
        return model

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

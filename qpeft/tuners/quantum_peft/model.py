"""The Quantum-PEFT tuner: peft's ``BaseTuner`` that swaps target layers for Quantum-PEFT layers."""

from __future__ import annotations

from typing import Any

import torch
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from qpeft.circuits.stiefel import stiefel
from qpeft.tuners._common import QpeftTuner, layer_kind

from .layer import QuantumPEFTConv2d, QuantumPEFTLayer, QuantumPEFTLinear

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

    # ---- one batched circuit call per group of same-shaped factors, per model forward ----------

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        if self.__dict__.get("_qpeft_hooks") is None:
            self.__dict__["_qpeft_hooks"] = (
                model.register_forward_pre_hook(self._batch_factors),
                model.register_forward_hook(self._drop_factors),
            )

    def _batch_factors(self, module: nn.Module, args: Any) -> None:
        """Forward pre-hook: U and V of every active adapter of every layer, grouped by
        (parameterization, N, K, depth, dtype, device) and generated with one batched
        ``stiefel`` call per group — a few circuit calls per forward instead of two per layer
        (per-call overhead dominates at these sizes). Results wait in each layer's cache
        until the forward ends."""
        groups: dict[tuple, list[tuple[QuantumPEFTLayer, str, int, torch.Tensor]]] = {}
        layers = [m for m in self.model.modules() if isinstance(m, QuantumPEFTLayer)]
        for layer in layers:
            layer.__dict__["_qpeft_factors"] = {}
            if layer.disable_adapters or layer.merged:
                continue
            for name in layer.active_adapters:
                if name not in layer.qpeft_spec:
                    continue
                spec = layer.qpeft_spec[name]
                au, av = layer.circuit_params(name)
                for side, method, n, params in ((0, spec.method_u, spec.out_features, au),
                                                (1, spec.method_v, spec.in_features, av)):
                    key = (method, n, spec.r, spec.depth, params.dtype, params.device)
                    groups.setdefault(key, []).append((layer, name, side, params))
        factors: dict[tuple[QuantumPEFTLayer, str], list[torch.Tensor]] = {}
        for (method, n, r, depth, _, _), items in groups.items():
            generated = stiefel(method, torch.stack([params for *_, params in items]), n, r, depth)
            for (layer, name, side, _), mat in zip(items, generated, strict=True):
                factors.setdefault((layer, name), [mat, mat])[side] = mat
        for (layer, name), (u, v) in factors.items():
            layer.__dict__["_qpeft_factors"][name] = (u, v)

    def _drop_factors(self, module: nn.Module, args: Any, output: Any) -> None:
        """Forward hook: forget this forward's factors (the autograd graph keeps what it needs)."""
        for m in self.model.modules():
            if isinstance(m, QuantumPEFTLayer):
                m.__dict__.pop("_qpeft_factors", None)

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any):
        hooks = self.__dict__.pop("_qpeft_hooks", None)
        for hook in hooks or ():
            hook.remove()
        self._drop_factors(self.model, (), None)
        return super()._unload_and_optionally_merge(*args, **kwargs)

    def _update_layer(self, target: nn.Module, adapter_name: str, config: Any, module_name: str) -> None:
        target.update_layer(adapter_name, config, module_name=module_name)

    def _new_layer(self, target: nn.Module, adapter_name: str, config: Any, module_name: str) -> nn.Module:
        cls = QuantumPEFTConv2d if layer_kind(target) == "conv2d" else QuantumPEFTLinear
        return cls(target, adapter_name, config=config, module_name=module_name)

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

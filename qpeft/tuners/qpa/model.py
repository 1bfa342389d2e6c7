"""QPAModel: the peft tuner that wraps targeted layers and builds the one shared generator."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.integrations import init_empty_weights
from torch import nn

from qpeft.tuners._common import QpeftTuner
from qpeft.tuners.qpa.config import QPAConfig
from qpeft.tuners.qpa.generator import QPAGenerator
from qpeft.tuners.qpa.layer import QPALayer


def build_generator(config: QPAConfig, shapes: list[tuple[int, int]]) -> QPAGenerator:
    """The generator ``config`` describes for layers of these ``(d_out, d_in)`` shapes."""
    return QPAGenerator(
        shapes,
        r=config.r,
        n_mlp=config.n_mlp,
        depth=config.depth,
        n_qubits=config.n_qubits,
        hidden=config.mlp_hidden,
        activation=config.mlp_activation,
        prob_transform=config.prob_transform,
        center_output=config.center_output,
        output_gain=config.output_gain,
        init_seed=config.init_seed,
    )


class QPAModel(QpeftTuner):
    """Quantum Parameter Adaptation as a peft tuner (``qpeft.QPAConfig``, prefix ``qpa_``).

    After peft injects a :class:`QPALayer` into every targeted module, :meth:`inject_adapter`
    builds one :class:`QPAGenerator` for all of them (slicing order = module order), registers it on
    the first adapted layer and records the layout in ``config.layout``. A forward pre-hook on the
    wrapped model invalidates the generators' cache, so each model forward runs the circuit and the
    MLP once, shared by every layer (and kept in the autograd graph of that forward)."""

    prefix: str = "qpa_"
    method_label = "QPA"
    tuner_layer_cls = QPALayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    uses_shared_state: bool = True

    def _update_layer(self, target: nn.Module, adapter_name: str, config: Any, module_name: str) -> None:
        target.update_layer(adapter_name, config)

    def _new_layer(self, target: nn.Module, adapter_name: str, config: Any, module_name: str) -> nn.Module:
        return QPALayer(target, adapter_name, config)

    def _generators(self) -> dict[str, QPAGenerator]:
        gens = self.__dict__.get("_qpa_gens")
        if gens is None:
            gens = {}
            self.__dict__["_qpa_gens"] = gens
        return gens

    def _new_forward(self, module: nn.Module, args: Any) -> None:
        for gen in self._generators().values():
            gen.invalidate()

    def inject_adapter(
        self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any
    ) -> None:
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        low_cpu_mem_usage = bool(kwargs.get("low_cpu_mem_usage", False))
        if len(args) >= 2:
            low_cpu_mem_usage = bool(args[1])
        config: QPAConfig = self.peft_config[adapter_name]
        layers = [
            (name, module)
            for name, module in model.named_modules()
            if isinstance(module, QPALayer) and adapter_name in module.qpa_r
        ]
        layout = []
        for name, module in layers:
            base = module.get_base_layer()
            layout.append(
                [name, module.kind, module.out_features, module.in_features, list(base.weight.shape)]
            )
        if config.layout is not None and [list(x) for x in config.layout] != layout:
            raise ValueError(
                f"adapter {adapter_name!r} was saved for a different set of layers: its config "
                f"lists {len(config.layout)} layers ({config.layout[:2]}...), this model has "
                f"{len(layout)} ({layout[:2]}...)"
            )
        config.layout = layout
        shapes = [(o, i) for _, _, o, i, _ in layout]
        weight = layers[0][1].get_base_layer().weight
        dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        ctx = init_empty_weights if low_cpu_mem_usage else nullcontext
        with ctx():
            generator = build_generator(config, shapes)
        if generator.theta.is_meta:  # low_cpu_mem_usage: peft assigns the loaded tensors later
            generator.to(dtype=dtype)
        else:
            generator.to(device=weight.device, dtype=dtype)
        for index, (_, module) in enumerate(layers):
            module.attach_generator(adapter_name, generator, index, owner=index == 0)
        trainable = adapter_name in self.active_adapters and not config.inference_mode
        generator.requires_grad_(trainable)
        self._generators()[adapter_name] = generator
        if self.__dict__.get("_qpa_hook") is None:
            self.__dict__["_qpa_hook"] = model.register_forward_pre_hook(self._new_forward)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._generators().pop(adapter_name, None)

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any):
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        hook = self.__dict__.pop("_qpa_hook", None)
        if hook is not None:
            hook.remove()
        self._generators().clear()
        return model

    def generator(self, adapter_name: str = "default") -> QPAGenerator:
        """The shared generator of ``adapter_name`` (ValueError naming the known adapters)."""
        gens = self._generators()
        if adapter_name not in gens:
            raise ValueError(f"no QPA adapter named {adapter_name!r}; known: {sorted(gens)}")
        return gens[adapter_name]

    def lora_state_dict(self, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        """The generated factors as a plain peft LoRA state dict (keys
        ``base_model.model.<layer>.lora_A.weight`` / ``.lora_B.weight``), detached, fp32."""
        from qpeft.tuners.qpa.export import lora_tensors

        config: QPAConfig = self.peft_config[adapter_name]
        return lora_tensors(self.generator(adapter_name), config.layout)

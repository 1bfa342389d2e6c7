"""QPAModel: the peft tuner that wraps targeted layers and builds the one shared generator."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.integrations import init_empty_weights
from torch import nn

from qpeft.tuners._common import QpeftTuner
from qpeft.tuners.qpa.config import QPAConfig, build_generator
from qpeft.tuners.qpa.export import lora_tensors
from qpeft.tuners.qpa.generator import QPAGenerator, parameters_fixed
from qpeft.tuners.qpa.layer import QPALayer, qpa_layer_class

__all__ = ["QPAModel", "build_generator"]  # build_generator lives in config.py (no import cycle)


class QPAModel(QpeftTuner):
    """Quantum Parameter Adaptation as a peft tuner (``qpeft.QPAConfig``, prefix ``qpa_``).

    After peft injects a QPA layer (:class:`QPALinear` / :class:`QPAConv2d`) into every targeted module, :meth:`inject_adapter`
    builds one :class:`QPAGenerator` for all of them (slicing order = module order), registers it
    in this tuner's ``qpa_generator`` ModuleDict (checkpoint key ``base_model.qpa_generator.*``)
    and records the layout in ``config.layout``. Each layer generates its own slice of the
    factors in its forward; while training, the whole generation (circuit and MLP) runs once
    per step and is shared (``qpeft.tuners._batched_generation``)."""

    prefix: str = "qpa_"
    method_label = "QPA"
    tuner_layer_cls = QPALayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    uses_shared_state: bool = True

    def _update_layer(self, target: nn.Module, adapter_name: str, config: Any, module_name: str) -> None:
        target.update_layer(adapter_name, config)

    def _new_layer(self, target: nn.Module, adapter_name: str, config: Any, module_name: str) -> nn.Module:
        return qpa_layer_class(target)(target, adapter_name, config)

    def _generators(self) -> nn.ModuleDict:
        """The ``qpa_generator`` ModuleDict of this tuner, created on first use (peft builds the
        tuner through ``BaseTuner.__init__``, which injects before a subclass could add it)."""
        gens = self._modules.get("qpa_generator")
        if gens is None:
            gens = nn.ModuleDict()
            self.add_module("qpa_generator", gens)
        return gens

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """peft's injection (``BaseTuner.inject_adapter``, same signature), then one
        :class:`QPAGenerator` for the adapter's layers, registered in ``qpa_generator``; built on
        the meta device when ``low_cpu_mem_usage`` (peft assigns the loaded tensors later)."""
        # peft keeps the trainability of the parameters that already exist when an adapter is
        # added, but only looks inside the wrapped model: the generators live on the tuner
        existing = {
            p: p.requires_grad
            for name, gen in self._generators().items() if name != adapter_name
            for p in gen.parameters()
        }
        super().inject_adapter(
            model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict,
        )
        for param, requires_grad in existing.items():
            param.requires_grad_(requires_grad)
        config: QPAConfig = self.peft_config[adapter_name]
        layers = [
            (name, module)
            for name, module in model.named_modules()
            if isinstance(module, QPALayer) and adapter_name in module.qpa_r
        ]
        layout = []
        for name, module in layers:
            base = module.get_base_layer()
            # a quantized linear stores a packed weight: record the matrix shape it stands for
            weight_shape = (
                [module.out_features, module.in_features]
                if module.kind == "linear"
                else list(base.weight.shape)
            )
            layout.append([name, module.kind, module.out_features, module.in_features, weight_shape])
        if config.layout is not None and [list(x) for x in config.layout] != layout:
            raise ValueError(
                f"adapter {adapter_name!r} was saved for a different set of layers: its config "
                f"lists {len(config.layout)} layers ({config.layout[:2]}...), this model has "
                f"{len(layout)} ({layout[:2]}...)"
            )
        config.layout = layout
        shapes = [(o, i) for _, _, o, i, _ in layout]
        # the sizes the rule chose are written into the config: a saved adapter reloads the
        # same generator even if the rule changes
        config.n_mlp, config.mlp_hidden = config.resolve_sizes(shapes)
        weight = layers[0][1].get_base_layer().weight
        # the base's float dtype, as peft creates LoRA factors; _cast_adapter_dtype upcasts
        # half precision unless autocast_adapter_dtype=False
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        ctx = init_empty_weights if low_cpu_mem_usage else nullcontext
        with ctx():
            generator = build_generator(config, shapes)
        if generator.theta.is_meta:  # low_cpu_mem_usage: peft assigns the loaded tensors later
            generator.to(dtype=dtype)
        else:
            generator.to(device=weight.device, dtype=dtype)
        for index, (_, module) in enumerate(layers):
            module.attach_generator(adapter_name, generator, index)
        trainable = adapter_name in self.active_adapters and not config.inference_mode
        generator.requires_grad_(trainable)
        self._generators()[adapter_name] = generator

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """peft's context around every ``PeftModel`` forward / ``generate``: qpeft's
        (mixed-adapter batches), inside :func:`parameters_fixed`, so an evaluation forward
        compares each generator's parameters with its kept factors' snapshot once, not once
        per adapted layer."""
        with parameters_fixed(), super()._enable_peft_forward_hooks(*args, **kwargs):
            yield

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """peft's rule for the generator too: float16 / bfloat16 become float32 unless
        ``autocast_adapter_dtype=False``."""
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        generator = self._generators()[adapter_name] if adapter_name in self._generators() else None
        if autocast_adapter_dtype and generator is not None:
            if generator.theta.dtype in (torch.float16, torch.bfloat16):
                generator.float()

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """peft's ``set_adapter`` (same signature); the generators (outside the layers) follow:
        only the active adapters' train, none with ``inference_mode=True``."""
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        active = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name, generator in self._generators().items():
            generator.requires_grad_(name in active and not inference_mode)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """peft's ``set_requires_grad`` (e.g. ``load_adapter(..., is_trainable=True)``); the named
        adapters' generators follow."""
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for name, generator in self._generators().items():
            if name in names:
                generator.requires_grad_(requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if adapter_name in self._generators():
            del self._generators()[adapter_name]

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any):
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        self._generators().clear()
        return model

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: Any, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Checkpoints of qpeft <= 0.1 kept the generator on the first adapted layer
        (``...<layer>.qpa_generator.theta``); it lives on the tuner now."""
        moved = {}
        for key, value in state_dict.items():
            head, sep, rest = key.partition(".qpa_generator.")
            if sep and head not in ("base_model", ""):
                key = "base_model.qpa_generator." + rest
            moved[key] = value
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, moved)

    def generator(self, adapter_name: str = "default") -> QPAGenerator:
        """The shared generator of ``adapter_name`` (ValueError naming the known adapters)."""
        gens = self._generators()
        if adapter_name not in gens:
            raise ValueError(f"no QPA adapter named {adapter_name!r}; known: {sorted(gens.keys())}")
        return gens[adapter_name]

    def lora_state_dict(self, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        """The generated factors as a plain peft LoRA state dict (keys
        ``base_model.model.<layer>.lora_A.weight`` / ``.lora_B.weight``), detached, fp32."""
        config: QPAConfig = self.peft_config[adapter_name]
        return lora_tensors(self.generator(adapter_name), config.layout)

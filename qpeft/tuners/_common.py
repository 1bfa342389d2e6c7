"""Helpers shared by qpeft's tuners: which kind of layer is being adapted, and how its weight
reads as a plain ``out x in`` matrix.

Three layer kinds are supported by every method:
- ``nn.Linear``: weight is ``[out, in]``.
- transformers' ``Conv1D`` (GPT-2, ``fan_in_fan_out``): weight is stored transposed, ``[in, out]``.
- ``nn.Conv2d``: weight ``[out_ch, in_ch/groups, kh, kw]`` reads as ``[out_ch, in_ch*kh*kw]`` (groups == 1).
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Sequence
from typing import Any, Literal

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

LayerKind = Literal["linear", "conv1d", "conv2d"]

try:  # transformers is a hard dependency of qpeft, but keep this module importable alone
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment,misc]


def layer_kind(base_layer: nn.Module) -> LayerKind:
    """Classify ``base_layer``; ValueError naming the type for anything unsupported."""
    if isinstance(base_layer, nn.Linear):
        return "linear"
    if Conv1D and isinstance(base_layer, Conv1D):
        return "conv1d"
    if isinstance(base_layer, nn.Conv2d):
        if base_layer.groups != 1:
            raise ValueError(
                f"nn.Conv2d with groups={base_layer.groups} is not supported (only groups=1); "
                "leave depthwise/grouped convolutions out of target_modules"
            )
        return "conv2d"
    raise ValueError(
        f"layer type {type(base_layer).__name__} is not supported; qpeft adapts nn.Linear, "
        "transformers' Conv1D and nn.Conv2d — remove this module from target_modules"
    )


def matrix_shape(base_layer: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of the weight read as a matrix (Conv2d: in = in_ch*kh*kw).

    Reads ``weight.ds_shape`` when present (DeepSpeed ZeRO-3 partitions the real tensor)."""
    kind = layer_kind(base_layer)
    weight = base_layer.weight
    shape = tuple(getattr(weight, "ds_shape", weight.shape))
    if kind == "linear":
        return int(shape[0]), int(shape[1])
    if kind == "conv1d":
        return int(shape[1]), int(shape[0])
    out_ch, in_ch, kh, kw = shape
    return int(out_ch), int(in_ch * kh * kw)


def weight_to_matrix(base_layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """View ``weight`` (shaped like ``base_layer.weight``) as ``[out, in]``. O(1) for Linear/Conv2d;
    Conv1D returns a transposed view."""
    kind = layer_kind(base_layer)
    if kind == "linear":
        return weight
    if kind == "conv1d":
        return weight.T
    return weight.reshape(weight.shape[0], -1)


def matrix_to_weight(base_layer: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`weight_to_matrix`: ``[out, in]`` back to ``base_layer.weight``'s layout."""
    kind = layer_kind(base_layer)
    if kind == "linear":
        return matrix
    if kind == "conv1d":
        return matrix.T.contiguous()
    return matrix.reshape(base_layer.weight.shape)


_GENERATED = "_qpeft_generated"  # a layer's per-forward cache: {adapter: [output per request]}


class QpeftTuner(BaseTuner):
    """What qpeft's three tuners share: peft's ``_create_and_replace`` step, and optionally one
    batched generation per model forward.

    A subclass sets peft's ``prefix`` / ``tuner_layer_cls`` / ``target_module_mapping`` and
    ``method_label`` (used in errors), and implements :meth:`_new_layer` (wrap a plain layer) and
    :meth:`_update_layer` (add an adapter to a layer that is already ours).

    Batched generation: a tuner whose layers build small matrices from their parameters every
    forward (circuits, compounds) implements :meth:`_batch_requests` and
    :meth:`_batch_generate`. A forward pre-hook on the model then collects every active
    adapter's requests, stacks those with the same group key and generates each group in one
    call (per-call overhead dominates at these sizes: dozens of layers, each a few small ops);
    the outputs wait in each layer's cache (:meth:`WeightMergeLayer.generated`) until the
    forward ends."""

    method_label: str = "qpeft"
    batch_generation: bool = False

    def _batch_requests(self, layer: Any, adapter_name: str) -> list[tuple[Hashable, torch.Tensor]]:
        """(group key, parameters) for each thing ``adapter_name`` of ``layer`` generates per
        forward. Parameters with the same key must have the same shape."""
        raise NotImplementedError

    def _batch_generate(self, key: Hashable, params: torch.Tensor) -> Sequence[Any]:
        """Outputs for the stacked parameters [G, ...] of one group: item i for request i."""
        raise NotImplementedError

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        if self.batch_generation and self.__dict__.get("_qpeft_hooks") is None:
            self.__dict__["_qpeft_hooks"] = (
                model.register_forward_pre_hook(self._generate_batched),
                model.register_forward_hook(self._drop_generated),
            )

    def _adapter_layers(self) -> list[Any]:
        return [m for m in self.model.modules() if isinstance(m, self.tuner_layer_cls)]

    def _generate_batched(self, module: nn.Module, args: Any) -> None:
        """Forward pre-hook: generate every active adapter's requests, one call per group."""
        groups: dict[Hashable, list[tuple[list[Any], int, torch.Tensor]]] = {}
        for layer in self._adapter_layers():
            cache = layer.__dict__[_GENERATED] = {}
            if layer.disable_adapters or layer.merged:
                continue
            for name in layer.active_adapters:
                if not layer._owns_adapter(name):
                    continue
                requests = self._batch_requests(layer, name)
                slots = cache[name] = [None] * len(requests)
                for i, (key, params) in enumerate(requests):
                    groups.setdefault(key, []).append((slots, i, params))
        for key, items in groups.items():
            outputs = self._batch_generate(key, torch.stack([params for *_, params in items]))
            for (slots, i, _), out in zip(items, outputs, strict=True):
                slots[i] = out

    def _drop_generated(self, module: nn.Module, args: Any, output: Any) -> None:
        """Forward hook: forget this forward's outputs (the autograd graph keeps what it needs)."""
        for layer in self._adapter_layers():
            layer.__dict__.pop(_GENERATED, None)

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any):
        for hook in self.__dict__.pop("_qpeft_hooks", None) or ():
            hook.remove()
        self._drop_generated(self.model, (), None)
        return super()._unload_and_optionally_merge(*args, **kwargs)

    def _new_layer(self, target: nn.Module, adapter_name: str, config: Any, module_name: str) -> nn.Module:
        raise NotImplementedError

    def _update_layer(self, target: nn.Module, adapter_name: str, config: Any, module_name: str) -> None:
        raise NotImplementedError

    def _create_and_replace(
        self,
        config: Any,
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
            if isinstance(target, self.tuner_layer_cls):
                self._update_layer(target, adapter_name, config, current_key)
                return
            if isinstance(target, BaseTunerLayer):
                raise ValueError(
                    f"{type(target).__name__} is another peft method's layer; {self.method_label} "
                    "wraps plain nn.Linear, Conv1D and nn.Conv2d modules"
                )
            layer_kind(target)
            new_module = self._new_layer(target, adapter_name, config, current_key)
        except ValueError as err:
            raise ValueError(f"{self.method_label} cannot adapt module {current_key!r}: {err}") from err
        if adapter_name not in self.active_adapters:
            # an additional adapter is not trainable until set_adapter() selects it
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)


class WeightMergeLayer(BaseTunerLayer):
    """What qpeft's three tuner layers share: the base-layer bookkeeping peft expects
    (:meth:`_init_base_layer`) and ``merge`` / ``unmerge`` for an adapter that maps the base
    weight W to a new W (additive: W + ΔW; multiplicative: Q·W). peft's merge contract: adapters
    merge in the order given and unmerge last-first; ``safe_merge`` refuses non-finite results
    before writing.

    A layer implements :meth:`_owns_adapter`, :meth:`_merged_weight` and :meth:`_unmerged_weight`."""

    def _init_base_layer(self, base_layer: nn.Module, **kwargs: Any) -> None:
        """Wrap ``base_layer``: nothing merged, adapters enabled; ``kind`` and the weight's
        ``(out_features, in_features)`` read once (ValueError for unsupported layers)."""
        self.base_layer = base_layer
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        base = self.get_base_layer()
        self.kind = layer_kind(base)
        self.out_features, self.in_features = matrix_shape(base)

    def _owns_adapter(self, adapter_name: str) -> bool:
        raise NotImplementedError

    def generated(self, adapter_name: str) -> list[Any] | None:
        """This forward's batched outputs for ``adapter_name`` (see :class:`QpeftTuner`), or
        None outside a model forward (then the layer generates its own)."""
        return self.__dict__.get(_GENERATED, {}).get(adapter_name)

    def _merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _read_base_weight(self) -> torch.Tensor:
        # get_base_weight handles quantized bases (peft >= 0.21); older peft: the plain tensor
        if hasattr(BaseTunerLayer, "get_base_weight"):
            return self.get_base_weight()
        return self.get_base_layer().weight.data

    def _write_base_weight(self, weight: torch.Tensor) -> None:
        if hasattr(BaseTunerLayer, "set_base_weight"):
            self.set_base_weight(weight)
        else:
            self.get_base_layer().weight.data = weight

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold each adapter (default: the active ones) into the base weight."""
        from peft.tuners.tuners_utils import check_adapters_to_merge

        for name in check_adapters_to_merge(self, adapter_names):
            if not self._owns_adapter(name):
                continue
            with torch.no_grad():
                weight = self._read_base_weight()
                new_weight = self._merged_weight(name, weight)
                if safe_merge and not torch.isfinite(new_weight).all():
                    raise ValueError(
                        f"NaN/inf in the merged weights: adapter {name!r} seems to be broken; "
                        "nothing was merged into this layer"
                    )
                self._write_base_weight(new_weight.to(weight.dtype))
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Undo every merged adapter, last merged first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if not self._owns_adapter(name):
                continue
            with torch.no_grad():
                weight = self._read_base_weight()
                self._write_base_weight(self._unmerged_weight(name, weight).to(weight.dtype))

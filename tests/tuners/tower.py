"""A small stack of adapted layers for the grouped-generation tests: two blocks of
(q 24->24, v 24->12, o 12->24), six layers with three shapes, so layers of one shape share
a batched generation and the others do not."""

from __future__ import annotations

import torch
from torch import nn


class Tower(nn.Module):
    """x [B, 24] -> [B, 24] through two residual blocks of q, v, o."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"q": nn.Linear(24, 24), "v": nn.Linear(24, 12), "o": nn.Linear(12, 24)})
            for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = x + b["o"](torch.tanh(b["v"](torch.tanh(b["q"](x)))))
        return x

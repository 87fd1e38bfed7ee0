"""Backgrounds behind the object: a solid colour or a small MLP on the ray direction."""

from __future__ import annotations

import torch
from torch import nn


class SolidBackground(nn.Module):
    """A fixed colour (white by default: every palette colour stays visible against it)."""

    color: torch.Tensor

    def __init__(self, color: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> None:
        super().__init__()
        self.register_buffer("color", torch.tensor(color, dtype=torch.float32))

    def forward(self, dirs: torch.Tensor) -> torch.Tensor:
        return self.color.expand(*dirs.shape[:-1], 3)


class MLPBackground(nn.Module):
    """A learnable background: a tiny MLP from ray direction to colour (DreamFusion's choice)."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 3))

    def forward(self, dirs: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(dirs))

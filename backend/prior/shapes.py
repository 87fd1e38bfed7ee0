"""Analytic primitives as signed distance functions (scene units, Z up, centred).

Used to render the prior's training images and, by the quality benchmark, to judge meshes.
"""

from __future__ import annotations

import torch

SHAPES = ("sphere", "cube", "cylinder", "cone", "torus")

# Display (sRGB) albedo of each colour word; none is close to the white background.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.10, 0.10),
    "green": (0.12, 0.68, 0.16),
    "blue": (0.12, 0.22, 0.88),
    "yellow": (0.95, 0.82, 0.08),
    "purple": (0.56, 0.16, 0.76),
}


def _length2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(a * a + b * b)


def sdf(shape: str, p: torch.Tensor) -> torch.Tensor:
    """Signed distance from points p [..., 3] to a unit-scale primitive (negative inside)."""
    x, y, z = p.unbind(-1)
    if shape == "sphere":
        return p.norm(dim=-1) - 0.55
    if shape == "cube":
        q = p.abs() - 0.42
        return q.clamp_min(0).norm(dim=-1) + q.max(-1).values.clamp_max(0)
    if shape == "cylinder":
        dx, dz = _length2(x, y) - 0.42, z.abs() - 0.48
        return torch.maximum(dx, dz).clamp_max(0) + _length2(dx.clamp_min(0), dz.clamp_min(0))
    if shape == "cone":  # apex at z = 0.55, base radius 0.52 at z = -0.5
        radius, height = 0.52, 1.05
        wx, wy = _length2(x, y), z - 0.55
        t = ((wx * radius - wy * height) / (radius * radius + height * height)).clamp(0, 1)
        ax, ay = wx - radius * t, wy + height * t
        bx, by = wx - radius * (wx / radius).clamp(0, 1), wy + height
        dist = torch.sqrt(torch.minimum(ax * ax + ay * ay, bx * bx + by * by))
        inside = torch.maximum(-(wx * -height - wy * radius), -(wy + height)) < 0
        return torch.where(inside, -dist, dist)
    if shape == "torus":
        return _length2(_length2(x, y) - 0.4, z) - 0.17
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")

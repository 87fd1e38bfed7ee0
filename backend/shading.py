"""Shading of composited albedo: albedo only, Lambertian, or textureless (DreamFusion §3.1).

The same `lambertian` is used by the NeRF renderer and by the embedded prior's training
renderer, so the prior learns exactly the images the NeRF can produce.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SHADING_MODES = ("albedo", "lambertian", "textureless")


@dataclass(frozen=True)
class ShadingConfig:
    """Probabilities of each shading mode per step and the ambient light ratio."""

    albedo: float = 0.1
    textureless: float = 0.2
    ambient: float = 0.35

    def sample(self, generator: torch.Generator) -> str:
        u = float(torch.rand((), generator=generator))
        if u < self.albedo:
            return "albedo"
        if u < self.albedo + self.textureless:
            return "textureless"
        return "lambertian"


def lambertian(albedo: torch.Tensor, normals: torch.Tensor, light_dir: torch.Tensor, ambient: float) -> torch.Tensor:
    """`albedo * (ambient + (1 - ambient) * max(0, n . l))`; tensors broadcast on the last axis."""
    diffuse = (normals * light_dir).sum(-1, keepdim=True).clamp_min(0.0)
    return albedo * (ambient + (1.0 - ambient) * diffuse)


def shade(
    mode: str, albedo: torch.Tensor, opacity: torch.Tensor, normals: torch.Tensor, light_dir: torch.Tensor, ambient: float
) -> torch.Tensor:
    """Shade premultiplied albedo [..., 3] given opacity [..., 1], normals and light [..., 3]."""
    if mode == "albedo":
        return albedo
    if mode == "lambertian":
        return lambertian(albedo, normals, light_dir, ambient)
    if mode == "textureless":
        return lambertian(opacity.expand_as(albedo), normals, light_dir, ambient)
    raise ValueError(f"unknown shading mode {mode!r}; expected one of {SHADING_MODES}")

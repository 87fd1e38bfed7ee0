"""Procedural training data for the embedded prior: shaded coloured primitives with captions.

Cameras, light, shading and background follow the NeRF pipeline exactly (cameras.py,
shading.py, background.py) with the settings of the embedded prior's recipe, and captions
are the view prompts SDS uses (prompts.py), so the prior learns the images SDS will show it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cameras import Cameras, ray_bundle, sample_cameras, view_word
from ..prompts import view_prompt
from ..recipe import Recipe
from ..shading import ShadingConfig, lambertian
from .shapes import PALETTE, SHAPES, sdf

EMPTY_CAPTION_RATE = 0.1


@dataclass
class Batch:
    images: torch.Tensor  # [B, 3, S, S] in [0, 1], display colour
    captions: list[str]
    cameras: Cameras
    shape_ids: torch.Tensor  # [B]
    color_ids: torch.Tensor  # [B]


def render_primitives(
    shapes: list[str],
    colors: torch.Tensor,
    cameras: Cameras,
    size: int,
    supersample: int = 2,
    ambient: float = ShadingConfig.ambient,
    background: tuple[float, float, float] = (1.0, 1.0, 1.0),
    iterations: int = 64,
) -> torch.Tensor:
    """Sphere-trace each primitive from its camera; returns [B, 3, size, size] images."""
    res = size * supersample
    origins, dirs = ray_bundle(cameras, res, res)  # [B, R, R, 3]
    t = torch.zeros(origins.shape[:-1])
    hit = torch.zeros_like(t, dtype=torch.bool)
    start = (cameras.distance - 1.0).clamp_min(0.0)[:, None, None]
    t = t + start

    def field(points: torch.Tensor) -> torch.Tensor:
        out = torch.empty(points.shape[:-1])
        for b, shape in enumerate(shapes):
            out[b] = sdf(shape, points[b])
        return out

    for _ in range(iterations):
        d = field(origins + t[..., None] * dirs)
        hit = hit | (d.abs() < 1e-3)
        t = torch.where(hit, t, t + d)
    points = origins + t[..., None] * dirs
    hit = hit & (field(points).abs() < 5e-3)
    eps = 1e-3
    offsets = torch.eye(3) * eps
    grad = torch.stack([field(points + o) - field(points - o) for o in offsets], -1)
    normals = torch.nn.functional.normalize(grad, dim=-1)
    albedo = colors[:, None, None, :].expand_as(points)
    light = cameras.light_dir[:, None, None, :]
    rgb = lambertian(albedo, normals, light, ambient)
    bg = torch.tensor(background).expand_as(rgb)
    image = torch.where(hit[..., None], rgb, bg).permute(0, 3, 1, 2)
    return torch.nn.functional.avg_pool2d(image, supersample) if supersample > 1 else image


def make_batch(count: int, size: int, generator: torch.Generator, recipe: Recipe) -> Batch:
    """Random primitives, colours and cameras drawn and lit as `recipe` draws and lights SDS views;
    deterministic for a given generator state."""
    shape_ids = torch.randint(len(SHAPES), (count,), generator=generator)
    color_ids = torch.randint(len(PALETTE), (count,), generator=generator)
    palette = torch.tensor(list(PALETTE.values()))
    jitter = (torch.rand(count, 3, generator=generator) - 0.5) * 0.08
    colors = (palette[color_ids] + jitter).clamp(0, 1)
    cameras = sample_cameras(count, generator, recipe.cameras)
    shapes = [SHAPES[i] for i in shape_ids.tolist()]
    images = render_primitives(shapes, colors, cameras, size, ambient=recipe.shading.ambient)
    names = list(PALETTE)
    views = view_word(cameras.elevation, cameras.azimuth)
    drop = torch.rand(count, generator=generator) < EMPTY_CAPTION_RATE
    captions = [
        "" if d else view_prompt(f"a {names[c]} {s}", v)
        for d, c, s, v in zip(drop.tolist(), color_ids.tolist(), shapes, views, strict=True)
    ]
    return Batch(images, captions, cameras, shape_ids, color_ids)

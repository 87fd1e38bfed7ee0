"""Rendering a triangle surface through the differentiable rasteriser, painted by a colour
function and shaded as the prior expects: the DMTet stage and the texture stage both render
this way."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..cameras import Cameras, ray_bundle
from ..raster import project, rasterize, vertex_normals
from ..shading import shade

Albedo = Callable[[torch.Tensor], torch.Tensor]  # points [N, 3] -> display colour [N, 3]
Background = Callable[[torch.Tensor], torch.Tensor]  # ray directions [N, 3] -> colour [N, 3]


def spread(x: torch.Tensor, covered: torch.Tensor, reach: int = 2) -> torch.Tensor:
    """[B, H, W, C] values of covered pixels carried to the uncovered pixels within `reach`
    (their neighbours' mean), where the antialiased outline mixes them with the background."""
    weight = covered[:, None].to(x.dtype)
    k = 2 * reach + 1
    total = F.avg_pool2d(x.permute(0, 3, 1, 2) * weight, k, 1, reach)
    count = F.avg_pool2d(weight, k, 1, reach)
    filled = (total / count.clamp_min(1e-6)).permute(0, 2, 3, 1)
    return torch.where(covered[..., None], x, filled)


def render_surface(vertices: torch.Tensor, faces: torch.Tensor, cameras: Cameras, size: int, shading: str,
                   albedo: Albedo, background: Background, ambient: float, sigma: float,
                   edges: tuple[torch.Tensor, torch.Tensor] | None = None, inset: float = 0.0,
                   albedo_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, 3, H, W] display colour over the background and [B, 1, H, W] alpha. The colour is
    looked up `inset` inside the surface along its normal, without gradients unless `albedo_grad`."""
    frags = rasterize(project(vertices, cameras, size, size), faces, size, size, sigma, edges)
    covered = frags.face >= 0
    points = frags.interpolate(vertices, faces)
    normals = F.normalize(frags.interpolate(vertex_normals(vertices, faces), faces), dim=-1)
    color = torch.zeros_like(points)
    if covered.any():
        with torch.set_grad_enabled(torch.is_grad_enabled() and albedo_grad):
            color = color.index_put((covered,), albedo(points[covered] - inset * normals[covered]))
    color, normals = spread(color, covered), spread(normals, covered)
    alpha = frags.alpha[..., None]
    light = cameras.light_dir[:, None, None, :].expand_as(normals)
    shaded = shade(shading, color * alpha, alpha, normals, light, ambient)
    _, dirs = ray_bundle(cameras, size, size)
    shaded = shaded + (1 - alpha) * background(dirs.reshape(-1, 3)).view_as(shaded)
    return shaded.permute(0, 3, 1, 2), alpha.permute(0, 3, 1, 2)

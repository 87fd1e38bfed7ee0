"""Volume rendering of the field: rays through the bounding sphere, stratified samples,
an occupancy grid that skips empty space, alpha compositing, and deferred shading.

Only samples in occupied cells are evaluated, in one pass with gradients (a no-grad pass
that found where each ray turns opaque, so that only the samples in front are
differentiated, cost more than it saved: it cut 1-15 % of the samples for a whole extra
forward pass). Normals are taken once per ray at the expected surface point (deferred
shading) instead of at every sample: for the solid surfaces SDS converges to this is the
same image, at a fraction of the cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .cameras import BOUND_RADIUS, Cameras, ray_bundle, sphere_near_far
from .field import NeRFField
from .shading import ShadingConfig, shade


@dataclass(frozen=True)
class RenderConfig:
    """How rays are sampled and how the occupancy grid skips empty space."""

    # Samples along a diameter of the bounding sphere. Rays are sampled only across the field's
    # own sphere (FieldConfig.radius: no density beyond it), at the same spacing.
    samples_per_ray: int = 64
    occupancy_resolution: int = 32
    # A cell counts as empty where a sample's optical thickness (density x sample spacing) is
    # below this: Instant-NGP's 0.01, i.e. under 1 % opacity per sample.
    occupancy_thickness: float = 0.01
    occupancy_decay: float = 0.9
    # Cells next to occupied ones are sampled too, so that the surface can grow into them. One
    # cell, not two: on the tiny-SD benchmark two cost 48 % more samples (133k against 90k a step)
    # for a render that differed by at most 0.0015 in colour and 0.0023 in opacity.
    occupancy_dilation: int = 1  # cells


class OccupancyGrid(nn.Module):
    """A coarse grid over [-R, R]^3 remembering where the field has density."""

    density: torch.Tensor
    mask: torch.Tensor

    def __init__(self, config: RenderConfig = RenderConfig()) -> None:
        super().__init__()
        self.config = config
        res = config.occupancy_resolution
        self.register_buffer("density", torch.full((res, res, res), float("inf")))
        self.register_buffer("mask", torch.ones(res, res, res, dtype=torch.bool))

    @torch.no_grad()
    def update(self, field: NeRFField, generator: torch.Generator | None = None) -> None:
        """Re-measure the density at a jittered point in every cell and refresh the mask."""
        res = self.config.occupancy_resolution
        device = self.density.device
        idx = torch.stack(torch.meshgrid(*[torch.arange(res, device=device)] * 3, indexing="ij"), -1).reshape(-1, 3)
        jitter = torch.rand(idx.shape, generator=generator).to(device)
        points = ((idx + jitter) / res * 2 - 1) * BOUND_RADIUS
        fresh = torch.cat([field.density(chunk) for chunk in points.split(65536)]).view(res, res, res)
        finite = torch.isfinite(self.density)
        self.density = torch.where(finite, torch.maximum(self.density * self.config.occupancy_decay, fresh), fresh)
        spacing = 2 * BOUND_RADIUS / self.config.samples_per_ray
        occupied = (self.density * spacing > self.config.occupancy_thickness).float()[None, None]
        k = 2 * self.config.occupancy_dilation + 1
        self.mask = F.max_pool3d(occupied, k, stride=1, padding=self.config.occupancy_dilation)[0, 0].bool()

    def occupied(self, points: torch.Tensor) -> torch.Tensor:
        res = self.config.occupancy_resolution
        idx = ((points / BOUND_RADIUS + 1) * 0.5 * res).long().clamp(0, res - 1)
        return self.mask[idx[..., 0], idx[..., 1], idx[..., 2]]

    @property
    def occupied_fraction(self) -> float:
        return float(self.mask.float().mean())


@dataclass
class RenderOutput:
    rgb: torch.Tensor  # [B, 3, H, W] display colour, background composited
    opacity: torch.Tensor  # [B, 1, H, W]
    depth: torch.Tensor  # [B, 1, H, W] distance along the ray, 0 where empty
    normals: torch.Tensor  # [B, 3, H, W] world-space, at the expected surface
    orientation: torch.Tensor  # scalar: opacity-weighted relu(n . d)^2 summed per image (Ref-NeRF)
    samples: int  # field evaluations spent on the samples


def composite(density: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Compositing weights [N, S] from densities [N, S] and step lengths [N, 1]."""
    tau = density * delta
    alpha = 1 - torch.exp(-tau)
    transmittance = torch.exp(-(torch.cumsum(tau, -1) - tau))
    return alpha * transmittance


def render(
    field: NeRFField,
    background: nn.Module,
    cameras: Cameras,
    height: int,
    width: int,
    shading: str = "lambertian",
    ambient: float = ShadingConfig.ambient,
    occupancy: OccupancyGrid | None = None,
    config: RenderConfig = RenderConfig(),
    generator: torch.Generator | None = None,
) -> RenderOutput:
    """Render B cameras at H x W; stratified jitter comes from `generator` (none: centres)."""
    origins, dirs = ray_bundle(cameras, height, width)
    batch = origins.shape[0]
    o, d = origins.reshape(-1, 3), dirs.reshape(-1, 3)
    near, far, hit = sphere_near_far(o, d, field.radius)
    s = max(1, round(config.samples_per_ray * field.radius / BOUND_RADIUS))
    if generator is None:
        u = torch.full((o.shape[0], s), 0.5, device=o.device)
    else:
        u = torch.rand(o.shape[0], s, generator=generator).to(o.device)
    delta = ((far - near) / s)[:, None]
    t = near[:, None] + (torch.arange(s, device=o.device) + u) * delta
    points = o[:, None, :] + t[..., None] * d[:, None, :]
    mask = hit[:, None].expand(-1, s)
    if occupancy is not None:
        culled = mask & occupancy.occupied(points)
        # A grid that leaves no sample on these rays (the field faded where they look) would
        # leave the render without a gradient, and the field could never grow back.
        if culled.any():
            mask = culled
    density = torch.zeros(mask.shape, device=o.device)
    albedo = torch.zeros(*mask.shape, 3, device=o.device)
    if mask.any():
        sigma, rgb = field(points[mask])
        density = density.index_put((mask,), sigma)
        albedo = albedo.index_put((mask,), rgb)
    weights = composite(density, delta)
    opacity = weights.sum(-1, keepdim=True)
    albedo_c = (weights[..., None] * albedo).sum(1)
    depth = (weights * t).sum(-1, keepdim=True)

    normals = torch.zeros_like(d)
    solid = opacity[:, 0] > 1e-3
    if shading != "albedo" and solid.any():
        surface = o[solid] + d[solid] * (depth[solid] / opacity[solid])
        normals = normals.index_put((solid,), field.normals(surface))
    light = cameras.light_dir[:, None, :].expand(batch, height * width, 3).reshape(-1, 3)
    color = shade(shading, albedo_c, opacity, normals, light, ambient)
    color = color + (1 - opacity) * background(d)
    facing_away = (normals * d).sum(-1).clamp_min(0) ** 2
    orientation = (opacity[:, 0].detach() * facing_away).sum() / batch

    def image(x: torch.Tensor) -> torch.Tensor:
        return x.view(batch, height, width, -1).permute(0, 3, 1, 2)

    return RenderOutput(image(color), image(opacity), image(depth), image(normals), orientation, int(mask.sum()))

"""The NeRF stage: a hash-grid field and a background optimised by score distillation from
random views (DreamFusion), with an occupancy grid to skip empty space once the shape forms."""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import torch

from ...shared.result import Mesh
from ...shared.vocab import Stage
from ..background import MLPBackground, SolidBackground
from ..cameras import Cameras, orbit_cameras, ray_bundle
from ..field import NeRFField
from ..mesh import extract_mesh
from ..recipe import Schedule
from ..renderer import OccupancyGrid, RenderOutput, render
from .context import JobContext
from .loop import PROXY_MAX_FACES, PROXY_RESOLUTION, rgba_uint8


def active_levels(levels: int, schedule: Schedule, step: int) -> int:
    """Coarse to fine: more hash-grid levels switch on as the run goes."""
    start = min(schedule.field_levels_start, levels)
    progress = step / max(1, schedule.steps * schedule.coarse_to_fine_until)
    return min(levels, start + int(math.floor(progress * (levels - start + 1))))


def annealed_t_range(schedule: Schedule, step: int) -> tuple[float, float]:
    """The noise levels drawn at `step`: t_max anneals from the schedule's range to t_max_end."""
    lo, hi = schedule.t_range
    frac = step / max(1, schedule.steps)
    return lo, max(lo, hi + (schedule.t_max_end - hi) * frac)


def field_and_optimiser(ctx: JobContext, seed: int) -> tuple[NeRFField, MLPBackground | SolidBackground, torch.optim.Adam]:
    """A hash-grid field, the recipe's background and their Adam. The initial values come from
    `seed` through a forked global generator, so building them changes no process-wide random
    state."""
    recipe, optim = ctx.recipe, ctx.recipe.optim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        field = NeRFField(recipe.field).to(ctx.device)
        background = (SolidBackground() if recipe.background == "white" else MLPBackground()).to(ctx.device)
    groups = [{"params": list(field.encoding.parameters()), "lr": optim.lr_grid},
              {"params": list(field.mlp.parameters()), "lr": optim.lr_mlp}]
    if list(background.parameters()):
        groups.append({"params": list(background.parameters()), "lr": optim.lr_background})
    return field, background, torch.optim.Adam(groups, betas=(0.9, 0.99), eps=1e-15, fused=optim.fused_adam)


class Descending(Protocol):
    step: int

    @property
    def optimizer(self) -> torch.optim.Optimizer: ...

    def _update_schedule(self) -> None: ...


def descend(model: Descending, loss: torch.Tensor) -> float:
    """One optimiser step of `model` down `loss`, then its step count and schedule moved on; the
    loss's value."""
    model.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    model.optimizer.step()
    model.step += 1
    model._update_schedule()
    return loss.item()


class NeRFModel:
    """Owns the field, background, occupancy grid and optimiser of one job's NeRF."""

    stage = Stage.OPTIMISING

    def __init__(self, ctx: JobContext, seed: int) -> None:
        """The modules' initial values come from `seed` through a forked global generator, so
        building a model changes no process-wide random state."""
        self.ctx, recipe = ctx, ctx.recipe
        self.field, self.background, self.optimizer = field_and_optimiser(ctx, seed)
        self.occupancy = OccupancyGrid(recipe.render).to(ctx.device)
        self.steps = recipe.schedule.steps
        self.step = 0
        self._update_schedule()

    def _update_schedule(self) -> None:
        self.field.encoding.active_levels = active_levels(self.field.config.levels, self.ctx.recipe.schedule, self.step)

    def t_range(self) -> tuple[float, float]:
        return annealed_t_range(self.ctx.recipe.schedule, self.step)

    def train_step(self) -> float:
        """One distillation step on a random batch of views; returns the loss."""
        optim = self.ctx.recipe.optim
        if self.step >= optim.occupancy_warmup and self.step % optim.occupancy_every == 0:
            self.occupancy.update(self.field, self.ctx.generator)
        return descend(self, self.loss())

    def loss(self) -> torch.Tensor:
        """This step's loss: score distillation of a random batch of views and the regularisers
        (a subclass adds its own terms, so one optimiser step covers them all)."""
        ctx = self.ctx
        r, optim = ctx.recipe, ctx.recipe.optim
        cameras = ctx.sample_cameras()
        shading = r.shading.sample(ctx.generator)
        out = self.render_training(cameras, shading)
        loss = self.distill(out.rgb, cameras) + optim.orientation_weight * out.orientation
        if self.step >= optim.entropy_from * r.schedule.steps:
            o = out.opacity.clamp(1e-5, 1 - 1e-5)
            entropy = -(o * o.log() + (1 - o) * (1 - o).log())
            loss = loss + optim.entropy_weight * entropy.sum() / o.shape[0]
        return loss

    def render_training(self, cameras: Cameras, shading: str) -> RenderOutput:
        """Renders at the recipe's resolution with gradients, through the occupancy grid once it
        is warm."""
        r = self.ctx.recipe
        return render(self.field, self.background, cameras, r.resolution, r.resolution, shading=shading,
                      ambient=r.shading.ambient, occupancy=self.occupancy if self.step >= r.optim.occupancy_warmup else None,
                      config=r.render, generator=self.ctx.generator)

    def distill(self, images: torch.Tensor, cameras: Cameras) -> torch.Tensor:
        """The prior's score distillation of this step's renders (an image job adds its 3D prior's)."""
        return self.ctx.distill(images, cameras, self.t_range())

    def albedo(self, points: torch.Tensor) -> torch.Tensor:
        """Display colour at `points` [N, 3]: the colour model later stages paint with."""
        return self.field(points)[1]

    @property
    def solid_background(self) -> tuple[float, float, float] | None:
        """The fixed colour the guidance saw behind the object (None when learnt)."""
        if isinstance(self.background, SolidBackground):
            r, g, b = self.background.color.tolist()
            return r, g, b
        return None

    @torch.no_grad()
    def preview(self, size: int = 64) -> np.ndarray:
        """An RGBA uint8 render from an orbiting camera (the azimuth turns with the step)."""
        return self.render_rgba(orbit_cameras(1, start_azimuth=(self.step * 7.0) % 360.0), size)[0]

    @torch.no_grad()
    def render_rgba(self, cameras: Cameras, size: int) -> np.ndarray:
        out = render(self.field, self.background, cameras.to(self.ctx.device), size, size, shading="lambertian",
                     ambient=self.ctx.recipe.shading.ambient, occupancy=self.occupancy, config=self.ctx.recipe.render)
        return rgba_uint8(out.rgb, out.opacity)

    @torch.no_grad()
    def surface_density(self, views: int = 8, size: int = 64) -> float | None:
        """The median density at the rendered surface (expected depth of the opaque pixels)
        seen from an orbit: the iso-level whose mesh matches what the renders show."""
        cams = orbit_cameras(views).to(self.ctx.device)
        out = render(self.field, self.background, cams, size, size, shading="albedo", occupancy=self.occupancy,
                     config=self.ctx.recipe.render)
        origins, dirs = ray_bundle(cams, size, size)
        opacity = out.opacity.permute(0, 2, 3, 1)[..., 0]
        depth = out.depth.permute(0, 2, 3, 1)[..., 0]
        solid = opacity > 0.5
        if int(solid.sum()) < 16:
            return None
        points = origins[solid] + dirs[solid] * (depth[solid] / opacity[solid])[:, None]
        return float(self.field.density(points).median())

    def extract(self, resolution: int, max_faces: int | None, views: int = 8, size: int = 64) -> Mesh:
        """The field's surface at the density the renders show from `views` cameras of `size`
        pixels (MeshError with advice when there is none). The renders are most of the cost: a
        proxy uses 4 at 32 px (~0.1 s on 2 cores), the final mesh 8 at 64 px."""
        return extract_mesh(self.field.density, self.albedo, resolution=resolution,
                            threshold=self.surface_density(views=views, size=size), max_faces=max_faces,
                            device=self.ctx.device, background=self.solid_background)

    def proxy(self) -> Mesh:
        return self.extract(PROXY_RESOLUTION, PROXY_MAX_FACES, views=4, size=32)

    def mesh(self) -> Mesh:
        mesh = self.ctx.recipe.mesh
        return self.extract(mesh.resolution, mesh.max_faces)

    def state_dict(self) -> dict:
        return {"step": self.step, "field": self.field.state_dict(), "background": self.background.state_dict(),
                "occupancy": self.occupancy.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.field.load_state_dict(state["field"])
        self.background.load_state_dict(state["background"])
        self.occupancy.load_state_dict(state["occupancy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        self._update_schedule()

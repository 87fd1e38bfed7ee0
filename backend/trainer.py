"""The SDS optimisation loop: one step renders a random view, scores it with the guidance and
updates the field. Holds everything a checkpoint needs to resume bit-for-bit."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..shared.result import atomic_write
from .background import MLPBackground, SolidBackground
from .cameras import Cameras, orbit_cameras, ray_bundle, sample_views
from .field import NeRFField
from .guidance.base import Guidance
from .prompts import PromptEmbeddings
from .recipe import Recipe
from .renderer import OccupancyGrid, render
from .threads import keep_freed_memory


class Trainer:
    """Owns the field, background, occupancy grid, optimiser and random state of one job."""

    def __init__(self, guidance: Guidance, embeddings: PromptEmbeddings, recipe: Recipe, seed: int, device: torch.device) -> None:
        """`recipe` is the resolved one (see recipe.resolve): the trainer reads every setting from it."""
        torch.manual_seed(seed)
        if device.type == "cpu":
            keep_freed_memory()
        self.guidance, self.embeddings, self.recipe, self.device = guidance, embeddings, recipe, device
        self.generator = torch.Generator().manual_seed(seed)
        self.field = NeRFField(recipe.field).to(device)
        self.background = (SolidBackground() if recipe.background == "white" else MLPBackground()).to(device)
        self.occupancy = OccupancyGrid(recipe.render).to(device)
        optim = recipe.optim
        groups = [
            {"params": list(self.field.encoding.parameters()), "lr": optim.lr_grid},
            {"params": list(self.field.mlp.parameters()), "lr": optim.lr_mlp},
        ]
        bg_params = list(self.background.parameters())
        if bg_params:
            groups.append({"params": bg_params, "lr": optim.lr_background})
        self.optimizer = torch.optim.Adam(groups, betas=(0.9, 0.99), eps=1e-15, fused=optim.fused_adam)
        self.step = 0
        self._update_schedule()

    def _update_schedule(self) -> None:
        levels, schedule = self.field.config.levels, self.recipe.schedule
        start = min(schedule.field_levels_start, levels)
        progress = self.step / max(1, schedule.steps * schedule.coarse_to_fine_until)
        self.field.encoding.active_levels = min(levels, start + int(math.floor(progress * (levels - start + 1))))

    def t_range(self) -> tuple[float, float]:
        schedule = self.recipe.schedule
        lo, hi = schedule.t_range
        frac = self.step / max(1, schedule.steps)
        return lo, max(lo, hi + (schedule.t_max_end - hi) * frac)

    def train_step(self) -> float:
        """One SDS step; returns the loss."""
        r, optim = self.recipe, self.recipe.optim
        if self.step >= optim.occupancy_warmup and self.step % optim.occupancy_every == 0:
            self.occupancy.update(self.field, self.generator)
        cameras = sample_views(self.guidance.views_per_group, self.generator, r.cameras).to(self.device)
        shading = r.shading.sample(self.generator)
        out = render(
            self.field, self.background, cameras, r.resolution, r.resolution, shading=shading, ambient=r.shading.ambient,
            occupancy=self.occupancy if self.step >= optim.occupancy_warmup else None, config=r.render,
            generator=self.generator,
        )
        sds = self.guidance.sds_loss(out.rgb, self.embeddings, cameras, r.guidance_scale, self.t_range(), self.generator,
                                     r.views, r.objective)
        loss = sds + optim.orientation_weight * out.orientation
        if self.step >= optim.entropy_from * r.schedule.steps:
            o = out.opacity.clamp(1e-5, 1 - 1e-5)
            entropy = -(o * o.log() + (1 - o) * (1 - o).log())
            loss = loss + optim.entropy_weight * entropy.sum() / o.shape[0]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        self._update_schedule()
        return loss.item()

    @torch.no_grad()
    def preview(self, size: int = 64, azimuth: float | None = None) -> np.ndarray:
        """An RGBA uint8 render from an orbiting camera (the azimuth turns with the step)."""
        if azimuth is None:
            azimuth = (self.step * 7.0) % 360.0
        return self.render_rgba(orbit_cameras(1, start_azimuth=azimuth), size)[0]

    @property
    def solid_background(self) -> tuple[float, float, float] | None:
        """The fixed colour the guidance saw behind the object (None when learnt)."""
        if isinstance(self.background, SolidBackground):
            r, g, b = self.background.color.tolist()
            return r, g, b
        return None

    @torch.no_grad()
    def render_rgba(self, cameras: Cameras, size: int) -> np.ndarray:
        out = render(self.field, self.background, cameras.to(self.device), size, size, shading="lambertian",
                     ambient=self.recipe.shading.ambient, occupancy=self.occupancy, config=self.recipe.render)
        rgba = torch.cat([out.rgb, out.opacity], 1).clamp(0, 1).permute(0, 2, 3, 1)
        return (rgba * 255).round().to(torch.uint8).cpu().numpy()

    @torch.no_grad()
    def surface_density(self, views: int = 8, size: int = 64) -> float | None:
        """The median density at the rendered surface (expected depth of the opaque pixels)
        seen from an orbit: the iso-level whose mesh matches what the renders show."""
        cams = orbit_cameras(views).to(self.device)
        out = render(self.field, self.background, cams, size, size, shading="albedo", occupancy=self.occupancy,
                     config=self.recipe.render)
        origins, dirs = ray_bundle(cams, size, size)
        opacity = out.opacity.permute(0, 2, 3, 1)[..., 0]
        depth = out.depth.permute(0, 2, 3, 1)[..., 0]
        solid = opacity > 0.5
        if int(solid.sum()) < 16:
            return None
        points = origins[solid] + dirs[solid] * (depth[solid] / opacity[solid])[:, None]
        return float(self.field.density(points).median())

    def state_dict(self) -> dict:
        return {
            "step": self.step, "field": self.field.state_dict(), "background": self.background.state_dict(),
            "occupancy": self.occupancy.state_dict(), "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.field.load_state_dict(state["field"])
        self.background.load_state_dict(state["background"])
        self.occupancy.load_state_dict(state["occupancy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.step = state["step"]
        self._update_schedule()

    def save_checkpoint(self, path: Path, spec: dict) -> None:
        """The job's spec and recipe beside the state, so a resume can check it continues the same run."""
        state = {"meta": spec, "recipe": self.recipe.to_dict(), "trainer": self.state_dict()}
        atomic_write(path, lambda f: torch.save(state, f))


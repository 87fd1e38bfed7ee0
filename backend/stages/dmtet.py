"""The mesh stage after the NeRF (Magic3D's and NeMo's DMTet stage): an explicit surface on a
deformable tetrahedral grid, initialised from the NeRF's density and optimised with the same
distillation through the rasteriser, at a higher render resolution; then the colour alone on
the fixed geometry. Marching cubes of a NeRF rounds every edge (its density is smooth over a
few field cells); a mesh optimised as a mesh keeps the flat faces and corners the prior draws.

Colour comes from the NeRF model's albedo at the surface points (the NeRF stays the colour
model; while shaping it is looked up without gradients at detached points, so that the shape
moves only for the silhouette and the shading the prior sees).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from ...shared.result import Mesh
from ...shared.vocab import Stage
from ..cameras import Cameras, orbit_cameras
from ..dmtet import TetGrid, marching_tets
from ..mesh import MeshError, finish_mesh
from ..raster import face_normals, mesh_edges
from .context import JobContext
from .loop import PROXY_MAX_FACES, rgba_uint8
from .nerf import NeRFModel
from .surface import render_surface


def initial_sdf(density: np.ndarray, level: float, cell: float) -> np.ndarray:
    """A signed distance (negative inside) from the field's density on the grid's nodes: within
    a cell and a half of the surface, the first-order distance (level - density) / |grad density|,
    so that the zero crossings fall where marching cubes would put them; further out, the
    distance to the nearest node on the other side (a distance transform), which keeps the
    values sane where the density is flat."""
    inside = density > level
    far = np.where(inside, 0.5 - ndimage.distance_transform_edt(inside),
                   ndimage.distance_transform_edt(~inside) - 0.5) * cell
    slope = np.linalg.norm(np.stack(np.gradient(density, cell)), axis=0)
    near = (level - density) / np.maximum(slope, 1e-6)
    band = 1.5 * cell
    return np.where(np.abs(far) <= band, np.clip(near, -band, band), far).astype(np.float32)


class DMTetModel:
    """Owns the tetrahedral grid's SDF and offsets, and the optimisers of both phases."""

    stage = Stage.REFINING

    def __init__(self, ctx: JobContext, nerf: NeRFModel, threshold: float | None) -> None:
        """`threshold`: the density of the NeRF's surface (NeRFModel.surface_density)."""
        self.ctx, self.nerf, self.settings = ctx, nerf, ctx.recipe.refine
        # a margin of two cells, so that a surface at the field's bound still closes
        res = self.settings.grid
        self.grid = TetGrid.cube(res, nerf.field.radius * res / (res - 4), ctx.device)
        with torch.no_grad():
            density = torch.cat([nerf.field.density(c) for c in self.grid.vertices.split(65536)])
        level = float(threshold) if threshold is not None else float(density.max()) * 0.5
        density_grid = density.view(res + 1, res + 1, res + 1).cpu().numpy().astype(np.float64)
        if not (density_grid > level).any():
            raise MeshError("the NeRF stage left no surface to refine: run more --steps or change the --seed")
        sdf = initial_sdf(density_grid, level, self.grid.cell)
        self.sdf = torch.nn.Parameter(torch.from_numpy(sdf).reshape(-1).to(ctx.device))
        self.offset = torch.nn.Parameter(torch.zeros_like(self.grid.vertices))
        s = self.settings
        fused = ctx.recipe.optim.fused_adam
        self.shape_optimizer = torch.optim.Adam([{"params": [self.sdf], "lr": s.lr_sdf},
                                                 {"params": [self.offset], "lr": s.lr_offset}], fused=fused)
        self.steps = s.steps
        self.geometry_steps = round(s.steps * (1 - s.color_share))
        # The colour phase, if any, tunes the NeRF's colour model on the fixed surface.
        self.color_optimizer = (torch.optim.Adam(nerf.field.parameters(), lr=s.lr_color, fused=fused)
                                if self.geometry_steps < self.steps else None)
        self.step = 0
        self._fixed: tuple[torch.Tensor, torch.Tensor] | None = None

    def positions(self) -> torch.Tensor:
        """Grid vertices moved by their offsets, at most half a cell (neighbours cannot pass each other)."""
        return self.grid.vertices + torch.tanh(self.offset) * (0.5 * self.grid.cell)

    def surface(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._fixed is not None:
            return self._fixed
        vertices, faces = marching_tets(self.grid, self.positions(), self.sdf)
        if len(faces) == 0:
            raise MeshError("the refined surface vanished: lower --refine-steps or change the --seed")
        return vertices, faces

    def render(self, vertices: torch.Tensor, faces: torch.Tensor, cameras: Cameras, size: int, shading: str,
               shaping: bool, edges: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 3, H, W] display colour over the background, and [B, 1, H, W] alpha. While `shaping`,
        the colour is looked up without gradients one cell inside the surface: the field's colour is
        trained only where its density is, and the surface may lie up to half a cell outside."""
        return render_surface(vertices, faces, cameras, size, shading, self.nerf.albedo, self.nerf.background,
                              self.ctx.recipe.shading.ambient, self.settings.sigma, edges,
                              inset=self.grid.cell if shaping else 0.0, albedo_grad=not shaping)

    def regularisers(self, vertices: torch.Tensor, faces: torch.Tensor,
                     edges_beside: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Normal consistency across edges and a uniform Laplacian, in units of the grid cell."""
        edges, beside = edges_beside
        shared = beside[:, 1] >= 0
        n = face_normals(vertices, faces)
        consistency = (1 - (n[beside[shared, 0]] * n[beside[shared, 1]]).sum(-1)).mean()
        ends = torch.cat([edges, edges.flip(1)])
        total = torch.zeros_like(vertices).index_add(0, ends[:, 0], vertices[ends[:, 1]])
        count = torch.zeros(len(vertices), device=vertices.device).index_add(
            0, ends[:, 0], torch.ones(len(ends), device=vertices.device))
        laplacian = vertices - total / count.clamp_min(1)[:, None]
        s = self.settings
        return s.normal_weight * consistency + s.laplacian_weight * (laplacian**2).sum(-1).mean() / self.grid.cell**2

    def train_step(self) -> float:
        """One distillation step on the shape (first phase) or on the colour (second phase); the loss."""
        ctx, s = self.ctx, self.settings
        shaping = self.step < self.geometry_steps
        if not shaping and self._fixed is None:
            with torch.no_grad():
                self._fixed = self.surface()
        cameras = ctx.sample_cameras()
        vertices, faces = self.surface()
        edges = mesh_edges(faces)
        rgb, _ = self.render(vertices, faces, cameras, s.resolution, ctx.recipe.shading.sample(ctx.generator), shaping, edges)
        loss = ctx.distill(rgb, cameras, s.t_range)
        if shaping:
            loss = loss + self.regularisers(vertices, faces, edges)
        optimizer = self.shape_optimizer if shaping or self.color_optimizer is None else self.color_optimizer
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        self.step += 1
        return loss.item()

    @torch.no_grad()
    def preview(self, size: int = 64) -> np.ndarray:
        """An RGBA uint8 render of the current mesh from an orbiting camera."""
        vertices, faces = self.surface()
        cameras = orbit_cameras(1, start_azimuth=(self.step * 7.0) % 360.0).to(self.ctx.device)
        rgb, alpha = self.render(vertices, faces, cameras, size, "lambertian", True)
        return rgba_uint8(rgb, alpha)[0]

    @torch.no_grad()
    def extract(self, max_faces: int | None) -> Mesh:
        """The refined surface as a coloured Mesh (floaters dropped, decimated to `max_faces`)."""
        vertices, faces = self.surface()
        return finish_mesh(vertices.cpu().numpy(), faces.cpu().numpy(), self.nerf.albedo, max_faces,
                           device=self.ctx.device, background=self.nerf.solid_background)

    def proxy(self) -> Mesh:
        return self.extract(PROXY_MAX_FACES)

    def mesh(self) -> Mesh:
        return self.extract(self.ctx.recipe.mesh.max_faces)

    def state_dict(self) -> dict:
        """The colour phase's fixed surface is rebuilt from the SDF and offsets, which it no longer moves."""
        return {"step": self.step, "sdf": self.sdf.detach().clone(), "offset": self.offset.detach().clone(),
                "shape_optimizer": self.shape_optimizer.state_dict(),
                "color_optimizer": None if self.color_optimizer is None else self.color_optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.sdf.copy_(state["sdf"])
            self.offset.copy_(state["offset"])
        self.shape_optimizer.load_state_dict(state["shape_optimizer"])
        if self.color_optimizer is not None:
            self.color_optimizer.load_state_dict(state["color_optimizer"])
        self.step = state["step"]
        self._fixed = None
        if self.step > self.geometry_steps:
            with torch.no_grad():
                self._fixed = self.surface()

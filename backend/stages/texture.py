"""The texture stage: a given mesh keeps its geometry and gains colour (Fantasia3D's appearance
stage). Its colour model is a hash-grid field over space, looked up at the surface: unlike a
texture image it needs no UVs while it learns, has no seams between UV charts, and every
distillation step updates the colour of whole regions rather than the few texels a render
happens to sample; the result is baked onto the mesh's own UVs (or an xatlas unwrap) at the end.
The mesh is fitted into the cameras' view for rendering only; it comes back in its own
coordinates."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...shared.result import Mesh
from ...shared.surface import MAX_FACES, check_surface
from ...shared.vocab import Stage
from ..cameras import Cameras, orbit_cameras
from ..framing import FIT_HALF_EXTENT, FIT_RMS_RADIUS
from ..mesh import MeshError
from ..raster import mesh_edges, vertex_normals
from .context import JobContext
from .loop import PROXY_MAX_FACES, rgba_uint8
from .nerf import active_levels, annealed_t_range, descend, field_and_optimiser
from .surface import render_surface

SIGMA = 0.5  # pixels of the rasteriser's antialiased outline


@dataclass
class Surface:
    """A mesh to paint, as given: its own coordinates (Z up) and, if it has them, its UVs."""

    vertices: np.ndarray  # [V, 3] float32
    faces: np.ndarray  # [F, 3] int32
    uvs: np.ndarray | None = None  # [V, 2] in 0..1, origin bottom left
    warnings: tuple[str, ...] = ()  # what the check changed (UVs it could not use)

    @classmethod
    def checked(cls, vertices: np.ndarray, faces: np.ndarray, uvs: np.ndarray | None = None,
                max_faces: int = MAX_FACES) -> Surface:
        """A Surface from untrusted arrays; SurfaceError naming what is wrong."""
        v, f, uv, warnings = check_surface(vertices, faces, uvs, max_faces)
        return cls(v, f, uv, tuple(warnings))

    def fit(self) -> tuple[np.ndarray, float]:
        """(centre, scale) that put the mesh's bounding box centred at the origin with an RMS
        radius of FIT_RMS_RADIUS and no half-extent over FIT_HALF_EXTENT: scene point =
        (point - centre) * scale."""
        used = self.vertices[np.unique(self.faces)]
        lo, hi = used.min(0), used.max(0)
        centre = (lo + hi) / 2
        return centre, min(FIT_HALF_EXTENT / float((hi - lo).max() / 2),
                           FIT_RMS_RADIUS / rms_radius(self.vertices, self.faces, centre))


def rms_radius(vertices: np.ndarray, faces: np.ndarray, centre: np.ndarray) -> float:
    """The root mean square distance of the surface from `centre`, over its area: exact, from the
    mean of |p|^2 over a triangle, (|a|^2 + |b|^2 + |c|^2 + a.b + b.c + c.a) / 6."""
    a, b, c = (vertices[faces[:, i]].astype(np.float64) - centre for i in range(3))
    area = np.linalg.norm(np.cross(b - a, c - a), axis=1) / 2
    mean_square = (a * a + b * b + c * c + a * b + b * c + c * a).sum(1) / 6
    return float(np.sqrt((mean_square * area).sum() / area.sum()))


class TextureModel:
    """Owns the colour field, the background and their optimiser for one given mesh."""

    stage = Stage.TEXTURING

    def __init__(self, ctx: JobContext, surface: Surface, seed: int) -> None:
        self.ctx, self.surface, recipe = ctx, surface, ctx.recipe
        centre, self.scale = surface.fit()
        self.centre = torch.from_numpy(centre.astype(np.float32)).to(ctx.device)
        # Rendered as its geometry, not as its UVs split it: copies of a vertex are one vertex, or a
        # cube unwrapped per side renders as six loose squares, flat-shaded with outlined seams.
        points, welded = np.unique(surface.vertices, axis=0, return_inverse=True)
        self.vertices = (torch.from_numpy(points).to(ctx.device) - self.centre) * self.scale
        self.faces = torch.from_numpy(welded.reshape(-1)[surface.faces]).long().to(ctx.device)
        self.edges = mesh_edges(self.faces)
        self.field, self.background, self.optimizer = field_and_optimiser(ctx, seed)  # its colour head paints
        self.steps = recipe.schedule.steps
        self.step = 0
        self._update_schedule()

    def _update_schedule(self) -> None:
        self.field.encoding.active_levels = active_levels(self.field.config.levels, self.ctx.recipe.schedule, self.step)

    def albedo(self, points: torch.Tensor) -> torch.Tensor:
        """Display colour at scene points [N, 3]."""
        return self.field(points)[1]

    def render(self, cameras: Cameras, size: int, shading: str) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.ctx.recipe
        return render_surface(self.vertices, self.faces, cameras, size, shading, self.albedo, self.background,
                              r.shading.ambient, SIGMA, self.edges)

    def train_step(self) -> float:
        """One distillation step of the colour on a random batch of views; returns the loss."""
        ctx = self.ctx
        cameras = ctx.sample_cameras()
        rgb, _ = self.render(cameras, ctx.recipe.resolution, ctx.recipe.shading.sample(ctx.generator))
        return descend(self, ctx.distill(rgb, cameras, annealed_t_range(ctx.recipe.schedule, self.step)))

    @torch.no_grad()
    def preview(self, size: int = 64) -> np.ndarray:
        cameras = orbit_cameras(1, start_azimuth=(self.step * 7.0) % 360.0).to(self.ctx.device)
        rgb, alpha = self.render(cameras, size, "lambertian")
        return rgba_uint8(rgb, alpha)[0]

    @torch.no_grad()
    def color_at(self, points: np.ndarray) -> np.ndarray:
        """sRGB colour [N, 3] at points [N, 3] in the mesh's own coordinates (what the bake samples)."""
        x = (torch.from_numpy(np.asarray(points, np.float32)).to(self.ctx.device) - self.centre) * self.scale
        return torch.cat([self.albedo(c) for c in x.split(262144)]).clamp(0, 1).cpu().numpy()

    @torch.no_grad()
    def mesh(self) -> Mesh:
        """The given mesh, unchanged in place and size, with the colour at its vertices (and its
        UVs, if it had them: the texture bake keeps them)."""
        s = self.surface
        normals = vertex_normals(torch.from_numpy(s.vertices), torch.from_numpy(s.faces).long()).numpy()
        return Mesh(s.vertices, s.faces, self.color_at(s.vertices).astype(np.float32), normals.astype(np.float32), uvs=s.uvs)

    def proxy(self) -> Mesh:
        if len(self.surface.faces) > PROXY_MAX_FACES:
            raise MeshError("the mesh is too large to travel as a proxy: the previews show it")
        return self.mesh()

    def state_dict(self) -> dict:
        return {"step": self.step, "field": self.field.state_dict(), "background": self.background.state_dict(),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.field.load_state_dict(state["field"])
        self.background.load_state_dict(state["background"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        self._update_schedule()

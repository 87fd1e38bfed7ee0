"""Mesh extraction: density on a grid -> marching cubes -> cleanup -> vertex colours."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
import torch
import trimesh
from scipy.sparse.csgraph import connected_components
from scipy.sparse.linalg import spsolve
from skimage.color import rgb2lab
from skimage.measure import marching_cubes

from ..shared.errors import PromptMeshError
from ..shared.result import Mesh
from ..shared.vocab import ErrorCode
from .cameras import BOUND_RADIUS

Fn = Callable[[torch.Tensor], torch.Tensor]
Color = tuple[float, float, float]

# CIELAB distance under which a surface colour passes for a solid background's. Palette colours
# lie 80 or more from white; the undersides SDS left white, 0-10, and their edges 10-30.
HIDDEN_DELTA_E = 30.0


class MeshError(PromptMeshError):
    """Extraction gave no usable surface; the message says what to try."""

    code = ErrorCode.MESH


def auto_threshold(samples_per_ray: int = 64) -> float:
    """The density at which one render step of a ray across the bound is half opaque."""
    step = 2 * BOUND_RADIUS / samples_per_ray
    return math.log(2.0) / step


@torch.no_grad()
def sample_grid(fn: Fn, resolution: int, device: torch.device | str = "cpu", chunk: int = 262144) -> np.ndarray:
    """fn at the nodes of a resolution^3 grid spanning the bounding cube, as [x, y, z]."""
    axis = torch.linspace(-BOUND_RADIUS, BOUND_RADIUS, resolution, device=device)
    out = np.empty(resolution**3, dtype=np.float32)
    xs = torch.meshgrid(axis, axis, axis, indexing="ij")
    flat = torch.stack(xs, -1).view(-1, 3)
    for i in range(0, len(flat), chunk):
        out[i : i + chunk] = fn(flat[i : i + chunk]).float().cpu().numpy()
    return out.reshape(resolution, resolution, resolution)


def _keep_main_components(mesh: trimesh.Trimesh, min_fraction: float) -> trimesh.Trimesh:
    """The pieces of at least `min_fraction` of the largest one's area, less closed pieces
    turned inside out: the walls of cavities inside the object (SDS only sees a solid from
    outside, so the density inside may dip below the surface's; a NeRF sphere carried an
    unseen inner shell of a quarter of its faces), which no camera sees and which would take
    faces and texture from the visible surface."""
    parts = mesh.split(only_watertight=False)
    if len(parts) <= 1:
        return mesh
    outward = [p for p in parts if not (p.is_watertight and p.volume < 0)]
    parts = outward or parts
    areas = np.array([p.area for p in parts])
    keep = [p for p, a in zip(parts, areas, strict=True) if a >= min_fraction * areas.max()]
    joined = trimesh.util.concatenate(keep)
    assert isinstance(joined, trimesh.Trimesh)  # the parts of a Trimesh join into one
    return joined


def recolor_hidden(mesh: trimesh.Trimesh, colors: np.ndarray, background: Color,
                   delta_e: float = HIDDEN_DELTA_E) -> np.ndarray:
    """`colors` [V, 3] with those the guidance could not see replaced by the colours around them.

    Against a solid background, surface of (nearly) its colour renders as background, so SDS
    has no gradient to colour it or carve it away: the white underside that a blue cone grew
    below its base, seen only from under the horizon. Those vertices take the harmonic
    interpolation (Laplace's equation on the edge graph) of the other colours around them; a
    piece with no other colour keeps its own."""
    lab = rgb2lab(np.clip(colors, 0, 1)[None].astype(np.float64))[0]
    hidden = np.linalg.norm(lab - rgb2lab(np.array([[background]], np.float64))[0, 0], axis=1) < delta_e
    if not hidden.any() or hidden.all():
        return colors
    one_way = trimesh.graph.edges_to_coo(mesh.edges_unique, count=len(colors), data=np.ones(len(mesh.edges_unique)))
    adjacency = (one_way + one_way.T).tocsr()
    _, piece = connected_components(adjacency[hidden][:, hidden], directed=False)
    shown = np.flatnonzero(~hidden)
    borders = np.asarray(adjacency[hidden][:, shown].sum(1)).ravel() > 0
    solve = np.flatnonzero(hidden)[np.isin(piece, piece[borders])]
    if not len(solve):
        return colors
    laplacian = sp.diags(np.asarray(adjacency.sum(1)).ravel()) - adjacency
    out = colors.astype(np.float64)
    out[solve] = spsolve(laplacian[solve][:, solve].tocsc(), -(laplacian[solve][:, shown] @ out[shown])).reshape(len(solve), 3)
    return out.astype(colors.dtype)


def extract_mesh(
    density: Fn,
    albedo: Fn,
    resolution: int = 128,
    threshold: float | None = None,
    max_faces: int | None = None,
    min_component_fraction: float = 0.1,
    device: torch.device | str = "cpu",
    background: Color | None = None,
) -> Mesh:
    """Marching cubes of `density` at `threshold` (by default the density at which one render
    step is half opaque), lowered step by step when nothing crosses it; then `finish_mesh`."""
    grid = sample_grid(density, resolution, device)
    finite = grid[np.isfinite(grid)]
    if finite.size == 0:
        raise MeshError("the density field is not finite anywhere: the optimisation diverged; lower the guidance scale")
    start = auto_threshold() if threshold is None else threshold
    tries = [start * f for f in (1.0, 0.5, 0.25, 0.1)]
    level = next((t for t in tries if finite.min() < t < finite.max()), None)
    if level is None:
        raise MeshError(
            f"no surface: density ranges {finite.min():.3g}..{finite.max():.3g}, never crossing the threshold "
            f"{tries[-1]:.3g}. The object did not form or fills the whole volume: run more --steps, "
            "change the --seed, or lower --guidance-scale"
        )
    spacing = (2 * BOUND_RADIUS / (resolution - 1),) * 3
    verts, faces, _, _ = marching_cubes(np.nan_to_num(grid, nan=0.0), level=level, spacing=spacing, gradient_direction="ascent")
    return finish_mesh(verts - BOUND_RADIUS, faces, albedo, max_faces, min_component_fraction, device, background)


def finish_mesh(
    vertices: np.ndarray,
    faces: np.ndarray,
    albedo: Fn,
    max_faces: int | None = None,
    min_component_fraction: float = 0.1,
    device: torch.device | str = "cpu",
    background: Color | None = None,
) -> Mesh:
    """A raw surface (marching cubes' or the refinement's) -> a Mesh: duplicate vertices merged,
    floaters smaller than `min_component_fraction` of the largest piece's area dropped,
    decimated to `max_faces`, coloured by `albedo` at the vertices; with the solid `background`
    the guidance saw, surface of its colour recoloured from around it (`recolor_hidden`)."""
    mesh = trimesh.Trimesh(vertices, faces, process=True)
    mesh = _keep_main_components(mesh, min_component_fraction)
    if max_faces is not None and len(mesh.faces) > max_faces:
        mesh = mesh.simplify_quadric_decimation(face_count=max_faces)
    if len(mesh.faces) < 4 or mesh.area <= 0:
        raise MeshError("the surface is degenerate (fewer than 4 faces): run more --steps or change the --seed")
    v = torch.from_numpy(np.ascontiguousarray(mesh.vertices, dtype=np.float32)).to(device)
    with torch.no_grad():
        colors = torch.cat([albedo(c) for c in v.split(262144)]).float().clamp(0, 1).cpu().numpy()
    if background is not None:
        colors = recolor_hidden(mesh, colors, background)
    return Mesh(
        vertices=mesh.vertices.astype(np.float32),
        faces=mesh.faces.astype(np.int32),
        colors=colors.astype(np.float32),
        normals=np.asarray(mesh.vertex_normals, dtype=np.float32),
    )

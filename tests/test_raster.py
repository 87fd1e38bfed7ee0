"""The differentiable rasteriser against analytic projections, and its gradients at work."""

from __future__ import annotations

import torch
import trimesh

from promptmesh.backend.cameras import make_cameras, ray_bundle
from promptmesh.backend.raster import face_normals, project, rasterize


def _cube(half: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    box = trimesh.creation.box(extents=(2 * half,) * 3)
    return torch.tensor(box.vertices, dtype=torch.float32), torch.tensor(box.faces, dtype=torch.long)


def _cameras() -> object:
    n = 3
    return make_cameras(torch.tensor([20.0, -5.0, 60.0]), torch.tensor([30.0, 160.0, -75.0]),
                        torch.full((n,), 3.0), torch.tensor([40.0, 45.0, 50.0]))


def _box_hits(cameras: object, size: int, half: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ray casting of the axis-aligned cube (slab method): hit mask and camera depth per pixel."""
    origins, dirs = ray_bundle(cameras, size, size)  # type: ignore[arg-type]
    inv = 1.0 / dirs
    t0, t1 = (-half - origins) * inv, (half - origins) * inv
    near = torch.minimum(t0, t1).amax(-1)
    far = torch.maximum(t0, t1).amin(-1)
    hit = far > near
    forward = -cameras.c2w[:, :3, 2]  # type: ignore[attr-defined]
    depth = near * (dirs * forward[:, None, None, :]).sum(-1)
    return hit, depth


def test_cube_silhouette_and_depth_match_ray_casting() -> None:
    size, half = 64, 0.5
    verts, faces = _cube(half)
    cameras = _cameras()
    frags = rasterize(project(verts, cameras, size, size), faces, size, size, sigma=0.0)  # type: ignore[arg-type]
    hit, depth = _box_hits(cameras, size, half)
    covered = frags.face >= 0
    # pixel centres exactly on an edge may go either way: at most a pixel's worth along the outline
    assert (covered != hit).sum(dim=(1, 2)).max() <= 0.02 * hit.sum(dim=(1, 2)).min()
    both = covered & hit
    assert torch.allclose(frags.depth[both], depth[both], atol=1e-4)
    # antialiased: opaque three pixels inside the outline, clear three outside, half on it
    soft = rasterize(project(verts, cameras, size, size), faces, size, size, sigma=0.5).alpha  # type: ignore[arg-type]
    grow = lambda m: torch.nn.functional.max_pool2d(m[:, None].float(), 7, 1, 3)[:, 0] > 0  # noqa: E731
    inner, outer = ~grow(~hit), ~grow(hit)
    assert soft[inner].min() > 0.99 and soft[outer].max() < 0.01
    assert 0.4 < soft[~inner & ~outer].mean() < 0.6


def test_interpolation_is_perspective_correct() -> None:
    size = 48
    verts, faces = _cube()
    cameras = _cameras()
    frags = rasterize(project(verts, cameras, size, size), faces, size, size, sigma=0.0)  # type: ignore[arg-type]
    points = frags.interpolate(verts, faces)  # the world position of each covered pixel
    origins, dirs = ray_bundle(cameras, size, size)  # type: ignore[arg-type]
    hit, depth = _box_hits(cameras, size, 0.5)
    covered = (frags.face >= 0) & hit
    forward = -cameras.c2w[:, :3, 2]  # type: ignore[attr-defined]
    t = depth / (dirs * forward[:, None, None, :]).sum(-1)
    expected = origins + dirs * t[..., None]
    assert (points[covered] - expected[covered]).norm(dim=-1).max() < 1e-3
    normals = face_normals(verts, faces)[frags.face[covered]]
    assert ((normals * dirs[covered]).sum(-1) < 0).all()  # the visible faces face the camera


def test_silhouette_gradients_fit_a_mesh_to_a_target() -> None:
    """A photometric fit: a cube, shifted and shrunk, moves back onto the target's silhouettes."""
    size = 32
    verts, faces = _cube(0.5)
    cameras = _cameras()
    target = rasterize(project(verts, cameras, size, size), faces, size, size, sigma=0.0).alpha  # type: ignore[arg-type]
    offset = torch.tensor([0.15, -0.1, 0.05], requires_grad=True)
    scale = torch.tensor(0.7, requires_grad=True)
    optim = torch.optim.Adam([offset, scale], lr=0.02)

    def iou() -> float:
        with torch.no_grad():
            got = rasterize(project(verts * scale + offset, cameras, size, size), faces, size, size, sigma=0.0).alpha  # type: ignore[arg-type]
            return float((got * target).sum() / ((got + target) > 0).sum())

    before = iou()
    for _ in range(80):
        alpha = rasterize(project(verts * scale + offset, cameras, size, size), faces, size, size, sigma=0.7).alpha  # type: ignore[arg-type]
        loss = ((alpha - target) ** 2).mean()
        optim.zero_grad()
        loss.backward()
        optim.step()
    assert before < 0.6 and iou() > 0.95
    assert offset.detach().norm() < 0.03 and abs(float(scale) - 1.0) < 0.03

"""Marching tetrahedra on the Kuhn grid, against analytic surfaces."""

from __future__ import annotations

import math

import numpy as np
import trimesh

from promptmesh.backend.dmtet import TetGrid, marching_tets


def _mesh(resolution: int, sdf_fn) -> tuple[TetGrid, trimesh.Trimesh]:  # type: ignore[no-untyped-def]
    grid = TetGrid.cube(resolution, 1.0)
    verts, faces = marching_tets(grid, grid.vertices, sdf_fn(grid.vertices))
    return grid, trimesh.Trimesh(verts.numpy(), faces.numpy(), process=False)


def test_sphere_within_one_cell_closed_and_outward() -> None:
    radius = 0.6
    grid, mesh = _mesh(16, lambda p: p.norm(dim=-1) - radius)
    assert len(grid.tets) == 6 * 16**3
    error = np.abs(np.linalg.norm(mesh.vertices, axis=1) - radius)
    assert error.max() < grid.cell  # the bound; linear interpolation does far better:
    assert error.max() < 0.1 * grid.cell
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert abs(mesh.volume / (4 / 3 * math.pi * radius**3) - 1) < 0.03  # positive: the faces point out
    normals_out = (mesh.face_normals * mesh.triangles_center).sum(1)
    assert (normals_out > 0).all()


def test_cube_is_sharp_and_differentiable() -> None:
    """A box SDF whose faces lie between grid planes: flat faces, and gradients reach both the
    SDF values and the vertex positions."""
    half = 0.53
    grid = TetGrid.cube(12, 1.0)
    sdf = (grid.vertices.abs() - half).amax(-1).requires_grad_()
    positions = grid.vertices.clone().requires_grad_()
    verts, faces = marching_tets(grid, positions, sdf)
    mesh = trimesh.Trimesh(verts.detach().numpy(), faces.numpy(), process=False)
    assert mesh.is_watertight and abs(mesh.volume / (2 * half) ** 3 - 1) < 0.02
    assert np.abs(np.abs(mesh.vertices).max(1) - half).max() < 1e-5  # every vertex on a face of the box
    verts.sum().backward()
    assert sdf.grad is not None and sdf.grad.abs().sum() > 0
    assert positions.grad is not None and positions.grad.abs().sum() > 0

"""Judging a generated mesh without the prior: its shape by voxel IoU against the analytic
primitives, its colour by the nearest palette entry in CIELAB."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import trimesh
from skimage.color import rgb2lab

from ..export import Mesh
from .shapes import PALETTE, SHAPES, sdf

GRID = 24
YAWS = np.radians(np.arange(0, 90, 10))


@dataclass
class Verdict:
    shape: str
    color: str
    iou: float  # IoU with the judged shape
    ious: dict[str, float]


def _unit_grid(n: int = GRID) -> np.ndarray:
    axis = (np.arange(n) + 0.5) / n * 2 - 1
    return np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)


def _box_grid(grid: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The unit judge grid stretched over the box [lo, hi]: one scale for x and y (keeps the
    footprint's aspect, which tells a cube from a cylinder) and its own for z."""
    half = (hi - lo) / 2
    half_xy = max(half[0], half[1])
    return grid * np.array([half_xy, half_xy, half[2]]) + (lo + hi) / 2


def _primitive_occupancy(shape: str, yaw: float, grid: np.ndarray) -> np.ndarray:
    fine = _unit_grid(64)
    inside = fine[sdf(shape, torch.from_numpy(fine).float()).numpy() < 0]
    c, s = np.cos(yaw), np.sin(yaw)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    inside = inside @ rot.T
    world = _box_grid(grid, inside.min(0), inside.max(0))
    return sdf(shape, torch.from_numpy(world @ rot).float()).numpy() < 0


_REFERENCE: dict[str, list[np.ndarray]] = {}


def judge_mesh(mesh: Mesh) -> Verdict:
    grid = _unit_grid()
    tm = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
    lo, hi = tm.bounds
    world = _box_grid(grid, lo, hi)
    # surface voxels at twice the judge's resolution, holes filled, looked up at the grid
    voxels = tm.voxelized(pitch=float((hi - lo).min()) / (2 * GRID)).fill()
    occ = voxels.is_filled(world)
    ious = {}
    for shape in SHAPES:
        if shape not in _REFERENCE:
            _REFERENCE[shape] = [_primitive_occupancy(shape, yaw, grid) for yaw in (YAWS if shape == "cube" else [0.0])]
        ious[shape] = max(float((occ & ref).sum() / max(1, (occ | ref).sum())) for ref in _REFERENCE[shape])
    shape = max(ious, key=lambda name: ious[name])
    lab = rgb2lab(np.clip(mesh.colors.mean(0), 0, 1)[None, None])[0, 0]
    palette = {name: rgb2lab(np.array(rgb)[None, None])[0, 0] for name, rgb in PALETTE.items()}
    color = min(palette, key=lambda name: float(np.linalg.norm(palette[name] - lab)))
    return Verdict(shape, color, ious[shape], ious)

"""Judging a generated mesh without the prior: its shape by voxel IoU against the analytic
primitives, its colour by the nearest palette hue in Oklch, and, for an object with a
front, whether it came out right, as a Janus variant (its feature repeated), or as something
else."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import trimesh
from coloraide import Color
from scipy import ndimage
from skimage.measure import marching_cubes

from ..export import Mesh
from .shapes import JANUS_VARIANTS, PALETTE, SHAPES, object_sdf, sdf

GRID = 24
# The surface is voxelised this many times finer than the judge's grid before its inside is
# filled: a voxel the surface touches counts as inside, which swells the shape by half a voxel.
FINE = 4


@dataclass
class Verdict:
    shape: str
    color: str
    iou: float  # IoU with the judged shape
    ious: dict[str, float]
    rgb: tuple[float, float, float]  # the mesh's mean vertex colour (sRGB), what `color` names


def _unit_grid(n: int = GRID) -> np.ndarray:
    axis = (np.arange(n) + 0.5) / n * 2 - 1
    return np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)


def _box_grid(grid: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The unit judge grid stretched over the box [lo, hi]: one scale for x and y (keeps the
    footprint's aspect, which tells a cube from a cylinder) and its own for z."""
    half = (hi - lo) / 2
    half_xy = max(half[0], half[1])
    return grid * np.array([half_xy, half_xy, half[2]]) + (lo + hi) / 2


def _occupancy(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Which points of the judge's grid, stretched over the surface's box, lie inside it
    (surface voxels FINE times finer than the grid, holes filled)."""
    tm = trimesh.Trimesh(vertices, faces, process=False)
    lo, hi = tm.bounds
    voxels = tm.voxelized(pitch=float((hi - lo).min()) / (FINE * GRID)).fill()
    return voxels.is_filled(_box_grid(_unit_grid(), lo, hi))


def square_yaw(vertices: np.ndarray, faces: np.ndarray) -> float:
    """The yaw (radians, in [0, pi/2)) that turns the surface's vertical faces square to the
    axes: the mean direction of the face normals' azimuths times 4 (a quarter-turn symmetric
    statistic), weighted by area times horizontal extent. A cube so meets the reference cube
    square-on at any yaw; round shapes are the same at every yaw."""
    tri = vertices[faces].astype(np.float64)
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # area-weighted normals
    phi = np.arctan2(cross[:, 1], cross[:, 0])
    weight = np.hypot(cross[:, 0], cross[:, 1])
    return float(np.arctan2((weight * np.sin(4 * phi)).sum(), (weight * np.cos(4 * phi)).sum()) / 4 % (np.pi / 2))


def _turned(vertices: np.ndarray, yaw: float) -> np.ndarray:
    """Vertices turned by -yaw about Z."""
    c, s = np.cos(yaw), np.sin(yaw)
    return vertices @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def _primitive_occupancy(shape: str) -> np.ndarray:
    """The analytic primitive's occupancy, made the way a mesh's is (its marching-cubes surface
    through `_occupancy`, so both carry the same voxelisation): a perfect primitive scores
    about 1. (The reference sampled from the SDF that this replaced capped a perfect torus at
    0.86 and a sphere at 0.95.)"""
    n = 128
    axis = np.linspace(-1, 1, n, dtype=np.float32)
    points = torch.from_numpy(np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3))
    vertices, faces, _, _ = marching_cubes(sdf(shape, points).numpy().reshape(n, n, n), 0.0, spacing=(2 / (n - 1),) * 3)
    return _occupancy(vertices - 1, faces)


_REFERENCE: dict[str, np.ndarray] = {}


def judge_mesh(mesh: Mesh) -> Verdict:
    """IoU with each primitive, the mesh squared to the axes first (`square_yaw`)."""
    occ = _occupancy(_turned(mesh.vertices, square_yaw(mesh.vertices, mesh.faces)), mesh.faces)
    ious = {}
    for shape in SHAPES:
        if shape not in _REFERENCE:
            _REFERENCE[shape] = _primitive_occupancy(shape)
        ref = _REFERENCE[shape]
        ious[shape] = float((occ & ref).sum() / max(1, (occ | ref).sum()))
    shape = max(ious, key=lambda name: ious[name])
    rgb = np.clip(mesh.colors.mean(0), 0, 1)
    return Verdict(shape, color_word(rgb), ious[shape], ious, (float(rgb[0]), float(rgb[1]), float(rgb[2])))


# Below this Oklch chroma a colour is grey: its hue says nothing (the palette's lowest is 0.175).
GREY_CHROMA = 0.04


def color_word(rgb: np.ndarray) -> str:
    """The palette word whose hue (Oklch) is nearest to the sRGB colour's, or "grey".

    Hue, not a distance in a colour space: SDS darkens or pales an albedo without changing what
    colour it is, and every distance counts lightness too. CIELAB's also bends blue towards
    purple as it darkens (its known blue nonlinearity, which Oklab was fitted to remove): it
    called navy (0.03, 0.07, 0.39) purple. Oklab's hue is unchanged by scaling linear RGB."""
    lch = Color("srgb", [float(v) for v in rgb]).convert("oklch")
    if lch["chroma"] < GREY_CHROMA:
        return "grey"
    hues = {name: Color("srgb", list(value)).convert("oklch")["hue"] for name, value in PALETTE.items()}
    return min(hues, key=lambda name: abs((lch["hue"] - hues[name] + 180) % 360 - 180))


def judge_color(mesh: Mesh) -> str:
    """The palette word for the mesh's mean vertex colour (`color_word`)."""
    return color_word(mesh.colors.mean(0))


# ---- the Janus judge ------------------------------------------------------------------------
JANUS_YAWS = np.radians(np.arange(0, 360, 5))
JANUS_GRID = 32
# Below this IoU nothing fits: a lump is not called right or Janus because the object or its
# variant happens to overlap it a little more than the rest (they differ by a feature).
JANUS_MIN_IOU = 0.5


@dataclass
class JanusVerdict:
    kind: str  # "right", "janus" (a Janus variant fits best) or "other"
    best: str  # "right", a JANUS_VARIANTS key, or a primitive's name
    ious: dict[str, float]  # every candidate's IoU at its best yaw


# Background connected within a horizontal slice only: binary_fill_holes then closes every hole
# a slice surrounds, such as a cup's inside, which is open at the top and so not enclosed in 3D.
_IN_SLICE = np.zeros((3, 3, 3), bool)
_IN_SLICE[:, :, 1] = ndimage.generate_binary_structure(2, 1)


def _solid(occupancy: np.ndarray) -> np.ndarray:
    """A flat JANUS_GRID^3 occupancy with the holes of each horizontal slice filled. The Janus
    question is about the outside: a NeRF seen from our cameras' elevations shows a mug's rim,
    not the inside of a 0.06-thick wall, so a solid mug and the hollow analytic one must match."""
    n = JANUS_GRID
    return ndimage.binary_fill_holes(occupancy.reshape(n, n, n), _IN_SLICE).reshape(-1)


def _occupancies(fn: Callable[[torch.Tensor], torch.Tensor], grid: np.ndarray) -> list[np.ndarray]:
    """The shape `fn` (an SDF) turned by each of JANUS_YAWS about Z, sampled on `grid` stretched
    over its own box with one scale for all three axes (so two handles make a wider box than one)."""
    fine = _unit_grid(64)
    inside = fine[fn(torch.from_numpy(fine).float()).numpy() < 0]
    out = []
    for yaw in JANUS_YAWS:
        c, s = np.cos(yaw), np.sin(yaw)
        rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
        turned = inside @ rot.T
        world = _cube_grid(grid, turned.min(0), turned.max(0))
        out.append(_solid(fn(torch.from_numpy(world @ rot).float()).numpy() < 0))
    return out


def _cube_grid(grid: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return grid * float((hi - lo).max() / 2) + (lo + hi) / 2


def judge_janus(mesh: Mesh, name: str) -> JanusVerdict:
    """Is the mesh the object `name` (right), one of its Janus variants, or something else (the
    primitives, or nothing fitting with an IoU of JANUS_MIN_IOU)? Each candidate is searched
    over yaw; the mesh and the candidates are normalised alike (centred on their box, scaled by
    its longest side) and made solid alike (`_solid`); the best IoU decides."""
    grid = _unit_grid(JANUS_GRID)
    tm = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
    lo, hi = tm.bounds
    occ = _solid(tm.voxelized(pitch=float((hi - lo).max()) / (2 * JANUS_GRID)).fill().is_filled(_cube_grid(grid, lo, hi)))
    candidates: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"right": lambda p: object_sdf(name, p)}
    candidates |= {key: partial(object_sdf, name, offsets=offsets) for key, offsets in JANUS_VARIANTS.items()}
    candidates |= {shape: partial(sdf, shape) for shape in SHAPES}
    ious = {}
    for key, fn in candidates.items():
        if (name, key) not in _JANUS_REFERENCE:
            _JANUS_REFERENCE[name, key] = _occupancies(fn, grid)
        ious[key] = max(float((occ & ref).sum() / max(1, (occ | ref).sum())) for ref in _JANUS_REFERENCE[name, key])
    best = max(ious, key=lambda key: ious[key])
    kind = "right" if best == "right" else "janus" if best in JANUS_VARIANTS else "other"
    return JanusVerdict(kind if ious[best] >= JANUS_MIN_IOU else "other", best, ious)


_JANUS_REFERENCE: dict[tuple[str, str], list[np.ndarray]] = {}


# ---- the front judge ------------------------------------------------------------------------
FRONT_TOLERANCE = 45.0  # degrees: a front turned less than this from where the image shows it counts as right


@dataclass
class FrontVerdict:
    right: bool  # the object's front is where the reference image's front is (azimuth 0)
    yaw: float  # degrees in (-180, 180]: how far the best-fitting right object is turned about Z
    iou: float  # that fit's IoU


def judge_front(mesh: Mesh, name: str) -> FrontVerdict:
    """Where the mesh's front is: the yaw at which the object `name` (unturned: its front at
    azimuth 0, where an image job's reference camera stands) fits the mesh best, on the Janus
    judge's grids and yaws; right when that yaw is within FRONT_TOLERANCE of 0 and the fit
    reaches JANUS_MIN_IOU. Every object with a front has one feature off its mirror axis or on
    it at one end, so only one yaw fits it well."""
    grid = _unit_grid(JANUS_GRID)
    tm = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
    lo, hi = tm.bounds
    occ = _solid(tm.voxelized(pitch=float((hi - lo).max()) / (2 * JANUS_GRID)).fill().is_filled(_cube_grid(grid, lo, hi)))
    if (name, "right") not in _JANUS_REFERENCE:
        _JANUS_REFERENCE[name, "right"] = _occupancies(lambda p: object_sdf(name, p), grid)
    ious = [float((occ & ref).sum() / max(1, (occ | ref).sum())) for ref in _JANUS_REFERENCE[name, "right"]]
    best = int(np.argmax(ious))
    yaw = (float(np.degrees(JANUS_YAWS[best])) + 180.0) % 360.0 - 180.0
    return FrontVerdict(abs(yaw) <= FRONT_TOLERANCE and ious[best] >= JANUS_MIN_IOU, yaw, ious[best])

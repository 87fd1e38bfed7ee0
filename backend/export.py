"""Writing meshes to files with trimesh, each format in its own axis and colour convention,
so the object stands upright and keeps its colour after Blender's default import.

- GLB: Y up (glTF), COLOR_0 in linear RGB as the spec requires.
- OBJ: Y up (the common convention Blender's importer assumes), sRGB vertex colours.
- PLY: Z up like our world, sRGB vertex colours.
FBX goes through Blender's own exporter (`promptmesh export`, shared/blender_io.py).
No torch here: `promptmesh export` loads this module beside Blender's bpy.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import trimesh

from ..shared.errors import BAD_REQUEST, PromptMeshError


FORMATS = ("glb", "ply", "obj")


@dataclass
class Mesh:
    """A triangle mesh in the backend's world (Z up, front -Y); colours are display sRGB."""

    vertices: np.ndarray  # [V, 3] float32
    faces: np.ndarray  # [F, 3] int32, counter-clockwise seen from outside
    colors: np.ndarray  # [V, 3] float32 in [0, 1], sRGB
    normals: np.ndarray  # [V, 3] float32, unit, outward

    @property
    def counts(self) -> dict[str, int]:
        return {"vertices": int(len(self.vertices)), "faces": int(len(self.faces))}


def srgb_to_linear(c: np.ndarray) -> np.ndarray:
    c = np.clip(c, 0.0, 1.0)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(c: np.ndarray) -> np.ndarray:
    c = np.clip(c, 0.0, 1.0)
    return np.where(c <= 0.0031308, c * 12.92, 1.055 * c ** (1 / 2.4) - 0.055)


def z_up_to_y_up(v: np.ndarray) -> np.ndarray:
    """(x, y, z) with Z up and front -Y -> (x, z, -y) with Y up and front +Z."""
    return np.stack([v[:, 0], v[:, 2], -v[:, 1]], 1)


def y_up_to_z_up(v: np.ndarray) -> np.ndarray:
    """The inverse of z_up_to_y_up."""
    return np.stack([v[:, 0], -v[:, 2], v[:, 1]], 1)


def _rgba8(c: np.ndarray) -> np.ndarray:
    rgb = np.round(np.clip(c, 0, 1) * 255).astype(np.uint8)
    return np.concatenate([rgb, np.full((len(rgb), 1), 255, np.uint8)], 1)


def to_trimesh(mesh: Mesh, fmt: str) -> trimesh.Trimesh:
    """The mesh in `fmt`'s axes and colour space."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    y_up = fmt in ("glb", "obj")
    verts = z_up_to_y_up(mesh.vertices) if y_up else mesh.vertices
    normals = z_up_to_y_up(mesh.normals) if y_up else mesh.normals
    colors = srgb_to_linear(mesh.colors) if fmt == "glb" else mesh.colors
    return trimesh.Trimesh(
        vertices=verts, faces=mesh.faces, vertex_normals=normals, vertex_colors=_rgba8(colors), process=False
    )


def read_mesh(path: str | Path) -> Mesh:
    """A mesh written by write_mesh (GLB/PLY/OBJ) or a job's mesh.npz, back in our axes and sRGB."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt == "npz":
        with np.load(path) as data:
            return Mesh(**{k: np.asarray(data[k]) for k in ("vertices", "faces", "colors", "normals")})
    if fmt not in FORMATS:
        raise PromptMeshError(f"cannot read {path.name}: expected .npz or one of {', '.join(FORMATS)}", BAD_REQUEST)
    tm = trimesh.load(path, force="mesh", process=False)
    if not isinstance(tm, trimesh.Trimesh) or len(tm.faces) == 0:
        raise PromptMeshError(f"{path} holds no triangle mesh", BAD_REQUEST)
    y_up = fmt in ("glb", "obj")
    visual = tm.visual.to_color() if tm.visual.kind == "texture" else tm.visual
    colors = np.asarray(visual.vertex_colors)[:, :3] / 255.0
    verts, normals = np.asarray(tm.vertices), np.asarray(tm.vertex_normals)
    return Mesh(
        vertices=(y_up_to_z_up(verts) if y_up else verts).astype(np.float32),
        faces=np.asarray(tm.faces, np.int32),
        colors=(linear_to_srgb(colors) if fmt == "glb" else colors).astype(np.float32),
        normals=(y_up_to_z_up(normals) if y_up else normals).astype(np.float32),
    )


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_mesh(mesh: Mesh, path: str | Path, fmt: str | None = None) -> Path:
    """Write `mesh` to `path`; the format comes from `fmt` or the file extension."""
    path = Path(path)
    fmt = (fmt or path.suffix.lstrip(".")).lower()
    tm = to_trimesh(mesh, fmt)
    if fmt == "obj":
        data = trimesh.exchange.obj.export_obj(tm, include_color=True, include_normals=True).encode()
    else:
        data = tm.export(file_type=fmt)
    atomic_write_bytes(path, data)
    return path


def write_json(data: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
    return path

"""Writing meshes to files with trimesh, each format in its own axis and colour convention,
so the object stands upright and keeps its colour after Blender's default import.

- GLB: Y up (glTF), COLOR_0 in linear RGB as the spec requires.
- OBJ: Y up (the common convention Blender's importer assumes), sRGB vertex colours.
- PLY: Z up like our world, sRGB vertex colours.
FBX goes through Blender's own exporter (`promptmesh export`, shared/blender_io.py).
No torch here: `promptmesh export` loads this module beside Blender's bpy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import trimesh

from ..shared.errors import BAD_REQUEST, PromptMeshError
from ..shared.result import Mesh, atomic_write, read_npz

FORMATS = ("glb", "ply", "obj")


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
        return read_npz(path)
    if fmt not in FORMATS:
        raise PromptMeshError(f"cannot read {path.name}: expected .npz or one of {', '.join(FORMATS)}", BAD_REQUEST)
    tm = trimesh.load(path, force="mesh", process=False)
    if not isinstance(tm, trimesh.Trimesh) or len(tm.faces) == 0:
        raise PromptMeshError(f"{path} holds no triangle mesh", BAD_REQUEST)
    y_up = fmt in ("glb", "obj")
    visual = tm.visual
    if isinstance(visual, trimesh.visual.TextureVisuals):
        visual = visual.to_color()
    if not isinstance(visual, trimesh.visual.ColorVisuals):
        raise PromptMeshError(f"{path} holds no vertex colours", BAD_REQUEST)
    colors = np.asarray(visual.vertex_colors)[:, :3] / 255.0
    verts, normals = np.asarray(tm.vertices), np.asarray(tm.vertex_normals)
    return Mesh(
        vertices=(y_up_to_z_up(verts) if y_up else verts).astype(np.float32),
        faces=np.asarray(tm.faces, np.int32),
        colors=(linear_to_srgb(colors) if fmt == "glb" else colors).astype(np.float32),
        normals=(y_up_to_z_up(normals) if y_up else normals).astype(np.float32),
    )


def write_mesh(mesh: Mesh, path: str | Path, fmt: str | None = None) -> Path:
    """Write `mesh` to `path`; the format comes from `fmt` or the file extension."""
    path = Path(path)
    fmt = (fmt or path.suffix.lstrip(".")).lower()
    tm = to_trimesh(mesh, fmt)
    if fmt == "obj":
        data = trimesh.exchange.obj.export_obj(tm, include_color=True, include_normals=True).encode()
    else:
        data = tm.export(file_type=fmt)
    return atomic_write(path, data)

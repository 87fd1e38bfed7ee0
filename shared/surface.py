"""A mesh someone brings to be painted (`promptmesh texture`, the add-on's Texture Selected):
its arrays checked before any work starts, by the client and again by the backend."""

from __future__ import annotations

import numpy as np

from .errors import PromptMeshError
from .vocab import ErrorCode

MAX_FACES = 500_000  # a server may set its own (serve --max-texture-faces)


class SurfaceError(PromptMeshError):
    """The mesh cannot be painted as given; the message says why."""

    code = ErrorCode.BAD_REQUEST


def check_surface(vertices: np.ndarray, faces: np.ndarray, uvs: np.ndarray | None = None,
                  max_faces: int = MAX_FACES) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, list[str]]:
    """(vertices [V, 3] float32, faces [F, 3] int32, uvs [V, 2] float32 or None, warnings), or a
    SurfaceError naming what is wrong. UVs outside 0..1 (tiles, UDIMs) cannot hold one texture:
    they are dropped with a warning, and the mesh is unwrapped anew."""
    v, f = np.asarray(vertices), np.asarray(faces)
    if v.ndim != 2 or v.shape[1] != 3 or not np.issubdtype(v.dtype, np.number):
        raise SurfaceError(f"mesh: vertices must be [V, 3] numbers, got shape {v.shape} {v.dtype}")
    if f.ndim != 2 or f.shape[1] != 3 or not np.issubdtype(f.dtype, np.integer):
        raise SurfaceError(f"mesh: faces must be [F, 3] integers (triangles), got shape {f.shape} {f.dtype}")
    if len(f) == 0 or len(v) < 3:
        raise SurfaceError("mesh: it is empty (no triangles)")
    if len(f) > max_faces:
        raise SurfaceError(f"mesh: {len(f):,} triangles; at most {max_faces:,} can be painted (decimate it first)")
    if not np.isfinite(v).all():
        raise SurfaceError("mesh: some vertex coordinates are not finite (NaN or infinity)")
    if f.min() < 0 or f.max() >= len(v):
        raise SurfaceError(f"mesh: face indices must lie in 0..{len(v) - 1}, found {int(f.min())}..{int(f.max())}")
    v, f = v.astype(np.float32), f.astype(np.int32)
    a, b, c = (v[f[:, i]].astype(np.float64) for i in range(3))
    area = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1).sum()
    extent = float(np.ptp(v[np.unique(f)], axis=0).max())
    if extent <= 0 or area <= 1e-12 * extent**2:
        raise SurfaceError("mesh: it is degenerate (its triangles have no area)")
    warnings: list[str] = []
    uv = None
    if uvs is not None:
        uv = np.asarray(uvs, np.float32)
        if uv.shape != (len(v), 2) or not np.isfinite(uv).all():
            raise SurfaceError(f"mesh: uvs must be [V, 2] finite numbers for its {len(v)} vertices, got {uv.shape}")
        if uv.min() < 0 or uv.max() > 1:
            warnings.append("its UVs reach outside 0..1 (tiles or UDIMs): it gets a new UV map")
            uv = None
    return v, f, uv, warnings

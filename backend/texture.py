"""A base-colour texture for a vertex-coloured mesh: UV atlas by xatlas, the colours baked into
an image, seams dilated.

Texture images here are uint8 sRGB [H, W, 3] with row 0 at the top, i.e. at v = 1 (UV origin at
the bottom left, as OBJ, Blender and trimesh have it). No library here rasterises triangles in
UV space (xatlas only charts and packs; trimesh, scikit-image and Pillow fill polygons without
interpolating attributes), so `rasterize_uv` is ours: vectorised numpy, triangles grouped by
their box size. No torch here: `promptmesh export` loads this module beside Blender's bpy.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..shared.errors import PromptMeshError
from ..shared.result import Mesh
from ..shared.vocab import ErrorCode

PADDING = 2  # texels between charts, so that bilinear filtering does not mix neighbours


class TextureError(PromptMeshError):
    """The UV atlas could not be made; the mesh is still whole, with its vertex colours."""

    code = ErrorCode.MESH


PART_FACES = 2_500  # faces per piece handed to xatlas (see _charts)


def _pieces(vertices: np.ndarray, faces: np.ndarray) -> list[np.ndarray]:
    """The faces split into wedges of about PART_FACES around the vertical (Y) axis through the
    centroid, each an array of face indices."""
    count = max(1, round(len(faces) / PART_FACES))
    centres = vertices[faces].mean(1) - vertices.mean(0)
    order = np.argsort(np.arctan2(centres[:, 2], centres[:, 0]), kind="stable")
    return np.array_split(order, count)


def _charts(vertices: np.ndarray, faces: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """xatlas's charting time grows much faster than the face count (20k faces: 5.8 s on one
    core of a 2-core EPYC; the same faces as 8 wedges: 2.3 s, 16: 1.3 s), and it works on the
    meshes of one atlas in parallel. So the mesh goes in as wedges of about PART_FACES faces,
    charted separately and packed into one atlas; a wedge's edge is one more seam."""
    import xatlas

    chart = xatlas.ChartOptions()
    pack = xatlas.PackOptions()
    pack.resolution, pack.padding, pack.bilinear = size, PADDING, True
    atlas = xatlas.Atlas()
    used = []
    for piece in _pieces(vertices, faces):
        kept, local = np.unique(faces[piece], return_inverse=True)
        atlas.add_mesh(vertices[kept], local.reshape(-1, 3).astype(np.uint32))
        used.append(kept)
    atlas.generate(chart, pack)
    if atlas.atlas_count != 1:
        raise RuntimeError(f"xatlas packed the charts into {atlas.atlas_count} atlases, not one")
    vmaps, all_faces, all_uvs, offset = [], [], [], 0
    for i, kept in enumerate(used):
        vmap, new_faces, uvs = atlas[i]
        vmaps.append(kept[vmap])
        all_faces.append(new_faces.astype(np.int64) + offset)
        all_uvs.append(uvs)
        offset += len(vmap)
    return (np.concatenate(vmaps).astype(np.int64), np.concatenate(all_faces).astype(np.int32),
            np.concatenate(all_uvs).astype(np.float32))


def atlas(mesh: Mesh, size: int, timeout: float = 300.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """xatlas's charts packed for a `size` texture: (vertex map [V'] into the old vertices,
    new faces [F, 3], UVs [V', 2] in [0, 1]). Vertices on a seam are split. xatlas runs in a
    child process (`python -m promptmesh.backend.texture`, arrays through .npz files): it
    crashes on some meshes (a segmentation fault, jpcy/xatlas#151), which here becomes a
    TextureError instead of a dead server."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="promptmesh-atlas-") as tmp:
        src, dst = Path(tmp) / "mesh.npz", Path(tmp) / "atlas.npz"
        np.savez(src, vertices=np.asarray(mesh.vertices, np.float32), faces=np.asarray(mesh.faces, np.uint32))
        try:
            proc = subprocess.run([sys.executable, "-m", __name__, str(src), str(dst), str(size)],
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise TextureError(f"the UV unwrapper (xatlas) took over {timeout:.0f} s on {len(mesh.faces)} faces") from exc
        if proc.returncode != 0 or not dst.is_file():
            how = f"crashed (signal {-proc.returncode})" if proc.returncode < 0 else f"failed: {proc.stderr.strip()[-300:]}"
            raise TextureError(f"the UV unwrapper (xatlas) {how} on this mesh ({len(mesh.faces)} faces)")
        with np.load(dst) as out:
            return out["vmap"].astype(np.int64), out["faces"].astype(np.int32), out["uvs"].astype(np.float32)


def rasterize_uv(uvs: np.ndarray, faces: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """For each texel of a size x size image (row 0 at v = 1): the face covering its centre
    (-1: none) [S, S] and the barycentric weights of its centre in that face [S, S, 3]."""
    xy = np.stack([uvs[:, 0] * size - 0.5, (1.0 - uvs[:, 1]) * size - 0.5], 1)  # texel-centre units
    tri = xy[faces]  # [F, 3, 2]
    lo = np.floor(tri.min(1)).astype(np.int64).clip(0, size - 1)
    hi = np.ceil(tri.max(1)).astype(np.int64).clip(0, size - 1)
    extent = (hi - lo).max(1) + 1
    face_of = np.full((size, size), -1, np.int64)
    weights = np.zeros((size, size, 3), np.float32)
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    start = 0
    while start < extent.max(initial=0):  # buckets of faces whose box fits an s x s block
        s = max(2, 2 * start)
        pick = np.nonzero((extent > start) & (extent <= s) & (np.abs(area) > 1e-12))[0]
        start = s
        if len(pick) == 0:
            continue
        oy, ox = np.mgrid[0:s, 0:s]
        px = lo[pick, 0, None] + ox.ravel()[None]  # [n, s*s]
        py = lo[pick, 1, None] + oy.ravel()[None]

        def edge(p: np.ndarray, q: np.ndarray, px: np.ndarray = px, py: np.ndarray = py) -> np.ndarray:
            return (q[:, 0, None] - p[:, 0, None]) * (py - p[:, 1, None]) - (q[:, 1, None] - p[:, 1, None]) * (px - p[:, 0, None])

        inv = 1.0 / area[pick, None]
        w0, w1, w2 = edge(b[pick], c[pick]) * inv, edge(c[pick], a[pick]) * inv, edge(a[pick], b[pick]) * inv
        inside = (w0 >= -1e-6) & (w1 >= -1e-6) & (w2 >= -1e-6) & (px <= hi[pick, 0, None]) & (py <= hi[pick, 1, None])
        rows, cols = np.nonzero(inside)
        face_of[py[rows, cols], px[rows, cols]] = pick[rows]
        weights[py[rows, cols], px[rows, cols]] = np.stack([w0[rows, cols], w1[rows, cols], w2[rows, cols]], 1)
    return face_of, weights


def dilate(image: np.ndarray, covered: np.ndarray) -> np.ndarray:
    """Every texel outside the charts takes the colour of the nearest covered texel, so that
    filtering and mipmaps across a seam see the chart's own colour, not the empty background."""
    if covered.all() or not covered.any():
        return image
    index = ndimage.distance_transform_edt(~covered, return_distances=False, return_indices=True)
    return image[index[0], index[1]]


ColorAt = Callable[[np.ndarray], np.ndarray]  # surface points [N, 3] -> sRGB colours [N, 3] in [0, 1]


def bake(mesh: Mesh, size: int, color_at: ColorAt | None = None) -> Mesh:
    """The mesh with a size x size sRGB texture: of `color_at` at each texel's surface point, or
    else of its vertex colours. A mesh with UVs keeps them; one without gets xatlas's (vertices
    split at the atlas's seams; positions, normals and vertex colours copied to the split ones)."""
    if mesh.uvs is not None:
        vmap, faces, uvs = np.arange(len(mesh.vertices)), mesh.faces, mesh.uvs
    else:
        vmap, faces, uvs = atlas(mesh, size)
    face_of, weights = rasterize_uv(uvs, faces, size)
    vertices, colors = mesh.vertices[vmap], mesh.colors[vmap]
    covered = face_of >= 0
    corners = faces[face_of[covered]]  # [n, 3]
    image = np.zeros((size, size, 3), np.float32)
    if color_at is None:
        image[covered] = (weights[covered, :, None] * colors[corners]).sum(1)
    else:
        image[covered] = color_at((weights[covered, :, None] * vertices[corners]).sum(1))
    texture = np.round(np.clip(dilate(image, covered), 0, 1) * 255).astype(np.uint8)
    return Mesh(vertices, faces, colors, mesh.normals[vmap], uvs=uvs, texture=texture)


if __name__ == "__main__":  # the child process of `atlas`: MESH.npz ATLAS.npz SIZE
    with np.load(sys.argv[1]) as given:
        vmap, faces, uvs = _charts(np.ascontiguousarray(given["vertices"]), np.ascontiguousarray(given["faces"]),
                                   int(sys.argv[3]))
    np.savez(sys.argv[2], vmap=vmap, faces=faces, uvs=uvs)

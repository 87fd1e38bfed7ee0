"""Writing meshes to files, each format in its own axis and colour convention, so the object
stands upright and keeps its colour after Blender's default import.

- GLB (trimesh): Y up (glTF), COLOR_0 in linear RGB as the spec requires; with a texture, a
  PBR material whose baseColorTexture is the embedded sRGB PNG, on TEXCOORD_0 (V flipped by
  trimesh: glTF's UV origin is the top left), and the vertex colours as the application-specific
  attribute _COLOR_0 instead: glTF multiplies COLOR_0 into the base colour, so a texture of the
  same colours beside it renders them squared (darker) in every compliant viewer, Blender's
  importer included.
- OBJ (ours: trimesh drops vertex colours from a textured OBJ): Y up (the convention Blender's
  importer assumes), sRGB vertex colours; with a texture, `vt` lines, NAME.mtl (`map_Kd`) and
  NAME.png beside the OBJ.
- PLY (trimesh): Z up like our world, sRGB vertex colours, no texture.
FBX goes through Blender's own exporter (`promptmesh export`, shared/blender_io.py).
No torch here: `promptmesh export` loads this module beside Blender's bpy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import trimesh
from PIL import Image

from ..shared.blender_io import ROUGHNESS
from ..shared.errors import PromptMeshError
from ..shared.result import Mesh, atomic_write, read_npz
from ..shared.vocab import MESH_FORMATS, ErrorCode, OutputFormat

FORMATS = MESH_FORMATS


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


TEXTURED_COLORS = "_COLOR_0"  # a textured GLB's vertex colours (module docstring)


def _rgba8(c: np.ndarray) -> np.ndarray:
    rgb = np.round(np.clip(c, 0, 1) * 255).astype(np.uint8)
    return np.concatenate([rgb, np.full((len(rgb), 1), 255, np.uint8)], 1)


def to_trimesh(mesh: Mesh, fmt: str) -> trimesh.Trimesh:
    """The mesh in GLB's or PLY's axes and colour space; for GLB, with its texture if it has one."""
    if fmt not in (OutputFormat.GLB, OutputFormat.PLY):
        raise ValueError(f"trimesh writes glb and ply here, not {fmt!r}")
    verts = z_up_to_y_up(mesh.vertices) if fmt == OutputFormat.GLB else mesh.vertices
    normals = z_up_to_y_up(mesh.normals) if fmt == OutputFormat.GLB else mesh.normals
    colors = srgb_to_linear(mesh.colors) if fmt == OutputFormat.GLB else mesh.colors
    tm = trimesh.Trimesh(vertices=verts, faces=mesh.faces, vertex_normals=normals, vertex_colors=_rgba8(colors),
                         process=False)
    if fmt == OutputFormat.GLB and mesh.texture is not None:
        material = trimesh.visual.material.PBRMaterial(
            baseColorTexture=Image.fromarray(mesh.texture), metallicFactor=0.0, roughnessFactor=ROUGHNESS)
        tm.visual = trimesh.visual.TextureVisuals(uv=mesh.uvs, material=material)
        # linear RGB floats, like COLOR_0's values; an accessor of ours, so self-describing
        tm.vertex_attributes[TEXTURED_COLORS] = colors.astype(np.float32)
    return tm


def read_mesh(path: str | Path) -> Mesh:
    """A mesh written by write_mesh (GLB/PLY/OBJ) or a job's mesh.npz, back in our axes and sRGB."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt == "npz":
        return read_npz(path)
    if fmt not in FORMATS:
        raise PromptMeshError(f"cannot read {path.name}: expected .npz or one of {', '.join(FORMATS)}", ErrorCode.BAD_REQUEST)
    tm = _load(path)
    if not isinstance(tm, trimesh.Trimesh) or len(tm.faces) == 0:
        raise PromptMeshError(f"{path} holds no triangle mesh", ErrorCode.BAD_REQUEST)
    y_up = fmt in (OutputFormat.GLB, OutputFormat.OBJ)
    uvs, texture = _texture_of(tm)
    colors = _vertex_colors(tm)
    if colors is None:
        raise PromptMeshError(f"{path} holds no vertex colours", ErrorCode.BAD_REQUEST)
    verts, normals = np.asarray(tm.vertices), np.asarray(tm.vertex_normals)
    return Mesh(
        vertices=(y_up_to_z_up(verts) if y_up else verts).astype(np.float32),
        faces=np.asarray(tm.faces, np.int32),
        colors=(linear_to_srgb(colors) if fmt == OutputFormat.GLB else colors).astype(np.float32),
        normals=(y_up_to_z_up(normals) if y_up else normals).astype(np.float32),
        uvs=uvs, texture=texture,
    )


def read_surface(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(vertices [V, 3] in our axes, faces [F, 3], UVs [V, 2] or None) of any mesh file trimesh
    reads (GLB/glTF, OBJ, PLY, STL, OFF...), for painting; colours and materials are ignored.
    glTF and OBJ are Y up, the rest taken as Z up (as write_mesh writes them)."""
    path = Path(path)
    try:
        tm = _load(path)
    except Exception as exc:  # trimesh raises many kinds for a damaged or foreign file
        raise PromptMeshError(f"cannot read {path.name} as a mesh: {exc}", ErrorCode.BAD_REQUEST) from exc
    if not isinstance(tm, trimesh.Trimesh) or len(tm.faces) == 0:
        raise PromptMeshError(f"{path} holds no triangle mesh", ErrorCode.BAD_REQUEST)
    y_up = path.suffix.lower() in (".glb", ".gltf", ".obj")
    verts = np.asarray(tm.vertices, np.float64)
    uv = getattr(tm.visual, "uv", None)
    return ((y_up_to_z_up(verts) if y_up else verts).astype(np.float32), np.asarray(tm.faces, np.int64),
            None if uv is None else np.asarray(uv, np.float32)[:, :2])


def _load(path: Path) -> trimesh.Trimesh | None:
    """The file's mesh. A scene of one mesh at its origin (the GLB write_mesh writes) is taken as
    it is: trimesh's merging of a scene's meshes (force="mesh") drops the vertex colours of a
    textured one."""
    loaded = trimesh.load(path, process=False)
    if isinstance(loaded, trimesh.Scene):
        nodes = loaded.graph.nodes_geometry
        if len(nodes) == 1 and np.allclose(loaded.graph[nodes[0]][0], np.eye(4)):
            return loaded.geometry[loaded.graph[nodes[0]][1]]
        loaded = trimesh.load(path, force="mesh", process=False)
    return loaded if isinstance(loaded, trimesh.Trimesh) else None


def _vertex_colors(tm: trimesh.Trimesh) -> np.ndarray | None:
    """[V, 3] in [0, 1] as stored; a textured file's own vertex colours (our GLB's _COLOR_0 beside
    a texture), else the texture sampled at the vertices (trimesh drops an OBJ's `v` colours
    beside a texture)."""
    if TEXTURED_COLORS in tm.vertex_attributes:
        return np.asarray(tm.vertex_attributes[TEXTURED_COLORS], np.float64)[:, :3]
    visual = tm.visual
    if isinstance(visual, trimesh.visual.TextureVisuals):
        stored = visual.vertex_attributes.get("color")
        visual = visual.to_color() if stored is None else trimesh.visual.ColorVisuals(vertex_colors=stored)
    if not isinstance(visual, trimesh.visual.ColorVisuals) or visual.kind != "vertex":
        return None
    return np.asarray(visual.vertex_colors)[:, :3] / 255.0


def _texture_of(tm: trimesh.Trimesh) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(uvs [V, 2], texture [H, W, 3] uint8) of a textured file, else (None, None)."""
    visual = tm.visual
    if not isinstance(visual, trimesh.visual.TextureVisuals) or visual.uv is None:
        return None, None
    material = visual.material
    image = getattr(material, "baseColorTexture", None) or getattr(material, "image", None)
    if image is None:
        return None, None
    return np.asarray(visual.uv, np.float32)[:, :2], np.asarray(image.convert("RGB"))


def write_mesh(mesh: Mesh, path: str | Path, fmt: str | None = None) -> Path:
    """Write `mesh` to `path`; the format comes from `fmt` or the file extension."""
    path = Path(path)
    fmt = (fmt or path.suffix.lstrip(".")).lower()
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt == OutputFormat.OBJ:
        return write_obj(mesh, path)
    tm = to_trimesh(mesh, fmt)
    return atomic_write(path, lambda f: tm.export(f, file_type=fmt))


def write_obj(mesh: Mesh, path: Path) -> Path:
    """OBJ, Y up: `v x y z r g b` (sRGB), `vn`; with a texture also `vt`, `mtllib` and `usemtl`
    before the faces, and PATH.mtl (`map_Kd`) and PATH.png beside it. The PNG and the MTL are
    written first, the OBJ last, each atomically: an OBJ on disk always finds its material."""
    text = _rows("v", np.column_stack([z_up_to_y_up(mesh.vertices), np.clip(mesh.colors, 0, 1)]))
    text += _rows("vn", z_up_to_y_up(mesh.normals))
    corner = "{}//{}"  # every corner's v, vt and vn share one index
    if mesh.texture is not None and mesh.uvs is not None:
        png = Image.fromarray(mesh.texture)
        texture = atomic_write(path.with_suffix(".png"), lambda f: png.save(f, format="PNG"))
        material = atomic_write(path.with_suffix(".mtl"), _mtl(path.stem, texture.name))
        text = f"mtllib {material.name}\n{text}{_rows('vt', mesh.uvs)}usemtl {path.stem}\n"
        corner = "{}/{}/{}"
    return atomic_write(path, (text + _rows("f", mesh.faces + 1, corner)).encode())


def _rows(tag: str, array: np.ndarray, value_format: str = "{}") -> str:
    """One OBJ line per row of `array`, starting with `tag`."""
    return f"{tag} " + trimesh.util.array_to_string(array, row_delim=f"\n{tag} ", value_format=value_format) + "\n"


def _mtl(name: str, texture: str) -> bytes:
    """One material: white diffuse times the texture, no specular highlight, our roughness
    (`Pr`, the PBR extension Blender's importer reads), not metal."""
    return f"newmtl {name}\nKd 1 1 1\nKs 0 0 0\nPr {ROUGHNESS}\nPm 0\nmap_Kd {texture}\n".encode()

"""Texture Selected: the active mesh object goes to the backend as a surface to paint, and its
result comes back onto the same object as a new material.

The object is sent as Blender evaluates it (modifiers applied), triangulated, in object space;
a UV map it has travels with it (vertices split where UVs differ, as the wire wants one UV per
vertex). When the result is back it is matched to the object's evaluated triangles by position
(the backend may reorder and split them when it unwraps), so colours and UVs land on the right
face corners however the backend packed them.
"""

from __future__ import annotations

from typing import Any

import bpy
import numpy as np

from .shared.blender_io import packed_image
from .shared.errors import PromptMeshError
from .shared.result import Mesh
from .shared.surface import MAX_FACES, SurfaceError, check_surface
from .shared.vocab import ErrorCode

COLOR_ATTRIBUTE = "PromptMesh Color"  # our own name: the artist's "Color" stays untouched
UV_MAP = "PromptMesh UV"
MAX_UV_MAPS = 8  # Blender's limit per mesh
MATCH_TOLERANCE = 1e-5  # metres: the backend returns the very float32 positions it was sent


class TextureApplyError(PromptMeshError):
    """The result cannot be put on the object (it was changed, renamed or removed meanwhile)."""

    code = ErrorCode.MESH


def _uv_layer(mesh: Any) -> Any:
    """The UV map the object renders with, or None."""
    return next((layer for layer in mesh.uv_layers if layer.active_render), None)


def _same_topology(a: Any, b: Any) -> bool:
    """Whether two meshes have the same face corners on the same vertices (modifiers that only
    deform keep them): then a corner of the evaluated mesh is the same corner of the object's own."""
    if len(a.loops) != len(b.loops) or len(a.polygons) != len(b.polygons) or len(a.vertices) != len(b.vertices):
        return False
    la, lb = np.empty(len(a.loops), np.int32), np.empty(len(b.loops), np.int32)
    a.loops.foreach_get("vertex_index", la)
    b.loops.foreach_get("vertex_index", lb)
    return bool(np.array_equal(la, lb))


class Evaluated:
    """The object's mesh as Blender shows it, triangulated: positions per vertex, the vertex of
    each face corner, the corners of each triangle, UVs per corner (None without a usable map)."""

    def __init__(self, context: Any, obj: Any) -> None:
        if obj.mode == "EDIT":
            obj.update_from_editmode()  # edits not yet in its mesh data
        evaluated = obj.evaluated_get(context.evaluated_depsgraph_get())
        mesh = evaluated.to_mesh()
        try:
            mesh.calc_loop_triangles()
            if len(mesh.loop_triangles) > MAX_FACES:  # before copying arrays of millions
                raise SurfaceError(f"mesh: {len(mesh.loop_triangles):,} triangles; at most {MAX_FACES:,} can be "
                                   "painted (decimate it first)")
            self.co = np.empty(len(mesh.vertices) * 3, np.float32)
            mesh.vertices.foreach_get("co", self.co)
            self.co = self.co.reshape(-1, 3)
            self.loop_vertex = np.empty(len(mesh.loops), np.int32)
            mesh.loops.foreach_get("vertex_index", self.loop_vertex)
            self.triangles = np.empty(len(mesh.loop_triangles) * 3, np.int32)
            mesh.loop_triangles.foreach_get("loops", self.triangles)
            self.triangles = self.triangles.reshape(-1, 3)
            layer = _uv_layer(mesh)
            self.uv_map, self.uvs = "", None
            if layer is not None and len(mesh.loops):
                uvs = np.empty(len(mesh.loops) * 2, np.float32)
                layer.data.foreach_get("uv", uvs)
                uvs = uvs.reshape(-1, 2)
                if np.isfinite(uvs).all() and uvs.min() >= 0 and uvs.max() <= 1:  # tiles and UDIMs: a new map
                    self.uv_map, self.uvs = layer.name, uvs
            self.same_topology = _same_topology(mesh, obj.data)
        finally:
            evaluated.to_mesh_clear()

    def surface(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(vertices, faces, uvs or None) as the wire wants them: with UVs, one vertex per
        distinct (vertex, UV) pair, so a vertex on a UV seam is split and nothing else is."""
        if self.uvs is None:
            return self.co, self.loop_vertex[self.triangles], None
        pairs = np.column_stack([self.loop_vertex, self.uvs.view(np.int32)])
        unique, inverse = np.unique(pairs, axis=0, return_inverse=True)
        uvs = np.ascontiguousarray(unique[:, 1:]).view(np.float32)
        return self.co[unique[:, 0]], inverse.reshape(-1)[self.triangles].astype(np.int32), uvs


def surface_to_send(context: Any, obj: Any, texture_size: int | None) -> tuple[dict[str, np.ndarray], str]:
    """The arrays of a texture request for `obj` and the UV map they carry ('' for none), or a
    SurfaceError saying, before anything is sent, why the object cannot be painted."""
    if obj is None or obj.type != "MESH":
        kind = "nothing is active" if obj is None else f"'{obj.name}' is a {obj.type.lower()}, not a mesh"
        raise SurfaceError(f"select a mesh object to texture: {kind}")
    ev = Evaluated(context, obj)
    if not ev.same_topology and (ev.uvs is None or texture_size == 0):
        need = "a UV map" if ev.uvs is None else "a texture (set Texture in Advanced)"
        raise SurfaceError(f"'{obj.name}' has modifiers that change its faces, so the colours cannot be put back on "
                           f"its own mesh without {need}: unwrap it (UV > Smart UV Project) or apply the modifiers")
    vertices, faces, uvs = ev.surface()
    vertices, faces, uvs, _ = check_surface(vertices, faces, uvs, MAX_FACES)  # the server's own check
    arrays = {"vertices": vertices, "faces": faces, **({} if uvs is None else {"uvs": uvs})}
    return arrays, ev.uv_map if uvs is not None else ""


def _triangle_keys(corners: np.ndarray) -> list[bytes]:
    """A key per triangle [T, 3, 3] that does not depend on where its corners start."""
    order = np.lexsort((corners[..., 2], corners[..., 1], corners[..., 0]), axis=-1)
    ordered = np.ascontiguousarray(np.take_along_axis(corners, order[..., None], 1), np.float32)
    return [row.tobytes() for row in ordered.reshape(len(corners), 9)]


def corner_vertices(ev: Evaluated, mesh: Mesh) -> np.ndarray:
    """For each face corner of the evaluated object, the result's vertex at it: its triangle is
    found by its corners' positions, the corner by its position in that triangle."""
    if len(mesh.faces) != len(ev.triangles):
        raise TextureApplyError(f"the object has {len(ev.triangles)} triangles now, the result {len(mesh.faces)}: "
                                "it was changed since it was sent")
    ours = ev.co[ev.loop_vertex[ev.triangles]]  # [T, 3, 3]
    theirs = np.asarray(mesh.vertices, np.float32)[mesh.faces]
    index = {key: i for i, key in enumerate(_triangle_keys(theirs))}
    match = np.array([index.get(key, -1) for key in _triangle_keys(ours)], np.int64)
    if (match < 0).any():
        raise TextureApplyError(f"{int((match < 0).sum())} of the object's triangles are not in the result: "
                                "it was changed since it was sent")
    distance = np.abs(ours[:, :, None, :] - theirs[match][:, None, :, :]).sum(-1)  # [T, our corner, their corner]
    which = distance.argmin(-1)
    if distance.min(-1).max() > MATCH_TOLERANCE:
        raise TextureApplyError("the result's corners do not lie on the object's: it was changed since it was sent")
    per_loop = np.full(len(ev.loop_vertex), -1, np.int64)
    per_loop[ev.triangles.reshape(-1)] = np.asarray(mesh.faces)[match[:, None], which].reshape(-1)
    return per_loop


def _material(name: str, image: Any, uv_map: str, attribute: str) -> Any:
    """A Principled BSDF whose Base Color is `image` on `uv_map`, or else the colour attribute."""
    material = bpy.data.materials.new(name)
    if material.node_tree is None:  # Blender 4.x; from 5.0 every material has its node tree
        material.use_nodes = True
    nodes, links = material.node_tree.nodes, material.node_tree.links
    bsdf = next(n for n in nodes if n.type == "BSDF_PRINCIPLED")
    bsdf.inputs["Roughness"].default_value = 0.6
    if image is not None:
        source = nodes.new("ShaderNodeTexImage")
        source.image = image
        uv = nodes.new("ShaderNodeUVMap")  # named, so that the artist's active UV map may be another
        uv.uv_map = uv_map
        uv.location = (bsdf.location.x - 600, bsdf.location.y)
        links.new(uv.outputs["UV"], source.inputs["Vector"])
    else:
        source = nodes.new("ShaderNodeVertexColor")
        source.layer_name = attribute
    source.location = (bsdf.location.x - 300, bsdf.location.y)
    links.new(source.outputs["Color"], bsdf.inputs["Base Color"])
    return material


def apply_result(context: Any, obj: Any, mesh: Mesh, name: str, uv_map: str) -> Any:
    """Give `obj` a new material showing the result (its old ones stay in the slot list, its
    faces use the new one); its own UV map `uv_map` when it was sent with one, else a new map of
    the result's UVs; the colours as a corner colour attribute where the faces are its own.
    An object in Edit Mode leaves it for the change and goes back: leaving Edit Mode later would
    otherwise write the edit mesh, without the change, over its data."""
    if obj is None or obj.type != "MESH":
        raise TextureApplyError("the object it was made for is gone or renamed")
    if obj.mode != "EDIT":
        return _apply(context, obj, mesh, name, uv_map)
    with context.temp_override(active_object=obj, object=obj, edit_object=obj):
        bpy.ops.object.mode_set(mode="OBJECT")
    try:
        return _apply(context, obj, mesh, name, uv_map)
    finally:
        with context.temp_override(active_object=obj, object=obj):
            bpy.ops.object.mode_set(mode="EDIT")


def _apply(context: Any, obj: Any, mesh: Mesh, name: str, uv_map: str) -> Any:
    ev = Evaluated(context, obj)
    textured = mesh.texture is not None and mesh.uvs is not None
    keep_uvs = textured and bool(uv_map) and uv_map in obj.data.uv_layers
    if not ev.same_topology and not keep_uvs:
        raise TextureApplyError("its modifiers now change its faces: the result cannot be put back on its own mesh")
    data = obj.data
    attribute = ""
    if textured and not keep_uvs and len(data.uv_layers) >= MAX_UV_MAPS:  # before anything is changed
        raise TextureApplyError(f"it has the most UV maps Blender allows ({MAX_UV_MAPS}): remove one and import again")
    if ev.same_topology:  # a corner of the evaluated mesh is a corner of the object's own
        corner = corner_vertices(ev, mesh)
        rgba = np.ones((len(corner), 4), np.float32)
        rgba[:, :3] = np.clip(np.asarray(mesh.colors, np.float32)[corner, :3], 0.0, 1.0)
        colours = data.color_attributes.new(COLOR_ATTRIBUTE, "BYTE_COLOR", "CORNER")
        colours.data.foreach_set("color_srgb", rgba.ravel())
        attribute = colours.name
        if textured and not keep_uvs:
            layer = data.uv_layers.new(name=UV_MAP, do_init=False)
            layer.data.foreach_set("uv", np.asarray(mesh.uvs, np.float32)[corner].ravel())
            uv_map = layer.name
    image = packed_image(name, np.asarray(mesh.texture)) if textured else None
    material = _material(name, image, uv_map, attribute)
    data.materials.append(material)
    data.polygons.foreach_set("material_index", np.full(len(data.polygons), len(data.materials) - 1, np.int32))
    obj.active_material_index = len(data.materials) - 1  # the Material tab shows the new one
    data.update()
    return material

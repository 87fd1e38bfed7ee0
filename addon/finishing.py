"""Finishing an imported object the way artists do by hand: a real-world size, quad topology by
Blender's own QuadriFlow, smooth shading by angle, the origin at the bottom centre.

QuadriFlow builds a new surface and keeps none of the old one's attributes, so the colours and
UVs are carried over by Blender's Data Transfer modifier (interpolated from the nearest face of
a copy of the mesh taken before the remesh), applied at once. A texture keeps showing through
the transferred UVs; quads that straddle a UV seam of the old atlas smear across it.
"""

from __future__ import annotations

from typing import Any

import bpy
import numpy as np
from mathutils import Matrix

from .shared.blender_io import COLOR_ATTRIBUTE, UV_LAYER


def _override(obj: Any) -> Any:
    """A context in which Blender's object operators act on `obj` alone (the import may happen
    while the artist is in Edit Mode on another object)."""
    return bpy.context.temp_override(active_object=obj, object=obj, selected_objects=[obj],
                                     selected_editable_objects=[obj], edit_object=None)


def stand(obj: Any) -> None:
    """Move the mesh so that the origin is the bottom centre of its bounding box again: the object
    stands where it was placed (the 3D cursor)."""
    co = np.empty(len(obj.data.vertices) * 3, np.float32)
    obj.data.vertices.foreach_get("co", co)
    co = co.reshape(-1, 3)
    lo, hi = co.min(0), co.max(0)
    base = np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, lo[2]])
    obj.data.transform(Matrix.Translation((-base).tolist()))
    obj.data.update()


def resize(obj: Any, size: float) -> None:
    """Scale the mesh itself (the object's scale stays 1) so that its largest dimension is `size`."""
    co = np.empty(len(obj.data.vertices) * 3, np.float32)
    obj.data.vertices.foreach_get("co", co)
    extent = float(np.ptp(co.reshape(-1, 3), axis=0).max())
    if extent > 0:
        obj.data.transform(Matrix.Scale(size / extent, 4))
        obj.data.update()


def quad_remesh(obj: Any, faces: int) -> None:
    """QuadriFlow to about `faces` quads; the colour attribute and UV map come back by Data Transfer."""
    mesh = obj.data
    source = bpy.data.objects.new(f"{obj.name} (before remesh)", mesh.copy())
    collection = obj.users_collection[0]
    collection.objects.link(source)  # a Data Transfer source must be evaluated: in the scene
    had_colours = COLOR_ATTRIBUTE in mesh.color_attributes
    had_uvs = UV_LAYER in mesh.uv_layers
    try:
        with _override(obj):
            result = bpy.ops.object.quadriflow_remesh(target_faces=faces, mode="FACES", seed=0, use_mesh_symmetry=False)
        if not result or "FINISHED" not in result:
            raise RuntimeError("QuadriFlow did not remesh it (the mesh must be manifold)")
        if had_colours:  # the layers the modifier fills, by name
            mesh.color_attributes.new(COLOR_ATTRIBUTE, "BYTE_COLOR", "POINT")
            mesh.color_attributes.active_color_name = mesh.color_attributes.default_color_name = COLOR_ATTRIBUTE
        if had_uvs:
            mesh.uv_layers.new(name=UV_LAYER)
        if had_colours or had_uvs:
            transfer = obj.modifiers.new("PromptMesh Transfer", "DATA_TRANSFER")
            transfer.object, transfer.use_object_transform = source, False  # both in the mesh's own space
            transfer.use_vert_data, transfer.data_types_verts = had_colours, {"COLOR_VERTEX"}
            transfer.vert_mapping, transfer.layers_vcol_vert_select_dst = "POLYINTERP_NEAREST", "NAME"
            transfer.use_loop_data, transfer.data_types_loops = had_uvs, {"UV"}
            transfer.loop_mapping, transfer.layers_uv_select_dst = "POLYINTERP_NEAREST", "NAME"
            with _override(obj):
                bpy.ops.object.modifier_apply(modifier=transfer.name)
    finally:
        old: Any = source.data  # a Mesh; the stubs type it as any object data
        bpy.data.objects.remove(source)
        bpy.data.meshes.remove(old)


def finish(context: Any, obj: Any, prefs: Any) -> list[str]:
    """Remesh, size and shading as the preferences say; the origin at the bottom centre after.
    The size comes after the remesh: QuadriFlow's surface sits a little inside the old one.
    Returns what could not be done, for a notice: the object is imported all the same."""
    notices: list[str] = []
    if prefs.finish_remesh == "QUADRIFLOW":
        try:
            quad_remesh(obj, prefs.finish_faces)
        except RuntimeError as exc:  # Blender's own report: the import keeps its triangles, and says so
            notices.append(f"'{obj.name}' keeps its triangles: {str(exc).removeprefix('Error: ').strip()}")
    if prefs.finish_size > 0:
        resize(obj, prefs.finish_size)
    if prefs.finish_smooth:
        with _override(obj):
            bpy.ops.object.shade_smooth_by_angle(angle=prefs.finish_angle)
    stand(obj)
    return notices

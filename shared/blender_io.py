"""Meshes in and out of Blender: used by the add-on and by `promptmesh export` (bpy module).

Import builds the object from numpy arrays with `foreach_set` (no per-vertex Python), with a
POINT byte-colour attribute written through `color_srgb` and a material whose Base Color
comes from that attribute, or, for a mesh with a baked texture, from an Image Texture (a
packed image on a UV layer; the colour attribute stays). Export runs Blender's own FBX, glTF
and OBJ exporters on the given objects, textures embedded or copied beside the file. `bpy` is
imported inside the functions so this module imports anywhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from .errors import PromptMeshError
from .vocab import ErrorCode, OutputFormat

if TYPE_CHECKING:
    import bpy

COLOR_ATTRIBUTE = "Color"
UV_LAYER = "UVMap"
ROUGHNESS = 0.6  # of every material we make, here and in export.py's files
EXPORT_FORMATS = (OutputFormat.FBX, OutputFormat.GLB, OutputFormat.OBJ)


class MeshImportError(PromptMeshError):
    """The arrays do not describe a usable triangle mesh."""

    code = ErrorCode.BAD_REQUEST


def check_arrays(vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray) -> None:
    """Raise MeshImportError unless the arrays make a non-empty, consistent triangle mesh."""
    if len(vertices) == 0 or len(faces) == 0:
        raise MeshImportError("the mesh is empty (no vertices or faces): nothing to import")
    if vertices.ndim != 2 or vertices.shape[1] != 3 or faces.ndim != 2 or faces.shape[1] != 3:
        raise MeshImportError(f"expected vertices [V,3] and faces [F,3], got {vertices.shape} and {faces.shape}")
    if colors.shape not in ((len(vertices), 3), (len(vertices), 4)):
        raise MeshImportError(f"expected one colour per vertex, got {colors.shape} for {len(vertices)} vertices")
    if faces.min() < 0 or faces.max() >= len(vertices):
        raise MeshImportError("a face refers to a vertex that does not exist")


def check_texture(uvs: np.ndarray, texture: np.ndarray, vertices: int) -> None:
    """Raise MeshImportError unless `uvs` give each vertex a UV and `texture` is an RGB image."""
    if uvs.shape != (vertices, 2):
        raise MeshImportError(f"expected one UV per vertex, got {uvs.shape} for {vertices} vertices")
    if texture.ndim != 3 or texture.shape[2] != 3 or 0 in texture.shape or texture.dtype != np.uint8:
        raise MeshImportError(f"expected an [H, W, 3] uint8 texture, got {texture.shape} {texture.dtype}")


def build_mesh(name: str, vertices: np.ndarray, faces: np.ndarray, colors_srgb: np.ndarray,
               uvs: np.ndarray | None = None) -> Any:
    """A new bpy Mesh: triangles, smooth shading, POINT colour attribute (active and render),
    a UV layer if `uvs` are given."""
    import bpy

    return fill_mesh(bpy.data.meshes.new(name), vertices, faces, colors_srgb, uvs)


def fill_mesh(mesh: Any, vertices: np.ndarray, faces: np.ndarray, colors_srgb: np.ndarray,
              uvs: np.ndarray | None = None) -> Any:
    """Replace `mesh`'s geometry, colours and UVs (per vertex, if given) in place (bulk
    foreach_set, no per-vertex Python)."""
    vertices = np.ascontiguousarray(vertices, np.float32)
    faces = np.ascontiguousarray(faces, np.int32)
    colors_srgb = np.asarray(colors_srgb, np.float32)
    check_arrays(vertices, faces, colors_srgb)
    mesh.clear_geometry()
    mesh.vertices.add(len(vertices))
    mesh.vertices.foreach_set("co", vertices.ravel())
    mesh.loops.add(faces.size)
    mesh.loops.foreach_set("vertex_index", faces.ravel())
    mesh.polygons.add(len(faces))
    mesh.polygons.foreach_set("loop_start", np.arange(0, faces.size, 3, dtype=np.int32))
    rgba = np.ones((len(vertices), 4), np.float32)
    rgba[:, :3] = np.clip(colors_srgb[:, :3], 0.0, 1.0)
    attribute = cast("bpy.types.ByteColorAttribute", mesh.color_attributes.new(COLOR_ATTRIBUTE, "BYTE_COLOR", "POINT"))
    attribute.data.foreach_set("color_srgb", rgba.ravel())
    mesh.color_attributes.active_color_name = COLOR_ATTRIBUTE
    mesh.color_attributes.default_color_name = COLOR_ATTRIBUTE
    if uvs is not None:  # Blender's UVs are per face corner (loop), in the loops' face order
        mesh.uv_layers.new(name=UV_LAYER).data.foreach_set("uv", np.asarray(uvs, np.float32)[faces].ravel())
    mesh.update()
    mesh.shade_smooth()
    return mesh


def _base_color_material(name: str, node_type: str) -> tuple[Any, Any]:
    """A Principled BSDF material whose Base Color is the Color output of a new node of
    `node_type`: (material, that node)."""
    import bpy

    material = bpy.data.materials.new(name)
    if material.node_tree is None:  # Blender 4.x; from 5.0 every material has its node tree
        material.use_nodes = True
    nodes, links = material.node_tree.nodes, material.node_tree.links
    bsdf = next(n for n in nodes if n.type == "BSDF_PRINCIPLED")
    source = nodes.new(node_type)
    source.location = (bsdf.location.x - 300, bsdf.location.y)
    links.new(source.outputs["Color"], bsdf.inputs["Base Color"])
    bsdf.inputs["Roughness"].default_value = ROUGHNESS
    return material, source


def vertex_color_material(name: str) -> Any:
    """A Principled BSDF material whose Base Color is the mesh's colour attribute."""
    material, attribute = _base_color_material(name, "ShaderNodeVertexColor")
    attribute.layer_name = COLOR_ATTRIBUTE
    return material


def texture_material(name: str, image: Any) -> Any:
    """A Principled BSDF material whose Base Color is `image` on the mesh's UVs."""
    material, node = _base_color_material(name, "ShaderNodeTexImage")
    node.image = image
    return material


def packed_image(name: str, texture: np.ndarray) -> Any:
    """A Blender image of an sRGB [H, W, 3] uint8 texture (row 0 at the top), packed into the
    .blend as a PNG, so that saving the scene and exporting FBX with embedded media keep it."""
    import bpy

    height, width = texture.shape[:2]
    image = bpy.data.images.new(name, width, height, alpha=False)
    rgba = np.ones((height, width, 4), np.float32)
    rgba[..., :3] = texture[::-1] / 255.0  # Blender's rows go bottom up; byte images store sRGB as given
    image.pixels.foreach_set(rgba.ravel())  # type: ignore[attr-defined]  # stubbed as a float, is an array
    image.file_format = "PNG"
    image.filepath_raw = f"//{bpy.path.clean_name(image.name)}.png"  # the file name exporters give it
    image.pack()
    return image


def standing(vertices: np.ndarray) -> np.ndarray:
    """The vertices moved so that the bottom centre of their bounding box is the origin: the
    object's origin is where it stands (Z up), so placed on the 3D cursor it stands on it."""
    lo, hi = vertices.min(0), vertices.max(0)
    return vertices - np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, lo[2]], vertices.dtype)


def create_object(context: Any, name: str, vertices: np.ndarray, faces: np.ndarray, colors_srgb: np.ndarray,
                  location: Iterable[float] = (0.0, 0.0, 0.0), properties: dict[str, Any] | None = None,
                  uvs: np.ndarray | None = None, texture: np.ndarray | None = None) -> Any:
    """Link a new coloured mesh object, standing at `location` (its origin at the bottom centre),
    into the active collection, selected and active; with `uvs` and `texture`, its material
    shows the texture (the vertex colours stay as its colour attribute)."""
    import bpy

    if uvs is not None and texture is not None:
        check_texture(np.asarray(uvs), np.asarray(texture), len(vertices))
    else:
        uvs = texture = None
    mesh = build_mesh(name, standing(np.asarray(vertices, np.float32)) if len(vertices) else vertices, faces,
                      colors_srgb, uvs)
    mesh.materials.append(vertex_color_material(name) if texture is None
                          else texture_material(name, packed_image(name, np.asarray(texture))))
    obj = bpy.data.objects.new(name, mesh)
    obj.location = tuple(location)
    for key, value in (properties or {}).items():
        obj[key] = value
    context.collection.objects.link(obj)
    for other in context.view_layer.objects.selected:
        other.select_set(False)
    obj.select_set(True)
    context.view_layer.objects.active = obj
    return obj


def export_objects(context: Any, objects: list[Any], path: str | Path, fmt: str | None = None) -> Path:
    """Export `objects` (meshes, with their vertex colours and textures) with Blender's exporter
    for `fmt`: FBX embeds the textures, OBJ copies them beside its MTL, GLB holds them."""
    import bpy

    path = Path(path)
    fmt = (fmt or path.suffix.lstrip(".")).lower()
    if fmt not in EXPORT_FORMATS:
        raise PromptMeshError(f"unknown export format {fmt!r}; expected one of {', '.join(EXPORT_FORMATS)}")
    if not objects:
        raise PromptMeshError("nothing to export: select a mesh object")
    if not path.parent.is_dir():
        raise PromptMeshError(f"folder {path.parent} does not exist")
    for obj in context.view_layer.objects.selected:
        obj.select_set(False)
    for obj in objects:
        obj.select_set(True)
    context.view_layer.objects.active = objects[0]
    if fmt == OutputFormat.FBX:  # the settings Cinema 4D reads best; textures inside the file
        result = bpy.ops.export_scene.fbx(
            filepath=str(path), use_selection=True, object_types={"MESH"}, colors_type="SRGB",
            prioritize_active_color=True, add_leaf_bones=False, bake_anim=False, path_mode="COPY", embed_textures=True)
    elif fmt == OutputFormat.GLB:
        result = bpy.ops.export_scene.gltf(filepath=str(path), export_format="GLB", use_selection=True,
                                           **gltf_color_options())
    else:
        for image in packed_images(objects):  # Blender's OBJ exporter copies only images that are files; its
            image.save(filepath=str(path.parent / Path(image.filepath_raw).name))  # MTL names them so
        result = bpy.ops.wm.obj_export(filepath=str(path), export_selected_objects=True, export_colors=True,
                                       export_materials=True, path_mode="COPY")
    if not result or "FINISHED" not in result or not path.is_file():
        raise RuntimeError(f"Blender's {fmt.upper()} exporter did not write {path}")
    return path


def packed_images(objects: list[Any]) -> set[Any]:
    """The packed images that the objects' materials use in Image Texture nodes."""
    return {node.image for obj in objects for slot in obj.material_slots if slot.material and slot.material.node_tree
            for node in slot.material.node_tree.nodes
            if node.type == "TEX_IMAGE" and node.image is not None and node.image.packed_file is not None}


def gltf_color_options() -> dict[str, Any]:
    """The glTF exporter's vertex-colour switch, whichever this Blender version has."""
    import bpy

    props = bpy.ops.export_scene.gltf.get_rna_type().properties  # type: ignore[call-arg]  # stubbed unbound
    if "export_vertex_color" in props:  # 4.2+: an enum
        options: dict[str, Any] = {"export_vertex_color": "ACTIVE"}
        if "export_active_vertex_color_when_no_material" in props:
            options["export_active_vertex_color_when_no_material"] = True
        return options
    return {"export_colors": True}

"""A fetched job result -> a coloured (and textured, when it has a texture) object at the 3D
cursor (the import side of the add-on)."""

from __future__ import annotations

from typing import Any

from . import finishing, texturing
from .preferences import preferences
from .session import job_files, notify
from .shared.blender_io import MeshImportError, create_object
from .shared.result import read_json, read_npz

MAX_NAME = 63  # Blender's ID name limit


def object_name(prompt: str) -> str:
    return (prompt.strip() or "PromptMesh")[:MAX_NAME]


def import_job(context: Any, job: str) -> Any:
    """Build the object for a finished job, finished as the preferences say (size, remesh,
    shading); a Texture Selected job's result goes onto its object instead (returned). A
    PromptMeshError when there is nothing usable.

    In Object Mode the new object becomes the selection, as any import does; in Edit, Sculpt or
    Paint mode the object is only added: the selection and the active object (whose mode it is)
    stay as the artist left them."""
    files = job_files(job)
    if not files.mesh.is_file():
        raise MeshImportError(f"job {job} has no mesh here yet")
    meta = read_json(files.meta) if files.meta.is_file() else {}
    mesh = read_npz(files.mesh)
    prompt = str(meta.get("prompt", ""))
    record = read_json(files.record) if files.record.is_file() else {}
    if not isinstance(record, dict):
        record = {}
    name = object_name(prompt or str(record.get("prompt", "")))  # an image job without a prompt: its image's name
    if record.get("target"):
        target = context.scene.objects.get(str(record["target"]))
        if target is None:
            raise texturing.TextureApplyError(f"the object '{record['target']}' it was made for is not in this scene")
        texturing.apply_result(context, target, mesh, name, str(record.get("uv_map", "")))
        return target
    properties = {"promptmesh_prompt": prompt, "promptmesh_seed": int(meta.get("seed", 0)),
                  "promptmesh_model": str(meta.get("model", "")), "promptmesh_job": job}
    keep = context.mode != "OBJECT"
    layer = context.view_layer
    selected, active = list(layer.objects.selected), layer.objects.active
    obj = create_object(context, name, mesh.vertices, mesh.faces, mesh.colors,
                        context.scene.cursor.location, properties, mesh.uvs, mesh.texture)
    for notice in finishing.finish(context, obj, preferences(context)):
        notify(f"PromptMesh: {notice}", error=True)
    if keep:
        obj.select_set(False)
        for other in selected:
            other.select_set(True)
        layer.objects.active = active
    return obj

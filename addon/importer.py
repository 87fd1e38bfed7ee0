"""A fetched job result -> a coloured object at the 3D cursor (the import side of the add-on)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from .session import job_folder
from .shared.blender_io import MeshImportError, create_object

MAX_NAME = 63  # Blender's ID name limit


def object_name(prompt: str) -> str:
    return (prompt.strip() or "PromptMesh")[:MAX_NAME]


def import_job(context: Any, job: str) -> Any:
    """Build the object for a finished job; MeshImportError when there is nothing usable."""
    folder = job_folder(job)
    if not (folder / "mesh.npz").is_file():
        raise MeshImportError(f"job {job} has no mesh here yet")
    meta = json.loads((folder / "meta.json").read_text()) if (folder / "meta.json").is_file() else {}
    with np.load(folder / "mesh.npz") as data:
        vertices, faces, colors = data["vertices"], data["faces"], data["colors"]
    properties = {
        "promptmesh_prompt": str(meta.get("prompt", "")), "promptmesh_seed": int(meta.get("seed", 0)),
        "promptmesh_model": str(meta.get("model", "")), "promptmesh_job": job,
    }
    return create_object(context, object_name(properties["promptmesh_prompt"]), vertices, faces, colors,
                         context.scene.cursor.location, properties)

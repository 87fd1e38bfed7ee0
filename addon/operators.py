"""Operators: connect, generate, cancel, import, open folder, export, start/stop the backend.

Every failure is reported as one line (`self.report`), never as a traceback.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import bpy
from bpy.props import BoolProperty, EnumProperty, StringProperty
from bpy_extras.io_utils import ExportHelper, ImportHelper

from . import backend_process, from_image, session, texturing
from .importer import import_job
from .preferences import preferences
from .properties import LIVE_STATES
from .shared.blender_io import export_objects
from .shared.errors import PromptMeshError
from .shared.image import ImageError
from .shared.spec import SpecError
from .shared.surface import SurfaceError

EXPORT_ITEMS = [("fbx", "Export FBX (Cinema 4D)", "FBX 7.4 with sRGB vertex colours, no leaf bones, no animation"),
                ("glb", "Export GLB", "Binary glTF with the colour attribute as COLOR_0"),
                ("obj", "Export OBJ", "OBJ with vertex colours")]


# Operator inputs the redo panel must not show: which job a button stands for.
HIDDEN: set = {"SKIP_SAVE", "HIDDEN"}


def _job_item(context: bpy.types.Context, job: str):
    st = session.state(context)
    if job:
        return session.find(st, job)
    return st.jobs[st.jobs_index] if 0 <= st.jobs_index < len(st.jobs) else None


def prompt_ready(cls: Any, context: bpy.types.Context, required: bool) -> bool:
    """Whether the prompt can be sent (`required`: it must not be empty); if not, the poll says why."""
    settings = context.scene.promptmesh
    if required and not settings.prompt.strip():
        cls.poll_message_set("Type a prompt first, e.g. 'a red cube'")
        return False
    problem = session.prompt_problem(settings)
    if problem:
        cls.poll_message_set(problem)
        return False
    return True


class PROMPTMESH_OT_connect(bpy.types.Operator):
    bl_idname = "promptmesh.connect"
    bl_label = "Connect"
    bl_description = "Connect to the backend set in the add-on preferences"

    def execute(self, context):
        if session.connect(context) is None:
            self.report({"ERROR"}, session.state(context).status)
            return {"CANCELLED"}
        return {"FINISHED"}


class PROMPTMESH_OT_generate(bpy.types.Operator):
    bl_idname = "promptmesh.generate"
    bl_label = "Generate"
    bl_description = "Send the prompt to the backend; the object arrives when the job is done"

    @classmethod
    def poll(cls, context):
        if context.scene.promptmesh.source == "IMAGE" and from_image.chosen_image(context) is None:
            cls.poll_message_set("Choose an image first (or show one in an Image Editor)")
            return False
        return prompt_ready(cls, context, required=context.scene.promptmesh.source != "IMAGE")

    def execute(self, context):
        settings = context.scene.promptmesh
        seeds = session.seeds(settings)
        image, name = None, ""
        try:
            if settings.source == "IMAGE":
                chosen = from_image.chosen_image(context)
                image, name = from_image.image_rgba(chosen), chosen.name
            specs = [settings.to_spec(seed, image=image is not None).to_dict() for seed in seeds]
        except (SpecError, ImageError) as exc:
            self.report({"ERROR"}, f"Cannot generate: {str(exc).removeprefix('image: ')}")
            return {"CANCELLED"}
        if session.repeated({**specs[0], "image": name}, len(specs)):
            self.report({"WARNING"}, "Already queued: a second click within a second adds nothing")
            return {"CANCELLED"}
        if not settings.lock_seed:
            settings.seed = seeds[0]  # shown, so that a result worth keeping can be made again
        for spec in specs:
            label = spec["prompt"] or name  # an image job without a prompt is named by its image
            if session.submit(context, spec, label, spec["seed"], image=image, elevation=settings.elevation) is None:
                self.report({"ERROR"}, session.state(context).status)
                return {"CANCELLED"}
        if len(specs) > 1:
            self.report({"INFO"}, f"Queued {len(specs)} variations, seeds {', '.join(map(str, seeds))}")
        return {"FINISHED"}


class PROMPTMESH_OT_texture(bpy.types.Operator):
    bl_idname = "promptmesh.texture_selected"
    bl_label = "Texture Selected"
    bl_description = ("Paint the active mesh object from the prompt: it is sent as shown (modifiers applied), and "
                      "gets a new material with the result; its transform and its old materials stay")

    @classmethod
    def poll(cls, context):
        return prompt_ready(cls, context, required=True)  # the object is checked on click

    def execute(self, context):
        settings, obj = context.scene.promptmesh, context.active_object
        seed = session.seeds(settings)[0]
        try:
            spec = settings.to_spec(seed).to_dict()
            surface, uv_map = texturing.surface_to_send(context, obj, spec.get("texture_size"))
        except (SpecError, SurfaceError) as exc:
            self.report({"ERROR"}, f"Cannot texture: {str(exc).removeprefix('mesh: ')}")
            return {"CANCELLED"}
        spec["proxy_every"] = 0.0  # the object itself is in the scene; a proxy at the cursor would only be in the way
        if session.repeated({**spec, "target": obj.name}, 1):
            self.report({"WARNING"}, "Already queued: a second click within a second adds nothing")
            return {"CANCELLED"}
        if not settings.lock_seed:
            settings.seed = seed
        if session.submit(context, spec, spec["prompt"], seed, surface, obj.name, uv_map) is None:
            self.report({"ERROR"}, session.state(context).status)
            return {"CANCELLED"}
        self.report({"INFO"}, f"Sent {obj.name}: {len(surface['faces']):,} triangles"
                    + (f", its UV map {uv_map}" if uv_map else ", no UV map (the backend unwraps it)"))
        return {"FINISHED"}


class PROMPTMESH_OT_open_image(bpy.types.Operator, ImportHelper):  # type: ignore[misc]  # stubs: two `check`s
    """Blender's ImportHelper gives the file browser, filtered to pictures."""

    bl_idname = "promptmesh.open_image"
    bl_label = "Open Image"
    bl_description = "Open a picture to make into an object (PNG with transparency, or on a plain background)"

    filter_glob: StringProperty(default="*.png;*.jpg;*.jpeg;*.webp;*.tif;*.tiff;*.bmp;*.exr;*.hdr", options={"HIDDEN"})

    def execute(self, context):
        path = self.filepath  # type: ignore[attr-defined]  # ImportHelper's RNA property, untyped in the stubs
        try:
            image = bpy.data.images.load(path, check_existing=True)
        except RuntimeError as exc:  # Blender's own words: not found, or not an image it reads
            self.report({"ERROR"}, f"Cannot open {Path(path).name}: {exc}")
            return {"CANCELLED"}
        settings = context.scene.promptmesh
        settings.image, settings.source = image, "IMAGE"
        return {"FINISHED"}


class PROMPTMESH_OT_cancel(bpy.types.Operator):
    bl_idname = "promptmesh.cancel"
    bl_label = "Cancel"
    bl_description = "Stop the job (or take it out of the queue): the one in the Jobs list, else the one running"

    job: StringProperty(options=HIDDEN)

    @classmethod
    def poll(cls, context):
        if not any(j.state in LIVE_STATES for j in session.state(context).jobs):
            cls.poll_message_set("No queued or running job to cancel")
            return False
        return True

    def execute(self, context):
        st = session.state(context)
        if self.job:
            item = session.find(st, self.job)
        else:  # the main panel's button: the job whose progress it shows, else the newest live one
            item = st.job(st.active_job)
            if item is None or item.state not in LIVE_STATES:
                item = next((j for j in reversed(st.jobs) if j.state in LIVE_STATES), None)
        if item is None or item.state not in LIVE_STATES:
            self.report({"ERROR"}, "That job is not queued or running any more")
            return {"CANCELLED"}
        if not session.cancel(item):
            self.report({"ERROR"}, "Not connected to the backend: press the refresh button first")
            return {"CANCELLED"}
        return {"FINISHED"}


class PROMPTMESH_OT_notice(bpy.types.Operator):
    """How the timer says a job finished or failed: an operator's report reaches the status bar."""

    bl_idname = "promptmesh.notice"
    bl_label = "PromptMesh Notice"
    bl_options = {"INTERNAL"}

    message: StringProperty(options=HIDDEN)
    error: BoolProperty(options=HIDDEN)

    def execute(self, context):
        self.report({"WARNING" if self.error else "INFO"}, self.message)
        return {"FINISHED"}


class PROMPTMESH_OT_import(bpy.types.Operator):
    bl_idname = "promptmesh.import_job"
    bl_label = "Import"
    bl_description = "Put the job's mesh into the scene at the 3D cursor"
    bl_options = {"REGISTER", "UNDO"}

    job: StringProperty(options=HIDDEN)

    def execute(self, context):
        item = _job_item(context, self.job)
        if item is None or item.state != "DONE":
            self.report({"ERROR"}, "Pick a finished job to import")
            return {"CANCELLED"}
        try:
            obj = import_job(context, item.job)
        except (PromptMeshError, OSError, ValueError, KeyError) as exc:  # ValueError: a damaged npz
            self.report({"ERROR"}, f"Import failed: {exc}")
            return {"CANCELLED"}
        if item.target:
            self.report({"INFO"}, f"Textured {obj.name}: a new material, {obj.active_material.name}")
        else:
            self.report({"INFO"}, f"Imported {obj.name}: {len(obj.data.vertices)} vertices, {len(obj.data.polygons)} faces")
        return {"FINISHED"}


class PROMPTMESH_OT_open_folder(bpy.types.Operator):
    bl_idname = "promptmesh.open_folder"
    bl_label = "Open Folder"
    bl_description = "Show the job's files (mesh.npz, meta.json) in the file browser"

    job: StringProperty(options=HIDDEN)

    def execute(self, context):
        item = _job_item(context, self.job)
        if item is None or not item.job:
            self.report({"ERROR"}, "The job has no folder yet")
            return {"CANCELLED"}
        bpy.ops.wm.path_open(filepath=str(session.job_files(item.job).folder))
        return {"FINISHED"}


class PROMPTMESH_OT_export(bpy.types.Operator, ExportHelper):  # type: ignore[misc]  # stubs: two `check`s
    """Blender's ExportHelper gives the file browser, the overwrite check and the extension."""

    bl_idname = "promptmesh.export"
    bl_label = "Export"
    bl_description = "Export the selected meshes with their vertex colours"

    format: EnumProperty(items=EXPORT_ITEMS)

    @property
    def filename_ext(self) -> str:  # ExportHelper's extension follows the chosen format
        return f".{self.format}"

    @classmethod
    def poll(cls, context):
        if not any(o.type == "MESH" for o in context.selected_objects):
            cls.poll_message_set("Select a mesh object to export")
            return False
        return True

    def invoke(self, context, event):
        # ExportHelper declares `filepath` as an RNA property, which mypy cannot type.
        if not self.filepath:  # type: ignore[has-type]  # named after the object, beside the .blend (or home)
            stem = re.sub(r"[^\w-]+", "_", context.active_object.name if context.active_object else "promptmesh")
            folder = Path(bpy.path.abspath("//")) if bpy.data.filepath else Path.home()
            self.filepath = str(folder / f"{stem}{self.filename_ext}")
        return ExportHelper.invoke(self, context, event)

    def execute(self, context):
        path = Path(bpy.path.ensure_ext(bpy.path.abspath(self.filepath), self.filename_ext))
        objects = [o for o in context.selected_objects if o.type == "MESH"]
        try:
            export_objects(context, objects, path, self.format)
        except (PromptMeshError, RuntimeError, OSError) as exc:
            self.report({"ERROR"}, f"Export failed: {exc}")
            return {"CANCELLED"}
        self.report({"INFO"}, f"Wrote {path}")
        return {"FINISHED"}


class PROMPTMESH_OT_backend_start(bpy.types.Operator):
    bl_idname = "promptmesh.backend_start"
    bl_label = "Start"
    bl_description = "Start the backend command from the preferences and connect to it"

    @classmethod
    def poll(cls, context):
        if backend_process.running():
            cls.poll_message_set("The backend is already running")
            return False
        return True

    def execute(self, context):
        prefs, st = preferences(context), session.state(context)
        log = Path(bpy.utils.extension_path_user(__package__, create=True)) / "backend.log"
        offline = not bpy.app.online_access  # Blender's switch holds for what it starts, too
        try:
            backend_process.start(prefs.backend_command, prefs.endpoint.strip(), log, offline=offline)
        except backend_process.BackendStartError as exc:
            st.backend_log = str(exc)
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        st.backend_log = ""
        session.connect(context)
        if offline:
            self.report({"INFO"}, "Started offline (online access is off in Blender): only models already "
                        "downloaded can be used")
        return {"FINISHED"}


class PROMPTMESH_OT_backend_stop(bpy.types.Operator):
    bl_idname = "promptmesh.backend_stop"
    bl_label = "Stop"
    bl_description = "Stop the backend this add-on started"

    @classmethod
    def poll(cls, context):
        if not backend_process.running():
            cls.poll_message_set("No backend started from Blender is running")
            return False
        return True

    def execute(self, context):
        session.disconnect(by_user=True)
        backend_process.stop()
        session.state(context).connection = "OFFLINE"
        return {"FINISHED"}


CLASSES = (PROMPTMESH_OT_connect, PROMPTMESH_OT_generate, PROMPTMESH_OT_open_image, PROMPTMESH_OT_texture,
           PROMPTMESH_OT_cancel, PROMPTMESH_OT_notice, PROMPTMESH_OT_import, PROMPTMESH_OT_open_folder,
           PROMPTMESH_OT_export, PROMPTMESH_OT_backend_start, PROMPTMESH_OT_backend_stop)

# The stubs declare the factory as returning None; it returns (register, unregister).
register, unregister = bpy.utils.register_classes_factory(CLASSES)  # type: ignore[misc]

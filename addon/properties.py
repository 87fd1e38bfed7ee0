"""Add-on data: the user's inputs on the Scene, transient job state on the WindowManager."""

from __future__ import annotations

from typing import Any

import bpy
from bpy.props import BoolProperty, CollectionProperty, EnumProperty, FloatProperty, IntProperty, PointerProperty, StringProperty

from .shared.spec import LIMITS, TEXTURE_SIZES, JobSpec
from .shared.vocab import Quality

JOB_STATES = [
    ("SUBMITTING", "Submitting", "Sent to the backend, not yet accepted", "SORTTIME", 0),
    ("QUEUED", "Queued", "Waiting for the backend's worker", "PREVIEW_RANGE", 1),
    ("RUNNING", "Running", "Being generated", "PLAY", 2),
    ("FETCHING", "Fetching", "Finished; downloading the mesh", "IMPORT", 3),
    ("DONE", "Done", "The mesh is here and can be imported", "CHECKMARK", 4),
    ("FAILED", "Failed", "The job failed; see its message", "ERROR", 5),
    ("CANCELLED", "Cancelled", "The job was cancelled", "CANCEL", 6),
]
STATE_NAMES = {s[0] for s in JOB_STATES}
FINAL_STATES = {"DONE", "FAILED", "CANCELLED"}
CONNECTION = [
    ("OFFLINE", "Offline", "Not connected", "UNLINKED", 0),
    ("CONNECTING", "Connecting", "Waiting for the backend's answer", "SORTTIME", 1),
    ("ONLINE", "Online", "Connected to the backend", "LINKED", 2),
    ("ERROR", "Error", "The backend could not be used", "ERROR", 3),
]


TEXTURE_ITEMS = [(str(px), f"{px} px" if px else "Off", f"A {px} x {px} texture" if px else "Vertex colours only")
                 for px in TEXTURE_SIZES]
OFFERED_MODELS: list[str] = []  # what the connected backend offers (its welcome); free text stays allowed


def offered_models(self: Any, context: Any, edit_text: str) -> list[str]:
    """The model field's drop-down: the backend's models that contain what is typed."""
    return [m for m in OFFERED_MODELS if edit_text.lower() in m.lower()]


class PROMPTMESH_PG_settings(bpy.types.PropertyGroup):
    """What to generate (saved with the .blend)."""

    prompt: StringProperty(name="Prompt", description="What to make, e.g. 'a red cube'", maxlen=1000)
    negative: StringProperty(name="Negative", description="What to avoid", maxlen=1000)
    seed: IntProperty(name="Seed", min=0, max=2**31 - 1, default=0)
    quality: EnumProperty(name="Quality", items=[(q.upper(), q.capitalize(), f"{q} preset") for q in Quality],
                          default="STANDARD", description="Steps and resolution, from the model's defaults")
    model: StringProperty(name="Model", default="embedded", search=offered_models, search_options={"SUGGESTION"},
                          description="A model the backend offers: embedded, sd21, sd15, or a folder in its models directory")
    steps: IntProperty(name="Steps", min=0, max=int(LIMITS["steps"][1]), default=0, description="0: from the quality preset")
    resolution: IntProperty(name="Resolution", min=0, max=int(LIMITS["resolution"][1]), step=8, default=0,
                            description="Render size in pixels (multiple of 8); 0: from the preset")
    guidance_scale: FloatProperty(name="Guidance", min=0.0, max=LIMITS["guidance_scale"][1], default=0.0,
                                  description="Classifier-free guidance scale; 0: the model's default")
    preview_every: IntProperty(name="Preview Every", min=0, max=1000, default=5, description="Steps between previews; 0: none")
    mesh_resolution: IntProperty(name="Mesh Grid", min=0, max=int(LIMITS["mesh_resolution"][1]), default=0,
                                 description="Marching-cubes grid size; 0: from the preset")
    max_faces: IntProperty(name="Max Faces", min=0, max=int(LIMITS["max_faces"][1]), default=0,
                           description="Decimate to at most this many faces; 0: the model's default (20,000)")
    refine_steps: IntProperty(name="Refine Steps", min=-1, max=int(LIMITS["refine_steps"][1]), default=-1,
                              description="Steps of the mesh refinement after the NeRF; 0: none; -1: the model's default")
    texture_size: EnumProperty(name="Texture", items=TEXTURE_ITEMS, default="1024",  # every shipped model's
                               description="Size of the base-colour texture baked from the colours (which stay too)")
    device: EnumProperty(name="Device", items=[("auto", "Auto", "The backend's choice"), ("cpu", "CPU", ""),
                                                 ("cuda", "CUDA", "")], default="auto")
    show_proxy: BoolProperty(name="Live 3D Proxy", default=True,
                             description="Show a coarse mesh of the object at the 3D cursor while it is generated")
    proxy_every: FloatProperty(name="Proxy Every", min=0.5, max=60.0, default=3.0, unit="TIME_ABSOLUTE",
                               description="Seconds between proxy updates (the backend keeps them under 5 % of its time)")
    import_when_done: BoolProperty(name="Import When Done", default=True,
                                   description="Put the object into the scene as soon as it is ready")

    def to_spec(self) -> JobSpec:
        """The validated JobSpec (SpecError names the bad field)."""
        unset_is_zero = ("steps", "resolution", "guidance_scale", "mesh_resolution", "max_faces")
        fields = {name: getattr(self, name) or None for name in unset_is_zero}
        return JobSpec(prompt=self.prompt, negative=self.negative, seed=self.seed, model=self.model.strip(),
                       quality=Quality(self.quality.lower()), refine_steps=self.refine_steps if self.refine_steps >= 0 else None,
                       preview_every=self.preview_every, device=self.device, texture_size=int(self.texture_size),
                       proxy_every=self.proxy_every if self.show_proxy else 0.0, **fields).validate()


class PROMPTMESH_PG_job(bpy.types.PropertyGroup):
    """One job in the history list."""

    job: StringProperty(name="Job")
    request: StringProperty(description="Message id of the generate request until it is accepted")
    prompt: StringProperty(name="Prompt")
    seed: IntProperty()
    state: EnumProperty(name="State", items=JOB_STATES, default="SUBMITTING")
    message: StringProperty(name="Message")
    step: IntProperty()
    total: IntProperty()


class PROMPTMESH_PG_state(bpy.types.PropertyGroup):
    """Transient state, on the WindowManager: never saved in a .blend."""

    connection: EnumProperty(name="Connection", items=CONNECTION, default="OFFLINE")
    device: StringProperty(name="Device")
    status: StringProperty(name="Status")
    status_is_error: BoolProperty()
    stage: StringProperty(name="Stage")
    progress: FloatProperty(min=0.0, max=1.0, subtype="FACTOR")
    stage_started: FloatProperty(description="time.monotonic() when the active job's stage began")
    eta: StringProperty(description="Elapsed and remaining time of the active job's optimisation")
    active_job: StringProperty()
    preview_step: IntProperty()
    backend_log: StringProperty(description="The last lines of the backend's log when it failed to start")
    history_loaded: BoolProperty(description="The job folders were read into `jobs`")
    jobs: CollectionProperty(type=PROMPTMESH_PG_job)
    jobs_index: IntProperty()

    def job(self, job_id: str) -> PROMPTMESH_PG_job | None:
        return next((j for j in self.jobs if j.job == job_id), None) if job_id else None

    def say(self, text: str, error: bool = False) -> None:
        self.status, self.status_is_error = text, error


CLASSES = (PROMPTMESH_PG_settings, PROMPTMESH_PG_job, PROMPTMESH_PG_state)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    # Our own properties, added to Blender's types here: unknown to the stubs.
    bpy.types.Scene.promptmesh = PointerProperty(type=PROMPTMESH_PG_settings)  # type: ignore[attr-defined]
    bpy.types.WindowManager.promptmesh = PointerProperty(type=PROMPTMESH_PG_state)  # type: ignore[attr-defined]


def unregister() -> None:
    del bpy.types.WindowManager.promptmesh  # type: ignore[attr-defined]
    del bpy.types.Scene.promptmesh  # type: ignore[attr-defined]
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)

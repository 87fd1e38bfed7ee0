"""Add-on data: the user's inputs on the Scene, transient job state on the WindowManager."""

from __future__ import annotations

from typing import Any

import bpy
from bpy.props import BoolProperty, CollectionProperty, EnumProperty, FloatProperty, IntProperty, PointerProperty, StringProperty

from .shared.image import ELEVATION_RANGE
from .shared.spec import LIMITS, TEXTURE_SIZES, JobSpec
from .shared.vocab import Device, JobState, Objective, Quality

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
LIVE_STATES = {"SUBMITTING", "QUEUED", "RUNNING"}  # what Cancel can stop
# The one mapping from the server's job states to ours: its `done` is our FETCHING until the mesh is here.
SERVER_STATES: dict[str, str] = {JobState.QUEUED: "QUEUED", JobState.RUNNING: "RUNNING", JobState.DONE: "FETCHING",
                 JobState.FAILED: "FAILED", JobState.CANCELLED: "CANCELLED"}
CONNECTION = [
    ("OFFLINE", "Offline", "Not connected", "UNLINKED", 0),
    ("CONNECTING", "Connecting", "Waiting for the backend's answer", "SORTTIME", 1),
    ("ONLINE", "Online", "Connected to the backend", "LINKED", 2),
    ("ERROR", "Error", "The backend could not be used", "ERROR", 3),
]
SEED_MAX = min(int(LIMITS["seed"][1]), 2**31 - 1)  # Blender's IntProperty is 32-bit signed
RESOLUTION_STEP = 8  # the backend renders at multiples of 8 (JobSpec.validate)

TEXTURE_ITEMS = [(str(px), f"{px} px" if px else "Off", f"A {px} x {px} texture" if px else "Vertex colours only")
                 for px in TEXTURE_SIZES]

# What the connected backend offers. The `models` reply fills MODELS ({name, label, default,
# presets?}); an older backend's welcome fills only OFFERED_MODELS (names); offline, the add-on
# offers the embedded prior and whatever model the scene names.
OFFERED_MODELS: list[str] = []
MODELS: list[dict[str, Any]] = []
NOVEL_VIEWS: list[str] = []  # the novel-view priors an image job may name (welcome's and models' `novel_views`)
BACKEND_DEVICE: list[str] = [""]  # the connected backend's device, for the quality tooltips
_enum_items: dict[str, list[tuple[str, str, str, int]]] = {}  # Blender needs the item strings kept alive


def offered_models(self: Any, context: Any, edit_text: str) -> list[str]:
    """The model names the backend offers that contain `edit_text`."""
    names = [str(m["name"]) for m in MODELS] or OFFERED_MODELS
    return [m for m in names if edit_text.lower() in m.lower()]


def offered_novel_views(self: Any, context: Any, edit_text: str) -> list[str]:
    """The novel-view priors the backend offers that contain `edit_text`."""
    return [m for m in NOVEL_VIEWS if edit_text.lower() in m.lower()]


def model_entries(current: str) -> list[tuple[str, str, str]]:
    """(name, label, tooltip) of every model to offer, the scene's current one always among them."""
    entries = [(str(m["name"]), str(m.get("label") or m["name"]), str(m.get("label") or m["name"])) for m in MODELS]
    if not entries:
        entries = [(name, name, name) for name in OFFERED_MODELS or ["embedded"]]
    if current and current not in [e[0] for e in entries]:
        entries.append((current, current, "Named by this scene; the connected backend does not list it"))
    return entries


def _model_items(self: Any, context: Any) -> list[tuple[str, str, str, int]]:
    items = [(name, label, tip, i) for i, (name, label, tip) in enumerate(model_entries(self.model.strip()))]
    _enum_items["model"] = items
    return items


def _get_model_choice(self: Any) -> int:
    names = [e[0] for e in model_entries(self.model.strip())]
    return names.index(self.model.strip()) if self.model.strip() in names else 0


def _set_model_choice(self: Any, value: int) -> None:
    entries = model_entries(self.model.strip())
    if 0 <= value < len(entries):
        self.model = entries[value][0]


def clock(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


def quality_tooltip(model: str, quality: Quality) -> str:
    """What a preset sets for `model`, and what it took on the connected backend when measured."""
    entry = next((m for m in MODELS if m.get("name") == model), None)
    presets = (entry or {}).get("presets")
    if not isinstance(presets, dict):
        return "the model's own preset (connect to a backend to see what it sets and takes)"
    preset = presets.get(quality) if isinstance(presets.get(quality), dict) else {}
    settings, by_device = preset.get("settings") or {}, preset.get("seconds")
    device_type = BACKEND_DEVICE[0].replace(":", " ").split(" ")[0]  # "cuda:0 (NVIDIA ...)" -> "cuda"
    seconds = by_device.get(device_type) if isinstance(by_device, dict) else by_device
    words = {"steps": "iterations", "resolution": "px renders", "mesh_resolution": "mesh detail",
             "refine_steps": "polish iterations", "guidance_scale": "prompt strength",
             "optim.lr_grid": "grid learning rate", "optim.lr_mlp": "MLP learning rate"}
    said = ", ".join(f"{value} {words.get(name, name)}" for name, value in settings.items()) or "the model's defaults"
    if isinstance(seconds, (int, float)) and seconds > 0:
        cost = f"about {clock(seconds)} (min:s) on {BACKEND_DEVICE[0] or 'the backend'}"
    else:
        cost = "time not measured yet on this backend"
    return f"{said}; {cost}"


def _quality_items(self: Any, context: Any) -> list[tuple[str, str, str, int]]:
    items = [(q.upper(), q.capitalize(), quality_tooltip(self.model.strip(), q), i) for i, q in enumerate(Quality)]
    _enum_items["quality"] = items
    return items


def _get_resolution(self: Any) -> int:
    return int(self.get("resolution", 64))


def _set_resolution(self: Any, value: int) -> None:
    """Snap to the nearest multiple of 8 inside the backend's range: what it accepts."""
    lo, hi = int(LIMITS["resolution"][0]), int(LIMITS["resolution"][1])
    self["resolution"] = min(hi, max(lo, round(value / RESOLUTION_STEP) * RESOLUTION_STEP))


# The distillation objectives (shared.vocab.Objective; docs/objectives.md compares them); Auto:
# the model card's choice.
OBJECTIVE_ITEMS = [("AUTO", "Auto", "The model's own choice (plain score distillation for the shipped models)", 0),
                   *[(o.upper(), text, tip, i) for i, (o, text, tip) in enumerate([
                       (Objective.SDS, "SDS", "DreamFusion's score distillation: the reference, mode-seeking"),
                       (Objective.X0, "x0", "Regression onto the model's one-step reconstruction (MVDream's)"),
                       (Objective.VSD, "VSD", "Variational score distillation: a small copy of the model is "
                                              "trained alongside (ProlificDreamer); about 3x the time per step"),
                       (Objective.NFSD, "NFSD", "Noise-free score distillation: SDS without its noise term"),
                       (Objective.CSD, "CSD", "Classifier score distillation: the prompt's pull alone"),
                       (Objective.ISM, "ISM", "Interval score matching (LucidDreamer): about 3x the time per step"),
                   ], start=1)]]

# Fields whose value can be left to the quality preset and the model: an "Auto" toggle each.
# The one place "not given" becomes JobSpec's None (see to_spec).
AUTO_FIELDS = ("steps", "resolution", "guidance_scale", "mesh_resolution", "max_faces", "refine_steps")
NO_ANIMATION: set[Any] = set()  # options without ANIMATABLE: no keyframe dots on settings


def _auto(label: str) -> Any:
    return BoolProperty(name="Auto", default=True, options=NO_ANIMATION,
                        description=f"{label} from the quality preset and the model; untick to set it yourself")


def _limit(name: str) -> tuple[int, int]:
    lo, hi = LIMITS[name]
    return int(lo), int(hi)


class PROMPTMESH_PG_settings(bpy.types.PropertyGroup):
    """What to generate (saved with the .blend)."""

    source: EnumProperty(name="Source", options=NO_ANIMATION, default="PROMPT",
                         items=[("PROMPT", "Prompt", "Make the object the prompt describes", "TEXT", 0),
                                ("IMAGE", "Image", "Make the object an image shows, its front where the image's is; "
                                                   "the prompt, if any, helps with the sides unseen", "IMAGE_DATA", 1)])
    image: PointerProperty(name="Image", type=bpy.types.Image,
                           description="The picture to make into an object: the object on transparency or on a plain "
                                       "background. Empty: the Image Editor's image")
    elevation: FloatProperty(name="Camera Elevation", min=ELEVATION_RANGE[0], max=ELEVATION_RANGE[1], default=0.0,
                             options=NO_ANIMATION, precision=0,
                             description="Degrees above the object's middle the image was taken from: 0 level, 30 "
                                         "looking down on it")
    novel_view: StringProperty(name="Novel-View Prior", default="", search=offered_novel_views,
                               search_options={"SUGGESTION"}, options=NO_ANIMATION,
                               description="A 3D prior beside the text prior, as Magic123 weighs them: one the backend "
                                           "offers, e.g. zero123-xl (a CUDA GPU). Empty: the text prior alone")
    prompt: StringProperty(name="Prompt", description="What to make, e.g. 'a red cube'", maxlen=1000, options=NO_ANIMATION)
    negative: StringProperty(name="Negative", description="What to avoid, e.g. 'blurry, low detail'", maxlen=1000,
                             options=NO_ANIMATION)
    seed: IntProperty(name="Seed", min=0, max=SEED_MAX, default=0, options=NO_ANIMATION,
                      description="Where the random start comes from: the same prompt and seed make the same object. "
                                  "Unlocked, each Generate picks a new one and shows it here")
    lock_seed: BoolProperty(name="Lock Seed", default=False, options=NO_ANIMATION,
                            description="Locked: Generate uses this seed (variations count up from it). "
                                        "Unlocked: a new seed each time")
    variations: IntProperty(name="Variations", min=1, max=16, default=1, options=NO_ANIMATION,
                            description="How many versions of the prompt Generate queues, each with its own seed")
    quality: EnumProperty(name="Quality", items=_quality_items, default=1, options=NO_ANIMATION,
                          description="How long and how finely the object is made")
    model: StringProperty(name="Model", default="embedded", search=offered_models, search_options={"SUGGESTION"},
                          options=NO_ANIMATION, description="The model the backend generates with")
    model_choice: EnumProperty(name="Model", items=_model_items, get=_get_model_choice, set=_set_model_choice,
                               options=NO_ANIMATION, description="The models the connected backend offers")
    auto_steps: _auto("Iterations")
    steps: IntProperty(name="Iterations", min=_limit("steps")[0], max=_limit("steps")[1], default=1000, options=NO_ANIMATION,
                       description="How long the shape is worked on: more takes longer and settles finer detail")
    auto_resolution: _auto("Render size")
    resolution: IntProperty(name="Render Size", min=_limit("resolution")[0], max=_limit("resolution")[1], step=RESOLUTION_STEP,
                            get=_get_resolution, set=_set_resolution, options=NO_ANIMATION, subtype="PIXEL",
                            description="Size of the views the model judges, in pixels (snaps to a multiple of 8)")
    auto_guidance_scale: _auto("Prompt strength")
    guidance_scale: FloatProperty(name="Prompt Strength", min=0.0, max=LIMITS["guidance_scale"][1], default=100.0,
                                  options=NO_ANIMATION,
                                  description="How strongly the object follows the prompt (classifier-free guidance)")
    preview_every: IntProperty(name="Preview Every", min=0, max=1000, default=5, options=NO_ANIMATION,
                               description="Iterations between live previews; 0: none")
    auto_mesh_resolution: _auto("Mesh detail")
    mesh_resolution: IntProperty(name="Mesh Detail", min=_limit("mesh_resolution")[0], max=_limit("mesh_resolution")[1],
                                 default=128, options=NO_ANIMATION,
                                 description="Size of the grid the surface is cut from: higher keeps finer features")
    auto_max_faces: _auto("Face limit")
    max_faces: IntProperty(name="Face Limit", min=_limit("max_faces")[0], max=_limit("max_faces")[1], default=20000,
                           options=NO_ANIMATION, description="The object is simplified to at most this many faces")
    auto_refine_steps: _auto("Surface polish")
    refine_steps: IntProperty(name="Surface Polish", min=_limit("refine_steps")[0], max=_limit("refine_steps")[1],
                              default=300, options=NO_ANIMATION,
                              description="Iterations that polish the surface after the shape is found; 0: none")
    texture_size: EnumProperty(name="Texture", items=TEXTURE_ITEMS, default="1024", options=NO_ANIMATION,
                               description="Size of the colour texture baked onto the object (the vertex colours stay too)")
    objective: EnumProperty(name="Objective", options=NO_ANIMATION, default="AUTO", items=OBJECTIVE_ITEMS,
                            description="What the model's judgement pulls the object towards, each step")
    device: EnumProperty(name="Compute On", options=NO_ANIMATION, default=Device.AUTO,
                         items=[(Device.AUTO, "Auto", "The backend's choice"), (Device.CPU, "CPU", "The processor"),
                                (Device.CUDA, "GPU (CUDA)", "An NVIDIA graphics card")])
    show_proxy: BoolProperty(name="Live 3D Proxy", default=True, options=NO_ANIMATION,
                             description="Show a coarse mesh of the object at the 3D cursor while it is generated")
    proxy_every: FloatProperty(name="Proxy Every", min=0.5, max=60.0, default=3.0, unit="TIME_ABSOLUTE", options=NO_ANIMATION,
                               description="Seconds between proxy updates (the backend keeps them under 5 % of its time)")
    import_when_done: BoolProperty(name="Import When Done", default=True, options=NO_ANIMATION,
                                   description="Put each finished object into the scene it was started from")

    def given(self) -> dict[str, Any]:
        """The Advanced fields the artist set (Auto off); the others are None: not given."""
        return {name: None if getattr(self, f"auto_{name}") else getattr(self, name) for name in AUTO_FIELDS}

    def to_spec(self, seed: int | None = None, image: bool = False) -> JobSpec:
        """The validated JobSpec (SpecError names the bad field); an `image` job's prompt may be empty."""
        return JobSpec(prompt=self.prompt, negative=self.negative, seed=self.seed if seed is None else seed,
                       model=self.model.strip(), quality=Quality(self.quality.lower()), **self.given(),
                       objective=None if self.objective == "AUTO" else Objective(self.objective.lower()),
                       preview_every=self.preview_every, device=self.device, texture_size=int(self.texture_size),
                       novel_view=(self.novel_view.strip() or None) if image else None,
                       proxy_every=self.proxy_every if self.show_proxy else 0.0).validate(image=image)


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
    opened: IntProperty(description="Which opened file (session.opened()) the job was submitted from")
    cancel_asked: BoolProperty(description="Cancel was pressed before the backend accepted the job")
    expect_bytes: IntProperty(description="About how large the result is on the wire, for its time-out")
    target: StringProperty(description="Texture Selected: the object the result goes onto; empty for a new object")
    uv_map: StringProperty(description="Texture Selected: the object's UV map that was sent with it; empty for none")


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

"""The project's words, each spelled once: job states, stages, error codes, message types,
output formats, view-prompt modes, quality presets, distillation objectives and devices.

Every one is a `StrEnum`, so a member is the very string the wire, the job database, the
JSON metadata and Blender's enum properties carry: it compares equal to it, packs as it and
prints as it. Code names the member (`JobState.DONE`), never the bare string;
tests/test_layout.py checks that.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    """A job's place in the server's registry."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


class Stage(StrEnum):
    """What a running job is doing, as its progress events name it."""

    LOADING = "loading"
    DOWNLOADING = "downloading"
    OPTIMISING = "optimising"  # the NeRF stage
    REFINING = "refining"  # the mesh (DMTet) stage
    TEXTURING = "texturing"  # a colour model on a given, fixed mesh
    MESHING = "meshing"  # surface extraction and the texture bake
    DONE = "done"
    STARTING = "starting"  # a farm job reached its worker (its progress names the node)
    RETRYING = "retrying"  # a farm job lost its worker and runs again


class ErrorCode(StrEnum):
    """The `code` of an `error` message and of every PromptMeshError."""

    BAD_REQUEST = "BAD_REQUEST"  # a malformed or invalid request, a prompt the model cannot take
    VERSION = "VERSION"  # the peer speaks another protocol version
    NOT_FOUND = "NOT_FOUND"  # no such job, or no result for it
    MODEL = "MODEL"  # the model cannot be found or loaded
    DEVICE = "DEVICE"  # the requested device is not available
    MESH = "MESH"  # the optimisation gave no usable surface
    OOM = "OOM"  # out of memory
    DISK = "DISK"  # the result could not be written (disk full, read-only, permissions)
    CANCELLED = "CANCELLED"  # cancelled by a client
    FORBIDDEN = "FORBIDDEN"  # the job belongs to another client key
    BUSY = "BUSY"  # a result is still on its way to this client: read it first
    QUEUE_FULL = "QUEUE_FULL"  # the server's queue, or this client's share of it, is full
    WORKER_LOST = "WORKER_LOST"  # the machine or process running the job died (the Ray executor)
    UNREACHABLE = "UNREACHABLE"  # the server did not answer (client side only)
    INTERNAL = "INTERNAL"  # a bug: the server's log has the traceback


class OutputFormat(StrEnum):
    """Mesh file formats. FBX is written by Blender's exporter; the rest by backend/export.py."""

    GLB = "glb"
    PLY = "ply"
    OBJ = "obj"
    FBX = "fbx"


MESH_FORMATS = (OutputFormat.GLB, OutputFormat.PLY, OutputFormat.OBJ)  # written without Blender


class ViewPrompt(StrEnum):
    """How the camera's view enters the text condition (a job's `view_prompt`)."""

    HARD = "hard"  # the nearest view word
    INTERPOLATED = "interpolated"  # view prompts blended with the azimuth
    PERP_NEG = "perp-neg"  # blended, plus Perp-Neg's push away from the other views
    CAMERA = "camera"  # no view word: the camera alone, for a prior that takes it


class Quality(StrEnum):
    """A job's quality preset; what each sets is the model's own (its presets.json)."""

    DRAFT = "draft"
    STANDARD = "standard"
    HIGH = "high"


class Objective(StrEnum):
    """What the prior's noise prediction pulls the renders towards (a job's `objective`;
    backend/guidance/base.py computes each, backend/recipe.py Objective holds its settings)."""

    SDS = "sds"  # DreamFusion's score distillation
    X0 = "x0"  # MVDream's regression onto the one-step reconstruction
    VSD = "vsd"  # ProlificDreamer's variational score distillation (a LoRA of the prior, per job)
    NFSD = "nfsd"  # noise-free score distillation (Katzir et al., ICLR 2024)
    CSD = "csd"  # classifier score distillation (Yu et al. 2023)
    ISM = "ism"  # interval score matching (LucidDreamer, CVPR 2024)


class Device(StrEnum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class MessageType(StrEnum):
    """The `type` of a wire message; docs/protocol.md says which side sends which, and the reply
    each request gets."""

    # client -> server
    HELLO = "hello"
    PING = "ping"
    GENERATE = "generate"
    TEXTURE = "texture"  # a generate that carries a mesh to paint (arrays vertices, faces, uvs?)
    IMAGE = "image"  # a generate that carries an image to make an object of (array image; elevation, fov?)
    CANCEL = "cancel"
    STATUS = "status"  # also the server's reply
    RESULT = "result"  # also the server's reply
    PRUNE = "prune"
    WATCH = "watch"
    MODELS = "models"  # also the server's reply
    # server -> client
    WELCOME = "welcome"
    PONG = "pong"
    ACCEPTED = "accepted"
    CANCELLING = "cancelling"
    WATCHING = "watching"
    PRUNED = "pruned"
    PROGRESS = "progress"
    PREVIEW = "preview"
    PROXY = "proxy"
    DONE = "done"
    ERROR = "error"

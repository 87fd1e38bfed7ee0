"""The generation job spec and its validation, shared by the CLI, the server and the add-on.

Every field is checked for type and range; a bad one raises SpecError naming the field.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import asdict, dataclass, fields
from typing import Any

from .errors import PromptMeshError
from .vocab import Device, ErrorCode, Objective, Quality, ViewPrompt

MAX_PROMPT_CHARS = 1000
MAX_MODEL_CHARS = 512
LIMITS: dict[str, tuple[float, float]] = {
    "seed": (0, 2**32 - 1),
    "steps": (1, 20000),
    "resolution": (16, 512),
    "guidance_scale": (0.0, 1000.0),
    "preview_every": (0, 100000),
    "proxy_every": (0.0, 3600.0),
    "mesh_resolution": (32, 256),
    "max_faces": (100, 5_000_000),
    "refine_steps": (0, 20000),
    "texture_size": (0, 4096),
}
TEXTURE_SIZES = (0, 64, 128, 256, 512, 1024, 2048, 4096)  # 0: no texture, vertex colours only
# Fields a job may leave unset (None): the model's recipe, after the job's quality preset, decides.
OPTIONAL = ("steps", "resolution", "guidance_scale", "mesh_resolution", "max_faces", "refine_steps", "texture_size")


INVISIBLE = ("Cc", "Cf", "Cs", "Co", "Cn")  # control, format (zero-width, bidi), surrogate, private, unassigned


def normalise_text(text: str) -> str:
    """NFC, every whitespace run one space, invisible characters removed: what a prompt shows is
    what the model gets, and a prompt of NULs or zero-width spaces reads as empty."""
    text = unicodedata.normalize("NFC", text)
    kept = (" " if ch.isspace() else ch for ch in text if ch.isspace() or unicodedata.category(ch) not in INVISIBLE)
    return " ".join("".join(kept).split())


def prompt_words(text: str) -> list[str]:
    """The words of a prompt as the embedded prior's tokenizer reads them: lower-cased, sentence
    punctuation dropped except the comma, any other symbol a word of its own (the backend checks
    with it; the add-on checks before sending)."""
    text = "".join(" " if unicodedata.category(ch).startswith("P") and ch != "," else ch for ch in text.lower())
    return re.findall(r"\w+|[^\w\s]", text)


def unknown_words(text: str, vocabulary: set[str] | list[str]) -> list[str]:
    """The prompt's words outside `vocabulary`, each once, in order."""
    known = set(vocabulary)
    return [w for w in dict.fromkeys(prompt_words(text)) if w not in known]


class SpecError(PromptMeshError):
    """A job spec field is missing, of the wrong type or out of range."""

    code = ErrorCode.BAD_REQUEST

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


@dataclass
class JobSpec:
    """What to generate. None, in Python and on the wire, means "not given": the model's recipe
    and the quality preset decide (backend/recipe.py resolve)."""

    prompt: str
    negative: str = ""
    seed: int = 0
    steps: int | None = None
    resolution: int | None = None
    guidance_scale: float | None = None
    model: str = "embedded"
    preview_every: int = 0
    # Seconds between coarse 3D proxies of the object (never more often than 20x their cost);
    # 0, the default, sends none: the clients that show them (the add-on, submit --proxy-dir) ask.
    proxy_every: float = 0.0
    mesh_resolution: int | None = None
    max_faces: int | None = None
    device: str = Device.AUTO
    # How the view enters the prompt (backend/recipe.py ViewPrompts): None is the prior's default.
    view_prompt: str | None = None
    # Steps of the mesh refinement stage after the NeRF (0: none); None is the prior's default.
    refine_steps: int | None = None
    # Side in pixels of the baked base-colour texture (a power of two, 64..4096); 0: vertex colours only.
    texture_size: int | None = None
    # The model's quality preset (its recipe.json says what each sets); None: standard.
    quality: str | None = None
    # The distillation objective (shared.vocab.Objective); None: the model card's.
    objective: str | None = None
    # An image job's novel-view (3D) prior beside the text prior (an alias such as zero123-xl, a
    # Hub id or a folder); None: the text prior alone.
    novel_view: str | None = None

    def validate(self, image: bool = False) -> JobSpec:
        """Check every field; returns self with the prompts normalised (normalise_text). An
        image job (`image`) may leave the prompt empty: the image says what the object is."""
        for name in ("prompt", "negative", "model", "device"):
            if not isinstance(getattr(self, name), str):
                raise SpecError(name, f"expected text, got {type(getattr(self, name)).__name__}")
        self.prompt = normalise_text(self.prompt)
        self.negative = normalise_text(self.negative)
        if not self.prompt and not image:
            raise SpecError("prompt", 'is empty: describe the object, e.g. "a red cube"')
        for name in ("prompt", "negative"):
            if len(getattr(self, name)) > MAX_PROMPT_CHARS:
                raise SpecError(name, f"has {len(getattr(self, name))} characters; at most {MAX_PROMPT_CHARS} allowed")
        if not self.model.strip() or len(self.model) > MAX_MODEL_CHARS:
            raise SpecError("model", f"must be 'embedded', a Hub id or a folder (1 to {MAX_MODEL_CHARS} characters)")
        if self.novel_view is not None:
            if not isinstance(self.novel_view, str) or not self.novel_view.strip() or len(self.novel_view) > MAX_MODEL_CHARS:
                raise SpecError("novel_view", f"must be a novel-view prior's alias (zero123-xl), Hub id or folder "
                                f"(1 to {MAX_MODEL_CHARS} characters)")
            if not image:
                raise SpecError("novel_view", "only an image job takes a novel-view prior: give an image")
        for name, words in (("device", Device), ("view_prompt", ViewPrompt), ("quality", Quality), ("objective", Objective)):
            value = getattr(self, name)
            if (value is not None or name == "device") and value not in set(words):
                raise SpecError(name, f"must be one of {', '.join(words)}, got {str(value)[:40]!r}")
        for name, (lo, hi) in LIMITS.items():
            value = getattr(self, name)
            if value is None and name in OPTIONAL:
                continue
            want_int = name not in ("guidance_scale", "proxy_every")
            ok_type = isinstance(value, int) if want_int else isinstance(value, (int, float))
            if isinstance(value, bool) or not ok_type:
                raise SpecError(name, f"expected {'an integer' if want_int else 'a number'}, got {type(value).__name__}")
            if not (lo <= value <= hi) or value != value:
                raise SpecError(name, f"must be between {lo} and {hi}, got {value}")
        if self.resolution is not None and self.resolution % 8:
            raise SpecError("resolution", f"must be a multiple of 8, got {self.resolution}")
        if self.texture_size is not None and self.texture_size not in TEXTURE_SIZES:
            raise SpecError("texture_size", f"must be 0 (off) or a power of two from 64 to 4096, got {self.texture_size}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, image: bool = False) -> JobSpec:
        """Build and validate a spec from untrusted data (unknown keys are an error); `image`: an
        image job's, whose prompt may be empty."""
        if not isinstance(data, dict):
            raise SpecError("spec", f"expected a mapping, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in data if k not in names)
        if unknown:
            raise SpecError(unknown[0], "is not a known field")
        if "prompt" not in data:
            raise SpecError("prompt", "is required")
        return cls(**data).validate(image)

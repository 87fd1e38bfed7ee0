"""Choosing and loading a prior from the `--model` value: an alias of the catalogue
(backend/models.py), a Hub id or a folder."""

from __future__ import annotations

from pathlib import Path

import torch

from ..models import CATALOGUE, EMBEDDED, candidates
from .base import Guidance, ModelLoadError


def load_guidance(model: str, device: torch.device | str = "cpu") -> Guidance:
    """`embedded` (or a folder written by `prior train`: a unet, no vae, no model_index.json)
    -> EmbeddedGuidance; anything else is Stable Diffusion. An alias tries its mirrors in
    order and reports the first one's error if none loads."""
    if not isinstance(model, str) or not model.strip():
        raise ModelLoadError(f"the model name is empty: use an alias ({', '.join(CATALOGUE)}), a Hub id or a folder")
    errors: list[ModelLoadError] = []
    for name in candidates(model):
        try:
            return _load_one(name, device)
        except ModelLoadError as exc:
            errors.append(exc)
    raise errors[0]


def _load_one(model: str, device: torch.device | str) -> Guidance:
    from .embedded import EmbeddedGuidance
    from .stable_diffusion import StableDiffusionGuidance

    if model == EMBEDDED:
        return EmbeddedGuidance(device=device)
    path = Path(model).expanduser()
    is_sd = (path / "model_index.json").is_file() or (path / "vae").is_dir()
    if path.is_dir() and not is_sd and (path / "unet").is_dir():
        return EmbeddedGuidance(path, device=device)
    if not path.exists() and (model.startswith((".", "/", "~")) or model.count("/") != 1):
        raise ModelLoadError(
            f"unknown model {model!r}: not an alias ({', '.join(CATALOGUE)}), not an existing folder, "
            "and not a Hub id of the form owner/name"
        )
    return StableDiffusionGuidance(str(path) if path.exists() else model, device=device)

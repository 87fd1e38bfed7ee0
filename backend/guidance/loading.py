"""Choosing and loading a prior from the `--model` value: "embedded", a Hub id or a folder."""

from __future__ import annotations

from pathlib import Path

import torch

from .base import Guidance, ModelLoadError

EMBEDDED = "embedded"


def load_guidance(model: str, device: torch.device | str = "cpu") -> Guidance:
    """`embedded` (or a folder written by `prior train`: a unet, no vae, no model_index.json)
    -> EmbeddedGuidance; anything else is a Stable Diffusion Hub id or folder."""
    from .embedded import EmbeddedGuidance
    from .stable_diffusion import StableDiffusionGuidance

    if not isinstance(model, str) or not model.strip():
        raise ModelLoadError("the model name is empty: use 'embedded', a Hub id or a local folder")
    if model == EMBEDDED:
        return EmbeddedGuidance(device=device)
    path = Path(model).expanduser()
    is_sd = (path / "model_index.json").is_file() or (path / "vae").is_dir()
    if path.is_dir() and not is_sd and (path / "unet").is_dir():
        return EmbeddedGuidance(path, device=device)
    if not path.exists() and (model.startswith((".", "/", "~")) or model.count("/") != 1):
        raise ModelLoadError(
            f"unknown model {model!r}: not 'embedded', not an existing folder, and not a Hub id of the form owner/name"
        )
    return StableDiffusionGuidance(str(path) if path.exists() else model, device=device)

"""Choosing and loading a prior from the `--model` value: an alias of the catalogue
(backend/models.py), a Hub id or a folder; and its model card (recipe and presets), read
without loading the weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..models import CATALOGUE, EMBEDDED, cached_file, candidates
from ..multiview import VIEWS_FIELD
from ..prior import WEIGHTS_DIR
from ..recipe import CARDS_DIR, RECIPE_FILE, ModelCard
from .base import Guidance, ModelLoadError

if TYPE_CHECKING:
    from .zero123 import NovelViewGuidance

# The card of a folder that carries none, by kind: (an embedded-style prior?, multi-view?)
FALLBACK_CARDS = {(False, False): "stable-diffusion.json", (False, True): "mvdream.json",
                  (True, True): "embedded-multiview.json"}


def model_card(model: str) -> ModelCard:
    """The recipe and quality presets of `model`: its folder's recipe.json; an alias's card;
    for a folder or Hub id without one, the card of its kind (read from its UNet's config)."""
    refuse_novel_view(model)
    if model == EMBEDDED:
        return _card(WEIGHTS_DIR)
    if model in CATALOGUE:
        return _card(CARDS_DIR / CATALOGUE[model].card)
    path = Path(model).expanduser()
    if path.is_dir():
        if (path / RECIPE_FILE).is_file():
            return _card(path)
        embedded_style = not _is_stable_diffusion(path) and (path / "unet").is_dir()
        unet_config: Path | None = path / "unet" / "config.json"
    else:  # a Hub id: what the local cache holds of it, if anything
        check_hub_id(model)
        hit = cached_file(model, RECIPE_FILE)
        if hit:
            return _card(hit[1])
        config = cached_file(model, "unet/config.json")
        embedded_style, unet_config = False, (config[1] if config else None)
    multiview = unet_config is not None and unet_config.is_file() and \
        int(json.loads(unet_config.read_text()).get(VIEWS_FIELD) or 1) > 1
    if embedded_style and not multiview:
        return _card(WEIGHTS_DIR)
    return _card(CARDS_DIR / FALLBACK_CARDS[embedded_style, multiview])


def refuse_novel_view(model: str) -> None:
    """A novel-view prior named where a text prior belongs gets one line that says where it goes."""
    entry = CATALOGUE.get(model)
    if entry is not None and entry.novel_view:
        text = ", ".join(a for a, m in CATALOGUE.items() if not m.novel_view)
        raise ModelLoadError(f"{model} is a novel-view prior for image jobs: pass it as --novel-view (the spec's "
                             f"novel_view) with an image; the model is a text prior: {text}, a Hub id or a folder")


def load_novel_view(model: str, device: torch.device | str = "cpu") -> NovelViewGuidance:
    """An image job's novel-view prior: Zero-1-to-3 in diffusers layout, or a folder that
    `prior train-views` wrote (a unet and no vae). An alias tries its mirrors in order and
    reports the first one's error if none loads."""
    from .embedded import EmbeddedNovelView
    from .zero123 import NovelViewGuidance

    entry = CATALOGUE.get(model)
    if model == EMBEDDED or (entry is not None and not entry.novel_view):
        novel = ", ".join(a for a, m in CATALOGUE.items() if m.novel_view)
        raise ModelLoadError(f"{model} is a text prior, not a novel-view prior: use {novel}, a Hub id or a folder")
    errors: list[ModelLoadError] = []
    for name in candidates(model):
        path = Path(name).expanduser()
        if not path.exists():
            check_hub_id(name)
        try:
            if path.is_dir() and not _is_stable_diffusion(path) and (path / "unet").is_dir():
                return EmbeddedNovelView(path, device=device)  # type: ignore[return-value]
            return NovelViewGuidance(str(path) if path.exists() else name, device=device)
        except ModelLoadError as exc:
            errors.append(exc)
    raise errors[0]


def check_hub_id(model: str) -> None:
    """A name that is neither an alias nor an existing folder must read as a Hub id."""
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ModelLoadError(
            f"unknown model {model!r}: not an alias ({', '.join(CATALOGUE)}), not an existing folder, "
            "and not a Hub id of the form owner/name"
        )


def _card(path: Path) -> ModelCard:
    try:
        return ModelCard.load(path)
    except ValueError as exc:
        raise ModelLoadError(f"{exc}: rewrite it, or delete it to use the defaults of the model's kind") from exc


def _is_stable_diffusion(path: Path) -> bool:
    return (path / "model_index.json").is_file() or (path / "vae").is_dir()


def load_guidance(model: str, device: torch.device | str = "cpu") -> Guidance:
    """`embedded` (or a folder written by `prior train`: a unet, no vae, no model_index.json)
    -> EmbeddedGuidance; anything else is Stable Diffusion. An alias tries its mirrors in
    order and reports the first one's error if none loads. The guidance carries the model's
    card (`guidance.card`)."""
    if not isinstance(model, str) or not model.strip():
        raise ModelLoadError(f"the model name is empty: use an alias ({', '.join(CATALOGUE)}), a Hub id or a folder")
    errors: list[ModelLoadError] = []
    card = model_card(model)
    for name in candidates(model):
        try:
            guidance = _load_one(name, device, card)
        except ModelLoadError as exc:
            errors.append(exc)
        else:
            return guidance
    raise errors[0]


def _load_one(model: str, device: torch.device | str, card: ModelCard) -> Guidance:
    from .embedded import EmbeddedGuidance
    from .stable_diffusion import StableDiffusionGuidance

    if model == EMBEDDED:
        return EmbeddedGuidance(card, device=device)
    path = Path(model).expanduser()
    if path.is_dir() and not _is_stable_diffusion(path) and (path / "unet").is_dir():
        return EmbeddedGuidance(card, path, device=device)
    if not path.exists():
        check_hub_id(model)
    return StableDiffusionGuidance(card, str(path) if path.exists() else model, device=device)

"""Guidance: a frozen text-to-image diffusion model scoring renders by Score Distillation."""

from .base import Guidance, ModelLoadError
from .loading import load_guidance, load_novel_view

__all__ = ["Guidance", "ModelLoadError", "load_guidance", "load_novel_view"]

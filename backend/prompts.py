"""View-dependent prompts (DreamFusion §3.2) and their embeddings, computed once per job."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

VIEWS = ("front", "side", "back", "overhead")
Cond = Any  # a tensor [N, ...] or a tuple of such tensors, indexed along the first axis


def view_prompt(prompt: str, view: str) -> str:
    return f"{prompt}, {view} view"


def index_cond(cond: Cond, index: torch.Tensor) -> Cond:
    if isinstance(cond, tuple):
        return tuple(c[index] for c in cond)
    return cond[index]


def cat_cond(a: Cond, b: Cond) -> Cond:
    if isinstance(a, tuple):
        return tuple(torch.cat([x, y]) for x, y in zip(a, b, strict=True))
    return torch.cat([a, b])


class PromptEmbeddings:
    """The negative prompt and the prompt with each view suffix, encoded in one batch."""

    def __init__(self, prompt: str, negative: str, encode: Callable[[list[str]], Cond]) -> None:
        self.prompt, self.negative = prompt, negative
        self.texts = [negative] + [view_prompt(prompt, v) for v in VIEWS]
        with torch.no_grad():
            self.cond = encode(self.texts)

    def select(self, views: list[str]) -> tuple[Cond, Cond]:
        """(unconditional, conditional) embeddings for a batch of view words."""
        device = (self.cond[0] if isinstance(self.cond, tuple) else self.cond).device
        cond_idx = torch.tensor([1 + VIEWS.index(v) for v in views], device=device)
        return index_cond(self.cond, torch.zeros_like(cond_idx)), index_cond(self.cond, cond_idx)

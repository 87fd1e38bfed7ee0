"""View-dependent prompts (DreamFusion §3.2) and their embeddings, computed once per job: the
view word's prompt, a blend of the view prompts along the azimuth, and Perp-Neg's weights."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .cameras import OVERHEAD_ABOVE

VIEWS = ("front", "side", "back", "overhead")
Cond = Any  # a tensor [N, ...] or a tuple of such tensors, indexed along the first axis


def view_prompt(prompt: str, view: str) -> str:
    return f"{prompt}, {view} view"


def index_cond(cond: Cond, index: torch.Tensor) -> Cond:
    if isinstance(cond, tuple):
        return tuple(c[index] for c in cond)
    return cond[index]


def cat_cond(*parts: Cond) -> Cond:
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(list(xs)) for xs in zip(*parts, strict=True))
    return torch.cat(list(parts))


def lerp_cond(a: Cond, b: Cond, r: torch.Tensor) -> Cond:
    """(1 - r) * a + r * b per batch entry (r: [B])."""
    if isinstance(a, tuple):
        return tuple(lerp_cond(x, y, r) for x, y in zip(a, b, strict=True))
    return torch.lerp(a, b, r.to(a).view(-1, *[1] * (a.dim() - 1)))


def half_turn(azimuth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """|azimuth| in degrees folded to [0, 180] (0 = front), and whether it is in the front half."""
    a = ((azimuth + 180.0) % 360.0 - 180.0).abs()
    return a, a < 90.0


def perp_neg_weights(azimuth: torch.Tensor, scale: float, front_decay: float, side_decay: float) -> torch.Tensor:
    """[B, 2] weights (<= 0) of the negative prompts (front view, side view) for cameras at
    `azimuth` degrees. In the front half r = 1 - |az|/90 (1 facing the front): "front" is pushed
    away as the camera turns to the side and "side" near the front; in the back half
    r = 1 - (|az| - 90)/90 (1 at the side): "front" always, "side" near the back. A push is off
    where the camera is within 18 degrees of that view (r beyond 0.8 or under 0.2)."""
    a, front_half = half_turn(azimuth.float())
    r = torch.where(front_half, 1 - a / 90.0, 1 - (a - 90.0) / 90.0)
    zero = torch.zeros_like(r)
    w_front = torch.where(front_half, torch.where(r > 0.8, zero, scale * torch.exp(-r * front_decay)), zero + scale)
    w_side = torch.where(front_half, torch.where(r < 0.2, zero, scale * torch.exp(-(1 - r) * side_decay)),
                         torch.where(r > 0.8, zero, scale * torch.exp(-r * side_decay)))
    return torch.stack([w_front, w_side], dim=1)


def perp_neg_noise(eps_uncond: torch.Tensor, eps_pos: torch.Tensor, eps_neg: list[torch.Tensor],
                   weights: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Perp-Neg's guided noise: uncond + s * (d_pos + sum_i w_i * perp(d_i, d_pos)), where
    d = eps_text - eps_uncond and perp(d_i, d_pos) is the part of d_i orthogonal to d_pos, per sample."""
    d_pos = eps_pos - eps_uncond
    flat = d_pos.flatten(1)
    norm2 = (flat * flat).sum(1).clamp_min(1e-12)
    total = d_pos
    for i, eps in enumerate(eps_neg):
        d = eps - eps_uncond
        along = (d.flatten(1) * flat).sum(1) / norm2
        perp = d - along.view(-1, *[1] * (d.dim() - 1)) * d_pos
        total = total + weights[:, i].to(d).view(-1, *[1] * (d.dim() - 1)) * perp
    return eps_uncond + guidance_scale * total


class PromptEmbeddings:
    """The negative prompt and the prompt with each view suffix, encoded in one batch."""

    def __init__(self, prompt: str, negative: str, encode: Callable[[list[str]], Cond]) -> None:
        self.prompt, self.negative = prompt, negative
        self.encode = encode
        self.extra: dict[str, Cond] = {}  # other texts an objective asks for (the null prompt, a negative), encoded once
        self.texts = [negative] + [view_prompt(prompt, v) for v in VIEWS]
        with torch.no_grad():
            self.cond = encode(self.texts)
            self.plain = encode([prompt])  # apart: the view rows stay bit-identical to a batch of five

    @property
    def device(self) -> torch.device:
        return (self.cond[0] if isinstance(self.cond, tuple) else self.cond).device

    def rows(self, index: torch.Tensor) -> Cond:
        return index_cond(self.cond, index.to(self.device))

    def negative_rows(self, n: int) -> Cond:
        """The negative prompt (the unconditional embedding), n times."""
        return self.rows(torch.zeros(n, dtype=torch.long))

    def view_rows(self, view: str, n: int) -> Cond:
        """The prompt with `view`'s suffix, n times."""
        return self.rows(torch.full((n,), 1 + VIEWS.index(view), dtype=torch.long))

    def plain_rows(self, n: int) -> Cond:
        """The prompt as typed, without a view word, n times."""
        return index_cond(self.plain, torch.zeros(n, dtype=torch.long, device=self.device))

    def text_rows(self, text: str, n: int) -> Cond:
        """Any other text (the null prompt "", an objective's negative), n times; encoded on first use."""
        if text not in self.extra:
            with torch.no_grad():
                self.extra[text] = self.encode([text])
        return index_cond(self.extra[text], torch.zeros(n, dtype=torch.long, device=self.device))

    def select(self, views: list[str]) -> tuple[Cond, Cond]:
        """(unconditional, conditional) embeddings for a batch of view words."""
        return self.negative_rows(len(views)), self.rows(torch.tensor([1 + VIEWS.index(v) for v in views]))

    def blend(self, elevation: torch.Tensor, azimuth: torch.Tensor, overhead_above: float = OVERHEAD_ABOVE) -> Cond:
        """Per camera: front -> side over |azimuth| 0..90 degrees and side -> back over 90..180,
        linearly in embedding space; the overhead prompt above `overhead_above` degrees."""
        a, front_half = half_turn(azimuth.float().cpu())
        first = torch.where(front_half, 1 + VIEWS.index("front"), 1 + VIEWS.index("side"))
        second = torch.where(front_half, 1 + VIEWS.index("side"), 1 + VIEWS.index("back"))
        overhead = elevation.float().cpu() > overhead_above
        first = torch.where(overhead, 1 + VIEWS.index("overhead"), first)
        second = torch.where(overhead, 1 + VIEWS.index("overhead"), second)
        r = torch.where(front_half, a / 90.0, (a - 90.0) / 90.0).to(self.device)
        return lerp_cond(self.rows(first), self.rows(second), r)

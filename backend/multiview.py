"""Multi-view denoising in diffusers terms (MVDream, Shi et al. 2023), without a fork of
diffusers' UNet: a `UNet2DConditionModel` whose self-attention layers see the tokens of all V
views of one object at once, while cross-attention to the text stays per view. The camera
goes in through the UNet's own `class_embed_type="projection"` (linear, SiLU, linear, added to
the timestep embedding: MVDream's camera embedding exactly).

A batch holds whole groups: entries [g*V, (g+1)*V) are the V views of object g. The number of
views is a field of the UNet's saved config (`multiview_views`), so `load_unet` re-attaches
the processor to a folder written by `save_pretrained`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

VIEWS_FIELD = "multiview_views"


class MultiViewAttnProcessor:
    """Self-attention over the V views of each object: tokens (b*V, L, C) are joined into
    (b, V*L, C), attended with diffusers' scaled-dot-product processor, and split back."""

    def __init__(self, views: int) -> None:
        self.views = views
        self.inner = AttnProcessor2_0()

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3:
            raise ValueError("the multi-view processor serves unmasked self-attention on [batch, tokens, channels] only")
        batch, length, channels = hidden_states.shape
        if batch % self.views:
            raise ValueError(f"a batch of {batch} is not a whole number of {self.views}-view groups")
        joined = hidden_states.reshape(batch // self.views, self.views * length, channels)
        return self.inner(attn, joined, temb=temb).reshape(batch, length, -1)


def attach_processors(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """Multi-view self-attention where the config asks for it (`multiview_views`), diffusers'
    default elsewhere; a UNet without the field is left as it is."""
    views = unet.config.get(VIEWS_FIELD)
    if views:
        unet.set_attn_processor({
            name: MultiViewAttnProcessor(int(views)) if name.endswith("attn1.processor") else AttnProcessor2_0()
            for name in unet.attn_processors
        })
    return unet


def make_multiview(unet: UNet2DConditionModel, views: int) -> UNet2DConditionModel:
    """Turn `unet` into a V-view denoiser (in place), recorded in its config for save_pretrained."""
    if views < 1:
        raise ValueError(f"views must be at least 1, got {views}")
    unet.register_to_config(**{VIEWS_FIELD: views})
    return attach_processors(unet)


def views_per_group(unet: UNet2DConditionModel) -> int:
    """How many views of one object `unet` denoises together (1: a 2D prior)."""
    return int(unet.config.get(VIEWS_FIELD) or 1)


@contextmanager
def single_views(unet: UNet2DConditionModel) -> Iterator[UNet2DConditionModel]:
    """Within the block a multi-view UNet treats every batch entry as an object of its own: the
    2D images MVDream mixes into multi-view training."""
    procs = [p for p in unet.attn_processors.values() if isinstance(p, MultiViewAttnProcessor)]
    views = [p.views for p in procs]
    for p in procs:
        p.views = 1
    try:
        yield unet
    finally:
        for p, v in zip(procs, views, strict=True):
            p.views = v


def load_unet(path: str | Path, **kwargs: Any) -> UNet2DConditionModel:
    """A UNet saved by save_pretrained, with its multi-view processor re-attached. (diffusers
    warns that it does not know the config field; it keeps it, and so do we, so the warning
    is silenced.)"""
    log = logging.getLogger("diffusers.configuration_utils")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        unet = UNet2DConditionModel.from_pretrained(path, **kwargs)
    finally:
        log.setLevel(level)
    return attach_processors(unet)

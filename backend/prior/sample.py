"""2D samples from the embedded prior with DDIM and classifier-free guidance."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDIMScheduler

from ..cameras import Cameras, orbit_groups, view_word
from ..prompts import view_prompt
from ..recipe import ModelCard
from . import WEIGHTS_DIR
from .model import IMAGE_SIZE, EmbeddedPrior, camera_features

# DDIM samples of the shipped weights are best unguided (bench/prior_samples.py, 360 samples):
# right shape 74 % and colour 99 % at 1, 20 % and 97 % at 2, 11 % and 76 % at 3 (drawn as
# purple cubes). SDS, which averages over views and noise, uses guidance 5.
GUIDANCE = 1.0


@torch.no_grad()
def sample(
    prior: EmbeddedPrior, prompt: str, cameras: Cameras, guidance_scale: float = GUIDANCE, steps: int = 50, seed: int = 0,
    view_words: bool | None = None,
) -> torch.Tensor:
    """One image per camera for `prompt` (+ each camera's view suffix if `view_words`, else the
    camera alone tells the view; by default as the prior was trained: suffixes for a 2D prior,
    none for a multi-view one); [N, 3, S, S] in [0, 1]. A multi-view prior draws each group of
    its views_per_group cameras as one object."""
    prior.check_prompt(prompt)
    n = len(cameras)
    if n % prior.views_per_group:
        raise ValueError(f"a multi-view prior draws whole groups of {prior.views_per_group} views, not {n}")
    if view_words is None:
        view_words = prior.views_per_group == 1
    captions = ([view_prompt(prompt, v) for v in view_word(cameras.elevation, cameras.azimuth)] if view_words
                else [prompt] * n)
    states, pooled = prior.encode_text([""] * n + captions)
    cams = camera_features(cameras, ModelCard.load(WEIGHTS_DIR).recipe.cameras).repeat(2, 1)
    scheduler = DDIMScheduler.from_config(prior.scheduler.config)
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    for t in scheduler.timesteps:
        eps_u, eps_c = prior.predict_noise(torch.cat([x, x]), t.repeat(2 * n), states, pooled, cams).chunk(2)
        x = scheduler.step(eps_u + guidance_scale * (eps_c - eps_u), t, x).prev_sample
    return (x.clamp(-1, 1) + 1) / 2


def sample_grid(prior: EmbeddedPrior, prompt: str, views: int = 8, rows: int = 2, **kwargs) -> np.ndarray:
    """`rows` x `views` samples around the object (azimuth across, a new seed per row) as uint8 HxWx3.
    A multi-view prior draws each row as one object, in groups a quarter-turn apart (as it was
    trained) that together cover the row's azimuths."""
    seed = kwargs.pop("seed", 0)
    cameras, back = orbit_groups(views, prior.views_per_group)
    images = [sample(prior, prompt, cameras, seed=seed + r, **kwargs)[back] for r in range(rows)]
    grid = torch.cat(images).view(rows, views, 3, IMAGE_SIZE, IMAGE_SIZE).permute(0, 3, 1, 4, 2)
    grid = grid.reshape(rows * IMAGE_SIZE, views * IMAGE_SIZE, 3)
    return (grid * 255).round().to(torch.uint8).numpy()

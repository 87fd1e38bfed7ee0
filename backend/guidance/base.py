"""The guidance interface and the one SDS implementation every prior shares (DreamFusion §3)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...shared.errors import PromptMeshError
from ...shared.vocab import ErrorCode
from ..cameras import OVERHEAD_ABOVE, Cameras, view_word
from ..prompts import Cond, PromptEmbeddings, cat_cond, perp_neg_noise, perp_neg_weights
from ..recipe import ModelCard, Objective, Recipe, ViewPrompts


class ModelLoadError(PromptMeshError):
    """A model could not be found or loaded; the message says what is missing."""

    code = ErrorCode.MODEL


HARD_VIEWS = ViewPrompts()  # DreamFusion's view word per camera
SDS = Objective()
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt")


def weight_hashes(folder: Path, components: tuple[str, ...] = ()) -> dict[str, str]:
    """The sha256 of every weight file under `folder` (or its `components` subfolders), by relative
    path: what a result's metadata records, so that a model can be told from a look-alike."""
    roots = [folder / c for c in components] if components else [folder]
    out = {}
    for root in roots:
        for path in sorted(p for p in root.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file()):
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            out[path.relative_to(folder).as_posix()] = digest.hexdigest()
    return out


class Guidance(nn.Module):
    """A frozen diffusion prior. Subclasses map renders to its input space, encode text and
    predict noise; `sds_grad` and `sds_loss` are the same for all of them. `card` holds the
    generation settings that suit the prior (its recipe.json)."""

    card: ModelCard
    views_per_group: int = 1  # > 1: a multi-view prior, denoising that many views of one object together
    alphas_cumprod: torch.Tensor
    weights: dict  # where the weights came from: {"source", "revision", "sha256": {file: digest}}

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """[B, 3, H, W] display colour in [0, 1] -> the diffusion model's input space (a
        stochastic encoder draws from `generator`, the job's one generator)."""
        raise NotImplementedError

    def encode_text(self, texts: list[str]) -> Cond:
        raise NotImplementedError

    def predict_noise(self, noisy: torch.Tensor, t: torch.Tensor, cond: Cond, cameras: Cameras) -> torch.Tensor:
        raise NotImplementedError

    def check_prompt(self, text: str) -> None:
        """Raise a PromptMeshError (BAD_REQUEST) for a prompt this prior cannot represent (default: any is fine)."""

    def embed_prompt(self, prompt: str, negative: str = "") -> PromptEmbeddings:
        for text in (prompt, negative):
            self.check_prompt(text)
        return PromptEmbeddings(prompt, negative, self.encode_text)

    @property
    def recipe(self) -> Recipe:
        """The recipe the prior was made for (the cameras and lighting it saw in training)."""
        return self.card.recipe

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    def sds_grad(
        self,
        latents: torch.Tensor,
        embeddings: PromptEmbeddings,
        cameras: Cameras,
        guidance_scale: float,
        t: torch.Tensor,
        noise: torch.Tensor,
        views: ViewPrompts = HARD_VIEWS,
        objective: Objective = SDS,
    ) -> torch.Tensor:
        """w(t) * (eps_guided(z_t; y, t) - eps) with w(t) = 1 - alpha_bar_t, where eps_guided is
        classifier-free guidance uncond + s * (cond - uncond) with the view's prompt (the view
        word's, or a blend along the azimuth), or Perp-Neg's (prompts.perp_neg_noise); or, for
        the "x0" objective, latents - x0_guided (recipe.Objective); NaNs and infs zeroed."""
        if objective.kind not in ("sds", "x0"):
            raise ValueError(f"unknown objective {objective.kind!r}: 'sds' or 'x0'")
        n = latents.shape[0]
        if not views.words:
            uncond, cond = embeddings.negative_rows(n), embeddings.plain_rows(n)
        elif views.interpolate or views.perp_neg:
            uncond, cond = embeddings.negative_rows(n), embeddings.blend(cameras.elevation, cameras.azimuth)
        else:
            uncond, cond = embeddings.select(view_word(cameras.elevation, cameras.azimuth))
        parts = [uncond, cond]
        if views.perp_neg:
            parts += [embeddings.view_rows("front", n), embeddings.view_rows("side", n)]
        with torch.no_grad():
            a = self.alphas_cumprod[t].view(-1, *[1] * (latents.dim() - 1))
            noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
            k = len(parts)
            out = self.predict_noise(
                torch.cat([noisy] * k), torch.cat([t] * k), cat_cond(*parts), cameras.cat(*[cameras] * (k - 1))
            ).chunk(k)
            if views.perp_neg:
                overhead = cameras.elevation > OVERHEAD_ABOVE  # the overhead prompt has no opposite views
                weights = perp_neg_weights(cameras.azimuth, views.perp_neg_scale, views.front_decay, views.side_decay)
                weights = torch.where(overhead.view(-1, 1).to(weights.device), 0.0, weights)
                eps = perp_neg_noise(out[0], out[1], list(out[2:]), weights, guidance_scale)
            else:
                eps = out[0] + guidance_scale * (out[1] - out[0])
            if objective.kind == "x0":
                grad = latents - self._reconstruction(noisy, a, eps, out[1], objective.rescale)
            else:
                grad = (1 - a) * (eps - noise)
        return torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)

    def _reconstruction(self, noisy: torch.Tensor, a: torch.Tensor, eps: torch.Tensor, eps_text: torch.Tensor,
                        rescale: float) -> torch.Tensor:
        """The one-step x0 of the guided prediction, its spread per object (a group of views)
        pulled by `rescale` towards the spread of the text prediction's x0 without guidance."""
        x0 = (noisy - (1 - a).sqrt() * eps) / a.sqrt()
        if rescale > 0:
            group = self.views_per_group

            def spread(x: torch.Tensor) -> torch.Tensor:
                per_object = x.reshape(-1, group * x[0].numel()).std(1).clamp_min(1e-8)
                return per_object.repeat_interleave(group).view(-1, *[1] * (x.dim() - 1))

            x0_text = (noisy - (1 - a).sqrt() * eps_text) / a.sqrt()
            x0 = rescale * x0 * spread(x0_text) / spread(x0) + (1 - rescale) * x0
        return x0

    def sds_loss(
        self,
        images: torch.Tensor,
        embeddings: PromptEmbeddings,
        cameras: Cameras,
        guidance_scale: float,
        t_range: tuple[float, float],
        generator: torch.Generator,
        views: ViewPrompts = HARD_VIEWS,
        objective: Objective = SDS,
    ) -> torch.Tensor:
        """A loss whose gradient w.r.t. the encoded images is the SDS gradient. A multi-view prior
        gets whole groups of views (views_per_group each) and one timestep per group."""
        latents = self.encode_images(images, generator)
        steps, group = len(self.alphas_cumprod), self.views_per_group
        if latents.shape[0] % group:
            raise ValueError(f"{latents.shape[0]} views are not whole groups of {group}")
        lo, hi = int(t_range[0] * steps), int(t_range[1] * steps)
        t = torch.randint(lo, max(lo, hi) + 1, (latents.shape[0] // group,), generator=generator).clamp_max(steps - 1)
        t = t.repeat_interleave(group)
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        grad = self.sds_grad(latents, embeddings, cameras, guidance_scale, t.to(self.device), noise, views, objective)
        target = (latents - grad).detach()
        return 0.5 * F.mse_loss(latents.float(), target.float(), reduction="sum") / latents.shape[0]

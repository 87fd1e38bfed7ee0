"""The guidance interface and the one SDS implementation every prior shares (DreamFusion §3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...shared.errors import MODEL, PromptMeshError
from ..cameras import Cameras, view_word
from ..prompts import Cond, PromptEmbeddings, cat_cond
from ..recipe import Recipe


class ModelLoadError(PromptMeshError):
    """A model could not be found or loaded; the message says what is missing."""

    code = MODEL


class Guidance(nn.Module):
    """A frozen diffusion prior. Subclasses map renders to its input space, encode text and
    predict noise; `sds_grad` and `sds_loss` are the same for all of them. `recipe` holds the
    generation settings that suit the prior."""

    recipe: Recipe
    alphas_cumprod: torch.Tensor

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] display colour in [0, 1] -> the diffusion model's input space."""
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
    ) -> torch.Tensor:
        """w(t) * (eps_cfg(z_t; y, t) - eps) with w(t) = 1 - alpha_bar_t and standard
        classifier-free guidance uncond + s * (cond - uncond); NaNs and infs zeroed."""
        uncond, cond = embeddings.select(view_word(cameras.elevation, cameras.azimuth))
        with torch.no_grad():
            a = self.alphas_cumprod[t].view(-1, *[1] * (latents.dim() - 1))
            noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
            both = self.predict_noise(
                torch.cat([noisy, noisy]), torch.cat([t, t]), cat_cond(uncond, cond), cameras.cat(cameras)
            )
            eps_uncond, eps_cond = both.chunk(2)
            eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            grad = (1 - a) * (eps - noise)
        return torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)

    def sds_loss(
        self,
        images: torch.Tensor,
        embeddings: PromptEmbeddings,
        cameras: Cameras,
        guidance_scale: float,
        t_range: tuple[float, float],
        generator: torch.Generator,
    ) -> torch.Tensor:
        """A loss whose gradient w.r.t. the encoded images is the SDS gradient."""
        latents = self.encode_images(images)
        steps = len(self.alphas_cumprod)
        lo, hi = int(t_range[0] * steps), int(t_range[1] * steps)
        t = torch.randint(lo, max(lo, hi) + 1, (latents.shape[0],), generator=generator).clamp_max(steps - 1)
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        grad = self.sds_grad(latents, embeddings, cameras, guidance_scale, t.to(self.device), noise)
        target = (latents - grad).detach()
        return 0.5 * F.mse_loss(latents.float(), target.float(), reduction="sum") / latents.shape[0]

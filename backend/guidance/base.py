"""The guidance interface and the one SDS implementation every prior shares (DreamFusion §3)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...shared.errors import PromptMeshError
from ...shared.spec import SpecError
from ...shared.vocab import ErrorCode
from ...shared.vocab import Objective as ObjectiveKind
from ..cameras import OVERHEAD_ABOVE, Cameras, view_word
from ..prompts import Cond, PromptEmbeddings, cat_cond, perp_neg_noise, perp_neg_weights
from ..recipe import ModelCard, Objective, Recipe, ViewPrompts
from .vsd import ObjectiveState, VSDLoRA


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

    def predict_noise(self, noisy: torch.Tensor, t: torch.Tensor, cond: Cond, cameras: Cameras,
                      unet: nn.Module | None = None) -> torch.Tensor:
        """The noise prediction of the prior's UNet, or of `unet` (VSD's LoRA copy of it, told
        the cameras; with autograd, for the LoRA's training)."""
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

    def lora_base(self) -> nn.Module:
        """The diffusers UNet that VSD's LoRA adapts (a copy of its modules; see vsd.lora_unet)."""
        raise NotImplementedError(f"{type(self).__name__} has no UNet for a LoRA")

    def objective_state(self, objective: Objective, steps: int, seed: int) -> ObjectiveState:
        """A job's state for `objective` over a run of `steps`: VSD's LoRA (from `seed`) or nothing."""
        state = ObjectiveState(steps=steps)
        if objective.kind == ObjectiveKind.VSD:
            if self.views_per_group > 1:
                raise SpecError("objective", "vsd takes a single-view prior; a multi-view one denoises groups of views")
            state.lora = VSDLoRA.create(self.lora_base(), objective.lora_rank, objective.lora_lr, seed, objective.lora_t_range,
                                        objective.lora_camera_dropout, objective.lora_guidance_scale)
        return state

    def conditions(self, embeddings: PromptEmbeddings, cameras: Cameras, views: ViewPrompts) -> tuple[Cond, Cond]:
        """(unconditional, conditional) rows for the cameras: the negative prompt, and the view
        word's prompt, a blend along the azimuth, or the prompt as typed."""
        n = len(cameras)
        if not views.words:
            return embeddings.negative_rows(n), embeddings.plain_rows(n)
        if views.interpolate or views.perp_neg:
            return embeddings.negative_rows(n), embeddings.blend(cameras.elevation, cameras.azimuth)
        return embeddings.select(view_word(cameras.elevation, cameras.azimuth))

    def objective_negative(self, embeddings: PromptEmbeddings, objective: Objective) -> str | None:
        """NFSD's and CSD's negative prompt: the job's, else the objective's where this prior can
        read it; None: no negative term."""
        text = embeddings.negative or objective.negative
        if not text:
            return None
        try:
            self.check_prompt(text)
        except PromptMeshError:
            return None
        return text

    def _passes(self, noisy: torch.Tensor, t: torch.Tensor, parts: list[Cond], cameras: Cameras,
                state: ObjectiveState | None) -> tuple[torch.Tensor, ...]:
        """The noise predictions of `noisy` under each condition in `parts`, in one batch."""
        k = len(parts)
        if state is not None:
            state.passes += k
        return self.predict_noise(torch.cat([noisy] * k), torch.cat([t] * k), cat_cond(*parts),
                                  cameras.cat(*[cameras] * (k - 1)) if k > 1 else cameras).chunk(k)

    def ddim_invert(self, x0: torch.Tensor, t: torch.Tensor, null: Cond, cameras: Cameras, delta_s: int, delta_t: int,
                    state: ObjectiveState | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """LucidDreamer's deterministic path: x_s by DDIM inversion of x0 (at timestep 0) to s = t -
        delta_t with the null prompt, in strides of delta_s (the last one shorter), then x_t one
        more inversion step from s. Returns (x_t, eps_null(x_s, s)); ceil(s / delta_s) + 1 passes."""
        a = self.alphas_cumprod

        def step(x: torch.Tensor, eps: torch.Tensor, frm: torch.Tensor, to: torch.Tensor) -> torch.Tensor:
            af, at = (a[v].view(-1, *[1] * (x.dim() - 1)) for v in (frm, to))
            return at.sqrt() * (x - (1 - af).sqrt() * eps) / af.sqrt() + (1 - at).sqrt() * eps

        s = (t - delta_t).clamp_min(0)
        x, now = x0, torch.zeros_like(t)
        while bool((now < s).any()):
            nxt = torch.minimum(now + delta_s, s)
            (eps,) = self._passes(x, now, [null], cameras, state)
            x = torch.where((now < s).view(-1, *[1] * (x.dim() - 1)), step(x, eps, now, nxt), x)
            now = nxt
        (eps_s,) = self._passes(x, s, [null], cameras, state)
        return step(x, eps_s, s, t), eps_s

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
        state: ObjectiveState | None = None,
    ) -> torch.Tensor:
        """The distillation gradient w.r.t. the latents, for every objective (recipe.Objective
        gives each formula). eps_guided is classifier-free guidance uncond + s * (cond - uncond)
        with the view's prompt (the view word's, or a blend along the azimuth), or Perp-Neg's
        (prompts.perp_neg_noise); w(t) = 1 - alpha_bar_t; NaNs and infs zeroed. NFSD and CSD
        guide from the null prompt and take the negative prompt as a term of its own; ISM noises
        by DDIM inversion (`noise` unused); VSD needs `state`'s LoRA. `state`, when given,
        counts the denoiser passes."""
        kind = objective.kind
        if kind not in set(ObjectiveKind):
            raise ValueError(f"unknown objective {kind!r}: one of {', '.join(ObjectiveKind)}")
        if kind == ObjectiveKind.VSD and (state is None or state.lora is None):
            raise ValueError("the vsd objective needs the job's LoRA (Guidance.objective_state)")
        n = latents.shape[0]
        uncond, cond = self.conditions(embeddings, cameras, views)
        null = embeddings.text_rows("", n) if kind in (ObjectiveKind.NFSD, ObjectiveKind.CSD, ObjectiveKind.ISM) else None
        if kind in (ObjectiveKind.NFSD, ObjectiveKind.CSD):
            uncond = null  # the condition direction is measured from the null prompt; the negative is a term apart
        parts = [uncond, cond]
        if views.perp_neg:
            parts += [embeddings.view_rows("front", n), embeddings.view_rows("side", n)]
        negative = self.objective_negative(embeddings, objective) if kind in (ObjectiveKind.NFSD, ObjectiveKind.CSD) else None
        if negative is not None:
            parts.append(embeddings.text_rows(negative, n))
        with torch.no_grad():
            a = self.alphas_cumprod[t].view(-1, *[1] * (latents.dim() - 1))
            if kind == ObjectiveKind.ISM:
                noisy, eps_null_s = self.ddim_invert(latents, t, null, cameras, objective.ism_delta_s, objective.ism_delta_t,
                                                     state)
            else:
                noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
            out = self._passes(noisy, t, parts, cameras, state)
            if views.perp_neg:
                overhead = cameras.elevation > OVERHEAD_ABOVE  # the overhead prompt has no opposite views
                weights = perp_neg_weights(cameras.azimuth, views.perp_neg_scale, views.front_decay, views.side_decay)
                weights = torch.where(overhead.view(-1, 1).to(weights.device), 0.0, weights)
                eps = perp_neg_noise(out[0], out[1], list(out[2:4]), weights, guidance_scale)
            else:
                eps = out[0] + guidance_scale * (out[1] - out[0])
            w = 1 - a
            if kind == ObjectiveKind.X0:
                grad = latents - self._reconstruction(noisy, a, eps, out[1], objective.rescale)
            elif kind == ObjectiveKind.NFSD:
                e_null = out[0]
                e_neg = out[-1] if negative is not None else e_null
                small = (t < objective.nfsd_t_split * len(self.alphas_cumprod)).view(-1, *[1] * (latents.dim() - 1))
                delta_d = torch.where(small, e_null, e_null - e_neg)
                grad = w * (delta_d + (eps - e_null))
            elif kind == ObjectiveKind.CSD:
                grad = w * (eps - out[0])
                if negative is not None:
                    start, end = objective.csd_negative_weight
                    progress = 0.0 if state is None else state.progress
                    grad = grad - w * (start + (end - start) * progress) * (out[-1] - out[0])
            elif kind == ObjectiveKind.ISM:
                grad = w * (eps - eps_null_s)
            elif kind == ObjectiveKind.VSD:
                assert state is not None and state.lora is not None
                state.passes += 1 if state.lora.guidance_scale == 1.0 else 2
                grad = w * (eps - state.lora.predict(self.predict_noise, noisy, t, cond, cameras))
            else:
                grad = w * (eps - noise)
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
        state: ObjectiveState | None = None,
    ) -> torch.Tensor:
        """A loss whose gradient w.r.t. the encoded images is the objective's gradient. A
        multi-view prior gets whole groups of views (views_per_group each) and one timestep per
        group. For VSD the LoRA then takes its own step on the detached latents."""
        latents = self.encode_images(images, generator)
        steps, group = len(self.alphas_cumprod), self.views_per_group
        if latents.shape[0] % group:
            raise ValueError(f"{latents.shape[0]} views are not whole groups of {group}")
        lo, hi = int(t_range[0] * steps), int(t_range[1] * steps)
        t = torch.randint(lo, max(lo, hi) + 1, (latents.shape[0] // group,), generator=generator).clamp_max(steps - 1)
        t = t.repeat_interleave(group)
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        grad = self.sds_grad(latents, embeddings, cameras, guidance_scale, t.to(self.device), noise, views, objective, state)
        if objective.kind == ObjectiveKind.VSD and state is not None and state.lora is not None:
            cond = self.conditions(embeddings, cameras, views)[1]
            state.lora_losses.append(state.lora.train_step(self.predict_noise, self.alphas_cumprod, latents.detach(), cond,
                                                           cameras, generator))
            state.passes += 1
        target = (latents - grad).detach()
        return 0.5 * F.mse_loss(latents.float(), target.float(), reduction="sum") / latents.shape[0]

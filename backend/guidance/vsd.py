"""Per-job state of a distillation objective, and ProlificDreamer's LoRA for VSD.

Variational score distillation (Wang et al., NeurIPS 2023) scores a render against a second
denoiser that learns the distribution of the job's own renders: a LoRA of the prior's UNet,
told the camera (its camera-to-world matrix through a small MLP into the UNet's class
embedding, as ProlificDreamer does), trained with the standard diffusion loss on the detached
renders by an optimiser of its own. The LoRA belongs to the job, not to the prior (a server
shares one prior between jobs): it wraps a copy of the UNet's modules that shares every frozen
weight with the prior, so it costs only its own parameters, gradients and Adam moments.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..cameras import Cameras

CAMERA_WIDTH = 16  # the flattened 4x4 camera-to-world matrix
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the attention projections, as ProlificDreamer adapts them


class CameraEmbedding(nn.Module):
    """The class embedding of the LoRA's UNet: the prior's own (of the labels it is given, if it
    takes any) plus the camera matrix through a two-layer MLP. The MLP's output layer starts at
    zero, so the LoRA starts as the pretrained prior."""

    def __init__(self, original: nn.Module | None, dim: int) -> None:
        super().__init__()
        self.original = original
        self.mlp = nn.Sequential(nn.Linear(CAMERA_WIDTH, dim), nn.SiLU(), nn.Linear(dim, dim))
        last = cast(nn.Linear, self.mlp[2])
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        out = self.mlp(labels[:, -CAMERA_WIDTH:].to(cast(nn.Linear, self.mlp[0]).weight.dtype))
        if self.original is not None:
            out = out + self.original(labels[:, :-CAMERA_WIDTH])
        return out


def camera_labels(labels: torch.Tensor | None, cameras: Cameras, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The class labels a CameraEmbedding reads: the prior's own labels (if any), then the cameras' c2w."""
    c2w = cameras.c2w.reshape(-1, CAMERA_WIDTH).to(device, dtype)
    return c2w if labels is None else torch.cat([labels.to(device, dtype), c2w], -1)


def lora_unet(unet: Any, rank: int, seed: int) -> Any:
    """A copy of `unet`'s modules sharing every weight and buffer with it, with LoRA layers of
    `rank` on its attention projections and a CameraEmbedding as its class embedding; only
    those require a gradient. Their initial values come from `seed` (a forked generator)."""
    from peft import LoraConfig, inject_adapter_in_model

    shared = {id(t): t for t in itertools.chain(unet.parameters(), unet.buffers())}
    copied: Any = copy.deepcopy(unet, shared)  # a diffusers UNet (untyped here)
    dim = unet.time_embedding.linear_2.out_features
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS), copied)
        embedding = CameraEmbedding(copied.class_embedding, dim)
    device = next(unet.parameters()).device
    copied.class_embedding = embedding.to(device)
    for name, p in copied.named_parameters():
        # peft keeps adapters in float32 on a half-precision base; the camera MLP is float32 too
        p.requires_grad_("lora_" in name or name.startswith("class_embedding.mlp."))
    if device.type == "cuda":
        # Stable Diffusion's training pass keeps up to 6.1 GB for its backward at 64x64 latents
        # (bench/vsd_memory.py), 0.3 GB checkpointed: the price of the 8 GB target is one more
        # forward of each block in the backward. The CPU keeps every activation (time is its limit).
        copied.enable_gradient_checkpointing()
    copied.train()
    return copied


# predict_noise(noisy, t, cond, cameras, unet=None): a prior's noise prediction, by `unet` when given
Predict = Callable[..., torch.Tensor]


@dataclass
class VSDLoRA:
    """The LoRA UNet of one job, its optimiser and its settings."""

    unet: nn.Module
    optimizer: torch.optim.Optimizer
    t_range: tuple[float, float]
    camera_dropout: float
    guidance_scale: float

    @classmethod
    def create(cls, unet: nn.Module, rank: int, lr: float, seed: int, t_range: tuple[float, float],
               camera_dropout: float, guidance_scale: float) -> VSDLoRA:
        lora = lora_unet(unet, rank, seed)
        trainable = [p for p in lora.parameters() if p.requires_grad]
        return cls(lora, torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0), t_range, camera_dropout, guidance_scale)

    def trainable(self) -> dict[str, torch.Tensor]:
        return {name: p for name, p in self.unet.named_parameters() if p.requires_grad}

    def predict(self, predict: Predict, noisy: torch.Tensor, t: torch.Tensor, cond: object, cameras: Cameras) -> torch.Tensor:
        """The LoRA's noise prediction for the renders' own distribution, with CFG over the
        camera (guidance_scale 1: the camera-conditioned prediction alone)."""
        with torch.no_grad():
            eps = predict(noisy, t, cond, cameras, unet=self.unet)
            if self.guidance_scale != 1.0:
                blind = predict(noisy, t, cond, no_camera(cameras), unet=self.unet)
                eps = blind + self.guidance_scale * (eps - blind)
        return eps

    def train_step(self, predict: Predict, alphas_cumprod: torch.Tensor, latents: torch.Tensor, cond: object,
                   cameras: Cameras, generator: torch.Generator) -> float:
        """One step of the standard diffusion loss ||eps_lora(x_t; y, c) - eps||^2 on the detached
        renders; a share `camera_dropout` of the samples sees no camera, so CFG over it works."""
        n, steps = latents.shape[0], len(alphas_cumprod)
        lo, hi = int(self.t_range[0] * steps), min(steps - 1, int(self.t_range[1] * steps))
        t = torch.randint(lo, hi + 1, (n,), generator=generator).to(latents.device)
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        keep = (torch.rand(n, generator=generator) >= self.camera_dropout).to(cameras.c2w)
        cameras = replace(cameras, c2w=cameras.c2w * keep.view(-1, 1, 1))
        a = alphas_cumprod[t].view(-1, *[1] * (latents.dim() - 1))
        noisy = a.sqrt() * latents.detach() + (1 - a).sqrt() * noise
        with torch.enable_grad():
            loss = F.mse_loss(predict(noisy, t, cond, cameras, unet=self.unet).float(), noise.float())
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def state_dict(self) -> dict:
        return {"lora": {k: v.detach().clone() for k, v in self.trainable().items()}, "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        params = self.trainable()
        if set(params) != set(state["lora"]):
            raise ValueError("the checkpoint's LoRA does not fit this prior's UNet")
        with torch.no_grad():
            for name, value in state["lora"].items():
                params[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])


def no_camera(cameras: Cameras) -> Cameras:
    """The same cameras with a zero camera matrix: the LoRA's "no camera" condition."""
    return replace(cameras, c2w=torch.zeros_like(cameras.c2w))


@dataclass
class ObjectiveState:
    """What an objective keeps across one job's steps: how far the run is (CSD anneals its
    negative weight along it), the denoiser passes spent (per view, to measure an objective's
    cost) and VSD's LoRA. Saved in the job's checkpoints, so a resume continues it."""

    steps: int = 1  # the run's length, for `progress`
    step: int = 0  # distillation calls so far
    passes: int = 0  # denoiser passes per view so far (a batch of B views through the UNet once counts 1)
    lora: VSDLoRA | None = None
    lora_losses: list[float] = field(default_factory=list)

    @property
    def progress(self) -> float:
        return min(1.0, self.step / max(1, self.steps))

    def state_dict(self) -> dict:
        return {"step": self.step, "passes": self.passes, "lora": None if self.lora is None else self.lora.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.passes = state["step"], state["passes"]
        if (state["lora"] is None) != (self.lora is None):
            raise ValueError("the checkpoint's objective state does not fit this job's objective")
        if self.lora is not None:
            self.lora.load_state_dict(state["lora"])

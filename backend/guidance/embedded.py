"""Guidance by the embedded prior: pixel space at 32x32, camera-conditioned."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import __version__
from ..cameras import Cameras
from ..prior import WEIGHTS_DIR
from ..prior.model import IMAGE_SIZE, EmbeddedPrior, camera_features
from ..recipe import ModelCard
from .base import Guidance, ModelLoadError, weight_hashes
from .traced import Traced
from .vsd import camera_labels


class EmbeddedGuidance(Guidance):
    """SDS against our own small prior; its "latents" are the render resized to 32x32 in [-1, 1]."""

    def __init__(self, card: ModelCard, path: str | Path = WEIGHTS_DIR, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.card = card
        try:
            self.prior = EmbeddedPrior.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f"cannot load the embedded prior from {path}: {exc}. Reinstall PromptMesh, or rebuild the "
                "weights with `promptmesh prior train`"
            ) from exc
        self.prior.requires_grad_(False).eval().to(device)
        self.views_per_group = self.prior.views_per_group
        # Channels-last convolutions: 12 % less UNet time per step on the CPU (bench/sds_speed.py).
        self.prior.unet.to(memory_format=torch.channels_last)
        self.denoise = Traced(self.prior.denoise)
        self.weights = {"source": str(path), "revision": f"promptmesh {__version__}" if Path(path) == WEIGHTS_DIR else None,
                        "sha256": weight_hashes(Path(path))}
        self.register_buffer("alphas_cumprod", self.prior.scheduler.alphas_cumprod.to(device, torch.float32), persistent=False)

    def check_prompt(self, text: str) -> None:
        self.prior.check_prompt(text)

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = F.interpolate(images, (IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
        return x * 2 - 1

    def encode_text(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.prior.encode_text(texts)

    def lora_base(self) -> nn.Module:
        return self.prior.unet

    def predict_noise(
        self, noisy: torch.Tensor, t: torch.Tensor, cond: tuple[torch.Tensor, torch.Tensor], cameras: Cameras,
        unet: nn.Module | None = None,
    ) -> torch.Tensor:
        states, pooled = cond
        features = camera_features(cameras, self.recipe.cameras).to(noisy.device)
        if unet is None:
            return self.prior.predict_noise(noisy, t, states, pooled, features, unet=self.denoise)

        def lora(noisy: torch.Tensor, t: torch.Tensor, states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            labels = camera_labels(labels, cameras, labels.dtype, labels.device)
            return unet(noisy, t, encoder_hidden_states=states, class_labels=labels, return_dict=False)[0]

        return self.prior.predict_noise(noisy, t, states, pooled, features, unet=lora)

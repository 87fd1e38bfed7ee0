"""Guidance by the embedded prior: pixel space at 32x32, camera-conditioned."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...shared.errors import PromptMeshError
from ...shared.vocab import ErrorCode
from .. import __version__
from ..cameras import Cameras
from ..prior import WEIGHTS_DIR
from ..prior.model import IMAGE_SIZE, EmbeddedPrior, camera_features
from ..prior.views import REFERENCE_CHANNELS
from ..recipe import ModelCard
from .base import Guidance, ModelLoadError, weight_hashes
from .traced import Traced
from .vsd import camera_labels
from .zero123 import ImageEmbeddings


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


class EmbeddedNovelView(EmbeddedGuidance):
    """The embedded novel-view prior (prior/views.py): the embedded prior's UNet told the
    reference picture on three more input channels, its caption always empty; dropped, the
    picture is zeros (its unconditional branch)."""

    image_size = IMAGE_SIZE

    def __init__(self, path: str | Path, device: torch.device | str = "cpu") -> None:
        try:
            card = ModelCard.load(Path(path))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot read the novel-view prior's card in {path}: {exc}") from exc
        super().__init__(card, path, device)
        channels = self.prior.unet.config.in_channels
        if channels != 3 + REFERENCE_CHANNELS:
            raise ModelLoadError(f"{path}: not a novel-view prior: its UNet takes {channels} channels, not a view's and a "
                                 f"picture's ({3 + REFERENCE_CHANNELS}); `promptmesh prior train-views` makes one")
        with torch.no_grad():
            self.empty = self.prior.encode_text([""])

    def check_prompt(self, text: str) -> None:
        raise PromptMeshError("a novel-view prior reads a picture, not text", ErrorCode.BAD_REQUEST)

    @torch.no_grad()
    def embed_image(self, image: torch.Tensor, elevation: float, distance: float, fov: float,
                    half_extent: float) -> ImageEmbeddings:
        """The picture [1, 3, H, W] in 0..1 on white, framed as the prior's renders (the
        camera's figures are unused: the prior learnt the front camera, its elevation read
        from the picture)."""
        x = F.interpolate(image.to(self.device), (IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True,
                          align_corners=False) * 2 - 1
        states, pooled = self.empty
        keep = torch.ones(1, 1, device=self.device)
        return ImageEmbeddings((states, pooled, x, keep), (states, pooled, torch.zeros_like(x), keep * 0))

    def predict_noise(self, noisy: torch.Tensor, t: torch.Tensor, cond: tuple[torch.Tensor, ...], cameras: Cameras,
                      unet: nn.Module | None = None) -> torch.Tensor:
        states, pooled, picture, keep = cond
        x = torch.cat([noisy, picture * keep.view(-1, 1, 1, 1)], 1)
        return super().predict_noise(x, t, (states, pooled), cameras, unet)

"""Zero-1-to-3's conditioning (Liu et al. 2023, "Zero-1-to-3: Zero-shot One Image to 3D
Object", section 3.2), written from the paper: the denoiser of a view of an object is
conditioned on another view of it, the input image, and the relative camera between the two.

- The relative camera in spherical coordinates: polar angle theta (from the up axis, so
  theta = 90 - elevation), azimuth phi and radius r of each camera about the object; the model
  takes (delta theta, sin delta phi, cos delta phi, delta r), the azimuth through its sine and
  cosine because it wraps around.
- High-level semantics: the input image's CLIP image embedding concatenated with that camera
  vector ("posed CLIP embedding") and projected back to the embedding's width, the
  cross-attention's context (one token).
- Low-level detail: the input image's latent (VAE encoding) concatenated to the noisy latent
  along channels, so the UNet takes 8 channels.
- Classifier-free guidance drops both: the unconditional branch has a zero context and a zero
  image latent.

`NovelViewGuidance` loads a Zero-1-to-3 checkpoint in diffusers layout (unet, vae,
image_encoder, clip_camera_projection, scheduler: the catalogue's `zero123-xl`) and distils
through the one SDS code (base.Guidance.sds_grad): the reference image is its "prompt"
(`ImageEmbeddings`), each view's camera its relative pose. No weights ship here; the tests
build a tiny randomly initialised copy in that layout.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...shared.errors import PromptMeshError
from ...shared.vocab import ErrorCode
from ..cameras import Cameras
from ..prompts import PromptEmbeddings, cat_cond
from .base import Guidance, ModelLoadError
from .stable_diffusion import load_failure, open_source, provenance

CAMERA_FEATURES = 4  # delta polar angle (radians), sin and cos of delta azimuth, delta radius
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's image normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def relative_camera(elevation: torch.Tensor, azimuth: torch.Tensor, distance: torch.Tensor,
                    ref_elevation: torch.Tensor | float = 0.0, ref_azimuth: torch.Tensor | float = 0.0,
                    ref_distance: torch.Tensor | float = 0.0) -> torch.Tensor:
    """[B, 4] (delta theta, sin delta phi, cos delta phi, delta r) of target cameras (degrees,
    our elevation above the horizon) relative to the input image's camera. theta is the polar
    angle, 90 - elevation, so a camera raised by e degrees has delta theta = -e in radians."""
    d_theta = -torch.deg2rad(torch.as_tensor(elevation, dtype=torch.float32) - ref_elevation)
    d_phi = torch.deg2rad(torch.as_tensor(azimuth, dtype=torch.float32) - ref_azimuth)
    d_r = torch.as_tensor(distance, dtype=torch.float32) - ref_distance
    return torch.stack([d_theta, torch.sin(d_phi), torch.cos(d_phi), d_r], -1)


class PosedImageEmbedding(nn.Module):
    """The posed CLIP embedding: [image embedding, camera] -> a linear projection back to the
    embedding's width, as one cross-attention token. It starts as the identity on the image
    embedding and zero on the camera, so a UNet fine-tuned from an image-conditioned one begins
    with the conditioning it knows. Its parameter names and config.json keys are those of the
    released diffusers checkpoints' `clip_camera_projection` folder (`proj`; `embedding_dim`,
    `additional_embeddings`), so their weights load as they are."""

    def __init__(self, width: int, additional: int = CAMERA_FEATURES) -> None:
        super().__init__()
        self.proj = nn.Linear(width + additional, width)
        with torch.no_grad():
            self.proj.weight.zero_()
            self.proj.weight[:, :width].copy_(torch.eye(width))
            self.proj.bias.zero_()

    def forward(self, image_embeds: torch.Tensor, camera: torch.Tensor) -> torch.Tensor:
        """[B, width] and [B, 4] -> [B, 1, width]."""
        return self.proj(torch.cat([image_embeds, camera.to(image_embeds)], -1))[:, None]

    @classmethod
    def load(cls, folder: Path) -> PosedImageEmbedding:
        """From a `clip_camera_projection` folder: config.json and its safetensors weights; a
        missing file or a weight of another name or shape is a ModelLoadError that says which."""
        from safetensors.torch import load_file

        try:
            config = json.loads((folder / "config.json").read_text())
            weights = sorted(folder.glob("*.safetensors"))
            if not weights:
                raise FileNotFoundError(f"no .safetensors weights in {folder}")
            module = cls(int(config["embedding_dim"]), int(config["additional_embeddings"]))
            module.load_state_dict({k: v.float() for k, v in load_file(weights[0]).items()})
        except (OSError, KeyError, ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"cannot load the camera projection from {folder}: {' '.join(str(exc).split())}") from exc
        return module


def clip_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """[B, 3, H, W] display colour in 0..1 -> CLIP's input: `size` square, normalised."""
    x = F.interpolate(images, (size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    return (x - mean) / std


ZERO123_COMPONENTS = ("unet", "vae", "image_encoder", "clip_camera_projection", "scheduler")
UNIT_HALF_EXTENT = 0.5  # Zero-1-to-3's objects fit a unit cube: its radii are in those units


class ImageEmbeddings(PromptEmbeddings):
    """The reference image as a novel-view prior's prompt: every view word's row and the
    prompt's are the image's condition `image`, the negative and the null prompt's the
    unconditional one `null` (rows of one row each, as the prior's predict_noise reads them)."""

    def __init__(self, image: tuple[torch.Tensor, ...], null: tuple[torch.Tensor, ...]) -> None:
        super().__init__("<reference image>", "", lambda texts: cat_cond(*(image if t else null for t in texts)))


class NovelViewGuidance(Guidance):
    """Zero-1-to-3 as a prior for score distillation: renders are resized to its image size
    (256 for the released checkpoints), VAE-encoded and scored by its 8-channel UNet given the
    reference image and each view's camera relative to the reference's. fp16 on CUDA. It has no
    card: the image job's recipe (ReferenceSettings) holds the joint prior's settings."""

    def __init__(self, model: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> None:
        super().__init__()
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPVisionModelWithProjection

        device = torch.device(device)
        self.dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        source = open_source(model, ZERO123_COMPONENTS)
        try:
            local_only = source.local_only
            self.unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=self.dtype,
                                                             local_files_only=local_only)
            self.vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=self.dtype, local_files_only=local_only)
            self.image_encoder = CLIPVisionModelWithProjection.from_pretrained(
                model, subfolder="image_encoder", torch_dtype=self.dtype, local_files_only=local_only)
            scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler", local_files_only=source.local_only)
        except (OSError, ValueError) as exc:
            raise load_failure(model, source.local, exc, "a Zero-1-to-3 novel-view prior") from exc
        folder = source.folder if source.folder is not None else _downloaded(model)
        self.posed = PosedImageEmbedding.load(folder / "clip_camera_projection")
        channels = self.unet.config.in_channels
        if channels != 2 * self.vae.config.latent_channels:
            raise ModelLoadError(f"{model}: not a Zero-1-to-3 UNet: it takes {channels} channels, not the noisy latents and "
                                 f"the image's ({2 * self.vae.config.latent_channels})")
        for module in (self.unet, self.vae, self.image_encoder, self.posed):
            module.requires_grad_(False).eval().to(device)
        self.posed.to(self.dtype)
        self.weights = provenance(model, source.local, ("unet", "vae", "image_encoder", "clip_camera_projection"))
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.to(device, torch.float32), persistent=False)
        self.image_size = self.unet.config.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.scaling_factor = self.vae.config.scaling_factor

    def check_prompt(self, text: str) -> None:
        raise PromptMeshError("a novel-view prior reads an image, not text", ErrorCode.BAD_REQUEST)

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = F.interpolate(images, (self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return self.vae.encode((x * 2 - 1).to(self.dtype)).latent_dist.sample(generator=generator) * self.scaling_factor

    @torch.no_grad()
    def embed_image(self, image: torch.Tensor, elevation: float, distance: float, fov: float,
                    half_extent: float) -> ImageEmbeddings:
        """The condition of a reference image [1, 3, H, W] (display colour in 0..1 on white, the
        object centred as the prior's training images frame theirs) seen from the front camera
        at `elevation` degrees, `distance` and vertical field of view `fov` degrees, of an
        object `half_extent` across (half, in the scene's units): (embedding [W], image latents
        [C, h, w], that camera (elevation and azimuth in degrees, distance, field of view in
        radians) and the scale to Zero-1-to-3's units [5], kept 1 or dropped 0 [1]). Its latents
        are the VAE posterior's mode, unscaled (as the released checkpoints were trained)."""
        x = F.interpolate(image.to(self.device), (self.image_size, self.image_size), mode="bilinear", align_corners=False)
        size = int(self.image_encoder.config.image_size)  # type: ignore[arg-type]  # an int in every CLIP vision config
        embeds = self.image_encoder(pixel_values=clip_pixels(x, size).to(self.dtype)).image_embeds
        latents = self.vae.encode((x * 2 - 1).to(self.dtype)).latent_dist.mode()
        pose = torch.tensor([[elevation, 0.0, distance, math.radians(fov), UNIT_HALF_EXTENT / half_extent]],
                            device=self.device)
        keep = torch.ones(1, 1, device=self.device)
        image_row = (embeds.float(), latents.float(), pose, keep)
        # unconditional: zero context and zero image latents (the pose stays finite: the zeros are multiplied in)
        return ImageEmbeddings(image_row, (torch.zeros_like(image_row[0]), torch.zeros_like(image_row[1]), pose, keep * 0))

    def predict_noise(self, noisy: torch.Tensor, t: torch.Tensor, cond: tuple[torch.Tensor, ...], cameras: Cameras,
                      unet: nn.Module | None = None) -> torch.Tensor:
        """Each row's camera relative to its reference: the distance taken at the reference's
        field of view (the same framing at the same distance) and in the units of an object
        that fits a unit cube. A dropped row sees a zero context and zero image latents."""
        if unet is not None:
            raise NotImplementedError("a novel-view prior takes no LoRA (vsd)")
        embeds, latents, pose, keep = cond
        ref_elevation, ref_azimuth, ref_distance, ref_fov, scale = pose.unbind(-1)
        framed = cameras.distance.to(pose) * torch.tan(cameras.fovy.to(pose) / 2) / torch.tan(ref_fov / 2)
        camera = relative_camera(cameras.elevation.to(pose), cameras.azimuth.to(pose), framed * scale, ref_elevation,
                                 ref_azimuth, ref_distance * scale).to(pose.device)
        context = self.posed(embeds.to(self.dtype), camera.to(self.dtype)) * keep.view(-1, 1, 1).to(self.dtype)
        sample = torch.cat([noisy, latents * keep.view(-1, 1, 1, 1)], 1).to(self.dtype)
        with torch.no_grad():
            return self.unet(sample, t, encoder_hidden_states=context).sample.float()


def _downloaded(model: str) -> Path:
    from .stable_diffusion import _snapshot

    folder = _snapshot(model)
    if folder is None:
        raise ModelLoadError(f"{model} is not in the Hugging Face cache after loading it")
    return folder

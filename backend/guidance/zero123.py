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

No weights ship here (the released checkpoints' licences are for the catalogue to state); the
tests build a tiny randomly initialised UNet and CLIP vision model and check the wiring.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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
    with the conditioning it knows."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.projection = nn.Linear(width + CAMERA_FEATURES, width)
        with torch.no_grad():
            self.projection.weight.zero_()
            self.projection.weight[:, :width].copy_(torch.eye(width))
            self.projection.bias.zero_()

    def forward(self, image_embeds: torch.Tensor, camera: torch.Tensor) -> torch.Tensor:
        """[B, width] and [B, 4] -> [B, 1, width]."""
        return self.projection(torch.cat([image_embeds, camera.to(image_embeds)], -1))[:, None]


def clip_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """[B, 3, H, W] display colour in 0..1 -> CLIP's input: `size` square, normalised."""
    x = F.interpolate(images, (size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    return (x - mean) / std


def guided_noise(unet: nn.Module, posed: PosedImageEmbedding, noisy: torch.Tensor, t: torch.Tensor,
                 image_embeds: torch.Tensor, image_latents: torch.Tensor, camera: torch.Tensor,
                 guidance_scale: float) -> torch.Tensor:
    """Zero-1-to-3's guided noise prediction for latents `noisy` [B, C, h, w] of the target
    views: the conditional branch sees the posed embedding and the input image's latents [B, C,
    h, w] concatenated on channels; the unconditional one a zero context and zero latents;
    uncond + s * (cond - uncond). `unet` is a diffusers UNet2DConditionModel with 2C input
    channels and the embedding's width as its cross-attention dimension."""
    context = posed(image_embeds, camera)
    sample = torch.cat([torch.cat([noisy, image_latents], 1), torch.cat([noisy, torch.zeros_like(image_latents)], 1)])
    states = torch.cat([context, torch.zeros_like(context)])
    eps_cond, eps_uncond = unet(sample, torch.cat([t, t]), encoder_hidden_states=states).sample.chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


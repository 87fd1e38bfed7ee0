"""Zero-1-to-3's conditioning (backend/guidance/zero123.py) on a tiny randomly initialised UNet
and CLIP vision model built here: the relative camera, the posed embedding and the 8-channel
input each reach the noise prediction, and classifier-free guidance drops both."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from promptmesh.backend.guidance.zero123 import PosedImageEmbedding, clip_pixels, guided_noise, relative_camera

WIDTH = 32


@pytest.fixture(scope="module")
def tiny() -> tuple[UNet2DConditionModel, CLIPVisionModelWithProjection, PosedImageEmbedding]:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=8, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=WIDTH, attention_head_dim=8, norm_num_groups=8,
    ).eval()
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, image_size=32, patch_size=8,
        projection_dim=WIDTH)).eval()
    posed = PosedImageEmbedding(WIDTH)
    with torch.no_grad():  # a trained projection mixes the camera in; the identity start ignores it
        posed.projection.weight.add_(torch.randn_like(posed.projection.weight) * 0.5)
    return unet, clip, posed


def test_the_relative_camera_is_polar_angle_sine_cosine_azimuth_and_radius():
    same = relative_camera(torch.tensor([20.0]), torch.tensor([30.0]), torch.tensor([2.0]), 20.0, 30.0, 2.0)
    assert torch.allclose(same, torch.tensor([[0.0, 0.0, 1.0, 0.0]]), atol=1e-6)
    right = relative_camera(torch.tensor([0.0]), torch.tensor([90.0]), torch.tensor([2.5]), 0.0, 0.0, 2.0)
    assert torch.allclose(right, torch.tensor([[0.0, 1.0, 0.0, 0.5]]), atol=1e-6)
    up = relative_camera(torch.tensor([30.0]), torch.tensor([0.0]), torch.tensor([2.0]), 0.0, 0.0, 2.0)
    assert math.isclose(float(up[0, 0]), -math.pi / 6, rel_tol=1e-6)  # raised 30 degrees: the polar angle shrinks
    around = relative_camera(torch.tensor([0.0]), torch.tensor([370.0]), torch.tensor([2.0]), 0.0, 0.0, 2.0)
    assert torch.allclose(around, relative_camera(torch.tensor([0.0]), torch.tensor([10.0]), torch.tensor([2.0]), 0.0, 0.0,
                                                  2.0), atol=1e-6)


def test_the_posed_embedding_starts_as_the_image_embedding_alone():
    posed = PosedImageEmbedding(WIDTH)
    e = torch.randn(3, WIDTH)
    cams = relative_camera(torch.tensor([0.0, 10, 40]), torch.tensor([0.0, 90, 200]), torch.tensor([2.0, 2, 3]))
    out = posed(e, cams)
    assert out.shape == (3, 1, WIDTH) and torch.allclose(out[:, 0], e, atol=1e-6)


@torch.no_grad()
def test_the_camera_and_the_input_image_reach_the_noise_and_guidance_drops_both(tiny):
    unet, clip, posed = tiny
    g = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 48, 48, generator=g)
    embeds = clip(pixel_values=clip_pixels(image, clip.config.image_size)).image_embeds
    assert embeds.shape == (1, WIDTH)
    latents, noisy = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    t = torch.tensor([500])
    side = relative_camera(torch.tensor([0.0]), torch.tensor([90.0]), torch.tensor([2.0]))
    back = relative_camera(torch.tensor([0.0]), torch.tensor([180.0]), torch.tensor([2.0]))

    def eps(camera, image_latents=latents, scale=3.0, image_embeds=embeds):
        return guided_noise(unet, posed, noisy, t, image_embeds, image_latents, camera, scale)

    base = eps(side)
    assert base.shape == (1, 4, 8, 8) and torch.isfinite(base).all()
    assert not torch.allclose(base, eps(back), atol=1e-4)  # the relative camera matters
    assert not torch.allclose(base, eps(side, image_latents=latents + 1), atol=1e-4)  # so does the input's latent
    assert not torch.allclose(base, eps(side, image_embeds=embeds + 1), atol=1e-4)  # and its CLIP embedding
    # guidance scale 0: the unconditional branch alone, which sees neither camera nor image
    assert torch.allclose(eps(side, scale=0.0), eps(back, image_latents=latents + 1, scale=0.0), atol=1e-5)
    # scale 1: the conditional branch alone, as the UNet computes it from 8 channels and the posed token
    direct = unet(torch.cat([noisy, latents], 1), t, encoder_hidden_states=posed(embeds, side)).sample
    assert torch.allclose(eps(side, scale=1.0), direct, atol=1e-5)

"""Build a tiny randomly initialised Zero-1-to-3 and save it in the released checkpoints'
diffusers layout (bennyguo/zero123-xl-diffusers): unet/ (8 input channels), vae/,
image_encoder/ (CLIP vision with projection), clip_camera_projection/ (config.json and fp16
safetensors of one `proj` linear layer, as the release has them), scheduler/ and
model_index.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

WIDTH = 32  # the tiny CLIP embedding's width, the UNet's cross-attention width
TINY_UNET: dict[str, Any] = dict(
    sample_size=8, in_channels=8, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=WIDTH, attention_head_dim=8, norm_num_groups=8)
TINY_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
    block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4)
TINY_VISION: dict[str, Any] = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                                   image_size=32, patch_size=8, projection_dim=WIDTH)


def save_zero123(root: Path, unet: dict[str, Any], vae: dict[str, Any], vision: dict[str, Any], seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> Path:
    """A random Zero-1-to-3 of these component configurations (diffusers' and transformers'
    own keywords) in the release's layout, its weights in `dtype`, one component in memory at a time."""
    torch.manual_seed(seed)
    UNet2DConditionModel(**unet).to(dtype).save_pretrained(root / "unet")
    AutoencoderKL(**vae).to(dtype).save_pretrained(root / "vae")
    CLIPVisionModelWithProjection(CLIPVisionConfig(**vision)).to(dtype).save_pretrained(root / "image_encoder")
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  clip_sample=False, set_alpha_to_one=False).save_pretrained(root / "scheduler")
    width = vision["projection_dim"]
    projection = root / "clip_camera_projection"
    projection.mkdir(parents=True)
    (projection / "config.json").write_text(json.dumps(
        {"_class_name": "CLIPCameraProjection", "_diffusers_version": "0.16.0", "additional_embeddings": 4,
         "embedding_dim": width}))
    save_file({"proj.weight": (torch.randn(width, width + 4) * 0.3).half(), "proj.bias": (torch.randn(width) * 0.1).half()},
              str(projection / "diffusion_pytorch_model.safetensors"))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "Zero1to3StableDiffusionPipeline"}))
    return root


def save_tiny_zero123(root: Path, seed: int = 0) -> Path:
    return save_zero123(root, TINY_UNET, TINY_VAE, TINY_VISION, seed)

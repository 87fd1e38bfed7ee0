"""MVDream's released checkpoint as a diffusers folder: `promptmesh models convert-mvdream`.

The Hub repository MVDream/MVDream holds `sd-v2.1-base-4view.pt`, a pickled state dict with the
original latent-diffusion key names: the UNet under `model.diffusion_model.` (with the camera
embedding `camera_embed.0/2`: linear, SiLU, linear), the VAE under `first_stage_model.` and the
OpenCLIP text encoder under `cond_stage_model.model.`. diffusers' own single-file conversion
functions map the keys; the camera embedding becomes the UNet's projection class embedding,
and the UNet is made a 4-view denoiser (backend/multiview.py). The tokenizer is Stable
Diffusion 2.1's (MVDream is fine-tuned from it and the checkpoint holds none).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from ..shared.errors import PromptMeshError
from ..shared.result import atomic_folder
from ..shared.vocab import ErrorCode
from .multiview import make_multiview
from .recipe import CARDS_DIR, ModelCard

UNET_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "cond_stage_model.model."
VIEWS = 4
CAMERA_DIM = 16  # the flattened 4x4 camera-to-world matrix (cameras.mvdream_cameras)
# MVDream's published configuration of its SD 2.1-base model (mvdream/configs/sd-v2-base.yaml),
# in the shape diffusers' conversion functions read.
ORIGINAL_CONFIG: dict[str, Any] = {"model": {"params": {
    "linear_start": 0.00085, "linear_end": 0.0120, "timesteps": 1000, "scale_factor": 0.18215,
    "parameterization": "eps",
    "unet_config": {"params": {
        "image_size": 32,  # the latent size of its 256 px training images
        "in_channels": 4, "out_channels": 4, "model_channels": 320,
        "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4],
        "num_head_channels": 64, "use_spatial_transformer": True, "use_linear_in_transformer": True,
        "transformer_depth": 1, "context_dim": 1024, "legacy": False, "camera_dim": CAMERA_DIM}},
    "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": {
        "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
        "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}}},
}}}


class ConversionError(PromptMeshError):
    code = ErrorCode.BAD_REQUEST


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of an original-layout checkpoint, loaded without running pickled code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConversionError(f"cannot read {path} as a PyTorch checkpoint of tensors: {exc}") from exc
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not any(k.startswith(UNET_PREFIX) for k in state):
        raise ConversionError(f"{path} holds no latent-diffusion UNet (no keys under {UNET_PREFIX!r})")
    if f"{UNET_PREFIX}camera_embed.0.weight" not in state:
        raise ConversionError(f"{path} is a latent-diffusion checkpoint without MVDream's camera embedding")
    return state


def unet_config(config: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The diffusers UNet configuration of an original configuration, with the camera input."""
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    out = create_unet_diffusers_config_from_ldm(config, state)
    # The latent size it was trained at (32: MVDream's 256 px images); diffusers would take SD 2's 64.
    out.update(class_embed_type="projection", projection_class_embeddings_input_dim=CAMERA_DIM,
               sample_size=config["model"]["params"]["unet_config"]["params"]["image_size"])
    return out


def convert_unet(state: dict[str, torch.Tensor], config: dict[str, Any]) -> Any:
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet_config_ = unet_config(config, state)
    # MVDream's camera embedding has the layout of latent diffusion's label embedding: rename it so.
    renamed = {k.replace(f"{UNET_PREFIX}camera_embed.", f"{UNET_PREFIX}label_emb.0."): v for k, v in state.items()}
    weights = convert_ldm_unet_checkpoint(renamed, unet_config_)
    unet = UNet2DConditionModel(**unet_config_)
    unet.load_state_dict(weights, strict=True)
    return make_multiview(unet, VIEWS)


def convert_vae(state: dict[str, torch.Tensor], config: dict[str, Any]) -> Any:
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm

    vae_config = create_vae_diffusers_config_from_ldm(config, state)
    vae = AutoencoderKL(**vae_config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(state, vae_config), strict=True)
    return vae


def convert_text_encoder(state: dict[str, torch.Tensor]) -> Any:
    """OpenCLIP's text tower as a CLIPTextModel without its last layer: Stable Diffusion 2 reads
    the penultimate layer, so diffusers' SD 2 text encoders stop there."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    embedding = state[f"{TEXT_PREFIX}token_embedding.weight"]
    layers = len({k.split(".")[4] for k in state if k.startswith(f"{TEXT_PREFIX}transformer.resblocks.")})
    width, mlp = int(embedding.shape[1]), state[f"{TEXT_PREFIX}transformer.resblocks.0.mlp.c_fc.weight"]
    config = CLIPTextConfig(
        vocab_size=int(embedding.shape[0]), hidden_size=width, num_hidden_layers=layers - 1,
        num_attention_heads=width // 64, intermediate_size=int(mlp.shape[0]),
        max_position_embeddings=int(state[f"{TEXT_PREFIX}positional_embedding"].shape[0]), hidden_act="gelu",
        projection_dim=width, bos_token_id=int(embedding.shape[0]) - 2, eos_token_id=int(embedding.shape[0]) - 1,
        pad_token_id=1,  # CLIP's vocabulary ends with its start and end tokens (49406, 49407)
    )
    model = CLIPTextModel(config)
    prefix = "text_model." if any(k.startswith("text_model.") for k in model.state_dict()) else ""
    weights = {k.removeprefix("text_model.") if not prefix else k: v
               for k, v in convert_open_clip_checkpoint(model, state).items()}
    skip = (f"{prefix}encoder.layers.{layers - 1}.", f"{prefix}embeddings.position_ids")
    weights = {k: v for k, v in weights.items() if not k.startswith(skip)}
    model.load_state_dict(weights, strict=False)  # position_ids is a buffer transformers fills itself
    expected = {k for k in model.state_dict() if not k.startswith(skip)}
    if set(weights) != expected:
        raise ConversionError(f"text encoder keys do not match: missing {sorted(expected - set(weights))[:5]}, "
                              f"unexpected {sorted(set(weights) - expected)[:5]}")
    return model


def convert(checkpoint: Path, out: Path, tokenizer: Path, config: dict[str, Any] = ORIGINAL_CONFIG) -> Path:
    """Write a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
    scheduler/) for the checkpoint at `out`, whole or not at all; `tokenizer` is a folder with
    Stable Diffusion 2.1's tokenizer files."""
    from diffusers import DDPMScheduler

    if not (tokenizer / "tokenizer_config.json").is_file() and not (tokenizer / "vocab.json").is_file():
        raise ConversionError(f"{tokenizer} holds no tokenizer files (vocab.json / tokenizer_config.json)")
    state = read_checkpoint(checkpoint)
    params = config["model"]["params"]
    unet, vae, text_encoder = convert_unet(state, config), convert_vae(state, config), convert_text_encoder(state)
    scheduler = DDPMScheduler(num_train_timesteps=params["timesteps"], beta_start=params["linear_start"],
                              beta_end=params["linear_end"], beta_schedule="scaled_linear", prediction_type="epsilon",
                              clip_sample=False)

    def save(folder: Path) -> None:
        unet.save_pretrained(folder / "unet")
        vae.save_pretrained(folder / "vae")
        text_encoder.save_pretrained(folder / "text_encoder")
        scheduler.save_pretrained(folder / "scheduler")
        shutil.copytree(tokenizer, folder / "tokenizer")
        index = {"_class_name": "StableDiffusionPipeline", "_promptmesh": {"source": checkpoint.name, "views": VIEWS}}
        (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        ModelCard.load(CARDS_DIR / "mvdream.json").save(folder)  # MVDream's published settings

    return atomic_folder(out, save)

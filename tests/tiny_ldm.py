"""A tiny randomly initialised checkpoint in the original latent-diffusion key layout (as MVDream
releases its model): the UNet of openaimodel.py with MVDream's camera embedding, the VAE of
ldm's autoencoder and the OpenCLIP text tower, each tensor distinct, written from the layout
rules of those modules (not from diffusers' conversion tables, which the test checks)."""

from __future__ import annotations

from typing import Any

import torch

CH, MULT, CONTEXT, CAMERA = 32, (1, 2), 64, 16  # UNet: attention at the first level only
VAE_CH, VAE_MULT = 32, (1, 2)
TEXT_WIDTH, TEXT_LAYERS, VOCAB, TOKENS = 64, 3, 100, 16

CONFIG: dict[str, Any] = {"model": {"params": {
    "linear_start": 0.00085, "linear_end": 0.0120, "timesteps": 1000, "scale_factor": 0.18215,
    "unet_config": {"params": {
        "image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": CH, "attention_resolutions": [1],
        "num_res_blocks": 1, "channel_mult": list(MULT), "num_head_channels": 8, "use_spatial_transformer": True,
        "use_linear_in_transformer": True, "transformer_depth": 1, "context_dim": CONTEXT, "legacy": False,
        "camera_dim": CAMERA}},
    "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": {
        "double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": VAE_CH,
        "ch_mult": list(VAE_MULT), "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}},
}}}


def _linear(out: dict, name: str, n_out: int, n_in: int, bias: bool = True) -> None:
    out[f"{name}.weight"] = (n_out, n_in)
    if bias:
        out[f"{name}.bias"] = (n_out,)


def _conv(out: dict, name: str, n_out: int, n_in: int, k: int = 3) -> None:
    out[f"{name}.weight"], out[f"{name}.bias"] = (n_out, n_in, k, k), (n_out,)


def _norm(out: dict, name: str, n: int) -> None:
    out[f"{name}.weight"], out[f"{name}.bias"] = (n,), (n,)


def _res(out: dict, name: str, c_in: int, c_out: int) -> None:
    _norm(out, f"{name}.in_layers.0", c_in)
    _conv(out, f"{name}.in_layers.2", c_out, c_in)
    _linear(out, f"{name}.emb_layers.1", c_out, 4 * CH)
    _norm(out, f"{name}.out_layers.0", c_out)
    _conv(out, f"{name}.out_layers.3", c_out, c_out)
    if c_in != c_out:
        _conv(out, f"{name}.skip_connection", c_out, c_in, 1)


def _transformer(out: dict, name: str, c: int) -> None:
    _norm(out, f"{name}.norm", c)
    _linear(out, f"{name}.proj_in", c, c)
    block = f"{name}.transformer_blocks.0"
    for attn, kv in (("attn1", c), ("attn2", CONTEXT)):
        _linear(out, f"{block}.{attn}.to_q", c, c, bias=False)
        _linear(out, f"{block}.{attn}.to_k", c, kv, bias=False)
        _linear(out, f"{block}.{attn}.to_v", c, kv, bias=False)
        _linear(out, f"{block}.{attn}.to_out.0", c, c)
    _linear(out, f"{block}.ff.net.0.proj", 8 * c, c)  # GEGLU: two halves of 4c
    _linear(out, f"{block}.ff.net.2", c, 4 * c)
    for i in (1, 2, 3):
        _norm(out, f"{block}.norm{i}", c)
    _linear(out, f"{name}.proj_out", c, c)


def unet_shapes() -> dict[str, tuple]:
    s: dict[str, tuple] = {}
    _linear(s, "time_embed.0", 4 * CH, CH)
    _linear(s, "time_embed.2", 4 * CH, 4 * CH)
    _linear(s, "camera_embed.0", 4 * CH, CAMERA)
    _linear(s, "camera_embed.2", 4 * CH, 4 * CH)
    _conv(s, "input_blocks.0.0", CH, 4)
    chans, ch, i, ds = [CH], CH, 1, 1
    for level, mult in enumerate(MULT):
        _res(s, f"input_blocks.{i}.0", ch, CH * mult)
        ch = CH * mult
        if ds == 1:
            _transformer(s, f"input_blocks.{i}.1", ch)
        chans.append(ch)
        i += 1
        if level < len(MULT) - 1:
            _conv(s, f"input_blocks.{i}.0.op", ch, ch)
            chans.append(ch)
            i, ds = i + 1, ds * 2
    _res(s, "middle_block.0", ch, ch)
    _transformer(s, "middle_block.1", ch)
    _res(s, "middle_block.2", ch, ch)
    i = 0
    for level, mult in reversed(list(enumerate(MULT))):
        for r in range(2):  # num_res_blocks + 1
            _res(s, f"output_blocks.{i}.0", ch + chans.pop(), CH * mult)
            ch = CH * mult
            parts = 1
            if ds == 1:
                _transformer(s, f"output_blocks.{i}.1", ch)
                parts = 2
            if level and r == 1:
                _conv(s, f"output_blocks.{i}.{parts}.conv", ch, ch)
                ds //= 2
            i += 1
    _norm(s, "out.0", ch)
    _conv(s, "out.2", 4, ch)
    return {f"model.diffusion_model.{k}": v for k, v in s.items()}


def _vae_res(out: dict, name: str, c_in: int, c_out: int) -> None:
    _norm(out, f"{name}.norm1", c_in)
    _conv(out, f"{name}.conv1", c_out, c_in)
    _norm(out, f"{name}.norm2", c_out)
    _conv(out, f"{name}.conv2", c_out, c_out)
    if c_in != c_out:
        _conv(out, f"{name}.nin_shortcut", c_out, c_in, 1)


def _vae_mid(out: dict, name: str, c: int) -> None:
    _vae_res(out, f"{name}.block_1", c, c)
    _norm(out, f"{name}.attn_1.norm", c)
    for p in ("q", "k", "v", "proj_out"):
        _conv(out, f"{name}.attn_1.{p}", c, c, 1)
    _vae_res(out, f"{name}.block_2", c, c)


def vae_shapes() -> dict[str, tuple]:
    s: dict[str, tuple] = {}
    _conv(s, "encoder.conv_in", VAE_CH, 3)
    ch = VAE_CH
    for level, mult in enumerate(VAE_MULT):
        _vae_res(s, f"encoder.down.{level}.block.0", ch, VAE_CH * mult)
        ch = VAE_CH * mult
        if level < len(VAE_MULT) - 1:
            _conv(s, f"encoder.down.{level}.downsample.conv", ch, ch)
    _vae_mid(s, "encoder.mid", ch)
    _norm(s, "encoder.norm_out", ch)
    _conv(s, "encoder.conv_out", 8, ch)
    _conv(s, "quant_conv", 8, 8, 1)
    _conv(s, "post_quant_conv", 4, 4, 1)
    _conv(s, "decoder.conv_in", ch, 4)
    _vae_mid(s, "decoder.mid", ch)
    for level, mult in reversed(list(enumerate(VAE_MULT))):
        for b in range(2):
            _vae_res(s, f"decoder.up.{level}.block.{b}", ch, VAE_CH * mult)
            ch = VAE_CH * mult
        if level:
            _conv(s, f"decoder.up.{level}.upsample.conv", ch, ch)
    _norm(s, "decoder.norm_out", ch)
    _conv(s, "decoder.conv_out", 3, ch)
    return {f"first_stage_model.{k}": v for k, v in s.items()}


def text_shapes() -> dict[str, tuple]:
    w = TEXT_WIDTH
    s: dict[str, tuple] = {"token_embedding.weight": (VOCAB, w), "positional_embedding": (TOKENS, w),
                           "text_projection": (w, w), "logit_scale": ()}
    for i in range(TEXT_LAYERS):
        block = f"transformer.resblocks.{i}"
        _norm(s, f"{block}.ln_1", w)
        s[f"{block}.attn.in_proj_weight"], s[f"{block}.attn.in_proj_bias"] = (3 * w, w), (3 * w,)
        _linear(s, f"{block}.attn.out_proj", w, w)
        _norm(s, f"{block}.ln_2", w)
        _linear(s, f"{block}.mlp.c_fc", 4 * w, w)
        _linear(s, f"{block}.mlp.c_proj", w, 4 * w)
    _norm(s, "ln_final", w)
    return {f"cond_stage_model.model.{k}": v for k, v in s.items()}


def tiny_checkpoint(seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor random (small, so that a forward pass stays finite) and distinct."""
    g = torch.Generator().manual_seed(seed)
    shapes = {**unet_shapes(), **vae_shapes(), **text_shapes()}
    return {k: torch.randn(shape, generator=g) * 0.05 for k, shape in shapes.items()}

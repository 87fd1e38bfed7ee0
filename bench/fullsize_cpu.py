"""Stable Diffusion 2.1-base and MVDream at their published sizes, with random weights, run on the CPU.

No Hub: both are built from their published configurations in code (MVDream's, in
backend/mvdream.py, is SD 2.1-base's UNet with a camera input at 32x32 latents; the text encoder
is OpenCLIP-H's 1,024-wide, 23-layer tower as SD 2 reads it) and saved as diffusers folders with
fp16 weight files, as the community mirrors hold them. Then each path runs a few steps through
bench/gpu_smoke.py in a process of its own, loaded through the same `--model FOLDER` path users
take: Stable Diffusion text to 3D (the NeRF at 64 px, upsampled to 512 for the VAE) followed by
the refinement at 512 px, MVDream's four views per step, and an image job with Zero-1-to-3 XL
(its published sizes: Stable Diffusion 1's UNet with 8 input channels at 32x32 latents, CLIP
ViT-L/14's image tower, the camera projection) as the novel-view prior beside Stable
Diffusion. Prints seconds per step and peak RSS per stage. `--size tiny` is the same code at
tiny sizes: the tests run it, so this cannot rot.

    python bench/fullsize_cpu.py [--size full|tiny] [--steps 2] [--refine-steps 1]
                                 [--paths sd,mvdream,zero123] [--models DIR] [--out DIR]

Full size needs about 10 GB of memory and 20 s a step on 2 cores (the image job more); the
models take 6.3 GB of disk.
bench/gpu_day.py runs the same paths on a GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))  # the tests' character tokenizer: the weights are random, any vocabulary does

from gpu_smoke import describe, run_child  # noqa: E402

from promptmesh.backend.mvdream import ORIGINAL_CONFIG, VIEWS, unet_config  # noqa: E402
from tiny_zero123 import TINY_UNET, TINY_VAE, TINY_VISION, save_zero123  # noqa: E402

PROMPT = "a ceramic mug with a handle"
MV_SHARED = ("vae", "text_encoder", "tokenizer", "scheduler")  # MVDream is fine-tuned from SD 2.1-base: same parts


@dataclass(frozen=True)
class Size:
    """Model sizes, in the published configurations' own terms, and the generate options that go with them."""

    ldm: dict[str, Any]  # a latent-diffusion configuration (backend/mvdream.py's ORIGINAL_CONFIG's shape)
    sd_latent: int  # SD 2.1-base's latent side (64: 512 px images); MVDream's is the configuration's image_size
    text: dict[str, int]  # the CLIP text tower
    zero123: tuple[dict[str, Any], dict[str, Any], dict[str, Any]]  # its UNet, VAE and CLIP image tower
    generate: tuple[str, ...] = field(default=())  # `promptmesh generate` options for this size


def _tiny_ldm() -> dict[str, Any]:
    config = copy.deepcopy(ORIGINAL_CONFIG)
    params = config["model"]["params"]
    params["unet_config"]["params"].update(image_size=8, model_channels=32, channel_mult=[1, 2], attention_resolutions=[1],
                                           num_res_blocks=1, num_head_channels=8, context_dim=32)
    params["first_stage_config"]["params"]["ddconfig"].update(ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=1)
    return config


def _zero123_full() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Zero-1-to-3 XL as released: fine-tuned from Stable Diffusion Image Variations, so SD 1's
    UNet (768-wide cross-attention) with 8 input channels at 32x32 latents (256 px), SD's VAE,
    and CLIP ViT-L/14's image tower with its 768-wide projection."""
    from diffusers.loaders.single_file_utils import create_vae_diffusers_config_from_ldm

    unet = dict(sample_size=32, in_channels=8, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
                  patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    return unet, create_vae_diffusers_config_from_ldm(ORIGINAL_CONFIG, {}), vision


SIZES = {
    "full": Size(ORIGINAL_CONFIG, 64, {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
                                       "num_attention_heads": 16, "vocab_size": 49408}, _zero123_full()),
    "tiny": Size(_tiny_ldm(), 8, {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                                  "num_attention_heads": 4, "vocab_size": 100}, (TINY_UNET, TINY_VAE, TINY_VISION),
                 ("--mesh-resolution", "32", "--texture-size", "256")),
}


def sd_unet_config(size: Size) -> dict[str, Any]:
    """SD 2.1-base's UNet: MVDream's without the camera input, at SD's latent size."""
    config = unet_config(size.ldm, {})
    for key in ("class_embed_type", "projection_class_embeddings_input_dim"):
        config.pop(key)
    return config | {"sample_size": size.sd_latent}


def build_models(root: Path, size_name: str) -> dict[str, Path]:
    """Write the random Stable Diffusion 2.1-base, MVDream and Zero-1-to-3 folders under `root`
    (once: existing ones are reused) and return them by path name ("zero123": the novel-view
    prior, its reference image beside it)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_vae_diffusers_config_from_ldm
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from promptmesh.backend.multiview import make_multiview
    from tiny_sd import _write_char_tokenizer

    size = SIZES[size_name]
    sd, mv, zero123 = (root / f"{name}-random-{size_name}" for name in ("sd21", "mvdream", "zero123"))
    if not (zero123 / "model_index.json").is_file():
        save_zero123(zero123, *size.zero123, dtype=torch.float16)
        write_reference(zero123.with_suffix(".png"))
    if (sd / "model_index.json").is_file() and (mv / "model_index.json").is_file():
        return {"sd": sd, "mvdream": mv, "zero123": zero123}
    torch.manual_seed(0)
    params = size.ldm["model"]["params"]

    def save(module: torch.nn.Module, folder: Path) -> None:
        module.half().save_pretrained(folder, variant="fp16")  # fp16 files only, as the mirrors hold them

    # one model in memory at a time: the full UNet alone is 3.5 GB in fp32
    save(UNet2DConditionModel(**sd_unet_config(size)), sd / "unet")
    save(AutoencoderKL(**create_vae_diffusers_config_from_ldm(size.ldm, {})), sd / "vae")
    positions = 77  # CLIP's context: the tokenizer pads every prompt to it
    text = CLIPTextConfig(**size.text, max_position_embeddings=positions, hidden_act="gelu", projection_dim=512,
                          bos_token_id=0, eos_token_id=1, pad_token_id=1)
    save(CLIPTextModel(text), sd / "text_encoder")
    _write_char_tokenizer(sd / "tokenizer")
    CLIPTokenizer.from_pretrained(sd / "tokenizer", model_max_length=positions).save_pretrained(sd / "tokenizer")
    DDPMScheduler(num_train_timesteps=params["timesteps"], beta_start=params["linear_start"],
                  beta_end=params["linear_end"], beta_schedule="scaled_linear", prediction_type="epsilon",
                  clip_sample=False).save_pretrained(sd / "scheduler")
    (sd / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}) + "\n")

    mv.mkdir(parents=True, exist_ok=True)
    save(make_multiview(UNet2DConditionModel(**unet_config(size.ldm, {})), VIEWS), mv / "unet")
    for part in MV_SHARED:
        target = mv / part
        if not target.exists():
            target.symlink_to(os.path.relpath(sd / part, mv))
    index = {"_class_name": "StableDiffusionPipeline", "_promptmesh": {"source": "random weights", "views": VIEWS}}
    (mv / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return {"sd": sd, "mvdream": mv, "zero123": zero123}


def write_reference(path: Path) -> None:
    """The image job's picture: a red disc on white, 128 px (the plain-background matte finds it)."""
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[:128, :128]
    rgb = np.full((128, 128, 3), 255, np.uint8)
    rgb[(yy - 64) ** 2 + (xx - 64) ** 2 < 40**2] = (200, 40, 30)
    Image.fromarray(rgb).save(path)


def path_arguments(path: str, model: Path, size_name: str, device: str, steps: int, refine_steps: int,
                   preview_every: int, novel_view: Path | None = None) -> list[str]:
    """bench/gpu_smoke.py's arguments for one path: SD's NeRF then its refinement at 512 px,
    MVDream's four views (its refinement would repeat SD's at another latent size), or an image
    job on SD (`model`: the SD folder) with `novel_view` beside it (its refinement is SD's)."""
    image = ["--image", str(novel_view.with_suffix(".png")), "--novel-view", str(novel_view)] if novel_view else []
    return ["--model", str(model), "--prompt", PROMPT, "--device", device, "--steps", str(steps),
            "--refine-steps", str(refine_steps if path == "sd" else 0), "--preview-every", str(preview_every),
            "--", *SIZES[size_name].generate, *image]


def run_paths(models: dict[str, Path], size_name: str, device: str, steps: int, refine_steps: int, out: Path,
              timeout: float, paths: tuple[str, ...] = ("sd", "mvdream", "zero123"), preview_every: int = 1,
              threads: int | None = None) -> dict[str, dict[str, Any]]:
    """Each path in a process of its own; its figures (or its error) by path name."""
    results = {}
    for path in paths:
        model, novel_view = (models["sd"], models["zero123"]) if path == "zero123" else (models[path], None)
        argv = path_arguments(path, model, size_name, device, steps, refine_steps, preview_every, novel_view)
        if threads:
            argv += ["--threads", str(threads)]
        results[path] = run_child(argv, out / path, timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return results


def report(results: dict[str, dict[str, Any]]) -> str:
    lines = []
    for path, figures in results.items():
        lines.append(f"== {path} ({figures['wall_seconds']:.0f} s in all)")
        lines += describe(figures) if figures["ok"] else ["FAILED:", *figures["error"]]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=tuple(SIZES), default="full")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--refine-steps", type=int, default=1)
    p.add_argument("--paths", default="sd,mvdream,zero123")
    p.add_argument("--models", default="runs/fullsize-models", help="where the random models are written (reused)")
    p.add_argument("--out", default="runs/fullsize-cpu")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per path")
    args = p.parse_args()
    models = build_models(Path(args.models), args.size)
    results = run_paths(models, args.size, "cpu", args.steps, args.refine_steps, Path(args.out), args.timeout,
                        tuple(args.paths.split(",")), threads=os.cpu_count())
    text = report(results)
    print(text)
    Path(args.out, "report.txt").write_text(text + "\n")
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

"""VSD's extra GPU memory for Stable Diffusion 2.1 base, counted on the meta device (no GPU, no
weights, no memory): the LoRA's trainable parameters, and the activations its training pass
saves for the backward (every tensor autograd packs, summed by size: an upper bound, as a
tensor saved by two operators counts twice), at the recipe's 64x64 latents, batch 1, in fp16,
with and without gradient checkpointing. Asserts nothing; docs/objectives.md gives the budget.

    python bench/vsd_memory.py [--rank 4] [--latent 64]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def sd21_unet():  # type: ignore[no-untyped-def]
    """Stable Diffusion 2.1 base's UNet at its published sizes (as tests/test_sds.py builds it)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64, block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
        cross_attention_dim=1024, use_linear_projection=True, layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def saved_bytes(rank: int, latent: int, checkpointing: bool) -> tuple[int, int]:
    """(trainable parameters, bytes autograd saves for the backward of one training pass)."""
    import torch

    from promptmesh.backend.guidance.vsd import lora_unet

    with torch.device("meta"):
        unet = sd21_unet().half().requires_grad_(False)
    lora = lora_unet(unet, rank, seed=0).half()
    if checkpointing:
        lora.enable_gradient_checkpointing()
    params = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    x = torch.empty(1, 4, latent, latent, device="meta", dtype=torch.float16)
    text = torch.empty(1, 77, 1024, device="meta", dtype=torch.float16)
    labels = torch.empty(1, 16, device="meta", dtype=torch.float16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = lora(x, torch.tensor([500], device="meta"), encoder_hidden_states=text, class_labels=labels).sample
    assert out.requires_grad
    return params, total


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--latent", type=int, default=64)
    args = p.parse_args()
    for checkpointing in (False, True):
        params, saved = saved_bytes(args.rank, args.latent, checkpointing)
        print(f"gradient checkpointing {'on ' if checkpointing else 'off'}: LoRA + camera MLP {params:,} parameters "
              f"({params * 16 / 2**20:.0f} MB in fp32 with gradients and AdamW's moments); "
              f"saved for backward {saved / 2**30:.2f} GB")


if __name__ == "__main__":
    main()

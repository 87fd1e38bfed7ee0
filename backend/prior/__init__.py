"""The embedded prior: a small pixel-space text-to-image diffusion model of coloured primitives."""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).with_name("weights")

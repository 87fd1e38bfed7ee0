"""The embedded prior: a small pixel-space text-to-image diffusion model of coloured primitives."""

import json
from pathlib import Path

WEIGHTS_DIR = Path(__file__).with_name("weights")


def vocabulary(weights: Path = WEIGHTS_DIR) -> list[str]:
    """The words the shipped prior knows, read from its tokenizer file (no torch needed)."""
    vocab = json.loads((weights / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    return [w for w in vocab if not (w.startswith("[") and w.endswith("]"))]  # not [PAD], [BOS], ...

"""How well the embedded prior knows each primitive in 2D, without any 3D optimisation.

For every shape x colour prompt it draws DDIM samples from random training-range cameras and
compares each sample's silhouette (pixels far from the white background) with the silhouettes
of all five analytic primitives rendered from the same camera: the sample counts as right when
its own primitive fits best. Prints per-shape accuracy and mean silhouette IoU.

    python bench/prior_samples.py [--weights DIR] [--views 8] [--guidance 3] [--ddim-steps 20]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from promptmesh.backend.cameras import CameraRanges, sample_cameras  # noqa: E402
from promptmesh.backend.prior import WEIGHTS_DIR  # noqa: E402
from promptmesh.backend.prior.data import render_primitives  # noqa: E402
from promptmesh.backend.prior.model import IMAGE_SIZE, EmbeddedPrior  # noqa: E402
from promptmesh.backend.prior.sample import sample  # noqa: E402
from promptmesh.backend.prior.shapes import PALETTE, SHAPES  # noqa: E402


def silhouette(images: torch.Tensor) -> torch.Tensor:
    """[N, 3, S, S] in [0, 1] on white -> [N, S, S] bool object mask."""
    return (1 - images).abs().amax(1) > 0.25


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=str(WEIGHTS_DIR))
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--ddim-steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    prior = EmbeddedPrior.from_pretrained(args.weights)
    generator = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    print(f"{'shape':<9} {'right':>6} {'IoU':>5}  confused with")
    total_right = total = 0
    for shape in SHAPES:
        right, ious, confused = 0, [], {}
        for color in PALETTE:
            cameras = sample_cameras(args.views, generator, CameraRanges())
            drawn = silhouette(sample(prior, f"a {color} {shape}", cameras, args.guidance, args.ddim_steps, seed=args.seed))
            truth = torch.stack([
                silhouette(render_primitives([s] * args.views, torch.tensor([PALETTE[color]] * args.views), cameras, IMAGE_SIZE))
                for s in SHAPES
            ])  # [5, N, S, S]
            iou = (truth & drawn).sum((-1, -2)) / (truth | drawn).sum((-1, -2)).clamp_min(1)
            best = iou.argmax(0)
            right += int((best == SHAPES.index(shape)).sum())
            ious += iou[SHAPES.index(shape)].tolist()
            for b in best.tolist():
                if SHAPES[b] != shape:
                    confused[SHAPES[b]] = confused.get(SHAPES[b], 0) + 1
        n = args.views * len(PALETTE)
        total_right, total = total_right + right, total + n
        worst = ", ".join(f"{k} {v}" for k, v in sorted(confused.items(), key=lambda kv: -kv[1]))
        print(f"{shape:<9} {right / n:>6.0%} {sum(ious) / n:>5.2f}  {worst}")
    print(f"all       {total_right / total:>6.0%}  ({total} samples, {time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()

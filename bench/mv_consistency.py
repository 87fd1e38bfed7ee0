"""Do a prior's views of one object agree? (MVDream's claim, measured on our world.)

For every object with a front x colour it draws groups of 4 views a quarter-turn apart
(shared elevation, distance and field of view; the prompt without a view word, the camera
tells the view): a multi-view prior draws each group as one object, a 2D prior draws the 4
views independently. Each view's silhouette is compared with the analytic object's, rendered
from the same cameras with the object turned by every yaw of a 15-degree grid:

- one object: the best yaw for the 4 views together (mean IoU): do they show one object?
- own yaw: each view with its own best yaw (mean IoU): how object-like each view is alone;
- told yaw: the object as the cameras say (yaw 0): does it face where the camera was told?

A consistent prior keeps "one object" close to "own yaw"; independent 2D samples of an
asymmetric object fit different yaws, and the gap shows it.

    python bench/mv_consistency.py --weights DIR [--weights DIR2 ...] [--groups 4] [--ddim-steps 20] [--guidance 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from figures import report  # noqa: E402
from prior_samples import silhouette  # noqa: E402

from promptmesh.backend.cameras import Cameras, make_cameras  # noqa: E402
from promptmesh.backend.prior import WEIGHTS_DIR  # noqa: E402
from promptmesh.backend.prior.data import render_primitives  # noqa: E402
from promptmesh.backend.prior.model import IMAGE_SIZE, EmbeddedPrior  # noqa: E402
from promptmesh.backend.prior.sample import sample  # noqa: E402
from promptmesh.backend.prior.shapes import OBJECTS, PALETTE  # noqa: E402

YAWS = torch.arange(0.0, 360.0, 15.0)
VIEWS = 4


def quarter_turn_group(generator: torch.Generator) -> Cameras:
    """4 cameras at a random azimuth + k * 90 degrees, elevation 0-30, distance 2.1, fov 42."""
    azimuth = torch.rand((), generator=generator) * 360.0 + torch.arange(VIEWS) * 90.0
    elevation = torch.full((VIEWS,), float(torch.rand((), generator=generator)) * 30.0)
    return make_cameras(elevation, azimuth, torch.full((VIEWS,), 2.1), torch.full((VIEWS,), 42.0))


def yaw_ious(name: str, color: str, cameras: Cameras, drawn: torch.Tensor) -> torch.Tensor:
    """[yaws, views] silhouette IoU of each drawn view against the object turned by each yaw
    (turning the object by +yaw is seeing it from azimuth - yaw)."""
    n = len(cameras)
    az = (cameras.azimuth[None] - YAWS[:, None]).flatten()
    each = lambda x: x.repeat(len(YAWS))  # noqa: E731
    turned = make_cameras(each(cameras.elevation), az, each(cameras.distance), each(torch.rad2deg(cameras.fovy)))
    truth = silhouette(render_primitives([name] * len(az), torch.tensor([PALETTE[color]] * len(az)), turned,
                                         IMAGE_SIZE)).view(len(YAWS), n, IMAGE_SIZE, IMAGE_SIZE)
    return (truth & drawn).sum((-1, -2)) / (truth | drawn).sum((-1, -2)).clamp_min(1)


def agreement(ious: torch.Tensor) -> dict[str, float]:
    """The three figures of the module docstring from one group's [yaws, views] IoUs."""
    return {"one object": float(ious.mean(1).max()), "own yaw": float(ious.max(0).values.mean()),
            "told yaw": float(ious[0].mean())}


def measure(prior: EmbeddedPrior, groups: int, ddim_steps: int, seed: int, guidance: float) -> dict[str, dict[str, float]]:
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name in OBJECTS:
        sums: dict[str, float] = {}
        for color in ("red", "blue"):
            for g in range(groups):
                cameras = quarter_turn_group(generator)
                drawn = silhouette(sample(prior, f"a {color} {name}", cameras, guidance, ddim_steps, seed=seed + g,
                                          view_words=False))
                for key, value in agreement(yaw_ious(name, color, cameras, drawn)).items():
                    sums[key] = sums.get(key, 0.0) + value / (2 * groups)
        out[name] = sums
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", action="append", help="prior folders (2D or multi-view); default the shipped one")
    parser.add_argument("--groups", type=int, default=4, help="groups of 4 views per object and colour")
    parser.add_argument("--ddim-steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale of the samples "
                        "(1: none, what the prior itself knows; these tiny priors drift to cubes at 3)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for weights in args.weights or [str(WEIGHTS_DIR)]:
        prior = EmbeddedPrior.from_pretrained(weights)
        t0 = time.time()
        kind = "multi-view (each group one sample)" if prior.views_per_group > 1 else "2D (each view its own sample)"
        print(f"{weights}: {kind}")
        figures = measure(prior, args.groups, args.ddim_steps, args.seed, args.guidance)
        keys = ("one object", "own yaw", "told yaw")
        print(f"  {'':<8}" + "".join(f"{k:>12}" for k in keys))
        for name, row in figures.items():
            print(f"  {name:<8}" + "".join(f"{row[k]:>12.3f}" for k in keys))
        tag = Path(weights).parent.name if Path(weights).name == "prior" else Path(weights).name  # a run's OUT/prior
        for key in keys:
            report(f"{tag}_{key.replace(' ', '_')}", sum(r[key] for r in figures.values()) / len(figures), "IoU")
        print(f"  ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()

"""Does the embedded prior use its camera, and does it lean to the front as a web-trained prior does?

1. Denoising error on views from behind (azimuth 150-210 degrees) of every object with a
   front, noised at each of TIMESTEPS (little noise to nearly pure noise): the caption without a view word and the camera told
   right (back) or turned half round (front); and with the true camera, the caption saying
   "back view" or "front view". A prior that uses its camera errs more when told the wrong one.
2. The lean: 2D samples of each object from behind, prompt without a view word, true camera:
   a sample "looks like the front" when its silhouette fits the object seen from the front at
   the same elevation (the image a prior that ignored the camera would draw) better than the
   object as seen from behind. Only the mug and the arrow look different from the front and
   the back in silhouette (their feature is at the side), so only they count.

    python bench/prior_camera.py [--weights DIR] [--views 16] [--ddim-steps 20]
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

from promptmesh.backend.cameras import make_cameras  # noqa: E402
from promptmesh.backend.guidance.loading import model_card  # noqa: E402
from promptmesh.backend.prior import WEIGHTS_DIR  # noqa: E402
from promptmesh.backend.prior.data import render_primitives  # noqa: E402
from promptmesh.backend.prior.model import IMAGE_SIZE, EmbeddedPrior, camera_features  # noqa: E402
from promptmesh.backend.prior.sample import sample  # noqa: E402
from promptmesh.backend.prior.shapes import FEATURE_AZIMUTH, OBJECTS, PALETTE  # noqa: E402
from promptmesh.backend.prompts import view_prompt  # noqa: E402

RANGES = model_card("embedded").recipe.cameras
TIMESTEPS = (200, 500, 800, 950)
CASES = ("camera right", "camera told front", "words right", "words told front")


def back_cameras(n: int, generator: torch.Generator, turn: float = 0.0):
    """n cameras behind the object (azimuth 180 +- 30) at elevations 0-30, turned by `turn` degrees."""
    azimuth = 180.0 + (torch.rand(n, generator=generator) - 0.5) * 60.0 + turn
    elevation = torch.rand(n, generator=generator) * 30.0
    return make_cameras(elevation, azimuth, torch.full((n,), 2.1), torch.full((n,), 42.0))


@torch.no_grad()
def denoising_errors(prior: EmbeddedPrior, views: int, seed: int) -> dict[tuple[str, int], float]:
    """Mean squared error of the predicted noise per (case, timestep)."""
    generator = torch.Generator().manual_seed(seed)
    sums = {(case, t): 0.0 for case in CASES for t in TIMESTEPS}
    count = 0
    for name in OBJECTS:
        for color in ("red", "blue"):
            cams = back_cameras(views, generator)
            turned = make_cameras(cams.elevation, cams.azimuth + 180.0, cams.distance, torch.rad2deg(cams.fovy))
            x = render_primitives([name] * views, torch.tensor([PALETTE[color]] * views), cams, IMAGE_SIZE) * 2 - 1
            prompt = f"a {color} {name}"
            for t in TIMESTEPS:
                noise = torch.randn(x.shape, generator=generator)
                a = prior.scheduler.alphas_cumprod[t]
                noisy = a.sqrt() * x + (1 - a).sqrt() * noise
                cases = {"camera right": (prompt, cams), "camera told front": (prompt, turned),
                         "words right": (view_prompt(prompt, "back"), cams),
                         "words told front": (view_prompt(prompt, "front"), cams)}
                for key, (caption, cameras) in cases.items():
                    states, pooled = prior.encode_text([caption] * views)
                    pred = prior.predict_noise(noisy, torch.full((views,), t), states, pooled,
                                               camera_features(cameras, RANGES))
                    sums[key, t] += float(((pred - noise) ** 2).mean())
            count += 1
    return {k: v / count for k, v in sums.items()}


def front_lean(prior: EmbeddedPrior, views: int, ddim_steps: int, seed: int) -> dict[str, float]:
    generator = torch.Generator().manual_seed(seed)
    lean = {}
    for name in (o for o in OBJECTS if FEATURE_AZIMUTH[o] % 180):
        fronts = 0
        for color in ("red", "blue"):
            cams = back_cameras(views, generator)
            seen_front = make_cameras(cams.elevation, cams.azimuth - 180.0, cams.distance, torch.rad2deg(cams.fovy))
            colors = torch.tensor([PALETTE[color]] * views)
            drawn = silhouette(sample(prior, f"a {color} {name}", cams, 3.0, ddim_steps, seed=seed, view_words=False))
            truth = torch.stack([silhouette(render_primitives([name] * views, colors, c, IMAGE_SIZE))
                                 for c in (cams, seen_front)])
            iou = (truth & drawn).sum((-1, -2)) / (truth | drawn).sum((-1, -2)).clamp_min(1)
            fronts += int((iou[1] > iou[0]).sum())
        lean[name] = fronts / (2 * views)
    return lean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=str(WEIGHTS_DIR))
    parser.add_argument("--views", type=int, default=16)
    parser.add_argument("--ddim-steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    prior = EmbeddedPrior.from_pretrained(args.weights)
    t0 = time.time()
    errors = denoising_errors(prior, args.views, args.seed)
    print("denoising error on views from behind (mean squared error of the predicted noise) at t =")
    print(f"  {'':<18}" + "".join(f"{t:>8}" for t in TIMESTEPS))
    for case in CASES:
        print(f"  {case:<18}" + "".join(f"{errors[case, t]:>8.4f}" for t in TIMESTEPS))
    for t in TIMESTEPS:
        report(f"camera_error_ratio_t{t}", errors["camera told front", t] / errors["camera right", t], "x")
        report(f"words_error_ratio_t{t}", errors["words told front", t] / errors["words right", t], "x")
    lean = front_lean(prior, args.views, args.ddim_steps, args.seed)
    print("samples from behind that look like the front (no view word, true camera):")
    for name, share in lean.items():
        print(f"  {name:<6} {share:.0%}")
    report("front_lean_from_behind", 100 * sum(lean.values()) / len(lean), "%")
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()

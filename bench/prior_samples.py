"""How well the embedded prior knows each subject in 2D, without any 3D optimisation.

For every subject it knows (the primitives, and the objects with a front where its vocabulary
has them) x colour it draws DDIM samples from random training-range cameras (groups of views
a quarter-turn apart for a multi-view prior) and compares each sample's silhouette (pixels far
from the white background) with the silhouettes of all those subjects rendered from the same
camera: the sample counts as right when its own subject fits best (for an object: as the
camera sees it, so a mug facing the wrong way fits worse). Its colour counts as right when
its mean colour inside its silhouette is nearest (CIELAB) to that of the prompted subject
rendered in the prompted colour, among renders in every palette colour from the same camera
(so shading darkens the candidates as it darkens the sample). Prints per-subject shape and
colour accuracy and mean silhouette IoU, and the figures `prior_samples_right` (shape) and
`prior_samples_color_right`.

    python bench/prior_samples.py [--weights DIR] [--views 8] [--guidance 1] [--ddim-steps 20]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from skimage.color import rgb2lab

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from figures import report  # noqa: E402

from promptmesh.backend.cameras import CameraRanges, Cameras, sample_camera_groups, sample_cameras  # noqa: E402
from promptmesh.backend.prior import WEIGHTS_DIR  # noqa: E402
from promptmesh.backend.prior.data import SUBJECTS, render_primitives  # noqa: E402
from promptmesh.backend.prior.model import IMAGE_SIZE, EmbeddedPrior  # noqa: E402
from promptmesh.backend.prior.sample import GUIDANCE, sample  # noqa: E402
from promptmesh.backend.prior.shapes import PALETTE  # noqa: E402


def silhouette(images: torch.Tensor) -> torch.Tensor:
    """[N, 3, S, S] in [0, 1] on white -> [N, S, S] bool object mask."""
    return (1 - images).abs().amax(1) > 0.25


def mean_lab(images: torch.Tensor) -> torch.Tensor:
    """[N, 3, S, S] in [0, 1] on white -> [N, 3] CIELAB of the mean colour inside each silhouette."""
    mask = silhouette(images)[:, None].float()
    rgb = (images * mask).sum((-1, -2)) / mask.sum((-1, -2)).clamp_min(1)
    return torch.from_numpy(rgb2lab(rgb.clamp(0, 1).numpy()[:, None])[:, 0]).float()


def judged_colors(subject: str, images: torch.Tensor, cameras: Cameras) -> torch.Tensor:
    """[N] palette index of each image's colour: the nearest (CIELAB, mean inside the
    silhouette) of `subject` rendered from the same camera in each palette colour."""
    n = len(cameras)
    painted = torch.stack([mean_lab(render_primitives([subject] * n, torch.tensor([rgb] * n), cameras, IMAGE_SIZE))
                           for rgb in PALETTE.values()])  # [colours, N, 3]
    return (painted - mean_lab(images)).norm(dim=-1).argmin(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=str(WEIGHTS_DIR))
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--guidance", type=float, default=GUIDANCE)
    parser.add_argument("--ddim-steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    prior = EmbeddedPrior.from_pretrained(args.weights)
    subjects = [s for s in SUBJECTS if s in prior.known_words]
    group = prior.views_per_group
    generator = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    print(f"{'subject':<9} {'right':>6} {'colour':>6} {'IoU':>5}  confused with")
    total_right = total_color = total = 0
    for subject in subjects:
        right, color_right, ious, confused = 0, 0, [], {}
        for color in PALETTE:
            cameras = (sample_cameras(args.views, generator, CameraRanges()) if group == 1
                       else sample_camera_groups(args.views // group, group, generator, CameraRanges()))
            n = len(cameras)
            images = sample(prior, f"a {color} {subject}", cameras, args.guidance, args.ddim_steps, seed=args.seed)
            drawn = silhouette(images)
            color_right += int((judged_colors(subject, images, cameras) == list(PALETTE).index(color)).sum())
            truth = torch.stack([
                silhouette(render_primitives([s] * n, torch.tensor([PALETTE[color]] * n), cameras, IMAGE_SIZE))
                for s in subjects
            ])  # [subjects, N, S, S]
            iou = (truth & drawn).sum((-1, -2)) / (truth | drawn).sum((-1, -2)).clamp_min(1)
            best = iou.argmax(0)
            right += int((best == subjects.index(subject)).sum())
            ious += iou[subjects.index(subject)].tolist()
            for b in best.tolist():
                if subjects[b] != subject:
                    confused[subjects[b]] = confused.get(subjects[b], 0) + 1
        count = len(ious)
        total_right, total_color, total = total_right + right, total_color + color_right, total + count
        worst = ", ".join(f"{k} {v}" for k, v in sorted(confused.items(), key=lambda kv: -kv[1]))
        print(f"{subject:<9} {right / count:>6.0%} {color_right / count:>6.0%} {sum(ious) / count:>5.2f}  {worst}")
    print(f"all       {total_right / total:>6.0%} {total_color / total:>6.0%}  ({total} samples, {time.time() - t0:.0f} s)")
    report("prior_samples_right", 100 * total_right / total, "%")
    report("prior_samples_color_right", 100 * total_color / total, "%")


if __name__ == "__main__":
    main()

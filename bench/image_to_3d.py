"""The image-to-3D benchmark: reference images rendered by our own renderer, made into objects.

For every subject (the primitives and the objects with a front) x colour x seed x elevation,
the subject is rendered by the embedded prior's own renderer (prior/data.py
render_primitives: the training images' shading and lighting) from the front (azimuth 0) at that
elevation, the mean distance and field of view of the prior's cameras, 128 px on white; the
image's foreground comes from the plain-background matte (shared/image.py border_matte), as a
user's render on a plain backdrop would. `pipeline.run` makes the object with the prompt
"a COLOUR SUBJECT" (or none, --no-prompt) and the result is judged without the prior: shape
(a primitive: judge_mesh's best IoU names it; an object: judge_janus says "right"), colour
(the nearest palette hue) and, for an object with a front, whether its front is where the
image's is (judge_front: the best-fitting yaw within 45 degrees of 0). With --baseline the same
subject is also made from its prompt alone, for the time ratio. Prints a row per result, then
the rates and the median times, and the figures `image_both_right`, `image_front_right`,
`image_front_and_shape_right` and `image_time_ratio`. Asserts nothing.

    python bench/image_to_3d.py [--subjects sphere,cube,duck] [--colors red,blue] [--seeds 2]
                                [--elevations 0,30] [--steps N] [--no-prompt] [--baseline] [--workers 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from figures import report  # noqa: E402
from pool import run_all  # noqa: E402

from promptmesh.backend.prior.shapes import OBJECTS, SHAPES  # noqa: E402

IMAGE_SIZE = 128


def reference_image(name: str, color: str, elevation: float):  # type: ignore[no-untyped-def]
    """The subject as an RGBA uint8 image seen from the front, its foreground from the matte."""
    import numpy as np
    import torch

    from promptmesh.backend.cameras import make_cameras
    from promptmesh.backend.prior import WEIGHTS_DIR
    from promptmesh.backend.prior.data import render_primitives
    from promptmesh.backend.prior.shapes import PALETTE
    from promptmesh.backend.recipe import ModelCard
    from promptmesh.shared.image import foreground_rgba

    recipe = ModelCard.load(WEIGHTS_DIR).recipe
    ranges = recipe.cameras
    one = lambda v: torch.tensor([float(v)])  # noqa: E731
    cameras = make_cameras(one(elevation), one(0.0), one(sum(ranges.distance) / 2), one(sum(ranges.fovy) / 2))
    image = render_primitives([name], torch.tensor([PALETTE[color]]), cameras, IMAGE_SIZE, ambient=recipe.shading.ambient)
    rgb = (image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return foreground_rgba(rgb)


def generate_and_judge(mode: str, name: str, color: str, seed: int, elevation: float, steps: int | None,
                       prompt: bool, novel_view: str | None = None, model: str = "embedded") -> tuple:
    """One row: (mode, subject, colour, seed, elevation, shape right, colour right, front right
    (None: no front), judged shape, judged colour, front yaw, seconds)."""
    from promptmesh.backend.mesh import MeshError
    from promptmesh.backend.pipeline import run
    from promptmesh.backend.prior.judge import judge_color, judge_front, judge_janus, judge_mesh
    from promptmesh.shared.image import Reference
    from promptmesh.shared.spec import JobSpec

    reference = Reference(reference_image(name, color, elevation), elevation) if mode == "image" else None
    text = f"a {color} {name}" if prompt or mode == "text" else ""
    t0 = time.perf_counter()
    try:
        spec = JobSpec(prompt=text, seed=seed, steps=steps, texture_size=0, model=model,
                       novel_view=novel_view if reference is not None else None)
        mesh = run(spec, reference=reference).mesh
    except MeshError:
        return (mode, name, color, seed, elevation, False, False, None if name in SHAPES else False, "(none)", "(none)",
                float("nan"), time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    judged_color = judge_color(mesh)
    if name in SHAPES:
        shape = judge_mesh(mesh).shape
        return (mode, name, color, seed, elevation, shape == name, judged_color == color, None, shape, judged_color,
                float("nan"), seconds)
    janus = judge_janus(mesh, name)
    front = judge_front(mesh, name)
    return (mode, name, color, seed, elevation, janus.kind == "right", judged_color == color, front.right, janus.best,
            judged_color, front.yaw, seconds)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--subjects", default=",".join(SHAPES + OBJECTS))
    p.add_argument("--colors", default="red,blue")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--elevations", default="0,30")
    p.add_argument("--steps", type=int, default=None, help="optimisation steps (default: the prior's recipe)")
    p.add_argument("--no-prompt", action="store_true", help="image jobs without a prompt (the image alone)")
    p.add_argument("--baseline", action="store_true", help="also make each subject from its prompt alone, once per "
                   "subject, colour and seed, for the time ratio")
    p.add_argument("--model", default="embedded", help="the text prior (a folder of the embedded prior's kind: its "
                   "card's recipe is the one used)")
    p.add_argument("--novel-view", help="the image jobs' novel-view prior (a folder `prior train-views` wrote, or an "
                   "alias); default none: the text prior alone")
    p.add_argument("--workers", type=int, default=1, help="processes of one thread each; 1 runs here with all threads")
    args = p.parse_args()
    subjects, colors = args.subjects.split(","), args.colors.split(",")
    elevations = [float(e) for e in args.elevations.split(",")]
    jobs = [("image", s, c, seed, e, args.steps, not args.no_prompt, args.novel_view, args.model) for s in subjects
            for c in colors for seed in range(args.seeds) for e in elevations]
    if args.baseline:
        jobs += [("text", s, c, seed, 0.0, args.steps, True, None, args.model) for s in subjects for c in colors
                 for seed in range(args.seeds)]
    print(f"{'mode':<5} {'subject':<9} {'colour':<7} {'seed':>4} {'elev':>4} {'shape':<8} {'colour':<7} {'front':<5} "
          f"{'yaw':>5} {'s':>6}")
    rows: list[tuple] = []

    def show(row: tuple) -> None:
        rows.append(row)
        mode, name, color, seed, elev, shape_ok, color_ok, front_ok, shape, judged, yaw, dt = row
        front = "-" if front_ok is None else "yes" if front_ok else "no"
        print(f"{mode:<5} {name:<9} {color:<7} {seed:>4} {elev:>4.0f} {shape + ('' if shape_ok else '!'):<8} "
              f"{judged + ('' if color_ok else '!'):<7} {front:<5} {yaw:>5.0f} {dt:>6.1f}", flush=True)

    run_all(generate_and_judge, jobs, args.workers, show)
    images = [r for r in rows if r[0] == "image"]
    fronts = [r for r in images if r[7] is not None]
    both = sum(r[5] and r[6] for r in images) / len(images)
    front = sum(bool(r[7]) for r in fronts) / len(fronts) if fronts else float("nan")
    # stricter: the front right on an object whose shape is right (a blob can still fit best turned one way)
    strict = sum(bool(r[7]) and r[5] for r in fronts) / len(fronts) if fronts else float("nan")
    image_s = statistics.median(r[11] for r in images)
    print(f"\n{'results':>7} {'shape':>6} {'colour':>6} {'both':>6} {'fronts':>7} {'front+shape':>11} {'median s':>9}")
    print(f"{len(images):>7} {sum(r[5] for r in images) / len(images):>6.0%} {sum(r[6] for r in images) / len(images):>6.0%} "
          f"{both:>6.0%} {front:>7.0%} {strict:>11.0%} {image_s:>9.0f}")
    report("image_both_right", 100 * both, "%")
    if fronts:
        report("image_front_right", 100 * front, "%")
        report("image_front_and_shape_right", 100 * strict, "%")
    texts = [r for r in rows if r[0] == "text"]
    if texts:
        text_s = statistics.median(r[11] for r in texts)
        print(f"text jobs: {len(texts)}, median {text_s:.0f} s; image/text time {image_s / text_s:.2f}x")
        report("image_time_ratio", image_s / text_s, "x")


if __name__ == "__main__":
    main()

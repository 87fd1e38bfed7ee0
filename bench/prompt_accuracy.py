"""Quality benchmark of the embedded prior's whole generate path.

Runs `pipeline.run` on every shape x colour prompt for several seeds, then judges each mesh
without the prior: shape by voxel IoU against the analytic primitives (scale-normalised,
the mesh turned square to the axes first), colour by the nearest palette hue (Oklch).
Prints a table and the totals. Asserts nothing.

    python bench/prompt_accuracy.py [--seeds 2] [--quality high] [--steps N] [--refine-steps N] [--shapes cube,cone]
                                    [--colors red] [--workers 2]

--quality applies the preset `promptmesh generate --quality` applies (steps, mesh resolution,
refinement); --steps and --refine-steps given explicitly win, as they do there.

With --workers N the prompts run in N processes of one thread each (bench/pool.py; seconds
per object are per worker).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pool import run_all  # noqa: E402

from promptmesh.backend.prior.shapes import PALETTE, SHAPES  # noqa: E402
from promptmesh.shared.vocab import Quality  # noqa: E402


def generate_and_judge(shape: str, color: str, seed: int, model: str, settings: dict[str, Any]) -> tuple:
    """One row: (shape, colour, seed, judged shape, judged colour, IoU with the judged shape,
    seconds, IoU with the prompted shape, the mesh's mean colour as sRGB hex)."""
    from promptmesh.backend.mesh import MeshError
    from promptmesh.backend.pipeline import run
    from promptmesh.backend.prior.judge import judge_mesh
    from promptmesh.shared.spec import JobSpec

    t0 = time.perf_counter()
    try:
        spec = JobSpec(prompt=f"a {color} {shape}", seed=seed, model=model, **settings)
        verdict = judge_mesh(run(spec).mesh)
        judged, prompted = (verdict.shape, verdict.color, verdict.iou), verdict.ious[shape]
        mean = "#" + "".join(f"{round(v * 255):02x}" for v in verdict.rgb)
    except MeshError:
        judged, prompted, mean = ("(none)", "(none)", 0.0), 0.0, "-"
    return (shape, color, seed, *judged, time.perf_counter() - t0, prompted, mean)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed .. first-seed + seeds - 1")
    p.add_argument("--quality", choices=list(Quality), default=Quality.STANDARD, help="the model's preset, as generate --quality")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--colors", default=",".join(PALETTE))
    p.add_argument("--model", default="embedded")
    p.add_argument("--refine-steps", type=int, default=None, help="the refinement stage's steps (default: the model's)")
    p.add_argument("--workers", type=int, default=1, help="processes of one thread each; 1 runs here with all threads")
    args = p.parse_args()
    settings = {"quality": args.quality, "steps": args.steps, "refine_steps": args.refine_steps}  # None: the preset's
    print(f"model {args.model}, quality {args.quality}, explicitly: steps {args.steps}, refine steps {args.refine_steps}")
    jobs = [
        (shape, color, seed, args.model, settings)
        for shape in args.shapes.split(",") for color in args.colors.split(",")
        for seed in range(args.first_seed, args.first_seed + args.seeds)
    ]
    print(f"{'prompt':<22} {'seed':>4} {'shape':<9} {'colour':<7} {'IoU':>5} {'s':>6}  mean colour")
    rows = []

    def report(row: tuple) -> None:
        rows.append(row)
        shape, color, seed, judged_shape, judged_color, iou, dt, _, mean = row
        print(f"{f'a {color} {shape}':<22} {seed:>4} {judged_shape:<9} {judged_color:<7} {iou:>5.2f} {dt:>6.1f}  {mean}",
              flush=True)

    run_all(generate_and_judge, jobs, args.workers, report)
    n = len(rows)
    shape_ok = sum(r[0] == r[3] for r in rows)
    color_ok = sum(r[1] == r[4] for r in rows)
    both = sum(r[0] == r[3] and r[1] == r[4] for r in rows)
    print(f"\nobjects: {n}; shape accuracy {shape_ok / n:.0%}; colour accuracy {color_ok / n:.0%}; "
          f"both right {both / n:.0%}; median {statistics.median(r[6] for r in rows):.0f} s per object")
    print("mean IoU with the prompted primitive: " + ", ".join(
        f"{shape} {statistics.mean(r[7] for r in rows if r[0] == shape):.3f}" for shape in dict.fromkeys(r[0] for r in rows)))
    confusions: dict[tuple[str, str], int] = {}
    for r in rows:
        if r[0] != r[3]:
            confusions[(r[0], r[3])] = confusions.get((r[0], r[3]), 0) + 1
    if confusions:
        print("shape confusions (prompted -> judged): " + ", ".join(f"{a}->{b} x{c}" for (a, b), c in sorted(confusions.items())))


if __name__ == "__main__":
    main()

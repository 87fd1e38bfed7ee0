"""What the refinement stage buys, on the same NeRF: for each prompt the NeRF stage runs once
(`pipeline.run` without refinement), then the refinement (backend/refine.py) runs on that
trainer. Both meshes are judged without the prior (bench/prompt_accuracy.py's judge): the
verdicts, the IoU with the prompted primitive, and for cubes a sharpness figure (the share of
the surface, by area, whose normal lies within 10 degrees of one of the cube's axes at its
best yaw). Prints seconds of the NeRF stage and of the refinement. Asserts nothing.

    python bench/refine.py [--seeds 2] [--shapes cube,cylinder] [--colors red|all] [--refine-steps N] [--workers 2]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pool import run_all  # noqa: E402

from promptmesh.backend.prior.shapes import PALETTE, SHAPES  # noqa: E402
from promptmesh.shared.result import Mesh  # noqa: E402


def cube_sharpness(mesh: Mesh) -> float:
    """Area share of faces whose normal is within 10 degrees of an axis, at the best yaw (1-degree search)."""
    tri = mesh.vertices[mesh.faces].astype(np.float64)
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    area = np.linalg.norm(cross, axis=1)
    normal = cross / np.maximum(area[:, None], 1e-12)
    best = 0.0
    for yaw in np.radians(np.arange(0.0, 90.0, 1.0)):
        c, s = math.cos(yaw), math.sin(yaw)
        turned = np.abs(normal @ np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]))
        best = max(best, float((area * (turned.max(1) > math.cos(math.radians(10.0)))).sum() / area.sum()))
    return best


def nerf_then_refine(shape: str, color: str, seed: int, refine_steps: int) -> tuple:
    """(shape, colour, seed, [(judged shape, judged colour, IoU with the prompt, sharpness, seconds)] before/after)."""
    import torch

    from promptmesh.backend.mesh import MeshError
    from promptmesh.backend.pipeline import run
    from promptmesh.backend.prior.judge import judge_mesh
    from promptmesh.backend.stages import DMTetModel
    from promptmesh.shared.spec import JobSpec

    def judged(mesh: Mesh, seconds: float) -> tuple:
        v = judge_mesh(mesh)
        return (v.shape, v.color, v.ious[shape], cube_sharpness(mesh) if shape == "cube" else float("nan"), seconds)

    t0 = time.perf_counter()
    result = run(JobSpec(prompt=f"a {color} {shape}", seed=seed, refine_steps=0, texture_size=0))  # geometry only
    before = judged(result.mesh, time.perf_counter() - t0)
    nerf = result.nerf
    ctx = nerf.ctx
    ctx.recipe = replace(ctx.recipe, refine=replace(ctx.recipe.refine, steps=refine_steps))
    t1 = time.perf_counter()
    try:
        refiner = DMTetModel(ctx, nerf, nerf.surface_density())
        while refiner.step < refine_steps:
            refiner.train_step()
        with torch.no_grad():
            after = judged(refiner.mesh(), time.perf_counter() - t1)
    except MeshError:
        after = ("(none)", "(none)", 0.0, float("nan"), time.perf_counter() - t1)
    return shape, color, seed, before, after


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--colors", default="red")
    p.add_argument("--refine-steps", type=int, default=300)
    p.add_argument("--workers", type=int, default=1, help="processes of one thread each; 1 runs here with all threads")
    args = p.parse_args()
    colors = list(PALETTE) if args.colors == "all" else args.colors.split(",")
    jobs = [(shape, color, seed, args.refine_steps) for shape in args.shapes.split(",")
            for color in colors for seed in range(args.seeds)]
    print(f"{'prompt':<20} {'seed':>4}  {'before: shape colour IoU sharp s':<36} {'after: shape colour IoU sharp s'}")
    rows = []

    def cell(j: tuple) -> str:
        return f"{j[0]:<9} {j[1]:<7} {j[2]:.3f} {j[3]:.2f} {j[4]:5.1f}"

    def report(row: tuple) -> None:
        rows.append(row)
        shape, color, seed, before, after = row
        print(f"{f'a {color} {shape}':<20} {seed:>4}  {cell(before):<36} {cell(after)}", flush=True)

    run_all(nerf_then_refine, jobs, args.workers, report)
    print(f"\n{'shape':<9} {'n':>2} {'IoU before':>10} {'after':>6} {'right before':>12} {'after':>6}")
    for shape in dict.fromkeys(r[0] for r in rows):
        mine = [r for r in rows if r[0] == shape]
        iou = [statistics.mean(r[k][2] for r in mine) for k in (3, 4)]
        right = [sum(r[k][0] == shape and r[k][1] == r[1] for r in mine) / len(mine) for k in (3, 4)]
        print(f"{shape:<9} {len(mine):>2} {iou[0]:>10.3f} {iou[1]:>6.3f} {right[0]:>12.0%} {right[1]:>6.0%}")
    both = [sum(r[k][0] == r[0] and r[k][1] == r[1] for r in rows) / len(rows) for k in (3, 4)]
    print(f"{'all':<9} {len(rows):>2} {'':>10} {'':>6} {both[0]:>12.0%} {both[1]:>6.0%}  (shape and colour right)")
    nerf = statistics.median(r[3][4] for r in rows)
    refine = statistics.median(r[4][4] for r in rows)
    print(f"median seconds: NeRF stage + meshing {nerf:.1f}, refinement {refine:.1f} (+{refine / nerf:.0%})")


if __name__ == "__main__":
    main()

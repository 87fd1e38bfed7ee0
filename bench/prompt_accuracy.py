"""Quality benchmark of the embedded prior's whole generate path.

Runs `pipeline.run` on every shape x colour prompt for several seeds, then judges each mesh
without the prior: shape by voxel IoU against the analytic primitives (scale-normalised,
searched over rotations about the vertical axis), colour by the nearest palette entry in
CIELAB. Prints a table and the totals. Asserts nothing.

    python bench/prompt_accuracy.py [--seeds 2] [--steps N] [--shapes cube,cone] [--colors red]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.mesh import MeshError  # noqa: E402
from backend.pipeline import run  # noqa: E402
from backend.prior.judge import judge_mesh  # noqa: E402
from backend.prior.shapes import PALETTE, SHAPES  # noqa: E402
from shared.spec import JobSpec  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed .. first-seed + seeds - 1")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--colors", default=",".join(PALETTE))
    p.add_argument("--model", default="embedded")
    args = p.parse_args()
    rows = []
    print(f"{'prompt':<22} {'seed':>4} {'shape':<9} {'colour':<7} {'IoU':>5} {'s':>6}")
    for shape in args.shapes.split(","):
        for color in args.colors.split(","):
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                prompt = f"a {color} {shape}"
                t0 = time.perf_counter()
                try:
                    result = run(JobSpec(prompt=prompt, seed=seed, steps=args.steps, model=args.model))
                    verdict = judge_mesh(result.mesh)
                    judged = (verdict.shape, verdict.color, verdict.iou)
                except MeshError:
                    judged = ("(none)", "(none)", 0.0)
                dt = time.perf_counter() - t0
                rows.append((shape, color, seed, *judged, dt))
                print(f"{prompt:<22} {seed:>4} {judged[0]:<9} {judged[1]:<7} {judged[2]:>5.2f} {dt:>6.1f}", flush=True)
    n = len(rows)
    shape_ok = sum(r[0] == r[3] for r in rows)
    color_ok = sum(r[1] == r[4] for r in rows)
    both = sum(r[0] == r[3] and r[1] == r[4] for r in rows)
    print(f"\nobjects: {n}; shape accuracy {shape_ok / n:.0%}; colour accuracy {color_ok / n:.0%}; "
          f"both right {both / n:.0%}; median {statistics.median(r[6] for r in rows):.0f} s per object")
    confusions = {}
    for r in rows:
        if r[0] != r[3]:
            confusions[(r[0], r[3])] = confusions.get((r[0], r[3]), 0) + 1
    if confusions:
        print("shape confusions (prompted -> judged): " + ", ".join(f"{a}->{b} x{c}" for (a, b), c in sorted(confusions.items())))


if __name__ == "__main__":
    main()

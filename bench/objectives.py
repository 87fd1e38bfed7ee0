"""The distillation objectives compared on the embedded world, judged as bench/prompt_accuracy.py
and bench/janus.py judge.

Every objective x the five shapes x colours x seeds (both right: shape by voxel IoU, colour by
hue; mean IoU with the prompted shape; cube sharpness: the share of a cube's surface area whose
normal lies within 10 degrees of an axis, the mesh squared to the axes first; the mean albedo's
Oklch chroma over the prompted palette colour's, where over-saturated or washed-out colour
shows), plus the four objects with a front x colours x seeds (right as judge_janus says, colour
right), at each step budget; seconds per object. Prints a row per object, then one markdown
table. Asserts nothing.

    python bench/objectives.py [--objectives sds,nfsd,csd,ism,vsd] [--steps 300,600,1000] [--colors red,blue]
                               [--seeds 2] [--shapes cube,torus] [--objects mug,duck] [--workers 2] [--quick]
                               [--texture-size 0] [--rows FILE]

The whole grid takes longer than a working session, so --rows FILE keeps it across runs: every
object's row is appended to FILE (JSON lines, with the commit and the time it ran) as it is
judged, objects already in FILE are not run again, and the table covers FILE's rows of the grid
asked for. A run stopped part way loses only the objects not yet written (those in flight, and
any finished behind one in flight: rows are written in the grid's order).

Seconds per object exclude the texture bake unless --texture-size asks for one (the judges
read vertex colours).

--quick: every objective, one shape and one object, one colour and seed, 3 steps and a coarse
mesh (the tests' dry run: it checks the plumbing, not the objectives).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pool import run_all  # noqa: E402

from promptmesh.backend.prior.shapes import OBJECTS, PALETTE, SHAPES  # noqa: E402
from promptmesh.shared.vocab import Objective  # noqa: E402

OBJECTIVES = (Objective.SDS, Objective.NFSD, Objective.CSD, Objective.ISM, Objective.VSD)
SHARP_DEGREES = 10.0


def cube_sharpness(vertices: Any, faces: Any) -> float:
    """The share of the surface's area whose normal is within SHARP_DEGREES of an axis, the mesh
    turned square to the axes first (judge.square_yaw): 1.0 for a perfect cube, about 0.1 for a sphere."""
    import numpy as np

    from promptmesh.backend.prior.judge import _turned, square_yaw

    v = _turned(vertices, square_yaw(vertices, faces)).astype(np.float64)
    cross = np.cross(v[faces[:, 1]] - v[faces[:, 0]], v[faces[:, 2]] - v[faces[:, 0]])
    area = np.linalg.norm(cross, axis=1)
    normal = cross / np.maximum(area, 1e-12)[:, None]
    near = np.abs(normal).max(1) >= np.cos(np.radians(SHARP_DEGREES))
    return float(area[near].sum() / max(area.sum(), 1e-12))


def chroma(rgb: Any) -> float:
    from coloraide import Color

    return float(Color("srgb", [float(c) for c in rgb]).convert("oklch")["chroma"])


def generate_and_judge(objective: str, steps: int, subject: str, color: str, seed: int, settings: dict[str, Any]) -> dict:
    """One object: its verdicts and seconds (a mesh that fails counts as wrong)."""
    from promptmesh.backend.mesh import MeshError
    from promptmesh.backend.pipeline import run
    from promptmesh.backend.prior.judge import judge_color, judge_janus, judge_mesh
    from promptmesh.shared.spec import JobSpec

    row: dict[str, Any] = {"objective": objective, "steps": steps, "subject": subject, "color": color, "seed": seed,
                           "kind": "shape" if subject in SHAPES else "front"}
    t0 = time.perf_counter()
    try:
        result = run(JobSpec(prompt=f"a {color} {subject}", seed=seed, steps=steps, objective=objective, **settings))
        mesh = result.mesh
        row["passes"] = result.nerf.ctx.objective.passes / max(1, steps)
        if subject in SHAPES:
            verdict = judge_mesh(mesh)
            row |= {"judged": verdict.shape, "judged_color": verdict.color, "iou": verdict.ious[subject],
                    "chroma": chroma(verdict.rgb) / chroma(PALETTE[color])}
            if subject == "cube":
                row["sharpness"] = cube_sharpness(mesh.vertices, mesh.faces)
        else:
            janus = judge_janus(mesh, subject)
            # the right object below judge_janus's IoU bar is "weak", not right
            judged = subject if janus.kind == "right" else "weak" if janus.best == "right" else janus.best
            row |= {"judged": judged, "judged_color": judge_color(mesh)}
    except MeshError:
        row |= {"judged": "(none)", "judged_color": "(none)", "iou": 0.0}
    row["seconds"] = time.perf_counter() - t0
    row["right"] = row["judged"] == subject and row["judged_color"] == color
    return row


KEY = ("objective", "steps", "subject", "color", "seed")  # a job's first fields, in its order


def _key(row: dict) -> tuple:
    return tuple(row[k] for k in KEY)


def _kept_rows(path: Path | None, wanted: dict[tuple, int], model: str) -> list[dict]:
    """The rows of `path` whose key is in `wanted` on `model` (the last, where one ran twice)."""
    if path is None or not path.exists():
        return []
    kept = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if row.get("model") == model and _key(row) in wanted:
                kept[_key(row)] = row
    return list(kept.values())


def _commit() -> str:
    """The checkout's commit, so that rows kept across runs say which code made them."""
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=Path(__file__).parent, check=False)
    return out.stdout.strip() or "unknown"


def summary(rows: list[dict], shapes: list[str]) -> list[str]:
    """The markdown table: one line per objective and step budget."""
    head = (["objective", "steps", "both right (shapes)", *[f"IoU {s}" for s in shapes], "cube sharpness",
             "chroma / palette", "fronts right", "passes/step", "s/object"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def mean(values: list[float]) -> str:
        return f"{statistics.mean(values):.3f}" if values else "-"

    for key in dict.fromkeys((r["objective"], r["steps"]) for r in rows):
        mine = [r for r in rows if (r["objective"], r["steps"]) == key]
        prims = [r for r in mine if r["kind"] == "shape"]
        fronts = [r for r in mine if r["kind"] == "front"]
        cells = [
            str(key[0]), str(key[1]),
            f"{sum(r['right'] for r in prims)}/{len(prims)}" if prims else "-",
            *[mean([r["iou"] for r in prims if r["subject"] == s]) for s in shapes],
            mean([r["sharpness"] for r in prims if "sharpness" in r]),
            mean([r["chroma"] for r in prims if "chroma" in r]),
            f"{sum(r['right'] for r in fronts)}/{len(fronts)}" if fronts else "-",
            mean([r["passes"] for r in mine if "passes" in r]),
            f"{statistics.mean(r['seconds'] for r in mine):.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser()
    p.add_argument("--objectives", default=",".join(OBJECTIVES))
    p.add_argument("--steps", default="300,600,1000", help="step budgets, comma-separated")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--objects", default=",".join(OBJECTS), help="objects with a front ('' for none)")
    p.add_argument("--colors", default=",".join(PALETTE))
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--model", default="embedded")
    p.add_argument("--workers", type=int, default=1, help="processes of one thread each; 1 runs here with all threads")
    p.add_argument("--texture-size", type=int, default=0,
                   help="the baked texture's side (default 0: vertex colours, which the judges read; the bake is no objective's)")
    p.add_argument("--quick", action="store_true", help="a dry run: 3 steps, one shape, one object, one colour and seed")
    p.add_argument("--rows", type=Path, default=None, help="a JSON-lines file the rows are kept in across runs")
    args = p.parse_args(argv)
    settings: dict[str, Any] = {"model": args.model, "texture_size": args.texture_size}
    if args.quick:
        args.steps, args.shapes, args.objects, args.colors, args.seeds = "3", "cube", "mug", "red", 1
        settings |= {"mesh_resolution": 32}
    shapes = [s for s in args.shapes.split(",") if s]
    subjects = shapes + [o for o in args.objects.split(",") if o]
    jobs = [(objective, int(steps), subject, color, seed, settings)
            for steps in args.steps.split(",") for objective in args.objectives.split(",")
            for subject in subjects for color in args.colors.split(",")
            for seed in range(args.first_seed, args.first_seed + args.seeds)]
    order = {job[:len(KEY)]: i for i, job in enumerate(jobs)}
    rows = _kept_rows(args.rows, order, args.model)
    done = {_key(r) for r in rows}
    todo = [job for job in jobs if job[:len(KEY)] not in done]
    print(f"{len(jobs)} objects, {len(todo)} to run; model {args.model}; workers {args.workers}")
    print(f"{'objective':<9} {'steps':>5} {'prompt':<20} {'seed':>4} {'judged':<9} {'colour':<7} {'IoU':>5} {'s':>6}")
    stamp = {"model": args.model, "commit": _commit()}

    def report(row: dict) -> None:
        rows.append(row)
        if args.rows is not None:
            with args.rows.open("a") as f:
                f.write(json.dumps(row | stamp | {"at": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
        print(f"{row['objective']:<9} {row['steps']:>5} {'a ' + row['color'] + ' ' + row['subject']:<20} {row['seed']:>4} "
              f"{row['judged']:<9} {row['judged_color']:<7} {row.get('iou', float('nan')):>5.2f} {row['seconds']:>6.1f}",
              flush=True)

    run_all(generate_and_judge, todo, args.workers, report)
    rows.sort(key=lambda r: order[_key(r)])
    print()
    print("\n".join(summary(rows, shapes)))
    return rows


if __name__ == "__main__":
    main()

"""The Janus benchmark: objects with a front, generated with each way of telling the prior the view.

For every object (mug, chair, arrow, duck) x colour x seed and every configuration (a job
spec `view_prompt` setting; "default" is the model's own; "blind" is DreamFusion's hard view words
with the embedded prior always told it sees the front, as a prior without a camera input
trained on front-leaning photos would assume: an ablation, patched in here, not a product
setting), runs `pipeline.run` and judges the mesh
without the prior: `judge_janus` (right / janus / other, searched over yaw) and the colour by
the nearest palette hue. Prints a row per object, then per configuration the Janus rate,
shape-right, colour-right and both-right rates and the median seconds per object, and the
figures `janus_rate_CONFIG` and `both_right_CONFIG`. Asserts nothing.

    python bench/janus.py [--configs blind,hard,interpolated,perp-neg,camera,default] [--objects mug,duck]
                          [--colors red,blue] [--seeds 3] [--steps N] [--workers 2]
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

from promptmesh.backend.prior.model import camera_features  # noqa: E402
from promptmesh.backend.prior.shapes import OBJECTS  # noqa: E402
from promptmesh.shared.vocab import ViewPrompt  # noqa: E402

DEFAULT, BLIND = "default", "blind"


def _front_camera_features(cameras, ranges):  # type: ignore[no-untyped-def]
    """The embedded prior's camera features with the azimuth turned to the front (sin 0, cos 1)."""
    from promptmesh.backend.prior.model import camera_features

    features = camera_features(cameras, ranges).clone()
    features[:, 0], features[:, 1] = 0.0, 1.0
    return features


def generate_and_judge(config: str, name: str, color: str, seed: int, steps: int | None, model: str) -> tuple:
    """One row: (config, object, colour, seed, verdict kind, best candidate, judged colour, seconds)."""
    from promptmesh.backend.guidance import embedded
    from promptmesh.backend.mesh import MeshError
    from promptmesh.backend.pipeline import run
    from promptmesh.backend.prior.judge import judge_color, judge_janus
    from promptmesh.shared.spec import JobSpec

    embedded.camera_features = _front_camera_features if config == BLIND else camera_features  # type: ignore[assignment]
    t0 = time.perf_counter()
    spec = JobSpec(prompt=f"a {color} {name}", seed=seed, steps=steps, model=model,
                   view_prompt="hard" if config == BLIND else None if config == DEFAULT else config)
    try:
        mesh = run(spec).mesh
        verdict = judge_janus(mesh, name)
        judged = (verdict.kind, verdict.best, judge_color(mesh))
    except MeshError:
        judged = ("other", "(none)", "(none)")
    return (config, name, color, seed, *judged, time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--configs", default=",".join([BLIND, *ViewPrompt, DEFAULT]))
    p.add_argument("--objects", default=",".join(OBJECTS))
    p.add_argument("--colors", default="red,blue")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--model", default="embedded")
    p.add_argument("--workers", type=int, default=1, help="processes of one thread each; 1 runs here with all threads")
    args = p.parse_args()
    configs = args.configs.split(",")
    jobs = [(config, name, color, seed, args.steps, args.model) for config in configs
            for name in args.objects.split(",") for color in args.colors.split(",") for seed in range(args.seeds)]
    print(f"{'config':<13} {'prompt':<16} {'seed':>4} {'verdict':<7} {'best':<8} {'colour':<7} {'s':>6}")
    rows: list[tuple] = []

    def show(row: tuple) -> None:
        rows.append(row)
        config, name, color, seed, kind, best, judged_color, dt = row
        print(f"{config:<13} {f'a {color} {name}':<16} {seed:>4} {kind:<7} {best:<8} {judged_color:<7} {dt:>6.1f}",
              flush=True)

    run_all(generate_and_judge, jobs, args.workers, show)
    print(f"\n{'config':<13} {'objects':>7} {'janus':>6} {'shape':>6} {'colour':>6} {'both':>6} {'median s':>9}")
    for config in configs:
        mine = [r for r in rows if r[0] == config]
        n = len(mine)
        janus = sum(r[4] == "janus" for r in mine) / n
        shape = sum(r[4] == "right" for r in mine) / n
        color = sum(r[2] == r[6] for r in mine) / n
        both = sum(r[4] == "right" and r[2] == r[6] for r in mine) / n
        median = statistics.median(r[7] for r in mine)
        print(f"{config:<13} {n:>7} {janus:>6.0%} {shape:>6.0%} {color:>6.0%} {both:>6.0%} {median:>9.0f}")
    for config in configs:
        mine = [r for r in rows if r[0] == config]
        report(f"janus_rate_{config}", 100 * sum(r[4] == "janus" for r in mine) / len(mine), "%")
        report(f"both_right_{config}", 100 * sum(r[4] == "right" and r[2] == r[6] for r in mine) / len(mine), "%")


if __name__ == "__main__":
    main()

"""A short real generation on a CUDA GPU, for anyone who has one: please paste its output into
bug reports.

    python bench/gpu_smoke.py [--model sd21] [--steps 300] [--out gpu_smoke]

Runs `--steps` SDS steps with the model's default recipe, then prints seconds per step, the peak
GPU memory (torch.cuda.max_memory_allocated), the time to the first preview and the load time,
and writes the mesh (GLB) and a turntable (MP4) under --out.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from promptmesh.backend import __version__
from promptmesh.backend.export import write_mesh
from promptmesh.backend.pipeline import PreviewEvent, StageEvent, StepEvent, run
from promptmesh.backend.video import write_turntable
from promptmesh.shared.spec import JobSpec


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd21")
    parser.add_argument("--prompt", default="a ceramic mug with a handle")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="gpu_smoke")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this smoke test is for GPU machines (torch sees none)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    marks: dict[str, float] = {}
    steps: list[float] = []
    t0 = time.perf_counter()

    def on_event(event: object) -> None:
        now = time.perf_counter() - t0
        if isinstance(event, StageEvent):
            marks.setdefault(event.stage, now)
        elif isinstance(event, StepEvent):
            steps.append(now)
        elif isinstance(event, PreviewEvent):
            marks.setdefault("first preview", now)

    torch.cuda.reset_peak_memory_stats()
    spec = JobSpec(prompt=args.prompt, model=args.model, steps=args.steps, device="cuda", preview_every=50)
    result = run(spec, on_event)
    write_mesh(result.mesh, out / "mesh.glb")
    write_turntable(result.nerf, out / "turntable.mp4")
    per_step = (steps[-1] - steps[0]) / max(1, len(steps) - 1)
    print(f"promptmesh {__version__}, torch {torch.__version__}, {torch.cuda.get_device_name()}, {platform.platform()}")
    print(f"model {args.model} ({result.metadata['weights']['source']} @ {result.metadata['weights']['revision']})")
    print(f"{len(steps)} steps at {result.metadata['resolution']} px: {per_step:.3f} s per step; "
          f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    print(f"load {marks.get('optimising', 0):.1f} s, first preview at {marks.get('first preview', float('nan')):.1f} s, "
          f"total {time.perf_counter() - t0:.1f} s; {result.metadata['faces']} faces -> {out}/mesh.glb, turntable.mp4")
    return 0


if __name__ == "__main__":
    sys.exit(main())

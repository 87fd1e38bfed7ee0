"""SDS iteration speed and peak memory on this machine: the trainer's whole step, then one
iteration split into render forward, guidance (encode + UNet) and backward, and the page faults
of a step. Prints figures; asserts nothing.

    python bench/sds_speed.py [--model embedded|PATH] [--resolution 64] [--steps 40] [--threads N] [--at 0.5]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from figures import report  # noqa: E402

from promptmesh.backend.cameras import sample_cameras  # noqa: E402
from promptmesh.backend.guidance import load_guidance  # noqa: E402
from promptmesh.backend.process import prepare_process  # noqa: E402
from promptmesh.backend.recipe import resolve  # noqa: E402
from promptmesh.backend.renderer import render  # noqa: E402
from promptmesh.backend.stages import JobContext, NeRFModel  # noqa: E402
from promptmesh.shared.spec import JobSpec  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny-sd", help="'tiny-sd' (built here), 'embedded', or a path")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=60, help="steps run first so the occupancy grid is in use")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--at", type=float, default=0.5, help="where in the schedule the warm-up starts (fraction)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model
    if model == "tiny-sd":
        from tiny_sd import save_tiny_stable_diffusion

        model = str(save_tiny_stable_diffusion(Path(tempfile.mkdtemp()) / "tiny-sd"))
    prepare_process()
    guidance = load_guidance(model)
    emb = guidance.embed_prompt("a red cube")
    recipe = resolve(guidance.card, JobSpec("a red cube", resolution=args.resolution))
    trainer = NeRFModel(JobContext.create(guidance, emb, recipe, 0, torch.device("cpu")), seed=0)
    # Start at `--at` of the schedule (all hash-grid levels active by half of it), so the steps
    # timed are typical of the run rather than of its coarse beginning.
    trainer.step = int(args.at * recipe.schedule.steps)
    trainer._update_schedule()
    for _ in range(args.warmup):
        trainer.train_step()
    faults0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step()
    report("train_step", (time.perf_counter() - t0) / args.steps * 1000, "ms")
    # glibc handing a step's freed buffers back to the kernel shows as minor faults (process.keep_freed_memory)
    report("page_faults_per_step", (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / args.steps, "faults")
    fwd = gd = bwd = 0.0
    samples = 0
    gen = torch.Generator().manual_seed(1)
    for _ in range(args.steps):
        cams = sample_cameras(1, gen, recipe.cameras)
        t0 = time.perf_counter()
        out = render(trainer.field, trainer.background, cams, args.resolution, args.resolution, shading="lambertian",
                     occupancy=trainer.occupancy, config=recipe.render, generator=gen)
        t1 = time.perf_counter()
        loss = guidance.sds_loss(out.rgb, emb, cams, recipe.guidance_scale, recipe.schedule.t_range, gen) + 1e-2 * out.orientation
        t2 = time.perf_counter()
        trainer.optimizer.zero_grad()
        loss.backward()
        trainer.optimizer.step()
        t3 = time.perf_counter()
        fwd, gd, bwd = fwd + t1 - t0, gd + t2 - t1, bwd + t3 - t2
        samples += out.samples
    n = args.steps
    total = (fwd + gd + bwd) / n
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"model={args.model} resolution={args.resolution} threads={torch.get_num_threads()} "
          f"occupied={trainer.occupancy.occupied_fraction:.2f} samples/step={samples / n:.0f}")
    print(f"per iteration: {total:.3f} s ({1 / total:.2f} it/s) = render {fwd / n:.3f} + guidance {gd / n:.3f} "
          f"+ backward {bwd / n:.3f}")
    print(f"peak RSS {peak_mb:.0f} MB")
    report("iteration", total * 1000, "ms")
    report("render", fwd / n * 1000, "ms")
    report("guidance", gd / n * 1000, "ms")
    report("backward", bwd / n * 1000, "ms")
    report("samples_per_step", samples / n, "samples")
    report("peak_rss", peak_mb, "MB")


if __name__ == "__main__":
    main()

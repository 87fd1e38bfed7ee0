"""Time, denoiser passes and memory per NeRF step of each distillation objective.

Each objective runs in a fresh process (so that its peak resident memory is its own): the
prior loaded, a NeRF stage built, `--warmup` steps, then `--steps` timed. Prints one line per
objective: ms per step, denoiser passes per view per step (ObjectiveState.passes), the peak RSS
of the process, and VSD's LoRA: its trainable parameters and their bytes with gradients and
AdamW's two moments. Asserts nothing.

    python bench/objective_cost.py [--model embedded|tiny-sd|FOLDER] [--objectives sds,nfsd,csd,ism,vsd]
                                   [--steps 20] [--warmup 3] [--resolution N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = r'''
import json, resource, sys, time
import torch
from promptmesh.backend.pipeline import cached_guidance
from promptmesh.backend.recipe import resolve
from promptmesh.backend.stages import JobContext, NeRFModel
from promptmesh.shared.spec import JobSpec
model, objective, steps, warmup, resolution = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
g = cached_guidance(model, "cpu")
spec = JobSpec("a red cube", model=model, steps=1000, objective=objective,
               resolution=None if resolution == "none" else int(resolution))
recipe = resolve(g.card, spec)
ctx = JobContext.create(g, g.embed_prompt(spec.prompt), recipe, 0, torch.device("cpu"))
nerf = NeRFModel(ctx, 0)
for _ in range(warmup):
    nerf.train_step()
passes = ctx.objective.passes
t0 = time.perf_counter()
for _ in range(steps):
    nerf.train_step()
ms = (time.perf_counter() - t0) / steps * 1000
lora = ctx.objective.lora
params = sum(p.numel() for p in lora.trainable().values()) if lora else 0
print(json.dumps({"objective": objective, "ms": ms, "passes": (ctx.objective.passes - passes) / steps,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "lora_params": params,
                  # float32 values, their gradients and AdamW's two moments
                  "lora_mb": params * 4 * 4 / 2**20, "threads": torch.get_num_threads(), "resolution": recipe.resolution}))
'''


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="embedded", help="embedded, tiny-sd (the tests' tiny Stable Diffusion) or a folder")
    p.add_argument("--objectives", default="sds,nfsd,csd,ism,vsd")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--resolution", default="none", help="render side (default: the model's)")
    args = p.parse_args()
    model = args.model
    if model == "tiny-sd":
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_sd import save_tiny_stable_diffusion

        model = str(save_tiny_stable_diffusion(Path(tempfile.mkdtemp()) / "tiny-sd"))
    print(f"model {args.model}; {args.steps} steps timed after {args.warmup}")
    print(f"{'objective':<9} {'ms/step':>8} {'passes':>6} {'peak RSS MB':>11} {'LoRA params':>11} {'LoRA MB':>8}")
    for objective in args.objectives.split(","):
        out = subprocess.run([sys.executable, "-c", CHILD, model, objective, str(args.steps), str(args.warmup),
                              args.resolution], capture_output=True, text=True, cwd=ROOT, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"{r['objective']:<9} {r['ms']:>8.1f} {r['passes']:>6.2f} {r['rss_mb']:>11.0f} {r['lora_params']:>11,} "
              f"{r['lora_mb']:>8.2f}   (threads {r['threads']}, {r['resolution']} px)", flush=True)


if __name__ == "__main__":
    main()

"""Everything a lent GPU machine should run, in one command that ends within its budget (9 minutes).

    python bench/gpu_day.py --out gpu-day [--budget 540] [--work /tmp/promptmesh-gpu-day] [--cores N]
    python bench/gpu_day.py --dry-run --out DIR      # the same at tiny sizes on the CPU (the tests run it)

No Hub access is needed (docs/gpu_day.md has the bare-machine install). In order:
1. smoke: Stable Diffusion 2.1-base, MVDream and Zero-1-to-3 XL at their published sizes with
   random weights (bench/fullsize_cpu.py builds them; fp16 files), each path in a process of its
   own through bench/gpu_smoke.py: seconds per step (SD's NeRF, its refinement at 512 px,
   MVDream's four views, an image job with SD and Zero-1-to-3), peak VRAM per stage against the
   8 GB budget, the time to the first preview, and the fp16 path checked for NaNs. Always runs.
2. trainings, side by side on the GPU: the view-biased embedded prior and the multi-view prior,
   both from the shipped weights (`promptmesh prior train`, with the settings #12 and #13 left
   ready), with as many steps as the time left allows; dropped, with the reason written, when
   fewer than MIN_TRAIN_STEPS fit. Meanwhile the CPU cores run the accuracy and Janus benchmarks
   on the shipped weights, the baseline on this machine.
3. the same benchmarks on the newly trained 2D prior, and bench/mv_consistency.py on the
   multi-view one (or, without trainings, the baseline benchmarks alone).
Before it starts it prints and writes its plan with the estimated seconds of each part. Under
--out: plan.json, env.txt, smoke/ (report.txt: what to paste into a bug report, and the figures
as JSON), train/ (each prior folder and loss.csv), logs/ (each training's and benchmark's
output), summary.json. Large files (the random models, the training datasets and checkpoints) stay under
--work.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from fullsize_cpu import build_models, report, run_paths  # noqa: E402

CLI = [sys.executable, "-m", "promptmesh.backend.cli"]
MIN_TRAIN_STEPS = 300  # fewer steps of 2,048 than this moved no benchmark in sessions 11-16: not worth the minutes


@dataclass(frozen=True)
class Mode:
    """Sizes and estimated seconds. The full mode's figures come from earlier GPU sessions where
    one measured them (the stops' notes, cited) and are guesses otherwise (marked)."""

    device: str
    size: str
    smoke_steps: int
    smoke_refine_steps: int
    preview_every: int
    build_s: float  # guess: the random full-size models built and saved on 16 cores
    smoke_fixed_s: float  # per path: process start, imports, loading, meshing and texture (guess)
    sd_step_s: float  # guess for fp16 on an H100
    refine_step_s: float  # guess (512 px renders through the VAE), its grid's setup included
    mv_step_s: float  # guess
    image_step_s: float  # an image job's step with SD 2.1 and Zero-1-to-3 XL (guess: SD's and a smaller UNet's)
    train: tuple[str, ...]  # `prior train` options both trainings share
    train_2d: tuple[str, ...]  # the view-biased 2D prior's own
    max_train_steps: int
    dataset_s: float  # H100: 131,072 renders for each of the 2D and 4-view datasets side by side, 105 s (stop 29)
    train_step_s: float  # H100: batches of 2,048, both trainings side by side, 341 ms a step (stop 29)
    benches: dict[str, tuple[str, ...]]  # bench/NAME.py's options, by NAME
    objects: dict[str, int]  # the generations each makes
    baseline: tuple[str, ...]  # which run on the shipped weights beside the trainings
    after: tuple[str, ...]  # which run on the trained 2D prior after them
    object_s: float  # a generation on one core: 31-37 s on the 2-core EPYC here (stops 36, 37)
    judge_setup_s: float  # the judge's references, once per process: about 13 s (stop 34)
    mv_consistency: tuple[str, ...] | None  # its options for the trained multi-view prior; None: not run
    mv_consistency_s: float  # guess


FULL = Mode(
    device="cuda", size="full", smoke_steps=50, smoke_refine_steps=10, preview_every=10,
    build_s=90, smoke_fixed_s=40, sd_step_s=0.3, refine_step_s=1.0, mv_step_s=0.5, image_step_s=0.45,
    train=("--device", "cuda", "--init", "embedded", "--batch-size", "2048", "--dataset-size", "131072",
           "--lr", "1e-3", "--warmup", "100"),
    # #12's next step (issue 12's note): more images of the objects with a front (ducks drew worst)
    train_2d=("--object-share", "0.6"),
    max_train_steps=1400, dataset_s=105, train_step_s=0.341,
    benches={"prompt_accuracy": ("--seeds", "1"), "janus": ("--configs", "default", "--seeds", "2")},
    objects={"prompt_accuracy": 25, "janus": 16}, baseline=("prompt_accuracy", "janus"),
    after=("prompt_accuracy", "janus"), object_s=37, judge_setup_s=15,
    mv_consistency=("--guidance", "1"), mv_consistency_s=120,
)
# Every part once at tiny sizes, in the fewest processes: a check that the commands still run.
DRY = Mode(
    device="cpu", size="tiny", smoke_steps=2, smoke_refine_steps=1, preview_every=1,
    build_s=10, smoke_fixed_s=25, sd_step_s=3, refine_step_s=25, mv_step_s=10, image_step_s=5,
    train=("--device", "cpu", "--init", "embedded", "--batch-size", "8", "--dataset-size", "32", "--warmup", "1"),
    train_2d=("--object-share", "0.6"), max_train_steps=2, dataset_s=10, train_step_s=3,
    benches={"prompt_accuracy": ("--seeds", "1", "--shapes", "cube", "--colors", "red", "--steps", "20"),
             "janus": ("--configs", "default", "--seeds", "1", "--objects", "mug", "--colors", "red", "--steps", "20")},
    objects={"prompt_accuracy": 1, "janus": 1}, baseline=("janus",), after=("prompt_accuracy",),
    object_s=15, judge_setup_s=20, mv_consistency=None, mv_consistency_s=0,
)


def bench_seconds(names: tuple[str, ...], workers: int, mode: Mode) -> float:
    """The benchmarks `names` side by side, the workers shared among them."""
    each = max(1, workers // max(1, len(names)))
    return max((math.ceil(mode.objects[n] / each) * mode.object_s + mode.judge_setup_s for n in names), default=0.0)


@dataclass(frozen=True)
class Plan:
    smoke_s: float
    train_steps: int  # 0: trainings dropped
    train_s: float
    after: tuple[str, ...]  # the benchmarks after the trainings (on the shipped weights without them)
    after_s: float
    total_s: float
    workers: int
    note: str


def make_plan(mode: Mode, budget_s: float, cores: int, margin_s: float = 30.0) -> Plan:
    """How the budget is spent, in the order of what only a GPU can do: the smoke always; then
    the trainings, with the steps that fit; then the benchmarks on their weights if the trainings
    still get twice MIN_TRAIN_STEPS beside them (else the GPU's minutes go to training, and the
    benchmarks run later on any machine). With fewer than
    MIN_TRAIN_STEPS fitting, the trainings are dropped and the benchmarks run on the shipped weights."""
    smoke = (mode.build_s + 3 * mode.smoke_fixed_s + mode.smoke_steps * (mode.sd_step_s + mode.mv_step_s + mode.image_step_s)
             + mode.smoke_refine_steps * mode.refine_step_s)
    workers = max(1, cores - 2)  # two cores feed the GPU
    after = max(bench_seconds(mode.after, workers, mode), mode.mv_consistency_s)
    room = budget_s - margin_s - smoke - mode.dataset_s
    minimum = min(MIN_TRAIN_STEPS, mode.max_train_steps)
    fits = int(max(0.0, room) // mode.train_step_s)
    if fits < minimum:
        alone = bench_seconds(mode.baseline, workers, mode)
        return Plan(smoke, 0, 0.0, mode.baseline, alone, smoke + alone, workers,
                    f"trainings dropped: {fits} steps fit after the smoke, fewer than {minimum}; "
                    "the benchmarks run on the shipped weights")
    with_after = int(max(0.0, room - after) // mode.train_step_s)
    kept = with_after >= min(2 * MIN_TRAIN_STEPS, mode.max_train_steps)  # else the GPU minutes go to training
    steps = min(mode.max_train_steps, with_after if kept else fits)
    # the baseline benchmarks run beside the trainings, so that part lasts at least as long as they do
    train = max(mode.dataset_s + steps * mode.train_step_s, bench_seconds(mode.baseline, workers, mode))
    note = f"trainings of {steps} steps, the baseline benchmarks beside them"
    if not kept:
        return Plan(smoke, steps, train, (), 0.0, smoke + train, workers,
                    note + "; no time for the benchmarks on the new weights: run them later (docs/gpu_day.md)")
    return Plan(smoke, steps, train, mode.after, after, smoke + train + after, workers, note)


def environment() -> str:
    import torch

    lines = [f"python {platform.python_version()}, {platform.platform()}, {os.cpu_count()} cores",
             f"torch {torch.__version__}, CUDA {torch.version.cuda}, available {torch.cuda.is_available()}"]
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        lines.append(f"{torch.cuda.get_device_name()}: {total / 2**30:.1f} GiB, {free / 2**30:.1f} free")
    for module in ("diffusers", "transformers", "numpy"):
        lines.append(f"{module} {__import__(module).__version__}")
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
        lines.append(smi.stdout)
    return "\n".join(lines) + "\n"


class Runs:
    """Commands started in the background, each logging to a file, stopped at a deadline."""

    def __init__(self, logs: Path) -> None:
        self.logs, self.procs = logs, {}
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, cmd: list[str], threads: int = 1) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
        log = open(self.logs / f"{name}.txt", "w")  # noqa: SIM115 - closed in wait()
        log.write(" ".join(cmd) + "\n\n")
        log.flush()
        self.procs[name] = (subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env), log,
                            time.perf_counter())

    def wait(self, deadline: float) -> dict[str, dict[str, Any]]:
        """Every command's exit status and seconds; one still running at `deadline` is stopped."""
        out = {}
        for name, (proc, log, started) in self.procs.items():
            try:
                code = proc.wait(timeout=max(1.0, deadline - time.perf_counter()))
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
                log.write("\n[gpu_day: stopped at its deadline]\n")
            log.close()
            out[name] = {"returncode": code, "seconds": round(time.perf_counter() - started, 1),
                         "tail": (self.logs / f"{name}.txt").read_text().strip().splitlines()[-3:]}
        self.procs = {}
        return out


def bench_command(mode: Mode, name: str, model: str, workers: int) -> list[str]:
    return [sys.executable, str(ROOT / "bench" / f"{name}.py"), "--model", model, "--workers", str(workers),
            *mode.benches[name]]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu-day", help="what to bring back: small files only")
    p.add_argument("--work", default="/tmp/promptmesh-gpu-day", help="the random models, datasets and checkpoints")
    # 9 minutes: one command of the device tool may run 10; the issue allows 12 where a machine does
    p.add_argument("--budget", type=float, default=540, help="seconds the whole run may take")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: checks the plumbing, measures nothing")
    args = p.parse_args()
    t0 = time.perf_counter()
    deadline = t0 + args.budget
    mode = DRY if args.dry_run else FULL
    if mode.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device (torch sees none): this is for GPU machines; --dry-run runs it at tiny sizes on the CPU",
                  file=sys.stderr)
            return 2
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    plan = make_plan(mode, args.budget, args.cores)
    (out / "plan.json").write_text(json.dumps({"mode": asdict(mode), "plan": asdict(plan)}, indent=2) + "\n")
    print(f"plan: smoke {plan.smoke_s:.0f} s, trainings {plan.train_s:.0f} s, benchmarks after {plan.after_s:.0f} s: "
          f"{plan.total_s:.0f} s estimated of {args.budget:.0f} s; {plan.note}", flush=True)
    (out / "env.txt").write_text(environment())
    summary: dict[str, Any] = {"plan": asdict(plan), "budget_s": args.budget}

    # 1. the smoke: the full-size random pipelines
    models = build_models(work / "models", mode.size)
    summary["build_s"] = round(time.perf_counter() - t0, 1)
    smoke = run_paths(models, mode.size, mode.device, mode.smoke_steps, mode.smoke_refine_steps, out / "smoke",
                      timeout=max(60.0, plan.smoke_s * 1.5), preview_every=mode.preview_every)
    text = report(smoke)
    (out / "smoke" / "report.txt").write_text(text + "\n")
    print(text, flush=True)
    summary["smoke"] = smoke
    summary["smoke_s"] = round(time.perf_counter() - t0, 1)

    # 2. the trainings, with the baseline benchmarks on the CPU cores beside them
    runs = Runs(out / "logs")
    trained = {}
    if plan.train_steps:
        steps = ["--steps", str(plan.train_steps)]
        runs.start("train-2d", [*CLI, "prior", "train", *mode.train, *mode.train_2d, *steps, "--out", str(work / "2d")])
        runs.start("train-mv", [*CLI, "prior", "train", *mode.train, "--multiview", *steps, "--out", str(work / "mv")])
        each = max(1, plan.workers // max(1, len(mode.baseline)))
        for name in mode.baseline:
            runs.start(f"{name}-shipped", bench_command(mode, name, "embedded", each))
        summary["trainings"] = runs.wait(max(time.perf_counter() + 60, deadline - plan.after_s * 1.2))
        for kind in ("2d", "mv"):
            prior = work / kind / "prior"
            if summary["trainings"][f"train-{kind}"]["returncode"] == 0 and prior.is_dir():
                shutil.copytree(prior, out / "train" / kind / "prior", dirs_exist_ok=True)
                shutil.copy2(work / kind / "loss.csv", out / "train" / kind / "loss.csv")
                trained[kind] = prior

    # 3. the benchmarks on the new weights (or on the shipped ones, without trainings)
    model, suffix = (str(trained["2d"]), "trained") if "2d" in trained else ("embedded", "shipped")
    if "2d" in trained or not plan.train_steps:
        each = max(1, plan.workers // max(1, len(plan.after)))
        for name in plan.after:
            runs.start(f"{name}-{suffix}", bench_command(mode, name, model, each))
    if "mv" in trained and plan.after and mode.mv_consistency is not None:
        runs.start("mv-consistency", [sys.executable, str(ROOT / "bench" / "mv_consistency.py"), "--weights",
                                      str(trained["mv"]), "--weights", str(ROOT / "backend" / "prior" / "weights"),
                                      *mode.mv_consistency], threads=2)
    summary["benchmarks"] = runs.wait(deadline)
    if "2d" in trained and not plan.after:  # what to run later, on any machine, with the weights brought back
        later = out / "train" / "2d" / "prior"
        summary["run_later"] = [" ".join(bench_command(FULL, name, str(later), 2)[1:]) for name in FULL.after]
    summary["total_s"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    ok = all(r["ok"] for r in smoke.values()) and all(
        r["returncode"] == 0 for part in ("trainings", "benchmarks") for r in summary.get(part, {}).values())
    print(f"done in {summary['total_s']:.0f} s (estimated {plan.total_s:.0f}); {'all ran' if ok else 'SOMETHING FAILED'}: "
          f"see {out}/summary.json", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""A short real generation on a CUDA GPU, for anyone who has one: please paste its output into
bug reports. bench/fullsize_cpu.py and bench/gpu_day.py run each of their paths through it too.

    python bench/gpu_smoke.py [--model sd21] [--steps 300] [--refine-steps 0] [--device cuda]
                              [--out gpu_smoke] [--json FILE] [-- GENERATE OPTIONS]

Builds the job as `promptmesh generate` builds it (its own parser and quality preset; options
after `--` go to that parser), runs it through pipeline.run and prints, per stage (the NeRF, the
refinement, meshing): seconds per step, peak GPU memory (torch's allocated and reserved, and
against the 8 GB budget with the CUDA context added) and peak RSS; the load time and the time to
the first preview, from process start; and whether the half-precision path stayed finite: every
step's loss, then the VAE and the UNet on the job's own prompt at t = 20, 500 and 980 (the SDS
code zeroes NaNs in its gradient, so a NaN would otherwise pass silently). Writes the mesh (GLB)
under --out, and the figures as JSON with --json.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # before torch's import: "time to first preview" counts from here

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from promptmesh.backend import __version__  # noqa: E402
from promptmesh.backend.cameras import sample_views  # noqa: E402
from promptmesh.backend.cli import _reference, _spec, build_parser  # noqa: E402
from promptmesh.backend.export import write_mesh  # noqa: E402
from promptmesh.backend.pipeline import PreviewEvent, StageEvent, StepEvent, run  # noqa: E402
from promptmesh.shared.vocab import Stage  # noqa: E402

BUDGET_BYTES = 8e9  # the README's VRAM budget for the Stable Diffusion object
GIB = 2**30
PROBE_TIMESTEPS = (20, 500, 980)


def _rss_peak_bytes() -> int:
    """This process's peak resident set since the last reset (Linux VmHWM); 0 elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peaks(cuda: bool) -> None:
    """Start a new peak for the next stage: "5" to clear_refs resets VmHWM (Linux 4.0+)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    if cuda:
        torch.cuda.reset_peak_memory_stats()


def _peaks(cuda: bool) -> dict[str, float]:
    out = {"rss_gib": _rss_peak_bytes() / GIB}
    if cuda:
        out |= {"vram_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
                "vram_reserved_gib": torch.cuda.max_memory_reserved() / GIB}
    return out


def _per_step(times: list[float], start: float | None) -> float | None:
    """Seconds per step: the mean after the first step (warm-up), or the only step's time."""
    if len(times) >= 2:
        return (times[-1] - times[0]) / (len(times) - 1)
    if times and start is not None:
        return times[0] - start
    return None


def _first(times: list[float], start: float | None) -> float | None:
    return times[0] - start if times and start is not None else None


@torch.no_grad()
def half_precision_probe(ctx: Any) -> dict[str, Any]:
    """The VAE and the UNet at the guidance's own precision on the job's prompt and cameras
    (`ctx`: the job's context, stages.JobContext): finite or not, and the largest magnitude seen
    (fp16 overflows at 65,504)."""
    g = ctx.guidance
    gen = torch.Generator().manual_seed(0)  # not the job's: the probe leaves its draws alone
    cams = sample_views(g.views_per_group, gen, ctx.recipe.cameras).to(ctx.device)
    n = cams.elevation.shape[0]
    size = ctx.recipe.resolution
    latents = g.encode_images(torch.rand(n, 3, size, size, generator=gen).to(ctx.device))
    out: dict[str, Any] = {"dtype": str(getattr(g, "dtype", "float32")).removeprefix("torch."),
                           "vae_finite": bool(torch.isfinite(latents).all()),
                           "vae_max_abs": float(latents.float().abs().max())}
    cond, finite, biggest = ctx.embeddings.plain_rows(n), True, 0.0
    for step in PROBE_TIMESTEPS:
        t = torch.full((n,), step, device=ctx.device, dtype=torch.long)
        a = g.alphas_cumprod[t].view(-1, 1, 1, 1)
        noise = torch.randn(latents.shape, generator=gen).to(latents)
        eps = g.predict_noise(a.sqrt() * latents.float() + (1 - a).sqrt() * noise.float(), t, cond, cams)
        finite = finite and bool(torch.isfinite(eps).all())
        biggest = max(biggest, float(eps.abs().max()))
    return out | {"unet_finite": finite, "unet_max_abs": biggest}


def measure(generate_args: list[str], out: Path) -> dict[str, Any]:
    """Run one job built from `promptmesh generate` options and return its figures."""
    args = build_parser().parse_args(["generate", *generate_args, "-o", str(out / "mesh.glb")])
    spec = _spec(args)
    cuda = spec.device == "cuda" or (spec.device == "auto" and torch.cuda.is_available())
    marks: dict[str, float] = {}
    steps: dict[str, list[float]] = {Stage.OPTIMISING: [], Stage.REFINING: []}
    losses: list[float] = []
    stages: dict[str, dict[str, float]] = {}
    current: list[str] = []

    def close_stage(now: float) -> None:
        if current:
            stages[current[-1]] = {"seconds": now - marks[current[-1]], **_peaks(cuda)}
        _reset_peaks(cuda)

    def on_event(event: object) -> None:
        now = time.perf_counter() - STARTED
        if isinstance(event, StageEvent) and event.stage not in marks:
            if event.stage in (Stage.OPTIMISING, Stage.REFINING, Stage.MESHING, Stage.DONE):
                close_stage(now)
                current.append(event.stage)
            marks[event.stage] = now
        elif isinstance(event, StepEvent):
            steps[event.stage].append(now)
            losses.append(event.loss)
        elif isinstance(event, PreviewEvent):
            marks.setdefault("first preview", now)

    if cuda:
        torch.cuda.init()
    _reset_peaks(cuda)
    current.append(Stage.LOADING)
    marks[Stage.LOADING] = time.perf_counter() - STARTED
    result = run(spec, on_event, threads=args.threads, reference=_reference(args))  # --image: an image job
    write_mesh(result.mesh, out / "mesh.glb")
    probe = half_precision_probe(result.nerf.ctx)
    figures: dict[str, Any] = {
        "model": spec.model, "device": str(result.metadata["device"]), "resolution": result.metadata["resolution"],
        "steps": len(steps[Stage.OPTIMISING]), "refine_steps": len(steps[Stage.REFINING]),
        "seconds_per_step": _per_step(steps[Stage.OPTIMISING], marks.get(Stage.OPTIMISING)),
        "refine_seconds_per_step": _per_step(steps[Stage.REFINING], marks.get(Stage.REFINING)),
        # the first step of each stage, with its warm-up (the refinement's includes building its grid)
        "first_step_seconds": _first(steps[Stage.OPTIMISING], marks.get(Stage.OPTIMISING)),
        "refine_first_step_seconds": _first(steps[Stage.REFINING], marks.get(Stage.REFINING)),
        "load_seconds": marks.get(Stage.OPTIMISING, math.nan) - marks[Stage.LOADING],
        "first_preview_seconds": marks.get("first preview"), "total_seconds": time.perf_counter() - STARTED,
        "nonfinite_losses": sum(not math.isfinite(v) for v in losses), "half_precision": probe,
        "stages": stages, "faces": result.metadata["faces"], "weights": result.metadata["weights"],
        "novel_view": result.metadata.get("reference", {}).get("novel_view", {}).get("weights"),
        "threads": result.metadata["threads"],
        "machine": f"promptmesh {__version__}, torch {torch.__version__}, "
                   f"{torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()}, "
                   f"{platform.platform()}",
    }
    if cuda:
        free, total = torch.cuda.mem_get_info()
        # what the card holds besides torch's own pool: the CUDA context and the libraries' workspaces
        figures["cuda_context_gib"] = (total - free - torch.cuda.memory_reserved()) / GIB
        peak = max(s.get("vram_reserved_gib", 0.0) for s in stages.values())
        figures["vram_peak_with_context_gb"] = (peak + figures["cuda_context_gib"]) * GIB / 1e9
        figures["within_budget"] = figures["vram_peak_with_context_gb"] * 1e9 <= BUDGET_BYTES
    return figures


def describe(f: dict[str, Any]) -> list[str]:
    """The figures as the lines to paste into a bug report."""

    def s(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    lines = [f["machine"], f"model {f['model']} ({f['weights'].get('source')} @ {f['weights'].get('revision')}), "
             f"{f['device']}, {f['threads']} threads"]
    lines.append(f"{f['steps']} steps at {f['resolution']} px: {s(f['seconds_per_step'])} s per step "
                 f"(the first {s(f['first_step_seconds'])} s); {f['refine_steps']} refinement steps: "
                 f"{s(f['refine_seconds_per_step'])} s per step (the first {s(f['refine_first_step_seconds'])} s)")
    for name, stage in f["stages"].items():
        vram = (f", VRAM peak {stage['vram_allocated_gib']:.2f} GiB allocated, {stage['vram_reserved_gib']:.2f} reserved"
                if "vram_allocated_gib" in stage else "")
        lines.append(f"  {name}: {stage['seconds']:.1f} s, peak RSS {stage['rss_gib']:.2f} GiB{vram}")
    if "within_budget" in f:
        lines.append(f"VRAM peak with the CUDA context ({f['cuda_context_gib']:.2f} GiB): "
                     f"{f['vram_peak_with_context_gb']:.2f} GB of the 8 GB budget: "
                     f"{'within' if f['within_budget'] else 'OVER'}")
    hp = f["half_precision"]
    lines.append(f"load {f['load_seconds']:.1f} s, first preview at {s(f['first_preview_seconds'])} s, "
                 f"total {f['total_seconds']:.1f} s from process start; {f['faces']} faces")
    lines.append(f"{hp['dtype']}: losses non-finite {f['nonfinite_losses']}; VAE finite {hp['vae_finite']} "
                 f"(max |z| {hp['vae_max_abs']:.3g}); UNet finite {hp['unet_finite']} (max |eps| {hp['unet_max_abs']:.3g})")
    return lines


def run_child(argv: list[str], out: Path, timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """This script in a process of its own (so each path has its own peak memory, and a crash or
    an out-of-memory error ends only that path): its figures, or its error and output's tail."""
    out.mkdir(parents=True, exist_ok=True)
    figures_file = out / "figures.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--out", str(out), "--json", str(figures_file), *argv]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        code, log = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, log = -1, f"{exc.stdout or ''}{exc.stderr or ''}\ntimed out after {timeout:.0f} s"
        log = log if isinstance(log, str) else log.decode(errors="replace")
    (out / "log.txt").write_text(log)
    wall = time.perf_counter() - t0
    if code == 0 and figures_file.is_file():
        return {"ok": True, "wall_seconds": wall, **json.loads(figures_file.read_text())}
    return {"ok": False, "wall_seconds": wall, "returncode": code, "error": log.strip().splitlines()[-20:]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd21")
    parser.add_argument("--prompt", default="a ceramic mug with a handle")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--refine-steps", type=int, default=0)
    parser.add_argument("--preview-every", type=int, default=50)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", default="gpu_smoke")
    parser.add_argument("--json", help="also write the figures to this file")
    args, generate_options = parser.parse_known_args()
    generate_options = [a for a in generate_options if a != "--"]
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: this smoke test is for GPU machines (torch sees none; --device cpu runs it on the CPU)",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figures = measure([args.prompt, "--model", args.model, "--steps", str(args.steps), "--refine-steps",
                       str(args.refine_steps), "--preview-every", str(args.preview_every), "--device", args.device,
                       *generate_options], out)
    print("\n".join(describe(figures)))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

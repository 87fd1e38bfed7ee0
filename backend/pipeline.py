"""One job: `run(spec, on_event) -> Result`, shared by the CLI and the job server.

Loading (the prior, its card resolved once against the spec) -> the stages, each a model run
by the one stage loop (stages/loop.py): for a prompt, the NeRF, then the mesh (DMTet) stage when
the recipe has refinement steps; for a given mesh (`surface`), the texture stage -> meshing (the
last stage's surface, then its base-colour texture) -> done. A checkpoint holds every stage's
state so far; cancellation is a threading.Event checked every step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from ..shared.image import Reference, image_job_warnings
from ..shared.result import Mesh
from ..shared.spec import JobSpec
from ..shared.vocab import Stage
from . import __version__
from .guidance import Guidance, load_guidance, load_novel_view
from .guidance.zero123 import NovelViewGuidance
from .models import download, needs_download
from .recipe import Recipe, resolve
from .stages import Checkpointer, DMTetModel, JobContext, NeRFModel, StageModel, Surface, TextureModel, run_stage
from .stages.events import Cancelled, Event, PreviewEvent, ProxyEvent, ResultEvent, StageEvent, StepEvent
from .stages.loop import PROXY_MAX_FACES, PROXY_RESOLUTION, CheckpointMismatch, LoopSettings, ProxyClock
from .stages.reference import ReferenceNeRFModel
from .texture import ColorAt, TextureError, bake
from .threads import FixedThreads, ThreadTuner, resolve_device

# The public face of generation: the entry point, its result and its events.
__all__ = ["PROXY_MAX_FACES", "PROXY_RESOLUTION", "Cancelled", "CheckpointMismatch", "Event", "PreviewEvent", "ProxyEvent",
           "Result", "ResultEvent", "StageEvent", "StepEvent", "run"]
log = logging.getLogger(__name__)


@dataclass
class Result:
    mesh: Mesh
    metadata: dict[str, Any]
    nerf: NeRFModel | None = field(repr=False)  # the NeRF stage's field (turntables render it); None when texturing


@lru_cache(maxsize=1)
def cached_guidance(model: str, device: str) -> Guidance:
    """The most recently used prior stays loaded between jobs."""
    return load_guidance(model, device)


@lru_cache(maxsize=1)
def cached_novel_view(model: str, device: str) -> NovelViewGuidance:
    """The most recently used novel-view prior, likewise."""
    return load_novel_view(model, device)


def textured(mesh: Mesh, size: int, color_at: ColorAt | None = None) -> tuple[Mesh, list[str]]:
    """The mesh with its baked base-colour texture (`size` 0: none; of `color_at`, else of the
    vertex colours), and warnings. A failed bake (xatlas crashes on some meshes) keeps the
    vertex-coloured mesh: the job still ends with its result, and says why it has no texture."""
    if not size:
        return mesh, []
    try:
        return bake(mesh, size, color_at), []
    except TextureError as exc:
        warning = f"no texture, the mesh keeps its vertex colours: {exc}"
        log.warning("%s", warning)
        return mesh, [warning]


def reference_metadata(reference: Reference, recipe: Recipe, novel_view: str | None = None,
                       novel: NovelViewGuidance | None = None, offset: torch.Tensor | None = None) -> dict[str, Any]:
    """What an image job's result records of its image and reference camera (`offset`: how far
    the camera moved from where it started, world units)."""
    from .framing import mean_fov, reference_distance

    fov = mean_fov(recipe.cameras) if reference.fov is None else reference.fov
    h, w = reference.rgba.shape[:2]
    return {"width": w, "height": h, "elevation": reference.elevation, "fov": fov, "azimuth": 0.0,
            "distance": round(reference_distance(recipe.cameras, fov), 4),
            "offset": [0.0] * 3 if offset is None else [round(v, 4) for v in offset.detach().tolist()],
            "foreground": round(float((reference.rgba[..., 3] >= 128).mean()), 4),
            "priors": {"2d": recipe.reference.prior_2d_weight,
                       "3d": None if novel is None else recipe.reference.prior_3d_weight},
            **({} if novel is None else {"novel_view": {"model": novel_view, "weights": novel.weights,
                                                        "guidance_scale": recipe.reference.novel_view_guidance_scale}})}


def thread_setting(threads: int | str | None, device: torch.device) -> ThreadTuner | FixedThreads:
    """What sets torch's CPU threads during the optimisation (nothing to tune on a GPU)."""
    if threads == "auto" and device.type == "cpu":
        return ThreadTuner()
    if isinstance(threads, int):
        torch.set_num_threads(threads)
    return FixedThreads()


def run(
    spec: JobSpec,
    on_event: Callable[[Event], None] = lambda e: None,
    cancel: threading.Event | None = None,
    checkpoint: Path | None = None,
    checkpoint_every: int = 100,
    resume: bool = False,
    threads: int | str | None = None,
    surface: Surface | None = None,
    reference: Reference | None = None,
) -> Result:
    """Optimise a NeRF for `spec.prompt` (and refine its surface when the recipe says so) and
    extract the mesh; or, given a `surface`, paint it. `threads`: a CPU thread count, "auto" (chosen from step times as the
    machine's load changes: backend/threads.py) or None (torch's setting as it is). Seeded runs
    repeat exactly at a fixed count. Given a `reference` image, its front view is reconstructed
    beside the prompt's distillation (stages/reference.py); the prompt may then be empty."""
    if surface is not None and reference is not None:
        raise ValueError("a job paints a given mesh or makes an object from an image, not both")
    spec.validate(image=reference is not None)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    device = resolve_device(spec.device)
    on_event(StageEvent(Stage.LOADING))
    for name in (spec.model, spec.novel_view):  # the first use of a model: say so, rather than a long silence
        if name is not None and needs_download(name):
            on_event(StageEvent(Stage.DOWNLOADING))
            download(name, on_bytes=lambda done, total: on_event(StageEvent(Stage.DOWNLOADING, done, total)))
    guidance = cached_guidance(spec.model, str(device))
    novel = None if spec.novel_view is None else cached_novel_view(spec.novel_view, str(device))
    recipe = resolve(guidance.card, spec, painting=surface is not None)
    ctx = JobContext.create(guidance, guidance.embed_prompt(spec.prompt, spec.negative), recipe, spec.seed, device)
    # An image job's checkpoint also names its image and camera: a resume with another one is another job.
    meta = spec.to_dict() if reference is None else {**spec.to_dict(), "reference": reference.identity()}
    saver = None if checkpoint is None else Checkpointer(checkpoint, meta, recipe, checkpoint_every)
    saved = saver.load(device) if saver is not None and resume else None
    stages: list[Callable[[], StageModel]]
    nerf = None
    if surface is not None:
        stages = [lambda: TextureModel(ctx, surface, spec.seed)]
    else:
        nerf = NeRFModel(ctx, spec.seed) if reference is None else ReferenceNeRFModel(ctx, spec.seed, reference, novel)
        stages = [lambda: nerf]
        if recipe.refine.steps:
            stages.append(lambda: DMTetModel(ctx, nerf, nerf.surface_density()))
    timings["load_seconds"] = time.perf_counter() - t0

    total = recipe.schedule.steps + (recipe.refine.steps if surface is None else 0)
    loop = LoopSettings(on_event, cancel, spec.preview_every, ProxyClock(spec.proxy_every), thread_setting(threads, device),
                        saver, time.perf_counter())
    done: list[StageModel] = []
    resumed_from = 0
    for index, make in enumerate(stages):
        t_stage = time.perf_counter()
        model = make()
        if saved is not None and index < len(saved["stages"]):
            model.load_state_dict(saved["stages"][index])
            resumed_from += model.step
            if index == len(saved["stages"]) - 1:
                ctx.load_state_dict(saved)  # the generator, and the objective's state (VSD's LoRA)
        run_stage(model, ctx, loop, done, sum(m.steps for m in done), total, last=index == len(stages) - 1)
        timings[f"{model.stage}_seconds"] = time.perf_counter() - t_stage
        done.append(model)

    on_event(StageEvent(Stage.MESHING))
    t2 = time.perf_counter()
    mesh = done[-1].mesh()
    timings["mesh_seconds"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    mesh, warnings = textured(mesh, recipe.mesh.texture_size, getattr(done[-1], "color_at", None))
    timings["texture_seconds"] = time.perf_counter() - t3
    timings["total_seconds"] = time.perf_counter() - t0
    metadata = {
        "prompt": spec.prompt, "negative": spec.negative, "seed": spec.seed, "model": spec.model, "quality": spec.quality,
        "stages": [m.stage for m in done], "steps": recipe.schedule.steps, "refine_steps": recipe.refine.steps,
        "resolution": recipe.resolution, "guidance_scale": recipe.guidance_scale,
        "mesh_resolution": recipe.mesh.resolution, "device": str(device), "promptmesh": __version__,
        "texture_size": 0 if mesh.texture is None else len(mesh.texture),
        "warnings": [*(surface.warnings if surface is not None else ()),
                     *(image_job_warnings(spec.prompt, spec.novel_view) if reference is not None else ()), *warnings],
        "timings": {k: round(v, 3) for k, v in timings.items()}, **mesh.counts, "recipe": recipe.to_dict(),
        "resumed_from_step": resumed_from,
        "threads": torch.get_num_threads(), "weights": guidance.weights,
        **({} if reference is None else {"reference": reference_metadata(
            reference, recipe, spec.novel_view, novel, nerf.offset if isinstance(nerf, ReferenceNeRFModel) else None)}),
    }
    result = Result(mesh, metadata, nerf)
    on_event(StageEvent(Stage.DONE))
    on_event(ResultEvent(result))
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    return result

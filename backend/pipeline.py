"""One generation: `run(spec, on_event) -> Result`, shared by the CLI and the job server.

Stages: loading (the prior, and its recipe resolved once against the spec) -> optimising
(events every step, previews every `preview_every` steps, checkpoints every `checkpoint_every`)
-> refining (the mesh stage, backend/refine.py, when the recipe has refinement steps; the
NeRF's last checkpoint is kept until the job ends, so a resume skips straight to it) ->
meshing (the surface, then its base-colour texture) -> done. Cancellation is a
threading.Event checked every step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..shared.errors import PromptMeshError
from ..shared.result import Mesh
from ..shared.spec import JobSpec
from ..shared.vocab import ErrorCode
from . import __version__
from .guidance import Guidance, load_guidance
from .mesh import MeshError, extract_mesh
from .models import download, needs_download
from .recipe import Recipe, resolve
from .refine import Refiner
from .texture import TextureError, bake
from .threads import FixedThreads, ThreadTuner, resolve_device
from .trainer import Trainer


class Cancelled(PromptMeshError):
    """The job was cancelled; raised from inside `run`."""

    code = ErrorCode.CANCELLED


@dataclass
class StageEvent:
    stage: str  # loading | downloading | optimising | refining | meshing | done
    done: int = 0  # downloading: bytes fetched so far, of `total` (0: not known yet); refining: steps done
    total: int = 0


@dataclass
class StepEvent:
    step: int  # counted over both stages: the refinement's steps follow the NeRF's
    total: int  # NeRF steps + refinement steps
    loss: float
    seconds: float
    stage: str = "optimising"  # or "refining"


@dataclass
class PreviewEvent:
    step: int
    rgba: np.ndarray  # [H, W, 4] uint8


@dataclass
class ProxyEvent:
    step: int
    mesh: Mesh  # coarse: PROXY_RESOLUTION^3 grid, at most PROXY_MAX_FACES faces


@dataclass
class ResultEvent:
    result: Result


Event = StageEvent | StepEvent | PreviewEvent | ProxyEvent | ResultEvent
PROXY_RESOLUTION = 40
PROXY_MAX_FACES = 20_000
PROXY_COST_SHARE = 0.05  # a proxy may take at most this share of the optimisation's time
log = logging.getLogger(__name__)


@dataclass
class Result:
    mesh: Mesh
    metadata: dict[str, Any]
    trainer: Trainer = field(repr=False)


@lru_cache(maxsize=1)
def cached_guidance(model: str, device: str) -> Guidance:
    """The most recently used prior stays loaded between jobs."""
    return load_guidance(model, device)


class CheckpointMismatch(PromptMeshError):
    """The checkpoint belongs to another job, or to this job under another recipe."""

    code = ErrorCode.BAD_REQUEST


def _check_resumable(path: Path, state: dict, spec: JobSpec, recipe: Recipe) -> None:
    """Refuse a checkpoint of another job, or of this job under another recipe (the code changed)."""
    if state["meta"] != spec.to_dict():
        raise CheckpointMismatch(f"checkpoint {path} belongs to a different job; delete it or drop --resume")
    saved = state.get("recipe")
    changes = ["it records none"] if saved is None else recipe.changes_from(saved)
    if changes:
        raise CheckpointMismatch(
            f"checkpoint {path} was made with a different recipe ({'; '.join(changes)}); delete it or drop --resume")


class ProxyClock:
    """When the next proxy is due: every `every` seconds, but never more often than keeps its
    extraction under PROXY_COST_SHARE of the time (adaptive to how fast the machine is)."""

    def __init__(self, every: float) -> None:
        self.every, self.cost = every, 0.0
        self.last = time.perf_counter()

    def due(self) -> bool:
        gap = max(self.every, self.cost / PROXY_COST_SHARE)
        return self.every > 0 and time.perf_counter() - self.last >= gap

    @contextmanager
    def timed(self) -> Iterator[None]:
        started = time.perf_counter()
        yield
        self.last = time.perf_counter()
        self.cost = self.last - started


def mesh_of(trainer: Trainer, device: torch.device, resolution: int, max_faces: int | None, views: int = 8,
            size: int = 64) -> Mesh:
    """The field's surface at the density the renders show from `views` cameras of `size`
    pixels (MeshError with advice when there is none). The renders are most of the cost: a
    proxy uses 4 at 32 px (~0.1 s on 2 cores), the final mesh 8 at 64 px."""
    field_ = trainer.field
    return extract_mesh(field_.density, lambda x: field_(x)[1], resolution=resolution,
                        threshold=trainer.surface_density(views=views, size=size), max_faces=max_faces, device=device,
                        background=trainer.solid_background)


def _stop_if_cancelled(cancel: threading.Event | None) -> None:
    """Checked once per step of either stage."""
    if cancel is not None and cancel.is_set():
        raise Cancelled("the job was cancelled")


def textured(mesh: Mesh, size: int) -> tuple[Mesh, list[str]]:
    """The mesh with its baked base-colour texture (`size` 0: none), and warnings. A failed
    bake (xatlas crashes on some meshes) keeps the vertex-coloured mesh: the job still ends
    with its result, and says why it has no texture."""
    if not size:
        return mesh, []
    try:
        return bake(mesh, size), []
    except TextureError as exc:
        warning = f"no texture, the mesh keeps its vertex colours: {exc}"
        log.warning("%s", warning)
        return mesh, [warning]


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
) -> Result:
    """Optimise a NeRF for `spec.prompt` and extract its mesh. `threads`: a CPU thread count,
    "auto" (chosen from step times as the machine's load changes: backend/threads.py) or None
    (torch's setting as it is). Seeded runs repeat exactly at a fixed count."""
    spec.validate()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    device = resolve_device(spec.device)
    on_event(StageEvent("loading"))
    if needs_download(spec.model):  # the first use of a model: say so, rather than a long silence
        on_event(StageEvent("downloading"))
        download(spec.model, on_bytes=lambda done, total: on_event(StageEvent("downloading", done, total)))
    guidance = cached_guidance(spec.model, str(device))
    embeddings = guidance.embed_prompt(spec.prompt, spec.negative)
    recipe = resolve(guidance.recipe, spec)
    trainer = Trainer(guidance, embeddings, recipe, spec.seed, device)
    if resume and checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False, map_location=device)
        _check_resumable(checkpoint, state, spec, recipe)
        trainer.load_state_dict(state["trainer"])
    resumed_from = trainer.step
    timings["load_seconds"] = time.perf_counter() - t0

    tuner = thread_setting(threads, device)
    proxies = ProxyClock(spec.proxy_every)
    on_event(StageEvent("optimising"))
    t1 = time.perf_counter()
    steps, refine_steps = recipe.schedule.steps, recipe.refine.steps
    total = steps + refine_steps
    while trainer.step < steps:
        _stop_if_cancelled(cancel)
        started = time.perf_counter()
        loss = trainer.train_step()
        tuner.step(time.perf_counter() - started)
        on_event(StepEvent(trainer.step, total, loss, time.perf_counter() - t1))
        if spec.preview_every and trainer.step % spec.preview_every == 0:
            on_event(PreviewEvent(trainer.step, trainer.preview()))
        if proxies.due():
            with proxies.timed():
                try:
                    proxy = mesh_of(trainer, device, PROXY_RESOLUTION, PROXY_MAX_FACES, views=4, size=32)
                    on_event(ProxyEvent(trainer.step, proxy))
                except MeshError:  # no surface yet: the next one
                    pass
        if checkpoint is not None and ((trainer.step % checkpoint_every == 0 and trainer.step < steps)
                                       or trainer.step == steps < total):
            trainer.save_checkpoint(checkpoint, spec.to_dict())
    timings["optimise_seconds"] = time.perf_counter() - t1

    refiner = None
    if refine_steps:
        on_event(StageEvent("refining", steps, total))  # the progress carries on from the NeRF's steps
        t_refine = time.perf_counter()
        refiner = Refiner(trainer, trainer.surface_density())
        while refiner.step < refine_steps:
            _stop_if_cancelled(cancel)
            loss = refiner.train_step()
            on_event(StepEvent(steps + refiner.step, total, loss, time.perf_counter() - t1, "refining"))
            if spec.preview_every and refiner.step % spec.preview_every == 0:
                on_event(PreviewEvent(steps + refiner.step, refiner.preview()))
        timings["refine_seconds"] = time.perf_counter() - t_refine

    on_event(StageEvent("meshing"))
    t2 = time.perf_counter()
    if refiner is not None:
        mesh = refiner.mesh(recipe.mesh.max_faces)
    else:
        mesh = mesh_of(trainer, device, recipe.mesh.resolution, recipe.mesh.max_faces)
    timings["mesh_seconds"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    mesh, warnings = textured(mesh, recipe.mesh.texture_size)
    timings["texture_seconds"] = time.perf_counter() - t3
    timings["total_seconds"] = time.perf_counter() - t0
    metadata = {
        "prompt": spec.prompt, "negative": spec.negative, "seed": spec.seed, "model": spec.model,
        "steps": steps, "refine_steps": refine_steps, "resolution": recipe.resolution,
        "guidance_scale": recipe.guidance_scale,
        "mesh_resolution": recipe.mesh.resolution, "device": str(device), "promptmesh": __version__,
        "texture_size": 0 if mesh.texture is None else len(mesh.texture), "warnings": warnings,
        "timings": {k: round(v, 3) for k, v in timings.items()}, **mesh.counts, "recipe": recipe.to_dict(),
        "resumed_from_step": resumed_from, "threads": torch.get_num_threads(), "weights": guidance.weights,
    }
    result = Result(mesh, metadata, trainer)
    on_event(StageEvent("done"))
    on_event(ResultEvent(result))
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    return result

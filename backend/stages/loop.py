"""The one stage loop: steps, events, previews, proxies, cancel, checkpoints and thread tuning
for any stage model, written once."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ...shared.errors import PromptMeshError
from ...shared.result import Mesh, atomic_write
from ...shared.vocab import ErrorCode, Stage
from ..mesh import MeshError
from ..recipe import Recipe
from ..threads import FixedThreads, ThreadTuner
from .context import JobContext
from .events import Cancelled, Event, PreviewEvent, ProxyEvent, StageEvent, StepEvent

PROXY_RESOLUTION = 40
PROXY_MAX_FACES = 20_000
PROXY_COST_SHARE = 0.05  # a proxy may take at most this share of the optimisation's time


class StageModel(Protocol):
    """What the loop needs of a stage: it owns its parameters, optimiser state, render and loss."""

    stage: Stage
    steps: int  # this stage's length
    step: int  # steps done

    def train_step(self) -> float: ...
    def preview(self, size: int = 64) -> np.ndarray: ...
    def proxy(self) -> Mesh: ...  # coarse; MeshError while there is no surface yet
    def mesh(self) -> Mesh: ...  # the stage's final surface
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def rgba_uint8(rgb: torch.Tensor, alpha: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] colour and [B, 1, H, W] alpha -> [B, H, W, 4] uint8, as previews travel."""
    rgba = torch.cat([rgb, alpha], 1).clamp(0, 1).permute(0, 2, 3, 1)
    return (rgba * 255).round().to(torch.uint8).cpu().numpy()


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


class CheckpointMismatch(PromptMeshError):
    """The checkpoint belongs to another job, or to this job under another recipe."""

    code = ErrorCode.BAD_REQUEST


@dataclass
class Checkpointer:
    """Where a job's state goes every `every` steps of a stage and at the end of each stage that
    another follows, with the job's spec and recipe, so a resume can check it continues the same
    run; the job's generator and objective state (VSD's LoRA and its optimiser) are saved with
    it, so a resumed run repeats the uninterrupted one."""

    path: Path
    meta: dict  # the job's spec
    recipe: Recipe
    every: int = 100

    def load(self, device: torch.device) -> dict | None:
        """The saved state, refused (CheckpointMismatch) when it belongs to another job or recipe."""
        if not self.path.exists():
            return None
        state = torch.load(self.path, weights_only=False, map_location=device)
        if state.get("meta") != self.meta:
            raise CheckpointMismatch(f"checkpoint {self.path} belongs to a different job; delete it or drop --resume")
        saved = state.get("recipe")
        changes = ["it records none"] if saved is None else self.recipe.changes_from(saved)
        if changes:
            raise CheckpointMismatch(
                f"checkpoint {self.path} was made with a different recipe ({'; '.join(changes)}); delete it or drop --resume")
        if "stages" not in state:
            raise CheckpointMismatch(f"checkpoint {self.path} was written by an older PromptMesh; delete it or drop --resume")
        return state

    def save(self, ctx: JobContext, models: list[StageModel]) -> None:
        state = {"meta": self.meta, "recipe": self.recipe.to_dict(), **ctx.state_dict(),
                 "stages": [m.state_dict() for m in models]}
        atomic_write(self.path, lambda f: torch.save(state, f))


@dataclass
class LoopSettings:
    """How a job's stages report and save while they run."""

    on_event: Callable[[Event], None]
    cancel: threading.Event | None
    preview_every: int
    proxies: ProxyClock
    tuner: ThreadTuner | FixedThreads
    checkpoint: Checkpointer | None
    started: float  # perf_counter at the first stage's start: step events count seconds from it


def stop_if_cancelled(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("the job was cancelled")


def run_stage(model: StageModel, ctx: JobContext, loop: LoopSettings, before: list[StageModel], steps_before: int,
              total: int, last: bool) -> None:
    """Run `model` to its last step. `before`: the job's finished stages (saved in its
    checkpoints beside it); `steps_before` of `total` steps were theirs; `last`: no stage
    follows, so the stage's end writes no checkpoint."""
    loop.on_event(StageEvent(model.stage, steps_before, total))
    loop.tuner.restart()  # another stage's step takes another time
    models = [*before, model]
    while model.step < model.steps:
        stop_if_cancelled(loop.cancel)
        started = time.perf_counter()
        loss = model.train_step()
        loop.tuner.step(time.perf_counter() - started)
        step = steps_before + model.step
        loop.on_event(StepEvent(step, total, loss, time.perf_counter() - loop.started, model.stage))
        if loop.preview_every and model.step % loop.preview_every == 0:
            loop.on_event(PreviewEvent(step, model.preview()))
        if loop.proxies.due():
            with loop.proxies.timed():
                try:
                    loop.on_event(ProxyEvent(step, model.proxy()))
                except MeshError:  # no surface yet: the next one
                    pass
        c = loop.checkpoint
        if c is not None and ((model.step % c.every == 0 and model.step < model.steps)
                              or (model.step == model.steps and not last)):
            c.save(ctx, models)

"""What a job tells its caller as it runs: stage changes, steps, previews, coarse 3D proxies,
and the result. The CLI draws them; the executors turn them into wire messages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ...shared.errors import PromptMeshError
from ...shared.result import Mesh
from ...shared.vocab import ErrorCode, Stage


class Cancelled(PromptMeshError):
    """The job was cancelled; raised from inside the stage loop."""

    code = ErrorCode.CANCELLED


@dataclass
class StageEvent:
    stage: Stage
    done: int = 0  # downloading: bytes fetched so far, of `total` (0: not known yet); a stage: steps done before it
    total: int = 0


@dataclass
class StepEvent:
    step: int  # counted over every stage: the refinement's steps follow the NeRF's
    total: int  # the steps of every stage
    loss: float
    seconds: float  # since the first stage started
    stage: Stage = Stage.OPTIMISING


@dataclass
class PreviewEvent:
    step: int
    rgba: np.ndarray  # [H, W, 4] uint8


@dataclass
class ProxyEvent:
    step: int
    mesh: Mesh  # coarse: at most PROXY_MAX_FACES faces


@dataclass
class ResultEvent:
    result: Any  # pipeline.Result


Event = StageEvent | StepEvent | PreviewEvent | ProxyEvent | ResultEvent

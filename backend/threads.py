"""Where torch runs: the device a job or a training asks for, and how many CPU threads torch
uses, chosen from measured step times.

On a quiet 2-core machine two threads make an SDS step faster (64 against 89 ms for the
embedded default); with one other CPU-bound process beside it (Blender, a second job) the same
two threads spin in OpenMP's barriers and a step takes 1.4 s instead of 83 ms with one thread
(bench/threads_under_load.py). Passive OpenMP waiting avoids the collapse but makes the quiet
case slower than one thread. So `auto` starts with every core and, every so often, tries the
other count for a few steps, keeping whichever is faster: a probe that is clearly slower ends
after one step, and a failed probe doubles the wait before the next, so under load the cost of
looking stays a few percent.
"""

from __future__ import annotations

import os
import statistics
from collections import deque
from collections.abc import Callable

import torch

from ..shared.errors import PromptMeshError
from ..shared.vocab import Device, ErrorCode


class DeviceError(PromptMeshError):
    """The requested device is not available."""

    code = ErrorCode.DEVICE


def resolve_device(name: str) -> torch.device:
    """'auto' (a CUDA GPU when torch sees one), 'cpu' or 'cuda'; refused when CUDA is asked for and absent."""
    if name == Device.AUTO:
        return torch.device(Device.CUDA if torch.cuda.is_available() else Device.CPU)
    if name == Device.CUDA and not torch.cuda.is_available():
        raise DeviceError("CUDA was requested but no CUDA device is available; use --device cpu")
    return torch.device(name)

PROBE_STEPS = 4  # steps a probe of the other thread count runs when it is not clearly worse
CLEARLY_WORSE = 2.0  # a probe step this many times the baseline ends the probe at once
CLEARLY_BETTER = 0.9  # a probe must beat the baseline by this much to switch (step times drift and jitter)
WINDOW = 8  # steps whose median is the current count's baseline


def available_cores() -> int:
    """OMP_NUM_THREADS if set (the user's cap), else the cores this process may run on."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class FixedThreads:
    """A thread count that stays as it was set."""

    def step(self, seconds: float) -> None:
        pass

    def restart(self) -> None:
        pass


class ThreadTuner:
    """Call `step(seconds)` after each optimisation step; it sets torch's thread count."""

    def __init__(self, max_threads: int | None = None, first_probe: int = WINDOW,
                 set_threads: Callable[[int], None] = torch.set_num_threads) -> None:
        self.max_threads = max(1, max_threads or available_cores())
        self.set_threads = set_threads
        self.threads = self.max_threads
        self.set_threads(self.threads)
        self.recent: deque[float] = deque(maxlen=WINDOW)
        self.wait = first_probe  # steps until the next probe
        self.until_probe = first_probe
        self.probe: list[float] | None = None  # step times at the other count, while probing
        self.baseline = 0.0

    def restart(self) -> None:
        """Step times change with the stage: measure afresh, keeping the current count."""
        if self.probe is not None:
            self.set_threads(self.threads)
            self.probe = None
        self.recent.clear()
        self.until_probe = self.wait

    @property
    def other(self) -> int:
        return 1 if self.threads == self.max_threads else self.max_threads

    def step(self, seconds: float) -> None:
        if self.max_threads == 1:
            return
        if self.probe is not None:
            self._probe_step(seconds)
            return
        self.recent.append(seconds)
        self.until_probe -= 1
        if self.until_probe <= 0 and len(self.recent) == WINDOW:
            self.baseline = statistics.median(self.recent)
            self.probe = []
            self.set_threads(self.other)

    def _probe_step(self, seconds: float) -> None:
        assert self.probe is not None
        self.probe.append(seconds)
        worse = seconds > CLEARLY_WORSE * self.baseline
        if not worse and len(self.probe) < PROBE_STEPS:
            return
        better = not worse and statistics.median(self.probe) < CLEARLY_BETTER * self.baseline
        if better:  # switch: the probed count becomes the current one
            self.threads = self.other
            self.recent.clear()
            self.wait = max(50, self.wait // 2)
        else:  # back, and look again later
            self.set_threads(self.threads)
            self.wait *= 2
        self.probe = None
        self.until_probe = self.wait

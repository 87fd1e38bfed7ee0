"""Running a benchmark's generations in worker processes of one thread each."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from typing import Any


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def run_all(fn: Callable[..., Any], jobs: Iterable[tuple], workers: int, report: Callable[[Any], None]) -> None:
    """report(fn(*job)) for every job, in order: here with all threads when workers is 1, else in
    `workers` processes of one thread each (on 2 cores, 2 workers finish about twice as fast)."""
    jobs = list(jobs)
    if workers > 1:
        with ProcessPoolExecutor(workers, initializer=_one_thread) as pool:
            for row in pool.map(fn, *zip(*jobs, strict=True)):
                report(row)
    else:
        for job in jobs:
            report(fn(*job))

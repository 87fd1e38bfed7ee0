"""SDS step time of the embedded default with 1 thread, 2 threads and `--threads auto`, on a
quiet machine and beside one competing CPU-bound process (a busy Python loop).

    python bench/threads_under_load.py [--steps 120]

Prints the median and mean step time per configuration and each one's slowdown against the
quiet machine's best. Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from promptmesh.backend.pipeline import StepEvent, run
from promptmesh.shared.spec import JobSpec


class Enough(Exception):
    pass


def step_times(threads: int | str, steps: int) -> list[float]:
    times: list[float] = []
    last = [time.perf_counter()]

    def on_event(event: object) -> None:
        if isinstance(event, StepEvent):
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now
            if len(times) >= steps:
                raise Enough

    try:
        run(JobSpec(prompt="a red cube", device="cpu"), on_event, threads=threads)
    except Enough:
        pass
    return times[5:]  # past the first steps' warm-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=120)
    args = parser.parse_args()
    rows = []
    for load in (False, True):
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load else None
        try:
            for threads in (1, 2, "auto"):
                times = step_times(threads, args.steps)
                rows.append((load, threads, statistics.median(times), statistics.mean(times)))
        finally:
            if hog is not None:
                hog.kill()
    best = min(r[2] for r in rows if not r[0])
    print(f"{'machine':<26}{'threads':>8}{'median ms':>11}{'mean ms':>9}{'x quiet best':>14}")
    for load, threads, median, mean in rows:
        machine = "one competing process" if load else "quiet"
        print(f"{machine:<26}{threads!s:>8}{median * 1000:>11.1f}{mean * 1000:>9.1f}{mean / best:>14.2f}")


if __name__ == "__main__":
    main()

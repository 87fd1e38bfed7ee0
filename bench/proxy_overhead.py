"""What the live 3D proxy costs the optimisation: the embedded default's wall time per step with
no proxies, a proxy every 3 s (the add-on's default) and as often as allowed (the adaptive
floor of 20x the extraction's cost), and what one proxy takes and weighs.

    python bench/proxy_overhead.py [--steps 300] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

from promptmesh.backend.pipeline import ProxyEvent, StepEvent, run
from promptmesh.shared.result import proxy_arrays
from promptmesh.shared.spec import JobSpec


def measure(proxy_every: float, steps: int, threads: int) -> tuple[float, list[ProxyEvent]]:
    proxies: list[ProxyEvent] = []
    times: list[float] = []

    def on_event(event: object) -> None:
        if isinstance(event, ProxyEvent):
            proxies.append(event)
        elif isinstance(event, StepEvent):
            times.append(time.perf_counter())

    run(JobSpec(prompt="a red cube", steps=steps, device="cpu", proxy_every=proxy_every), on_event, threads=threads)
    return (times[-1] - times[0]) / (len(times) - 1), proxies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    base, _ = measure(0.0, args.steps, args.threads)
    print(f"no proxies: {base * 1000:.1f} ms per step")
    for every in (3.0, 0.01):
        per_step, proxies = measure(every, args.steps, args.threads)
        sizes = [sum(a.nbytes for a in proxy_arrays(p.mesh).values()) for p in proxies]
        faces = [len(p.mesh.faces) for p in proxies]
        print(f"proxy every {every:g} s: {per_step * 1000:.1f} ms per step ({per_step / base - 1:+.1%}), "
              f"{len(proxies)} proxies, {min(faces)}-{max(faces)} faces, {max(sizes) / 1024:.0f} kB at most on the wire")


if __name__ == "__main__":
    main()

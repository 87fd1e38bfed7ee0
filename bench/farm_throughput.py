"""Throughput of `promptmesh serve --executor ray` on this machine, and what Ray costs per job.

    python bench/farm_throughput.py [--jobs 6] [--steps 150]

Runs the same N embedded-prior jobs (seeds 0..N-1) three times, each through a fresh server and
the ZeroMQ front: the in-process executor at one thread; the Ray executor on a local cluster of
one CPU (1 slot); and of two CPUs (2 slots), jobs single-threaded (--cpus-per-job 1). The time is
from the first submit to the last `done`, server and cluster start-up excluded. Prints the
figures farm_jobs_per_hour_1slot, farm_jobs_per_hour_2slots, farm_speedup_2slots and
ray_overhead_per_job (Ray at 1 slot minus in-process, seconds per job). Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import time
from pathlib import Path

from figures import report

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # the cluster on loopback only (read when ray is imported)

from local_server import start_server  # noqa: E402

from promptmesh.shared.client import Client  # noqa: E402


def run_jobs(endpoint: str, jobs: int, steps: int) -> float:
    """Seconds from the first submit to the last end (every job must end `done`)."""
    with Client(endpoint) as c:
        t0 = time.perf_counter()
        ids = [c.request("generate", spec={"prompt": "a red cube", "model": "embedded", "steps": steps, "seed": i,
                                           "mesh_resolution": 64, "device": "cpu"}).job for i in range(jobs)]
        ended: dict[str, str] = {}
        while len(ended) < jobs:
            for msg in c.poll(1.0):
                if msg.job in ids and msg.type in ("done", "error"):
                    ended[msg.job] = msg.type
        seconds = time.perf_counter() - t0
    if set(ended.values()) != {"done"}:
        raise RuntimeError(f"jobs failed: {ended}")
    return seconds


def measure(name: str, jobs: int, steps: int, extra: list[str], cpus: int | None) -> float:
    cluster = None
    if cpus is not None:
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus, "include_dashboard": False})
        extra = [*extra, "--ray-address", cluster.address]
    with tempfile.TemporaryDirectory() as tmp:
        proc, endpoint = start_server(Path(tmp) / "data", ["--device", "cpu", *extra], log=Path(tmp) / "server.log",
                                      env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
        try:
            seconds = run_jobs(endpoint, jobs, steps)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
            if cluster is not None:
                cluster.shutdown()
    print(f"{name}: {jobs} jobs in {seconds:.1f} s ({jobs * 3600 / seconds:.0f} jobs/hour)", flush=True)
    return seconds


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--jobs", type=int, default=6)
    p.add_argument("--steps", type=int, default=150)
    args = p.parse_args()
    local = measure("in-process, 1 thread", args.jobs, args.steps, ["--threads", "1"], None)
    one = measure("ray, 1 slot", args.jobs, args.steps, ["--executor", "ray", "--cpus-per-job", "1"], 1)
    two = measure("ray, 2 slots", args.jobs, args.steps, ["--executor", "ray", "--cpus-per-job", "1"], 2)
    report("farm_jobs_per_hour_1slot", args.jobs * 3600 / one, "jobs/h")
    report("farm_jobs_per_hour_2slots", args.jobs * 3600 / two, "jobs/h")
    report("farm_speedup_2slots", one / two, "x")
    report("ray_overhead_per_job", (one - local) / args.jobs, "s")


if __name__ == "__main__":
    main()

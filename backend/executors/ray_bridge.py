"""The bridge process: Ray's driver for the server's farm jobs.

It takes SUBMIT / CANCEL / CLOSE from the relay (executors/ray_relay.py) and sends back the
jobs' events and, every second, the cluster's capacity (CAPACITY, also its heartbeat). Each
job gets a driver thread that submits `ray_task.job_task` and reads its streaming generator;
the task's OUTCOME is written into the job folder here, by the current attempt only, so a
late or repeated completion never leaves two results. Cancel is cooperative first (Ray raises
in the task, which stops the pipeline within one step) and forced after CANCEL_GRACE_S. A
worker or node lost mid-job fails the job with the reason, or reruns it once per --retries.

A task is used rather than an actor per GPU: Ray then places each job on any node with a free
slot and reuses worker processes.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from ...shared.errors import PromptMeshError
from ...shared.result import JobFiles, Mesh
from ...shared.spec import JobSpec
from ...shared.vocab import Device, ErrorCode, MessageType, Stage
from .jobs import commit_result, discard_partial_result, error, failure, progress, read_reference, read_surface
from .messages import Internal, decode, frames
from .ray_task import job_task

log = logging.getLogger("promptmesh.ray")

CANCEL_GRACE_S = 10.0  # a cancelled task that has not stopped by then is killed
POLL_S = 0.2  # how often a driver looks at its cancel flag while its task is quiet
REPORT_S = 1.0  # how often the capacity is asked for and reported (the relay's heartbeat)


class ClusterDriver:
    """Submits each job as a Ray task from a driver thread of its own. Only the bridge's main
    thread calls its methods; a driver thread gets what it needs as arguments."""

    def __init__(self, address: str | None = None, gpus_per_job: float = 1, cpus_per_job: float = 1,
                 retries: int = 0, device: str = Device.AUTO) -> None:
        self.address, self.gpus_per_job, self.cpus_per_job = address, gpus_per_job, cpus_per_job
        self.retries, self.device = retries, device
        self._capacity: tuple[int, str] = (0, "")
        self._drivers: dict[str, tuple[threading.Thread, threading.Event]] = {}

    def start(self) -> None:
        connect(self.address)
        import ray

        # A streaming generator task (its options and its stream are not typed by Ray's stubs);
        # retries are ours, so that attempts are numbered.
        self._task: Any = ray.remote(max_retries=0)(job_task)

    def submit(self, job: str, spec: JobSpec, files: JobFiles, context: zmq.Context, events: str) -> None:
        for done in [j for j, (t, _) in self._drivers.items() if not t.is_alive()]:
            del self._drivers[done]
        cancel = threading.Event()
        uses_gpu = "GPU" in self._capacity[1]
        options = {"num_gpus": self.gpus_per_job if uses_gpu else 0, "num_cpus": 1 if uses_gpu else self.cpus_per_job}
        thread = threading.Thread(target=self._drive, args=(job, spec, files, cancel, options, context, events),
                                  name=f"ray-driver-{job}", daemon=True)
        self._drivers[job] = (thread, cancel)
        thread.start()

    def cancel(self, job: str) -> None:
        if job in self._drivers:
            self._drivers[job][1].set()

    def close(self) -> None:
        for _, cancel in self._drivers.values():
            cancel.set()
        for thread, _ in self._drivers.values():
            thread.join(timeout=CANCEL_GRACE_S + 5)

    def capacity(self) -> tuple[int, str]:
        """Jobs the cluster can run at once, and what one slot is (asks Ray)."""
        import ray

        resources = ray.cluster_resources()
        if self.gpus_per_job and resources.get("GPU", 0) >= self.gpus_per_job:
            self._capacity = int(resources["GPU"] // self.gpus_per_job), f"{self.gpus_per_job:g} GPU"
        else:
            self._capacity = int(resources.get("CPU", 0) // self.cpus_per_job), f"{self.cpus_per_job:g} CPU"
        return self._capacity

    # ---- one job's driver thread -------------------------------------------------------------
    def _drive(self, job: str, spec: JobSpec, files: JobFiles, cancel: threading.Event, options: dict[str, Any],
               context: zmq.Context, events: str) -> None:
        socket = context.socket(zmq.PUSH)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(events)
        try:
            for attempt in range(1, self.retries + 2):
                end = self._attempt(job, spec, files, cancel, socket.send_multipart, attempt, options)
                if end is not None:
                    socket.send_multipart(end)
                    return
                log.warning("job %s: attempt %d lost its worker; running it again", job, attempt)
                socket.send_multipart(progress(job, Stage.RETRYING, step=0, total=0))
        finally:
            socket.close()

    def _attempt(self, job: str, spec: JobSpec, files: JobFiles, cancel: threading.Event,
                 send: Callable[[list[bytes]], Any], attempt: int, options: dict[str, Any]) -> list[bytes] | None:
        """One run of the job on the cluster: the frames of its end, or None when its worker
        or node was lost and a retry is left."""
        import ray
        from ray.exceptions import RayError, TaskCancelledError

        threads = max(1, int(self.cpus_per_job)) if options["num_gpus"] == 0 else None
        device = self.device if spec.device == Device.AUTO else spec.device
        # a texture job's mesh and an image job's image travel with the task: no worker reads our disk
        surface, reference = read_surface(files), read_reference(files)
        stream = self._task.options(**options, name=f"promptmesh-{job}-{attempt}").remote(
            job, {**spec.to_dict(), "device": device}, threads, surface, reference)
        cancelled = error(job, ErrorCode.CANCELLED, "cancelled while running")
        cancelled_at: float | None = None
        node = ""
        try:
            while True:
                if cancel.is_set() and cancelled_at is None:
                    cancelled_at = time.monotonic()
                    ray.cancel(stream)
                elif cancelled_at is not None and time.monotonic() - cancelled_at > CANCEL_GRACE_S:
                    ray.cancel(stream, force=True)
                    cancelled_at = float("inf")  # once
                ready, _ = ray.wait([stream], timeout=POLL_S)
                if not ready:
                    continue
                try:
                    data = ray.get(next(stream))
                except StopIteration:  # Ray closes a generator cancelled while it waits at a yield
                    if cancel.is_set():
                        return cancelled
                    raise RuntimeError("the job's task ended without a result") from None
                item = decode(data)
                if item.type == Internal.NODE:
                    node = str(item.fields["node"])
                    send(progress(job, Stage.STARTING, step=0, total=0, node=node))
                elif item.type == Internal.OUTCOME:  # the result: written here, by this attempt only
                    meta = {**item.fields["meta"], "attempt": attempt, "node": node}
                    return commit_result(job, Mesh.from_arrays(item.arrays), meta, files)
                elif item.type == MessageType.ERROR:
                    return data
                else:  # one of the job's events
                    send(data)
        except TaskCancelledError:
            if not cancel.is_set():  # cancelled by someone else (ray CLI): say so
                return error(job, ErrorCode.CANCELLED, "the Ray task was cancelled")
            return cancelled
        except RayError as exc:
            if cancel.is_set():
                return cancelled
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if attempt <= self.retries:
                return None
            discard_partial_result(files)
            return error(job, ErrorCode.WORKER_LOST, f"the Ray worker running the job was lost ({type(exc).__name__}: "
                                                     f"{reason}); submit it again")
        except Exception as exc:
            discard_partial_result(files)
            return failure(job, exc)


def connect(address: str | None) -> None:
    """Join the cluster at `address`, or start a local one on loopback only (Ray's token
    authentication stays as Ray sets it)."""
    import ray

    try:
        if address:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        else:
            # "local": a new cluster of its own, never one that RAY_ADDRESS or /tmp/ray points to
            ray.init(address="local", include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise PromptMeshError(f"cannot reach the Ray cluster at {address or 'a new local cluster'}: {exc}") from exc


def bridge_main(config: dict[str, Any]) -> int:
    """Serve the relay's commands on `config["commands"]`, sending events and capacity to
    `config["events"]`. Ends on CLOSE, when the server is gone, or when Ray ends it (the
    cluster was lost)."""
    parent = os.getppid()
    context = zmq.Context()
    commands = context.socket(zmq.PULL)
    commands.connect(config["commands"])
    out = context.socket(zmq.PUSH)
    out.setsockopt(zmq.LINGER, 2000)
    out.connect(config["events"])
    driver = ClusterDriver(config["address"], config["gpus_per_job"], config["cpus_per_job"], config["retries"],
                           config["device"])
    try:
        driver.start()
    except PromptMeshError as exc:
        log.error("%s", exc)
        return 1
    try:
        next_report = 0.0
        while os.getppid() == parent:
            if time.monotonic() >= next_report:
                slots, what = driver.capacity()  # blocks while the cluster does not answer: the relay notices
                out.send_multipart(frames(Internal.CAPACITY, fields={"slots": slots,
                                                                     "device": f"ray: {slots} slot(s) of {what}"}))
                next_report = time.monotonic() + REPORT_S
            if not commands.poll(max(1, int((next_report - time.monotonic()) * 1000))):
                continue
            msg = decode(commands.recv_multipart())
            if msg.type == Internal.SUBMIT and msg.job:
                files = JobFiles(Path(msg.fields["folder"]))  # an image job (its reference stored) may have no prompt
                driver.submit(msg.job, JobSpec.from_dict(msg.fields["spec"], image=files.reference.exists()), files,
                              context, config["events"])
            elif msg.type == Internal.CANCEL and msg.job:
                driver.cancel(msg.job)
            elif msg.type == Internal.CLOSE:
                break
    finally:
        driver.close()
        out.close()
        commands.close(linger=0)
        context.term()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    sys.exit(bridge_main(json.loads(sys.argv[1])))

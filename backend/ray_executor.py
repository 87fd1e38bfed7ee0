"""The Ray executor: the server's jobs run as Ray tasks on a cluster, one job per slot.

The request loop keeps the registry, the FIFO and the clients (as with the in-process
executor); it hands this executor at most `slots` jobs, the cluster's capacity in jobs (its
GPUs / --gpus-per-job, or its CPUs / --cpus-per-job where it has no GPU). Ray's driver runs in
a bridge process (see RayExecutor), where each job gets a driver thread that submits `job_task`
and reads its streaming generator: the
task yields the job's wire events as they happen and, last, its mesh arrays and metadata,
which the driver writes into the job folder (so no worker needs the server's disk) and then
reports `done`. Attempts are numbered, and only the driver's current attempt may write, so a
late or repeated completion never leaves two results. Cancel is cooperative first (Ray raises
in the task, which stops the pipeline within one step) and forced after CANCEL_GRACE_S. A
worker or node lost mid-job fails the job with the reason, or reruns it once per --retries.

A task is used rather than an actor per GPU: Ray then places each job on any node with a free
slot and reuses worker processes, so a prior loaded by an earlier job (pipeline's cache) stays
loaded in that worker.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import zmq

from ..shared.errors import PromptMeshError
from ..shared.result import JobFiles, Mesh
from ..shared.spec import JobSpec
from ..shared.vocab import ErrorCode
from .executor import WAKE, commit_result, discard_partial_result, event, event_frames, failure

log = logging.getLogger("promptmesh.ray")

CANCEL_GRACE_S = 10.0  # a cancelled task that has not stopped by then is killed
POLL_S = 0.2  # how often a driver looks at its cancel flag while its task is quiet
SLOTS_TTL_S = 1.0  # how long the cluster's capacity is trusted before asking again
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray takes 127.0.0.1 as this node's address
CAPACITY = b"capacity"  # the bridge's frame: the cluster's slots and what one is
# Ray ends a driver that has not reached its cluster's GCS for this long (Ray's default: 60 s);
# the relay then starts a new bridge. A test may shorten it.
GCS_TIMEOUT_ENV = "RAY_gcs_rpc_server_reconnect_timeout_s"
LATE_REPORT_S = 3.0  # a bridge silent this long has a cluster that does not answer: no slots


def job_task(job: str, spec: dict[str, Any], threads: int | None) -> Iterator[Any]:
    """Run in a Ray worker: the pipeline in a thread, its events yielded as wire frames; then
    ("result", mesh arrays, metadata), or ("error", frames). Ray's cancel raises here; the
    pipeline is then told to stop and stops within one step."""
    import ray

    from .pipeline import ResultEvent, run

    out: queue.Queue[Any] = queue.Queue()
    stop = threading.Event()

    def on_event(e: Any) -> None:
        if isinstance(e, ResultEvent):
            out.put(("result", e.result.mesh.arrays, e.result.metadata))
        elif (frames := event_frames(job, e)) is not None:
            out.put(frames)

    def work() -> None:
        try:
            run(JobSpec.from_dict(spec), on_event, cancel=stop, threads=threads)
        except BaseException as exc:  # every outcome reaches the driver
            out.put(("error", failure(job, exc)))
        out.put(None)

    context = ray.get_runtime_context()
    yield ("node", os.uname().nodename, context.get_node_id(), os.getpid())
    thread = threading.Thread(target=work, name=f"promptmesh-{job}", daemon=True)
    thread.start()
    try:
        while (item := out.get()) is not None:
            yield item
    finally:  # the end, Ray's cancel, or the driver gone
        stop.set()
        thread.join()


class ClusterDriver:
    """In the bridge process: submits each job as a Ray task from a driver thread of its own."""

    def __init__(self, address: str | None = None, gpus_per_job: float = 1, cpus_per_job: float = 1,
                 retries: int = 0, device: str = "auto") -> None:
        self.address, self.gpus_per_job, self.cpus_per_job = address, gpus_per_job, cpus_per_job
        self.retries, self.device = retries, device
        self._capacity: tuple[float, int, str] = (0.0, 0, "")  # (when, slots, what they are)
        self._drivers: dict[str, tuple[threading.Thread, threading.Event]] = {}  # the bridge's main thread's only

    def start(self, context: zmq.Context, events: str) -> None:
        self._context, self._events = context, events
        connect(self.address)
        import ray

        # A streaming generator task (its options and its stream are not typed by Ray's stubs);
        # retries are ours, so that attempts are numbered.
        self._task: Any = ray.remote(max_retries=0)(job_task)

    def submit(self, job: str, spec: JobSpec, files: JobFiles) -> None:
        for done in [j for j, (t, _) in self._drivers.items() if not t.is_alive()]:
            del self._drivers[done]
        cancel = threading.Event()
        thread = threading.Thread(target=self._drive, args=(job, spec, files, cancel), name=f"ray-driver-{job}",
                                  daemon=True)
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

    # ---- the cluster -----------------------------------------------------------------------
    def capacity(self) -> tuple[int, str]:
        """Jobs the cluster can run at once (its capacity, asked at most every SLOTS_TTL_S), and in what."""
        import ray

        when, slots, what = self._capacity
        if time.monotonic() - when < SLOTS_TTL_S:
            return slots, what
        resources = ray.cluster_resources()
        if self.gpus_per_job and resources.get("GPU", 0) >= self.gpus_per_job:
            slots, what = int(resources["GPU"] // self.gpus_per_job), f"{self.gpus_per_job:g} GPU"
        else:
            slots, what = int(resources.get("CPU", 0) // self.cpus_per_job), f"{self.cpus_per_job:g} CPU"
        self._capacity = (time.monotonic(), slots, what)
        return slots, what

    def _options(self) -> dict[str, Any]:
        uses_gpu = "GPU" in self.capacity()[1]
        return {"num_gpus": self.gpus_per_job if uses_gpu else 0, "num_cpus": 1 if uses_gpu else self.cpus_per_job}

    # ---- one job's driver thread -------------------------------------------------------------
    def _drive(self, job: str, spec: JobSpec, files: JobFiles, cancel: threading.Event) -> None:
        socket = self._context.socket(zmq.PUSH)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(self._events)
        try:
            for attempt in range(1, self.retries + 2):
                end = self._attempt(job, spec, files, cancel, socket.send_multipart, attempt)
                if end is not None:
                    socket.send_multipart(end)
                    return
                log.warning("job %s: attempt %d lost its worker; running it again", job, attempt)
                socket.send_multipart(event("progress", job, {"stage": "retrying", "step": 0, "total": 0}))
        finally:
            socket.close()

    def _attempt(self, job: str, spec: JobSpec, files: JobFiles, cancel: threading.Event, send: Any,
                 attempt: int) -> list[bytes] | None:
        """One run of the job on the cluster: the frames of its end, or None when its worker
        or node was lost and a retry is left."""
        import ray
        from ray.exceptions import RayError, TaskCancelledError

        options = self._options()
        threads = max(1, int(self.cpus_per_job)) if options["num_gpus"] == 0 else None
        device = self.device if spec.device == "auto" else spec.device
        stream = self._task.options(**options, name=f"promptmesh-{job}-{attempt}").remote(
            job, {**spec.to_dict(), "device": device}, threads)
        cancelled = event("error", job, {"code": ErrorCode.CANCELLED, "message": "cancelled while running"})
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
                    item = ray.get(next(stream))
                except StopIteration:  # Ray closes a generator cancelled while it waits at a yield
                    if cancel.is_set():
                        return cancelled
                    raise RuntimeError("the job's task ended without a result") from None
                if isinstance(item, list):  # a wire event
                    send(item)
                elif item[0] == "node":
                    node = f"{item[1]} ({item[2][:8]}, pid {item[3]})"
                    send(event("progress", job, {"stage": "starting", "step": 0, "total": 0, "node": node}))
                elif item[0] == "error":
                    return item[1]
                else:  # the result: written here, by this attempt only
                    meta = {**item[2], "attempt": attempt, "node": node}
                    return commit_result(job, Mesh.from_arrays(item[1]), meta, files)
        except TaskCancelledError:
            if not cancel.is_set():  # cancelled by someone else (ray CLI): say so
                return event("error", job, {"code": ErrorCode.CANCELLED, "message": "the Ray task was cancelled"})
            return cancelled
        except RayError as exc:
            if cancel.is_set():
                return cancelled
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if attempt <= self.retries:
                return None
            discard_partial_result(files)
            return event("error", job, {"code": ErrorCode.WORKER_LOST,
                                        "message": f"the Ray worker running the job was lost ({type(exc).__name__}: "
                                                   f"{reason}); submit it again"})
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


# ---- the bridge process ------------------------------------------------------------------------
def bridge_main(config: dict[str, Any]) -> int:
    """The process that is Ray's driver: takes submit/cancel/close from the server on
    `config["commands"]`, sends the jobs' events and, every second, the cluster's capacity to
    `config["events"]`.
    It ends on close, when the server is gone, or when Ray ends it (the cluster was lost)."""
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
        driver.start(context, config["events"])
    except PromptMeshError as exc:
        log.error("%s", exc)
        return 1
    try:
        while os.getppid() == parent:
            out.send_multipart([CAPACITY, msgpack.packb(driver.capacity())])  # also a heartbeat: it blocks
            if not commands.poll(int(SLOTS_TTL_S * 1000)):  # while the cluster does not answer
                continue
            frames = commands.recv_multipart()
            kind, job = frames[0], frames[1].decode() if len(frames) > 1 else ""
            if kind == b"submit":
                spec, folder = msgpack.unpackb(frames[2]), frames[3].decode()
                driver.submit(job, JobSpec.from_dict(spec), JobFiles(Path(folder)))
            elif kind == b"cancel":
                driver.cancel(job)
            elif kind == b"close":
                break
    finally:
        driver.close()
        out.close()
        commands.close(linger=0)
        context.term()
    return 0


class RayExecutor:
    """The server's executor for a Ray cluster. Ray's driver runs in a bridge process of its own,
    because a driver whose cluster goes away blocks in Ray's calls and is then ended by Ray (after
    60 s without its GCS): the server must outlive that. A relay thread here owns the bridge:
    it forwards the loop's commands to it and its events to the loop, and when the bridge dies it
    fails the jobs it had (ErrorCode.WORKER_LOST), reports no slots (queued jobs wait) and starts a new
    bridge, which reconnects, with a growing pause between tries. The slots are the capacity the
    bridge last reported, none while its reports are late (the cluster does not answer) and none
    after a lost worker until the next report (so a queued job does not follow it into a cluster
    that is going away). Ray's output goes to `log_dir`/ray.log."""

    def __init__(self, address: str | None = None, gpus_per_job: float = 1, cpus_per_job: float = 1,
                 retries: int = 0, device: str = "auto", log_dir: Path | None = None) -> None:
        if importlib.util.find_spec("ray") is None:  # the bridge would only fail again and again
            raise PromptMeshError("--executor ray needs Ray: pip install 'promptmesh[ray]'")
        self.config = {"address": address, "gpus_per_job": gpus_per_job, "cpus_per_job": cpus_per_job,
                       "retries": retries, "device": device}
        self.log_dir = log_dir
        # Written by the relay thread only, read by the loop (single assignments).
        self.slots = 0
        self.device_name = "ray: connecting"

    def start(self, context: zmq.Context, events: str) -> None:
        self._context = context
        endpoint = f"inproc://promptmesh-ray-commands-{id(self):x}"
        self._commands = context.socket(zmq.PUSH)  # the loop thread's
        self._commands.setsockopt(zmq.LINGER, 0)
        self._commands.bind(endpoint)
        self._relay = threading.Thread(target=self._relay_main, args=(endpoint, events), name="promptmesh-ray-relay",
                                       daemon=True)
        self._relay.start()

    def submit(self, job: str, spec: JobSpec, files: JobFiles) -> None:
        self._commands.send_multipart([b"submit", job.encode(), msgpack.packb(spec.to_dict()),
                                       str(files.folder).encode()])

    def cancel(self, job: str) -> None:
        self._commands.send_multipart([b"cancel", job.encode()])

    def close(self) -> None:
        self._commands.send_multipart([b"close"])
        self._relay.join(timeout=CANCEL_GRACE_S + 20)
        self._commands.close()

    # ---- the relay thread ----------------------------------------------------------------------
    def _relay_main(self, commands_endpoint: str, events: str) -> None:
        commands = self._context.socket(zmq.PULL)
        commands.connect(commands_endpoint)
        to_loop = self._context.socket(zmq.PUSH)
        to_loop.setsockopt(zmq.LINGER, 0)
        to_loop.connect(events)
        private = Path(tempfile.mkdtemp(prefix="promptmesh-ray-"))  # 0700: no other user reaches the bridge
        bridge: Bridge | None = None
        in_flight: dict[str, list[bytes]] = {}  # job -> its submit command, until its end
        pause, next_start, generation, last_report = 1.0, 0.0, 0, 0.0

        def lose(reason: str) -> None:
            for job in list(in_flight):
                to_loop.send_multipart(event("error", job, {"code": ErrorCode.WORKER_LOST, "message": reason}))
            in_flight.clear()
            self.slots, self.device_name = 0, "ray: cluster unreachable, reconnecting"
            to_loop.send(WAKE)

        try:
            while True:
                if bridge is None and time.monotonic() >= next_start:
                    generation += 1
                    bridge = Bridge(self._context, private, generation, self.config, self.log_dir)
                    last_report = time.monotonic()
                poller = zmq.Poller()
                poller.register(commands, zmq.POLLIN)
                if bridge is not None:
                    poller.register(bridge.events, zmq.POLLIN)
                ready = dict(poller.poll(500))
                if commands in ready:
                    frames = commands.recv_multipart()
                    if frames[0] == b"close":
                        break
                    job = frames[1].decode()
                    if frames[0] == b"submit":
                        if bridge is None:
                            to_loop.send_multipart(event("error", job, {
                                "code": ErrorCode.WORKER_LOST, "message": "the Ray cluster is unreachable; submit it again"}))
                            continue
                        in_flight[job] = frames
                    if job in in_flight and bridge is not None:
                        bridge.commands.send_multipart(frames)
                if bridge is not None and bridge.events in ready:
                    frames = bridge.events.recv_multipart()
                    if frames[0] == CAPACITY:
                        slots, what = msgpack.unpackb(frames[1])
                        last_report, pause = time.monotonic(), 1.0
                        if (slots, f"ray: {slots} slot(s) of {what}") != (self.slots, self.device_name):
                            self.slots, self.device_name = slots, f"ray: {slots} slot(s) of {what}"
                            to_loop.send(WAKE)
                        continue
                    header = msgpack.unpackb(frames[0])
                    if header.get("type") in ("done", "error"):
                        in_flight.pop(header.get("job"), None)
                        if header.get("code") == ErrorCode.WORKER_LOST:  # no more jobs until the cluster answers again
                            self.slots = 0
                    to_loop.send_multipart(frames)
                if bridge is not None and self.slots and time.monotonic() - last_report > LATE_REPORT_S:
                    self.slots, self.device_name = 0, "ray: the cluster does not answer"
                if bridge is not None and bridge.process.poll() is not None:
                    log.error("the Ray bridge ended (exit %s): see %s", bridge.process.returncode, bridge.log_name)
                    bridge.close()
                    bridge = None
                    lose("the Ray cluster was lost while the job ran; submit it again")
                    next_start, pause = time.monotonic() + pause, min(pause * 2, 30.0)
        finally:
            if bridge is not None:
                bridge.stop()
            commands.close(linger=0)
            to_loop.close()
            shutil.rmtree(private, ignore_errors=True)


class Bridge:
    """One bridge process and the two sockets to it (fresh per process, so that nothing meant
    for a dead one reaches the next)."""

    def __init__(self, context: zmq.Context, private: Path, generation: int, config: dict[str, Any],
                 log_dir: Path | None) -> None:
        self.commands = context.socket(zmq.PUSH)
        self.commands.setsockopt(zmq.LINGER, 0)
        self.commands.bind(f"ipc://{private}/c{generation}")
        self.events = context.socket(zmq.PULL)
        self.events.setsockopt(zmq.LINGER, 0)
        self.events.bind(f"ipc://{private}/e{generation}")
        env = dict(os.environ)
        env.setdefault(GCS_TIMEOUT_ENV, "15")
        if config["address"] is None:
            env[LOOPBACK_ENV] = "0"  # Ray reads it at import
        self.log_name = str(log_dir / "ray.log") if log_dir is not None else os.devnull
        with open(self.log_name, "ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", __name__, json.dumps({**config, "commands": f"ipc://{private}/c{generation}",
                                                            "events": f"ipc://{private}/e{generation}"})],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=env)

    def stop(self) -> None:
        """Ask it to cancel its jobs and end; kill it if it has not within the grace period."""
        self.commands.send_multipart([b"close"])
        try:
            self.process.wait(timeout=CANCEL_GRACE_S + 10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.close()

    def close(self) -> None:
        self.commands.close()
        self.events.close()


if __name__ == "__main__":  # the bridge; its tasks are sent to Ray from the importable module, not __main__
    from promptmesh.backend import ray_executor

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    sys.exit(ray_executor.bridge_main(json.loads(sys.argv[1])))

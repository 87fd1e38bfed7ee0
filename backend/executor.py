"""Executors run the jobs the server's request loop hands them and report back over ZeroMQ.

The interface is what a scale-out executor (Ray) implements beside the in-process one:
`submit(job, spec, files)` starts a job when a slot is free, `cancel(job)` stops it, and every
event travels as a protocol `Message` (progress, preview, done, error) pushed to the loop's
inproc socket. An executor writes a job's result files before it reports `done`; the loop
owns the registry and the clients. Nothing mutable is shared: the loop calls `submit` and
`cancel`, the worker reads its own queue, and they meet only in a queue and a threading.Event.
"""

from __future__ import annotations

import errno
import logging
import queue
import threading
import traceback
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol

import zmq

from ..shared import protocol as P
from ..shared.errors import PromptMeshError
from ..shared.protocol import Message
from ..shared.result import JobFiles, Mesh, proxy_arrays, remove_temporaries, write_json, write_npz
from ..shared.spec import JobSpec
from ..shared.vocab import ErrorCode

log = logging.getLogger("promptmesh.executor")

WAKE = b"wake"  # an executor's frame that only makes the loop look again (its slots changed)
DISK_ERRNOS = {errno.ENOSPC, errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}


class Executor(Protocol):
    slots: int  # jobs it runs at once: the loop submits no more than this
    device_name: str  # what `welcome` and `pong` report

    def start(self, context: zmq.Context, events: str) -> None:
        """Begin work; events go to a PUSH socket connected to the `events` endpoint."""

    def submit(self, job: str, spec: JobSpec, files: JobFiles) -> None: ...

    def cancel(self, job: str) -> None:
        """Stop a submitted job; it then reports an error with code ErrorCode.CANCELLED."""

    def close(self) -> None:
        """Stop the running jobs and the workers (the loop is going away)."""


def event(kind: str, job: str, fields: dict[str, Any] | None = None, arrays: dict | None = None) -> list[bytes]:
    """The frames of one executor event."""
    return P.encode(Message(kind, "", job, fields or {}, arrays or {}))


class InProcessExecutor:
    """One worker thread in this process runs one job at a time with `pipeline.run`."""

    slots = 1

    def __init__(self, device: str = "auto", threads: int | str | None = "auto") -> None:
        self.device, self.threads = device, threads
        self.device_name = device_name(device)  # fails fast when CUDA is asked for but absent
        self._jobs: queue.Queue[tuple[str, JobSpec, JobFiles, threading.Event] | None] = queue.Queue()
        self._running: tuple[str, threading.Event] | None = None  # the loop thread's view: set by submit
        self._stopping = threading.Event()  # the server is going down: keep checkpoints for the restart
        self._thread = threading.Thread(target=self._work, name="promptmesh-worker", daemon=True)

    def start(self, context: zmq.Context, events: str) -> None:
        self._context, self._events = context, events
        self._thread.start()

    def submit(self, job: str, spec: JobSpec, files: JobFiles) -> None:
        if spec.device == "auto":
            spec = replace(spec, device=self.device)  # the server's --device
        cancel = threading.Event()
        self._running = (job, cancel)  # one slot: whatever ran before has ended
        self._jobs.put((job, spec, files, cancel))

    def cancel(self, job: str) -> None:
        if self._running is not None and self._running[0] == job:
            self._running[1].set()

    def close(self) -> None:
        self._stopping.set()
        if self._running is not None:
            self._running[1].set()
        self._jobs.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _work(self) -> None:
        socket = self._context.socket(zmq.PUSH)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(self._events)
        try:
            while (item := self._jobs.get()) is not None:
                job, spec, files, cancel = item
                socket.send_multipart(run_job(job, spec, files, cancel, socket.send_multipart, self._stopping,
                                              self.threads))
        finally:
            socket.close()


def run_job(job: str, spec: JobSpec, files: JobFiles, cancel: threading.Event, send: Callable[[list[bytes]], Any],
            stopping: threading.Event, threads: int | str | None = "auto") -> list[bytes]:
    """Run one job (from its checkpoint, if an earlier server stopped it), sending its progress
    and previews through `send`, write its result files, and return the frames of its terminal
    event (done, or error with a code). Stopped by `stopping`, it keeps its checkpoint."""
    from .pipeline import Cancelled, CheckpointMismatch, run

    def on_event(e: Any) -> None:
        if (frames := event_frames(job, e)) is not None:
            send(frames)

    try:
        try:
            result = run(spec, on_event, cancel=cancel, checkpoint=files.checkpoint, resume=True, threads=threads)
        except CheckpointMismatch as exc:  # made before an upgrade changed the recipe: start afresh
            log.warning("job %s starts afresh: %s", job, exc)
            files.checkpoint.unlink(missing_ok=True)
            result = run(spec, on_event, cancel=cancel, checkpoint=files.checkpoint, threads=threads)
        return commit_result(job, result.mesh, result.metadata, files)
    except Exception as exc:  # every outcome must reach the client
        if not (isinstance(exc, Cancelled) and stopping.is_set()):
            discard_partial_result(files)
        return failure(job, exc)


def event_frames(job: str, e: Any) -> list[bytes] | None:
    """The wire event of one pipeline event (None for those the client does not hear of)."""
    from .pipeline import PreviewEvent, ProxyEvent, StageEvent, StepEvent

    if isinstance(e, StageEvent) and e.stage != "done":  # the job is done when its files are: `done` says so
        return event("progress", job, {"stage": e.stage, "step": e.done, "total": e.total})
    if isinstance(e, StepEvent):
        return event("progress", job, {"stage": e.stage, "step": e.step, "total": e.total, "loss": e.loss})
    if isinstance(e, PreviewEvent):
        h, w = e.rgba.shape[:2]
        return event("preview", job, {"step": e.step, "w": w, "h": h}, {"rgba": e.rgba})
    if isinstance(e, ProxyEvent):
        return event("proxy", job, {"step": e.step}, proxy_arrays(e.mesh))
    return None


def commit_result(job: str, mesh: Mesh, metadata: dict[str, Any], files: JobFiles) -> list[bytes]:
    """Write a job's result files (each atomically; meta.json last, so its presence means the
    result is whole) and return the frames of its `done`."""
    from .export import write_mesh

    write_mesh(mesh, files.glb)
    write_mesh(mesh, files.ply)
    write_npz(mesh, files.mesh)
    meta = {**metadata, "job": job}
    write_json(meta, files.meta)
    return event("done", job, {"meta": meta})


def failure(job: str, exc: BaseException) -> list[bytes]:
    """The frames of a job's `error` (the traceback goes to the log when it is a bug)."""
    code, message = classify(exc)
    if code == ErrorCode.INTERNAL:
        log.error("job %s failed: %s", job, "".join(traceback.format_exception(exc)))
    return event("error", job, {"code": code, "message": message})


def discard_partial_result(files: JobFiles) -> None:
    """A failed job keeps no half of a result, no checkpoint and no temporaries."""
    for path in (files.meta, files.mesh, files.glb, files.ply, files.checkpoint):
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass
    if files.folder.is_dir():
        remove_temporaries(files.folder)


def classify(exc: BaseException) -> tuple[str, str]:
    """The wire code and message of a job's failure."""
    from .pipeline import Cancelled

    if isinstance(exc, Cancelled):
        return ErrorCode.CANCELLED, "cancelled while running"
    if isinstance(exc, PromptMeshError):
        return exc.code, str(exc)
    import torch

    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return ErrorCode.OOM, f"out of memory ({exc}); lower the resolution or the mesh resolution, or use fewer steps"
    if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
        return ErrorCode.DISK, f"cannot write the result: {exc.strerror} ({exc.filename or 'data directory'})"
    return ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"


def device_name(name: str) -> str:
    from .threads import resolve_device

    device = resolve_device(name)
    if device.type == "cuda":
        import torch

        return f"cuda: {torch.cuda.get_device_name(device)}"
    return "cpu"

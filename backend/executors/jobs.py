"""Running one job, wherever it runs: the pipeline's events as wire messages, the result
written into the job folder before `done`, and every failure turned into an `error` with a
code. The in-process executor and the Ray worker and bridge share these."""

from __future__ import annotations

import errno
import logging
import threading
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ...shared.errors import PromptMeshError
from ...shared.result import JobFiles, Mesh, proxy_arrays, remove_temporaries, write_json, write_npz
from ...shared.spec import JobSpec
from ...shared.vocab import Device, ErrorCode, MessageType, Stage
from .messages import frames

if TYPE_CHECKING:
    from ...shared.image import Reference
    from ..stages import Surface

log = logging.getLogger("promptmesh.executor")

DISK_ERRNOS = {errno.ENOSPC, errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}


def run_job(job: str, spec: JobSpec, files: JobFiles, cancel: threading.Event, send: Callable[[list[bytes]], Any],
            stopping: threading.Event, threads: int | str | None = "auto") -> list[bytes]:
    """Run one job (from its checkpoint, if an earlier server stopped it), sending its progress
    and previews through `send`, write its result files, and return the frames of its terminal
    event (done, or error with a code). Stopped by `stopping`, it keeps its checkpoint."""
    from ..pipeline import Cancelled, CheckpointMismatch, run
    from ..process import prepare_process

    prepare_process()

    def on_event(e: Any) -> None:
        if (event := event_frames(job, e)) is not None:
            send(event)

    try:
        surface, reference = read_surface(files), read_reference(files)
        try:
            result = run(spec, on_event, cancel=cancel, checkpoint=files.checkpoint, resume=True, threads=threads,
                         surface=surface, reference=reference)
        except CheckpointMismatch as exc:  # made before an upgrade changed the recipe: start afresh
            log.warning("job %s starts afresh: %s", job, exc)
            files.checkpoint.unlink(missing_ok=True)
            result = run(spec, on_event, cancel=cancel, checkpoint=files.checkpoint, threads=threads, surface=surface,
                         reference=reference)
        return commit_result(job, result.mesh, result.metadata, files)
    except Exception as exc:  # every outcome must reach the client
        if not (isinstance(exc, Cancelled) and stopping.is_set()):
            discard_partial_result(files)
        return failure(job, exc)


def read_surface(files: JobFiles) -> Surface | None:
    """A texture job's mesh, as the server stored it (None: a generate job)."""
    from ..stages import Surface

    if not files.surface.exists():
        return None
    with np.load(files.surface) as arrays:
        return Surface.checked(arrays["vertices"], arrays["faces"], arrays["uvs"] if "uvs" in arrays else None,
                               max_faces=len(arrays["faces"]))


def read_reference(files: JobFiles) -> Reference | None:
    """An image job's image and reference camera, as the server stored them (None: another job)."""
    from ...shared.image import Reference, check_rgba

    if not files.reference.exists():
        return None
    with np.load(files.reference) as arrays:
        fov = float(arrays["fov"]) if "fov" in arrays else None
        return Reference(check_rgba(arrays["image"]), float(arrays["elevation"]), fov)


def event_frames(job: str, e: Any) -> list[bytes] | None:
    """The wire event of one pipeline event (None for those the client does not hear of)."""
    from ..pipeline import PreviewEvent, ProxyEvent, StageEvent, StepEvent

    if isinstance(e, StageEvent) and e.stage == Stage.DOWNLOADING:  # bytes, named as such
        return progress(job, e.stage, done_bytes=e.done, total_bytes=e.total)
    if isinstance(e, StageEvent) and e.stage != Stage.DONE:  # the job is done when its files are: `done` says so
        return progress(job, e.stage, step=e.done, total=e.total)
    if isinstance(e, StepEvent):
        return progress(job, e.stage, step=e.step, total=e.total, loss=e.loss)
    if isinstance(e, PreviewEvent):
        h, w = e.rgba.shape[:2]
        return frames(MessageType.PREVIEW, job, {"step": e.step, "w": w, "h": h}, {"rgba": e.rgba})
    if isinstance(e, ProxyEvent):
        return frames(MessageType.PROXY, job, {"step": e.step}, proxy_arrays(e.mesh))
    return None


def progress(job: str, stage: str, **fields: Any) -> list[bytes]:
    return frames(MessageType.PROGRESS, job, {"stage": stage, **fields})


def commit_result(job: str, mesh: Mesh, metadata: dict[str, Any], files: JobFiles) -> list[bytes]:
    """Write a job's result files (each atomically; meta.json last, so its presence means the
    result is whole) and return the frames of its `done`."""
    from ..export import write_mesh

    write_mesh(mesh, files.glb)
    write_mesh(mesh, files.ply)
    write_npz(mesh, files.mesh)
    meta = {**metadata, "job": job}
    write_json(meta, files.meta)
    return frames(MessageType.DONE, job, {"meta": meta})


def error(job: str, code: ErrorCode, message: str) -> list[bytes]:
    return frames(MessageType.ERROR, job, {"code": code, "message": message})


def failure(job: str, exc: BaseException) -> list[bytes]:
    """The frames of a job's `error` (the traceback goes to the log when it is a bug)."""
    code, message = classify(exc)
    if code == ErrorCode.INTERNAL:
        log.error("job %s failed: %s", job, "".join(traceback.format_exception(exc)))
    return error(job, code, message)


def discard_partial_result(files: JobFiles) -> None:
    """A failed job keeps no half of a result, no checkpoint and no temporaries."""
    for path in (files.meta, files.mesh, files.glb, files.ply, files.checkpoint):
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass
    if files.folder.is_dir():
        remove_temporaries(files.folder)


def classify(exc: BaseException) -> tuple[ErrorCode, str]:
    """The wire code (an ErrorCode) and message of a job's failure."""
    from ..pipeline import Cancelled

    if isinstance(exc, Cancelled):
        return ErrorCode.CANCELLED, "cancelled while running"
    if isinstance(exc, PromptMeshError):
        return ErrorCode(exc.code), str(exc)
    import torch

    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return ErrorCode.OOM, f"out of memory ({exc}); lower the resolution or the mesh resolution, or use fewer steps"
    if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
        return ErrorCode.DISK, f"cannot write the result: {exc.strerror} ({exc.filename or 'data directory'})"
    return ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"


def device_name(name: str) -> str:
    from ..threads import resolve_device

    device = resolve_device(name)
    if device.type == Device.CUDA:
        import torch

        return f"cuda: {torch.cuda.get_device_name(device)}"
    return Device.CPU

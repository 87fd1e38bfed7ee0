"""The Ray worker's side of a farm job: the task that runs one job on whichever node Ray
places it, in its own module so that Ray ships it by reference (a worker process keeps the
priors earlier jobs loaded: pipeline's cache)."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ...shared.spec import JobSpec
from .jobs import event_frames, failure
from .messages import Internal, frames

if TYPE_CHECKING:
    from ...shared.image import Reference
    from ..stages import Surface


def job_task(job: str, spec: dict[str, Any], threads: int | None, surface: Surface | None = None,
             reference: Reference | None = None) -> Iterator[list[bytes]]:
    """Run in a Ray worker: the pipeline in a thread, each item yielded as an internal message:
    first NODE (where it runs), then the job's events, last OUTCOME (the mesh arrays and
    metadata, which the bridge writes into the job folder: no worker needs the server's disk)
    or the job's `error`. Ray's cancel raises here; the pipeline is then told to stop and
    stops within one step."""
    import ray

    from ..pipeline import ResultEvent, run
    from ..process import prepare_process

    prepare_process()

    out: queue.Queue[list[bytes] | None] = queue.Queue()
    stop = threading.Event()

    def on_event(e: Any) -> None:
        if isinstance(e, ResultEvent):
            out.put(frames(Internal.OUTCOME, job, {"meta": e.result.metadata}, e.result.mesh.arrays))
        elif (event := event_frames(job, e)) is not None:
            out.put(event)

    def work() -> None:
        try:
            run(JobSpec.from_dict(spec, image=reference is not None), on_event, cancel=stop, threads=threads, surface=surface,
                reference=reference)
        except BaseException as exc:  # every outcome reaches the bridge
            out.put(failure(job, exc))
        out.put(None)

    node_id = ray.get_runtime_context().get_node_id()
    yield frames(Internal.NODE, job, {"node": f"{os.uname().nodename} ({node_id[:8]}, pid {os.getpid()})"})
    thread = threading.Thread(target=work, name=f"promptmesh-{job}", daemon=True)
    thread.start()
    try:
        while (item := out.get()) is not None:
            yield item
    finally:  # the end, Ray's cancel, or the bridge gone
        stop.set()
        thread.join()

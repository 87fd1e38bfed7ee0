"""The in-process executor: one worker thread runs one job at a time with `pipeline.run`.

The loop thread calls `submit` and `cancel`; the worker reads its own queue. They meet only in
that queue and in each job's threading.Event, and the worker reports on its own PUSH socket.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import replace

import zmq

from ...shared.result import JobFiles
from ...shared.spec import JobSpec
from ...shared.vocab import Device
from .jobs import device_name, run_job


class InProcessExecutor:
    slots = 1

    def __init__(self, device: str = Device.AUTO, threads: int | str | None = "auto") -> None:
        self.device, self.threads = device, threads
        self.device_name = device_name(device)  # fails fast when CUDA is asked for but absent
        self._jobs: queue.Queue[tuple[str, JobSpec, JobFiles, threading.Event] | None] = queue.Queue()
        self._running: tuple[str, threading.Event] | None = None  # the loop thread's own: set by submit
        self._stopping = threading.Event()  # the server is going down: keep checkpoints for the restart
        self._thread = threading.Thread(target=self._work, name="promptmesh-worker", daemon=True)

    def start(self, context: zmq.Context, events: str) -> None:
        self._context, self._events = context, events
        self._thread.start()

    def submit(self, job: str, spec: JobSpec, files: JobFiles) -> None:
        if spec.device == Device.AUTO:
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

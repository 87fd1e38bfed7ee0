"""The job server: a ZeroMQ ROUTER that queues generation jobs and runs them one at a time.

The main thread owns the socket: it receives and validates requests, answers at once, and
forwards the worker's events to the client that submitted the job (the newest preview per
job only, so a slow client never makes previews pile up). The worker thread runs
`pipeline.run`. Results are written to the job folder, atomically, before `done` is sent.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from ..shared import protocol as P
from ..shared.errors import PromptMeshError
from ..shared.protocol import Message, ProtocolError

from . import __version__
from .export import write_json, write_mesh
from .pipeline import Cancelled, PreviewEvent, StageEvent, StepEvent, run
from .registry import Registry

log = logging.getLogger("promptmesh.server")

MAX_MESSAGE_BYTES = 1 << 20  # requests are small; results only flow server -> client
HEARTBEAT_MS = 2000
RESULT_ARRAYS = ("vertices", "faces", "colors", "normals")


@dataclass
class Running:
    job: str
    client: bytes
    cancel: threading.Event = field(default_factory=threading.Event)


def is_loopback(endpoint: str) -> bool:
    host = endpoint.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return endpoint.startswith(("ipc://", "inproc://")) or host in ("127.0.0.1", "localhost", "::1")


class Server:
    def __init__(self, bind: str, data_dir: Path, device: str = "auto", curve_dir: Path | None = None) -> None:
        if not is_loopback(bind) and curve_dir is None:
            raise PromptMeshError(f"refusing to bind {bind} without CURVE keys: pass --keys DIR (see `promptmesh keys generate`)")
        self.device = device
        self.device_name = _device_name(device)  # fails fast when CUDA is asked for but absent
        self.registry = Registry(data_dir)
        for job in self.registry.recover():
            log.warning("job %s was running when the server stopped: marked failed", job)
        self.ctx = zmq.Context()
        self.auth = None
        self.socket = self.ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self.socket.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_MS)
        self.socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * HEARTBEAT_MS)
        self.socket.setsockopt(zmq.SNDHWM, 1000)
        if curve_dir is not None:
            from .keys import server_curve

            self.auth = server_curve(self.ctx, self.socket, Path(curve_dir))
        self.endpoint = self._bind(bind)
        self.events: queue.Queue = queue.Queue()
        self.owners: dict[str, bytes] = {}  # job -> submitting client identity
        self.watchers: dict[str, set[bytes]] = {}  # job -> other clients awaiting its end (cancel)
        self.pending: list[str] = [j.id for j in self.registry.queued()]  # FIFO of queued jobs
        self.running: Running | None = None
        self.wake = threading.Condition()
        self.stopping = threading.Event()
        self.worker = threading.Thread(target=self._work, name="promptmesh-worker", daemon=True)

    def _bind(self, bind: str) -> str:
        if bind.endswith(":0"):
            port = self.socket.bind_to_random_port(bind[: bind.rindex(":")])
            return f"{bind[: bind.rindex(':')]}:{port}"
        self.socket.bind(bind)
        return bind

    # ---- main thread -------------------------------------------------------------------
    def serve_forever(self, poll_ms: int = 20) -> None:
        self.worker.start()
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        try:
            while not self.stopping.is_set():
                if poller.poll(poll_ms):
                    for _ in range(100):  # a burst, then flush events
                        try:
                            frames = self.socket.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._handle(frames)
                self._flush_events()
        finally:
            self.close()

    def close(self) -> None:
        self.stopping.set()
        if self.running:
            self.running.cancel.set()
        with self.wake:
            self.wake.notify_all()
        if self.worker.is_alive():
            self.worker.join(timeout=30)
        if self.auth is not None:
            self.auth.stop()
        self.socket.close(linger=0)
        self.ctx.term()
        self.registry.close()

    def _send(self, client: bytes, msg: Message) -> None:
        try:
            self.socket.send_multipart([client, *P.encode(msg)], zmq.NOBLOCK)
        except zmq.Again:
            log.debug("dropped %s for a slow client", msg.type)
        except zmq.ZMQError as exc:
            log.debug("could not send %s: %s", msg.type, exc)

    def _error(self, client: bytes, code: str, message: str, msg_id: str = "", job: str | None = None) -> None:
        self._send(client, Message("error", msg_id, job, {"code": code, "message": message}))

    def _handle(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            return
        client, body = frames[0], frames[1:]
        try:
            msg = P.decode(body)
        except ProtocolError as exc:
            self._error(client, exc.code, str(exc))
            return
        try:
            getattr(self, f"_on_{msg.type}")(client, msg)
        except Exception as exc:  # a bug answering one request must not stop the server
            log.error("handling %s failed: %s", msg.type, traceback.format_exc())
            self._error(client, P.INTERNAL, f"{type(exc).__name__}: {exc}", msg.id, msg.job)

    def _on_hello(self, client: bytes, msg: Message) -> None:
        self._send(client, Message("welcome", msg.id, fields={
            "protocol": P.PROTOCOL_VERSION, "version": __version__, "device": self.device_name}))

    def _on_ping(self, client: bytes, msg: Message) -> None:
        self._send(client, Message("pong", msg.id, fields={
            "device": self.device_name, "busy": self.running.job if self.running else None,
            "queue": len(self.pending)}))

    def _on_generate(self, client: bytes, msg: Message) -> None:
        job = self.registry.add(msg.fields["spec"])
        self.owners[job.id] = client
        with self.wake:
            self.pending.append(job.id)
            position = len(self.pending) - 1 + (1 if self.running else 0)
            self.wake.notify()
        self._send(client, Message("accepted", msg.id, job.id, {"position": position}))

    def _on_cancel(self, client: bytes, msg: Message) -> None:
        job = self._job_or_error(client, msg)
        if job is None:
            return
        with self.wake:
            if msg.job in self.pending:
                self.pending.remove(msg.job)
                self.registry.set_state(msg.job, "cancelled", error_code=P.CANCELLED, error="cancelled while queued")
                self._send(client, Message("error", msg.id, msg.job, {"code": P.CANCELLED, "message": "cancelled while queued"}))
                return
        if self.running and self.running.job == msg.job:
            self.running.cancel.set()
            self.watchers.setdefault(msg.job, set()).add(client)
            return  # the worker reports CANCELLED within one step, to the owner and to this client
        self._error(client, P.BAD_REQUEST, f"job {msg.job} is {job.state}; only queued or running jobs can be cancelled", msg.id, msg.job)

    def _on_status(self, client: bytes, msg: Message) -> None:
        jobs = [self.registry.get(msg.job)] if msg.job else self.registry.list()
        if msg.job and jobs[0] is None:
            self._error(client, P.NOT_FOUND, f"no job {msg.job}", msg.id, msg.job)
            return
        summaries = []
        for job in jobs:
            s = job.summary()
            s["position"] = self.pending.index(job.id) + (1 if self.running else 0) if job.id in self.pending else None
            summaries.append(s)
        self._send(client, Message("status", msg.id, msg.job, {"jobs": summaries}))

    def _on_result(self, client: bytes, msg: Message) -> None:
        job = self._job_or_error(client, msg)
        if job is None:
            return
        if job.state != "done":
            self._error(client, P.NOT_FOUND, f"job {job.id} has no result: it is {job.state}", msg.id, job.id)
            return
        data = np.load(self.registry.folder(job.id) / "mesh.npz")
        self._send(client, Message("result", msg.id, job.id, {"meta": job.meta},
                                   {k: data[k] for k in RESULT_ARRAYS}))

    def _job_or_error(self, client: bytes, msg: Message):
        job = self.registry.get(msg.job)
        if job is None:
            self._error(client, P.NOT_FOUND, f"no job {msg.job}", msg.id, msg.job)
        return job

    def _flush_events(self) -> None:
        latest_preview: dict[str, Message] = {}
        while True:
            try:
                job, msg = self.events.get_nowait()
            except queue.Empty:
                break
            if msg.type == "preview":
                latest_preview[job] = msg  # latest wins
                continue
            if job in latest_preview and msg.type in ("done", "error"):
                self._route(job, latest_preview.pop(job))
            self._route(job, msg)
        for job, msg in latest_preview.items():
            self._route(job, msg)

    def _route(self, job: str, msg: Message) -> None:
        clients = {self.owners[job]} if job in self.owners else set()
        if msg.type in ("done", "error"):  # the job's end: forget who was listening
            clients |= self.watchers.pop(job, set())
            self.owners.pop(job, None)
        for client in clients:
            self._send(client, msg)

    # ---- worker thread -----------------------------------------------------------------
    def _work(self) -> None:
        while not self.stopping.is_set():
            with self.wake:
                while not self.pending and not self.stopping.is_set():
                    self.wake.wait(timeout=0.5)
                if self.stopping.is_set():
                    return
                job_id = self.pending.pop(0)
                self.running = Running(job_id, self.owners.get(job_id, b""))
            try:
                kind, fields = self._run_job(job_id, self.running.cancel)
            finally:
                self.running = None
            self._post(job_id, kind, fields)  # after `running` is cleared: a ping then reads idle

    def _post(self, job: str, kind: str, fields: dict[str, Any] | None = None, arrays: dict[str, np.ndarray] | None = None) -> None:
        self.events.put((job, Message(kind, "", job, fields or {}, arrays or {})))

    def _run_job(self, job_id: str, cancel: threading.Event) -> tuple[str, dict[str, Any]]:
        """Run one job and record its outcome; returns the final message (done or error)."""
        job = self.registry.get(job_id)
        spec = job.spec
        spec.device = spec.device if spec.device != "auto" else self.device
        self.registry.set_state(job_id, "running")
        folder = self.registry.folder(job_id)

        def on_event(event: Any) -> None:
            if isinstance(event, StageEvent):
                self._post(job_id, "progress", {"stage": event.stage, "step": 0, "total": 0})
            elif isinstance(event, StepEvent):
                self._post(job_id, "progress", {"stage": "optimising", "step": event.step, "total": event.total, "loss": event.loss})
            elif isinstance(event, PreviewEvent):
                h, w = event.rgba.shape[:2]
                self._post(job_id, "preview", {"step": event.step, "w": w, "h": h}, {"rgba": event.rgba})

        try:
            result = run(spec, on_event, cancel=cancel, checkpoint=folder / "checkpoint.pt")
            mesh = result.mesh
            write_mesh(mesh, folder / "mesh.glb")
            write_mesh(mesh, folder / "mesh.ply")
            tmp = folder / "mesh.tmp.npz"
            np.savez(tmp, vertices=mesh.vertices, faces=mesh.faces, colors=mesh.colors, normals=mesh.normals)
            tmp.replace(folder / "mesh.npz")
            meta = {**result.metadata, "job": job_id}
            write_json(meta, folder / "meta.json")
            self.registry.set_state(job_id, "done", meta=meta)
            return "done", {"meta": meta}
        except Cancelled:
            self.registry.set_state(job_id, "cancelled", error_code=P.CANCELLED, error="cancelled while running")
            return "error", {"code": P.CANCELLED, "message": "cancelled while running"}
        except Exception as exc:
            code, message = _classify(exc)
            log.error("job %s failed: %s", job_id, traceback.format_exc())
            self.registry.set_state(job_id, "failed", error_code=code, error=message)
            return "error", {"code": code, "message": message}


def _device_name(name: str) -> str:
    from .pipeline import resolve_device

    device = resolve_device(name)
    if device.type == "cuda":
        import torch

        return f"cuda: {torch.cuda.get_device_name(device)}"
    return "cpu"


def _classify(exc: BaseException) -> tuple[str, str]:
    import torch

    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return P.OOM, f"out of memory ({exc}); lower the resolution or the mesh resolution, or use fewer steps"
    if isinstance(exc, ValueError):
        return P.BAD_REQUEST, str(exc)
    return P.INTERNAL, f"{type(exc).__name__}: {exc}"

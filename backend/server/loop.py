"""The job server's request loop: a ZeroMQ ROUTER for clients and an inproc PULL for the
executor's messages, served by one blocking poll over both (zguide's asyncsrv shape).

The loop's thread owns everything here: the socket, the registry, the scheduler (FIFO and
running jobs), the listeners and the outboxes. It answers every request at once with one reply
carrying the request's id (handlers.py), hands queued jobs to the executor while it has free
slots, records each job's end in the registry and forwards the executor's events to the job's
listeners (the newest preview and proxy per job only, so a slow client never makes previews
pile up). The executor runs the jobs and writes their results before `done`.
"""

from __future__ import annotations

import logging
import sqlite3
import traceback
from pathlib import Path
from typing import Any

import zmq

from ...shared import protocol as P
from ...shared.client import is_loopback
from ...shared.errors import PromptMeshError
from ...shared.protocol import Message
from ...shared.result import JobFiles
from ...shared.surface import MAX_FACES
from ...shared.vocab import Device, ErrorCode, JobState, MessageType
from ..executors import Executor, InProcessExecutor
from ..executors.messages import Internal, decode, frames
from ..keys import admin_keys
from ..models import Offer
from ..prior import vocabulary
from ..registry import Job, Registry
from .clients import KnownKeys, Listeners
from .handlers import HANDLERS
from .outbox import Outbox
from .scheduler import Scheduler
from .wakeup import SignalWakeup

log = logging.getLogger("promptmesh.server")

# Requests are small but for a texture job's mesh: 500k triangles unmerged are 1.5M vertices, 18 MB.
MAX_MESSAGE_BYTES = 32 << 20
HEARTBEAT_MS = 2000
# A client that does not read cannot answer a heartbeat either (its connection is backed up), and
# a timed-out connection loses everything queued for it: so only a client silent this long is
# given up (a vanished process is seen at once by TCP).
HEARTBEAT_TIMEOUT_MS = 120_000
SNDHWM = 16  # messages ZeroMQ queues for one client (results are big: this bounds their memory)
MAX_OUTBOX_BYTES = 32 << 20  # beyond this unread, a client's requests are answered BUSY
MAX_OUTBOX_MESSAGES = 10_000  # beyond this many unread, they are not answered at all (memory stays bounded)
RETRY_MS = 50  # how soon the outboxes are retried while one is not empty
BURST = 100  # requests handled before the loop looks at the executor's messages again


class Server:
    def __init__(self, bind: str, data_dir: Path, device: str = Device.AUTO, curve_dir: Path | None = None,
                 executor: Executor | None = None, max_queue: int = 100, max_queue_per_client: int = 20,
                 offer: Offer | None = None, max_texture_faces: int = MAX_FACES) -> None:
        if not is_loopback(bind) and curve_dir is None:
            raise PromptMeshError(f"refusing to bind {bind} without CURVE keys: pass --keys DIR (see `promptmesh keys generate`)")
        self.max_queue, self.max_queue_per_client = max_queue, max_queue_per_client
        self.max_texture_faces = max_texture_faces
        self.offer = offer or Offer()  # the catalogue's aliases only
        self.embedded_words = vocabulary()  # clients check prompts for the closed-vocabulary prior
        self.executor = executor or InProcessExecutor(device)
        self.registry = Registry(data_dir)
        for job in self.registry.recover():
            log.warning("job %s was running when the server stopped: marked failed", job)
        self.ctx = zmq.Context()
        self.auth = None
        self.socket = self.ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self.socket.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_MS)
        self.socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        self.socket.setsockopt(zmq.SNDHWM, SNDHWM)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a full pipe says so (Again) instead of dropping
        if curve_dir is not None:
            from ..keys import server_curve

            self.auth = server_curve(self.ctx, self.socket, Path(curve_dir))
        self.endpoint = self._bind(bind)
        self.events_endpoint = f"inproc://promptmesh-events-{id(self):x}"
        self.events = self.ctx.socket(zmq.PULL)
        self.events.setsockopt(zmq.LINGER, 0)
        self.events.bind(self.events_endpoint)
        self.outbox = Outbox(self.socket)
        self.scheduler = Scheduler((j.id for j in self.registry.queued()), self.executor.slots, self.executor.device_name)
        self.listeners = Listeners()
        self.keys = KnownKeys()  # with CURVE only
        self.admins = admin_keys(Path(curve_dir)) if curve_dir is not None else set()
        self.executor.start(self.ctx, self.events_endpoint)

    def _bind(self, bind: str) -> str:
        if bind.endswith(":0"):
            port = self.socket.bind_to_random_port(bind[: bind.rindex(":")])
            return f"{bind[: bind.rindex(':')]}:{port}"
        self.socket.bind(bind)
        return bind

    # ---- the loop ------------------------------------------------------------------------
    def serve_forever(self) -> None:
        """Serve until `stop()` (from any thread) or KeyboardInterrupt; then close."""
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(self.events, zmq.POLLIN)
        wakeup = SignalWakeup.for_this_thread()
        if wakeup is not None:
            poller.register(wakeup, zmq.POLLIN)
        try:
            self.dispatch()
            while True:
                ready = dict(poller.poll(RETRY_MS if self.outbox else None))
                if wakeup is not None and wakeup.fileno() in ready:
                    wakeup.drain()
                if self.events in ready and not self._drain_events():
                    return
                if self.socket in ready:
                    for _ in range(BURST):
                        try:
                            data = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        if self.auth is not None and len(data) > 1:  # who it is, as CURVE proved it
                            self.keys.remember(data[0].bytes, str(data[1].get("User-Id")))
                        self._handle([f.bytes for f in data])
                if self.outbox:
                    self.outbox.flush()
        finally:
            if wakeup is not None:
                wakeup.close()
            self.close()

    def stop(self) -> None:
        """Ask the loop to end (thread-safe: it is a message on the events socket)."""
        socket = self.ctx.socket(zmq.PUSH)
        socket.setsockopt(zmq.LINGER, 1000)
        socket.connect(self.events_endpoint)
        socket.send_multipart(frames(Internal.STOP))
        socket.close()

    def close(self) -> None:
        """Put the running jobs back in the queue (the next start resumes them from their
        checkpoints), stop the executor and close everything. (After a crash they read failed.)"""
        for job in self.scheduler.running:
            try:
                self.registry.requeue(job)
            except (sqlite3.Error, OSError) as exc:
                log.error("cannot put job %s back in the queue: %s", job, exc)
        self.executor.close()
        if self.auth is not None:
            self.auth.stop()
        self.socket.close(linger=0)
        self.events.close(linger=0)
        self.ctx.term()
        self.registry.close()

    # ---- requests ------------------------------------------------------------------------
    def reply(self, client: bytes, msg: Message) -> None:
        self.outbox.send(client, P.encode(msg), msg.type, msg.job)

    def error(self, client: bytes, code: str, message: str, msg_id: str = "", job: str | None = None) -> None:
        self.reply(client, Message(MessageType.ERROR, msg_id, job, {"code": code, "message": message}))

    def _handle(self, data: list[bytes]) -> None:
        """Answer one request; whatever goes wrong becomes an error reply and the loop goes on."""
        if len(data) < 2:
            return
        client, body = data[0], data[1:]
        try:
            msg = P.decode(body)
        except P.ProtocolError as exc:
            self.error(client, exc.code, str(exc), exc.msg_id)
            return
        except Exception as exc:  # a decoder bug must not stop the server either
            log.error("decoding a request failed: %s", traceback.format_exc())
            self.error(client, ErrorCode.BAD_REQUEST, f"undecodable message ({type(exc).__name__})")
            return
        unread, count, _ = self.outbox.backlog(client)
        if unread > MAX_OUTBOX_BYTES:  # a client that does not read gets small answers only
            if count < MAX_OUTBOX_MESSAGES:
                self.error(client, ErrorCode.BUSY, f"{unread >> 20} MB of replies wait for you: read them first",
                           msg.id, msg.job)
            return
        try:
            HANDLERS[msg.type](self, client, msg)
        except PromptMeshError as exc:
            self.error(client, exc.code, str(exc), msg.id, msg.job)
        except (sqlite3.Error, OSError) as exc:  # a full or read-only disk, a damaged file
            log.error("handling %s failed: %s", msg.type, exc)
            self.error(client, ErrorCode.DISK, f"the server cannot use its data directory: {exc}", msg.id, msg.job)
        except Exception as exc:  # a bug answering one request must not stop the server
            log.error("handling %s failed: %s", msg.type, traceback.format_exc())
            self.error(client, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}", msg.id, msg.job)

    def summary(self, job: Job) -> dict[str, Any]:
        """A job as `status` and `watch` tell of it."""
        return {**job.summary(), "position": self.scheduler.position(job.id), "node": self.scheduler.running.get(job.id)}

    # ---- the executor --------------------------------------------------------------------
    def dispatch(self) -> None:
        """Hand queued jobs to the executor while it has free slots, in FIFO order."""
        while (job_id := self.scheduler.next()) is not None:
            try:
                job = self.registry.get(job_id)
                if job is None or job.state != JobState.QUEUED:
                    continue
                self.registry.set_state(job.id, JobState.RUNNING)
            except (sqlite3.Error, OSError) as exc:  # the job cannot start; the next one may
                log.error("cannot start job %s: %s", job_id, exc)
                end = Message(MessageType.ERROR, "", job_id,
                              {"code": ErrorCode.DISK, "message": f"the server cannot record the job: {exc}"})
                self._record_end(job_id, end)
                self.route(job_id, end)
                continue
            self.scheduler.started(job.id)
            self.executor.submit(job.id, job.spec, JobFiles.of(self.registry.root, job.id))

    def _drain_events(self) -> bool:
        """Act on what the executor sent (forwarding the newest preview and proxy per job only);
        False on STOP."""
        latest: dict[tuple[str, str], Message] = {}
        keep_going = True
        while True:
            try:
                data = self.events.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                msg = decode(data)
            except P.ProtocolError as exc:  # an executor bug: say so, keep serving
                log.error("an executor message could not be decoded: %s", exc)
                continue
            job = msg.job or ""
            if msg.type == Internal.STOP:
                keep_going = False
                break
            if msg.type == Internal.CAPACITY:  # dispatch, below, uses the new slots
                self.scheduler.capacity(int(msg.fields["slots"]), str(msg.fields["device"]))
                continue
            if msg.type not in P.JOB_EVENTS:
                log.error("an executor sent %s, which the loop does not take", msg.type)
                continue
            if msg.type == MessageType.PROGRESS and "node" in msg.fields:
                self.scheduler.located(job, str(msg.fields["node"]))
            if msg.type in (MessageType.PREVIEW, MessageType.PROXY):
                latest[job, msg.type] = msg  # latest wins
                continue
            if msg.type in P.ENDS:
                for kind in (MessageType.PREVIEW, MessageType.PROXY):  # before the end, never after it
                    if (job, kind) in latest:
                        self.route(job, latest.pop((job, kind)))
                self._record_end(job, msg)
            self.route(job, msg)
        for (job, _), msg in latest.items():
            self.route(job, msg)
        if keep_going:
            self.dispatch()
        return keep_going

    def _record_end(self, job: str, msg: Message) -> None:
        """The job's end in the registry. If the disk refuses, the client still hears the end and
        the registry reads "failed: the server stopped" after a restart."""
        self.scheduler.ended(job)
        try:
            if msg.type == MessageType.DONE:
                self.registry.set_state(job, JobState.DONE, meta=msg.fields["meta"])
            else:
                code = msg.fields.get("code", ErrorCode.INTERNAL)
                self.registry.set_state(job, JobState.CANCELLED if code == ErrorCode.CANCELLED else JobState.FAILED,
                                        error_code=code, error=msg.fields.get("message", ""))
        except (sqlite3.Error, OSError) as exc:
            log.error("cannot record the end of job %s: %s", job, exc)

    def route(self, job: str, msg: Message, skip: bytes | None = None) -> None:
        """A job's event to its listeners (at its end, to each once, and they are forgotten)."""
        for client in self.listeners.of(job, msg.type) - {skip}:
            self.reply(client, msg)

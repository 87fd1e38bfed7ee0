"""The job server's request loop: a ZeroMQ ROUTER for clients and an inproc PULL for the
executor's events, served by one blocking poll over both (zguide's asyncsrv shape).

The loop owns the socket, the registry, the FIFO of queued jobs and who listens to which
job; it answers every request at once, hands queued jobs to the executor while it has free
slots, records each job's end in the registry and forwards the executor's events to the
client that submitted the job (the newest preview per job only, so a slow client never makes
previews pile up). The executor runs the jobs and writes their results before `done`.

A client that does not read is bounded and never loses what must arrive: ZeroMQ holds at most
SNDHWM messages for it; beyond those the loop keeps its replies and its jobs' ends in an
outbox, and of progress, previews and proxies only the newest per job (never after that job's
end), resent as the client reads; it gets one result at a time there, and its requests are
ignored while the outbox holds more than MAX_OUTBOX_BYTES.
"""

from __future__ import annotations

import logging
import signal
import socket
import sqlite3
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from pathlib import Path

import zmq

from ..shared import protocol as P
from ..shared.client import is_loopback
from ..shared.errors import PromptMeshError
from ..shared.protocol import Message
from ..shared.result import JobFiles, read_npz
from ..shared.vocab import ErrorCode
from . import __version__
from .executor import WAKE, Executor, InProcessExecutor
from .keys import admin_keys
from .models import EMBEDDED, Offer
from .prior import vocabulary
from .registry import Job, Registry

log = logging.getLogger("promptmesh.server")

MAX_MESSAGE_BYTES = 1 << 20  # requests are small; results only flow server -> client
HEARTBEAT_MS = 2000
# A client that does not read cannot answer a heartbeat either (its connection is backed up), and
# a timed-out connection loses everything queued for it: so only a client silent this long is
# given up (a vanished process is seen at once by TCP).
HEARTBEAT_TIMEOUT_MS = 120_000
SNDHWM = 16  # messages ZeroMQ queues for one client (results are big: this bounds their memory)
MAX_OUTBOX_BYTES = 32 << 20
RETRY_MS = 50  # how soon the outboxes are retried while one is not empty
SUPERSEDED = ("progress", "preview", "proxy")  # dropped for a client that does not keep up: a newer one follows
MAX_KNOWN_CLIENTS = 10_000  # connections whose CURVE key is remembered
STATUS_LIMIT = 100  # jobs in a `status` reply unless the client asks for another number (1..500)
BURST = 100  # requests handled before the loop looks at the executor's events again
STOP = b"stop"  # the control frame `stop()` sends on the events socket
TERMINAL = ("done", "error")


class Server:
    def __init__(self, bind: str, data_dir: Path, device: str = "auto", curve_dir: Path | None = None,
                 executor: Executor | None = None, max_queue: int = 100, max_queue_per_client: int = 20,
                 offer: Offer | None = None) -> None:
        if not is_loopback(bind) and curve_dir is None:
            raise PromptMeshError(f"refusing to bind {bind} without CURVE keys: pass --keys DIR (see `promptmesh keys generate`)")
        self.max_queue, self.max_queue_per_client = max_queue, max_queue_per_client
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
            from .keys import server_curve

            self.auth = server_curve(self.ctx, self.socket, Path(curve_dir))
        self.endpoint = self._bind(bind)
        self.events_endpoint = f"inproc://promptmesh-events-{id(self):x}"
        self.events = self.ctx.socket(zmq.PULL)
        self.events.setsockopt(zmq.LINGER, 0)
        self.events.bind(self.events_endpoint)
        self.pending: deque[str] = deque(j.id for j in self.registry.queued())  # FIFO of queued jobs
        self.running: set[str] = set()  # handed to the executor, not yet ended
        self.nodes: dict[str, str] = {}  # running job -> the machine it runs on, where the executor says
        self.owners: dict[str, bytes] = {}  # job -> submitting client identity
        self.watchers: dict[str, set[bytes]] = {}  # job -> other clients awaiting its end (cancel)
        self.outbox: dict[bytes, deque[tuple[str, list[bytes]]]] = {}  # client -> what its pipe had no room for
        self.latest: dict[bytes, dict[tuple[str, str], list[bytes]]] = {}  # client -> (job, kind) -> newest frames
        self.keys: dict[bytes, str] = {}  # client -> its CURVE public key (Z85), with keys only
        self.admins = admin_keys(Path(curve_dir)) if curve_dir is not None else set()
        self.handlers: dict[str, Callable[[bytes, Message], None]] = {
            "hello": self._on_hello, "ping": self._on_ping, "generate": self._on_generate,
            "cancel": self._on_cancel, "status": self._on_status, "result": self._on_result, "prune": self._on_prune,
        }
        self.executor.start(self.ctx, self.events_endpoint)

    def _bind(self, bind: str) -> str:
        if bind.endswith(":0"):
            port = self.socket.bind_to_random_port(bind[: bind.rindex(":")])
            return f"{bind[: bind.rindex(':')]}:{port}"
        self.socket.bind(bind)
        return bind

    @property
    def device_name(self) -> str:
        return self.executor.device_name

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
            self._dispatch()
            while True:
                ready = dict(poller.poll(RETRY_MS if self.outbox or self.latest else None))
                if wakeup is not None and wakeup.fileno() in ready:
                    wakeup.drain()
                if self.events in ready and not self._drain_events():
                    return
                if self.socket in ready:
                    for _ in range(BURST):
                        try:
                            frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        if self.auth is not None and len(frames) > 1:  # who it is, as CURVE proved it
                            self._remember_key(frames[0].bytes, str(frames[1].get("User-Id")))
                        self._handle([f.bytes for f in frames])
                if self.outbox or self.latest:
                    self._flush_outboxes()
        finally:
            if wakeup is not None:
                wakeup.close()
            self.close()

    def stop(self) -> None:
        """Ask the loop to end (thread-safe: it is a message on the events socket)."""
        socket = self.ctx.socket(zmq.PUSH)
        socket.setsockopt(zmq.LINGER, 1000)
        socket.connect(self.events_endpoint)
        socket.send(STOP)
        socket.close()

    def close(self) -> None:
        """Put the running jobs back in the queue (the next start resumes them from their
        checkpoints), stop the executor and close everything. (After a crash they read failed.)"""
        for job in self.running:
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
    def _remember_key(self, client: bytes, key: str) -> None:
        if client not in self.keys and len(self.keys) >= MAX_KNOWN_CLIENTS:
            del self.keys[next(iter(self.keys))]  # the oldest connection: long gone by now
        self.keys[client] = key

    def _send(self, client: bytes, msg: Message) -> None:
        self._socket_send(client, P.encode(msg), msg.type, msg.job)

    def _socket_send(self, client: bytes, frames: list[bytes], kind: str, job: str | None = None) -> None:
        """Send now, or keep it for the client: in order in its outbox, or, for what a newer one
        supersedes (progress, preview, proxy), only the newest of each kind per job."""
        latest = self.latest.get(client)
        if kind in TERMINAL and latest:  # after a job's end nothing of its progress may follow
            for key in [k for k in latest if k[0] == job]:
                del latest[key]
        if client not in self.outbox and not latest:
            try:
                self.socket.send_multipart([client, *frames], zmq.NOBLOCK)
                return
            except zmq.Again:  # the client's pipe is full: it does not keep up
                pass
            except zmq.ZMQError as exc:  # the client is gone; it asks `status` when it is back
                log.debug("could not send %s: %s", kind, exc)
                return
        if kind in SUPERSEDED:
            self.latest.setdefault(client, {})[job or "", kind] = frames
        else:
            self.outbox.setdefault(client, deque()).append((kind, frames))

    def _flush_outboxes(self) -> None:
        """Resend what was kept, the ordered outbox first, as far as each client's pipe takes it."""
        for client in list({*self.outbox, *self.latest}):
            box = self.outbox.get(client, deque())
            latest = self.latest.get(client, {})
            try:
                while box:
                    self.socket.send_multipart([client, *box[0][1]], zmq.NOBLOCK)
                    box.popleft()
                while latest:
                    key = next(iter(latest))
                    self.socket.send_multipart([client, *latest[key]], zmq.NOBLOCK)
                    del latest[key]
            except zmq.Again:
                pass
            except zmq.ZMQError:  # gone: what was kept for it is in the registry
                box.clear()
                latest.clear()
            if not box:
                self.outbox.pop(client, None)
            if not latest:
                self.latest.pop(client, None)

    def _backlog(self, client: bytes) -> tuple[int, bool]:
        """Bytes kept in the client's outbox, and whether a result is among them."""
        box = self.outbox.get(client, ())
        return sum(len(f) for _, frames in box for f in frames), any(kind == "result" for kind, _ in box)

    def _error(self, client: bytes, code: str, message: str, msg_id: str = "", job: str | None = None) -> None:
        self._send(client, Message("error", msg_id, job, {"code": code, "message": message}))

    def _handle(self, frames: list[bytes]) -> None:
        """Answer one request; whatever goes wrong becomes an error reply and the loop goes on."""
        if len(frames) < 2:
            return
        client, body = frames[0], frames[1:]
        if client in self.outbox and self._backlog(client)[0] > MAX_OUTBOX_BYTES:
            log.debug("ignoring a request from a client that does not read")
            return
        try:
            msg = P.decode(body)
        except P.ProtocolError as exc:
            self._error(client, exc.code, str(exc), exc.msg_id)
            return
        except Exception as exc:  # a decoder bug must not stop the server either
            log.error("decoding a request failed: %s", traceback.format_exc())
            self._error(client, ErrorCode.BAD_REQUEST, f"undecodable message ({type(exc).__name__})")
            return
        try:
            self.handlers[msg.type](client, msg)
        except PromptMeshError as exc:
            self._error(client, exc.code, str(exc), msg.id, msg.job)
        except (sqlite3.Error, OSError) as exc:  # a full or read-only disk, a damaged file
            log.error("handling %s failed: %s", msg.type, exc)
            self._error(client, ErrorCode.DISK, f"the server cannot use its data directory: {exc}", msg.id, msg.job)
        except Exception as exc:  # a bug answering one request must not stop the server
            log.error("handling %s failed: %s", msg.type, traceback.format_exc())
            self._error(client, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}", msg.id, msg.job)

    def _on_hello(self, client: bytes, msg: Message) -> None:
        self._send(client, Message("welcome", msg.id, fields={
            "protocol": P.PROTOCOL_VERSION, "version": __version__, "device": self.device_name,
            "models": self.offer.names(), "vocabularies": {EMBEDDED: self.embedded_words}}))

    def _on_ping(self, client: bytes, msg: Message) -> None:
        busy = min(self.running, key=self._seq) if self.running else None
        self._send(client, Message("pong", msg.id, fields={
            "device": self.device_name, "busy": busy, "queue": len(self.pending), "slots": self.executor.slots,
            "running": {job: self.nodes.get(job) for job in self.running}}))

    def _on_generate(self, client: bytes, msg: Message) -> None:
        if len(self.pending) >= self.max_queue:
            raise PromptMeshError(f"the queue is full ({len(self.pending)} jobs waiting): try again later", ErrorCode.QUEUE_FULL)
        if sum(self.owners.get(job) == client for job in self.pending) >= self.max_queue_per_client:
            raise PromptMeshError(f"you have {self.max_queue_per_client} jobs waiting, the most one client may queue: "
                                  "wait for one to start, or cancel one", ErrorCode.QUEUE_FULL)
        spec = msg.fields["spec"]
        spec.model = self.offer.resolve(spec.model)  # only what this server offers; never a client's path
        job = self.registry.add(spec, owner=self.keys.get(client))
        self.owners[job.id] = client
        self.pending.append(job.id)
        self._send(client, Message("accepted", msg.id, job.id, {"position": self._position(job.id)}))
        self._dispatch()

    def _on_cancel(self, client: bytes, msg: Message) -> None:
        job = self._job(msg)
        key = self.keys.get(client)
        if job.owner is not None and key != job.owner and key not in self.admins:
            raise PromptMeshError(f"job {job.id} was submitted with another key: only that key or an admin key "
                                  "(in the server's admins/ folder) may cancel it", ErrorCode.FORBIDDEN)
        if job.id in self.pending:
            self.pending.remove(job.id)
            self.registry.set_state(job.id, "cancelled", error_code=ErrorCode.CANCELLED, error="cancelled while queued")
            end = {"code": ErrorCode.CANCELLED, "message": "cancelled while queued"}
            self._send(client, Message("error", msg.id, job.id, end))  # the answer to this request
            self._route(job.id, Message("error", "", job.id, end), skip=client)  # and the owner's event
        elif job.id in self.running:
            self.executor.cancel(job.id)
            self.watchers.setdefault(job.id, set()).add(client)  # the executor's ErrorCode.CANCELLED reaches it
        else:
            self._error(client, ErrorCode.BAD_REQUEST,
                        f"job {job.id} is {job.state}; only queued or running jobs can be cancelled",
                        msg.id, job.id)

    def _on_status(self, client: bytes, msg: Message) -> None:
        """One job, or a page of jobs (live ones first) that always fits the client's header limit."""
        jobs, total = ([self._job(msg)], 1) if msg.job else self.registry.overview(msg.fields.get("limit", STATUS_LIMIT))
        summaries = [{**job.summary(), "position": self._position(job.id), "node": self.nodes.get(job.id)} for job in jobs]
        while True:
            reply = Message("status", msg.id, msg.job, {"jobs": summaries, "total": total})
            frames = P.encode(reply)
            if len(frames[0]) <= P.MAX_HEADER_BYTES or len(summaries) <= 1:
                break
            summaries = summaries[: len(summaries) * 3 // 4]
        self._socket_send(client, frames, reply.type)

    def _on_result(self, client: bytes, msg: Message) -> None:
        job = self._job(msg)
        if job.state != "done":
            raise PromptMeshError(f"job {job.id} has no result: it is {job.state}", ErrorCode.NOT_FOUND)
        if self._backlog(client)[1]:
            raise PromptMeshError("a result is still on its way to you: read it before asking for another", ErrorCode.BUSY)
        mesh = read_npz(JobFiles.of(self.registry.root, job.id).mesh)
        self._send(client, Message("result", msg.id, job.id, {"meta": job.meta}, mesh.arrays))

    def _on_prune(self, client: bytes, msg: Message) -> None:
        if self.auth is not None and self.keys.get(client) not in self.admins:
            raise PromptMeshError("only an admin key (in the server's admins/ folder) may prune jobs", ErrorCode.FORBIDDEN)
        pruned = self.registry.prune(time.time() - msg.fields["days"] * 86400)
        log.info("pruned %d job(s) older than %g days", len(pruned), msg.fields["days"])
        self._send(client, Message("pruned", msg.id, fields={"jobs": len(pruned)}))

    def _job(self, msg: Message) -> Job:
        job = self.registry.get(msg.job) if msg.job else None
        if job is None:
            raise PromptMeshError(f"no job {msg.job}", ErrorCode.NOT_FOUND)
        return job

    def _position(self, job: str) -> int | None:
        """Jobs ahead of a queued job (those running and those queued before it); None otherwise."""
        if job not in self.pending:
            return None
        return self.pending.index(job) + len(self.running)

    def _seq(self, job: str) -> int:
        found = self.registry.get(job)
        return found.seq if found else 0

    # ---- the executor --------------------------------------------------------------------
    def _dispatch(self) -> None:
        """Hand queued jobs to the executor while it has free slots, in FIFO order."""
        while self.pending and len(self.running) < self.executor.slots:
            job_id = self.pending.popleft()
            try:
                job = self.registry.get(job_id)
                if job is None or job.state != "queued":
                    continue
                self.registry.set_state(job.id, "running")
            except (sqlite3.Error, OSError) as exc:  # the job cannot start; the next one may
                log.error("cannot start job %s: %s", job_id, exc)
                end = Message("error", "", job_id,
                              {"code": ErrorCode.DISK, "message": f"the server cannot record the job: {exc}"})
                self._record_end(job_id, end)
                self._route(job_id, end)
                continue
            self.running.add(job.id)
            self.executor.submit(job.id, job.spec, JobFiles.of(self.registry.root, job.id))

    def _drain_events(self) -> bool:
        """Forward what the executor sent (newest preview and proxy per job); False on the stop frame."""
        latest: dict[tuple[str, str], Message] = {}
        keep_going = True
        while True:
            try:
                frames = self.events.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if frames == [STOP]:
                keep_going = False
                break
            if frames == [WAKE]:  # the executor's slots changed: _dispatch below
                continue
            try:
                msg = P.decode(frames, P.SERVER_TYPES)
            except P.ProtocolError as exc:  # an executor bug: say so, keep serving
                log.error("an executor event could not be decoded: %s", exc)
                continue
            job = msg.job or ""
            if msg.type == "progress" and "node" in msg.fields:
                self.nodes[job] = str(msg.fields["node"])
            if msg.type in ("preview", "proxy"):
                latest[job, msg.type] = msg  # latest wins
                continue
            if msg.type in TERMINAL:
                for kind in ("preview", "proxy"):  # before the end, never after it
                    if (job, kind) in latest:
                        self._route(job, latest.pop((job, kind)))
                self._record_end(job, msg)
            self._route(job, msg)
        for (job, _), msg in latest.items():
            self._route(job, msg)
        if keep_going:
            self._dispatch()
        return keep_going

    def _record_end(self, job: str, msg: Message) -> None:
        """The job's end in the registry. If the disk refuses, the client still hears the end and
        the registry reads "failed: the server stopped" after a restart."""
        self.running.discard(job)
        self.nodes.pop(job, None)
        try:
            if msg.type == "done":
                self.registry.set_state(job, "done", meta=msg.fields["meta"])
            else:
                code = msg.fields.get("code", ErrorCode.INTERNAL)
                self.registry.set_state(job, "cancelled" if code == ErrorCode.CANCELLED else "failed", error_code=code,
                                        error=msg.fields.get("message", ""))
        except (sqlite3.Error, OSError) as exc:
            log.error("cannot record the end of job %s: %s", job, exc)

    def _route(self, job: str, msg: Message, skip: bytes | None = None) -> None:
        clients = {self.owners[job]} if job in self.owners else set()
        if msg.type in TERMINAL:  # the job's end: forget who was listening
            clients |= self.watchers.pop(job, set())
            self.owners.pop(job, None)
        for client in clients - {skip}:
            self._send(client, msg)


class SignalWakeup:
    """A socket that becomes readable when a signal arrives. The kernel may deliver Ctrl-C or
    SIGTERM to any thread (a torch worker, the executor), leaving the main thread asleep in the
    blocking poll: the signal's byte on this socket wakes it, and Python then runs the handler."""

    def __init__(self) -> None:
        self.read, self.write = socket.socketpair()
        for end in (self.read, self.write):
            end.setblocking(False)
        signal.set_wakeup_fd(self.write.fileno(), warn_on_full_buffer=False)

    @classmethod
    def for_this_thread(cls) -> SignalWakeup | None:
        return cls() if threading.current_thread() is threading.main_thread() else None  # the main thread's only

    def fileno(self) -> int:
        return self.read.fileno()

    def drain(self) -> None:
        try:
            self.read.recv(4096)
        except BlockingIOError:
            pass

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        self.read.close()
        self.write.close()

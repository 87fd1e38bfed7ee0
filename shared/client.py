"""A small client for the PromptMesh server, used by the CLI, the tests and the add-on.

No threads: `send` queues a request, `poll` returns whatever events have arrived (waiting
at most `timeout` seconds). `request` waits for one reply; the other messages that arrive
meanwhile are kept for the next `poll`, never lost. Optional CURVE encryption.

The client follows the jobs it submitted or watched until their end: ZeroMQ reconnects by
itself, and the server knows a reconnected client as a new connection, so after each
reconnection (a network blip, a restarted server) the client sends `watch` for each of them
again, and their events and ends reach it as before. The socket has one monitor, the
client's: read connection changes through `connection_events`, never a monitor of your own.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from typing import Any

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from . import protocol as P
from .errors import PromptMeshError
from .protocol import Message, ProtocolError
from .vocab import ErrorCode, MessageType

T = MessageType
MAX_CONNECTION_EVENTS = 100  # kept for `connection_events` until read


def is_loopback(endpoint: str) -> bool:
    """Whether a ZeroMQ endpoint stays on this machine (loopback TCP, ipc, inproc)."""
    host = endpoint.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return endpoint.startswith(("ipc://", "inproc://")) or host in ("127.0.0.1", "localhost", "::1")


class ClientError(PromptMeshError):
    """The server could not be reached or answered with an error (its code)."""

    def __init__(self, message: str, code: str = ErrorCode.UNREACHABLE) -> None:
        super().__init__(message, code)


class Client:
    def __init__(self, endpoint: str = "tcp://127.0.0.1:5555", server_key: bytes | None = None,
                 client_keys: tuple[bytes, bytes] | None = None, context: zmq.Context | None = None) -> None:
        self.endpoint = endpoint
        self._own_ctx = context is None
        self.ctx = context or zmq.Context()
        self.socket = self.ctx.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.HEARTBEAT_IVL, 2000)
        self.socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, 6000)
        if server_key is not None:
            public, secret = client_keys or zmq.curve_keypair()
            self.socket.curve_serverkey, self.socket.curve_publickey, self.socket.curve_secretkey = server_key, public, secret
        self.monitor = self.socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        self.socket.connect(endpoint)
        self._ids = itertools.count(1)
        self._inbox: deque[Message] = deque()  # arrived while `request` waited for its reply
        self.following: set[str] = set()  # jobs submitted or watched through this client that have not ended
        self._watches: set[str] = set()  # ids of `watch` requests not answered yet
        self._handshakes = 0
        self._connection_events: deque[int] = deque(maxlen=MAX_CONNECTION_EVENTS)

    def close(self) -> None:
        self.socket.disable_monitor()
        self.monitor.close(linger=0)
        self.socket.close(linger=0)
        if self._own_ctx:
            self.ctx.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def send(self, kind: str, job: str | None = None, arrays: dict[str, np.ndarray] | None = None, **fields: Any) -> str:
        """Send a request (a texture job's mesh as `arrays`); returns its id."""
        msg_id = f"c{next(self._ids)}"
        self.socket.send_multipart(P.encode(Message(kind, msg_id, job, fields, arrays or {})), zmq.NOBLOCK)
        return msg_id

    def watch(self, job: str) -> str:
        """Ask for the job's events (its summary comes as the `watching` reply); returns the request id."""
        self.following.add(job)
        msg_id = self.send(T.WATCH, job)
        self._watches.add(msg_id)
        return msg_id

    def connection_events(self) -> list[int]:
        """The monitor's events (zmq.EVENT_DISCONNECTED, zmq.EVENT_HANDSHAKE_SUCCEEDED) since the last call."""
        self._check_connection()
        events = list(self._connection_events)
        self._connection_events.clear()
        return events

    def poll(self, timeout: float = 0.0, max_messages: int = 100) -> list[Message]:
        """Decoded messages that arrived, waiting up to `timeout` seconds for the first."""
        out: list[Message] = []
        while self._inbox and len(out) < max_messages:
            out.append(self._inbox.popleft())
        if out:
            return out
        deadline = time.monotonic() + timeout
        while True:
            self._check_connection()
            if self.socket.poll(0, zmq.POLLIN):
                return self._receive(max_messages)
            left = deadline - time.monotonic()
            if left <= 0 or not self._wait(left):
                return out

    def _wait(self, timeout: float) -> bool:
        """Wait for a message or a connection change; False when neither came within `timeout`."""
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        return bool(poller.poll(max(1, int(timeout * 1000))))

    def _check_connection(self) -> None:
        """Read the monitor; after a reconnection, watch the followed jobs again."""
        reconnected = False
        while self.monitor.poll(0):
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                break
            self._connection_events.append(event)
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                reconnected = self._handshakes > 0
                self._handshakes += 1
        if reconnected:
            for job in sorted(self.following):
                self.watch(job)

    def _receive(self, max_messages: int = 100) -> list[Message]:
        """What is waiting on the socket now, decoded (a bad message becomes an error event)."""
        out: list[Message] = []
        while len(out) < max_messages:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                msg = P.decode(frames, P.SERVER_TYPES)
            except ProtocolError as exc:
                msg = Message(T.ERROR, fields={"code": exc.code, "message": f"bad message from server: {exc}"})
            self._follow(msg)
            out.append(msg)
        return out

    def _follow(self, msg: Message) -> None:
        """Keep `following` up to date: a job joins when accepted or watched, and leaves at its end
        (done, an error event, a cancel's end, or a refused watch: the server does not know it)."""
        answered_watch = msg.id in self._watches
        self._watches.discard(msg.id)
        if not msg.job:
            return
        if msg.type in (T.ACCEPTED, T.WATCHING):
            self.following.add(msg.job)
        elif msg.type == T.DONE or (msg.type == T.ERROR and (
                not msg.id or answered_watch or msg.fields.get("code") == ErrorCode.CANCELLED)):
            self.following.discard(msg.job)

    def request(self, kind: str, job: str | None = None, timeout: float = 5.0, arrays: dict[str, np.ndarray] | None = None,
                **fields: Any) -> Message:
        """Send and wait for the reply to this request; ClientError on error or time-out."""
        msg_id = self.send(kind, job, arrays, **fields)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self._check_connection()
            if not self.socket.poll(0, zmq.POLLIN):
                self._wait(left)
                continue
            arrived = self._receive()
            for i, msg in enumerate(arrived):
                if msg.id == msg_id:
                    self._inbox.extend(arrived[:i] + arrived[i + 1:])
                    if msg.type == T.ERROR:
                        raise ClientError(msg.fields.get("message", "error"), msg.fields.get("code", ErrorCode.INTERNAL))
                    return msg
            self._inbox.extend(arrived)
        raise ClientError(f"no answer from {self.endpoint} within {timeout:g} s: is `promptmesh serve` running there?")

    def hello(self, timeout: float = 5.0) -> Message:
        welcome = self.request(T.HELLO, timeout=timeout, client="promptmesh-client", protocol=P.PROTOCOL_VERSION)
        if welcome.fields.get("protocol") != P.PROTOCOL_VERSION:
            raise ClientError(f"server speaks protocol {welcome.fields.get('protocol')}, this client {P.PROTOCOL_VERSION}",
                              ErrorCode.VERSION)
        return welcome

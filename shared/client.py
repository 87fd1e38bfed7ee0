"""A small client for the PromptMesh server, used by the CLI, the tests and the add-on.

No threads: `send` queues a request, `poll` returns whatever events have arrived (waiting
at most `timeout` seconds). `request` waits for one reply; the other messages that arrive
meanwhile are kept for the next `poll`, never lost. Optional CURVE encryption.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from typing import Any

import zmq

from . import protocol as P
from .errors import PromptMeshError
from .protocol import Message, ProtocolError
from .vocab import ErrorCode


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
        self.socket.connect(endpoint)
        self._ids = itertools.count(1)
        self._inbox: deque[Message] = deque()  # arrived while `request` waited for its reply

    def close(self) -> None:
        self.socket.close(linger=0)
        if self._own_ctx:
            self.ctx.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def send(self, kind: str, job: str | None = None, **fields: Any) -> str:
        msg_id = f"c{next(self._ids)}"
        self.socket.send_multipart(P.encode(Message(kind, msg_id, job, fields)), zmq.NOBLOCK)
        return msg_id

    def poll(self, timeout: float = 0.0, max_messages: int = 100) -> list[Message]:
        """Decoded messages that arrived, waiting up to `timeout` seconds for the first."""
        out: list[Message] = []
        while self._inbox and len(out) < max_messages:
            out.append(self._inbox.popleft())
        if out or not self.socket.poll(int(timeout * 1000), zmq.POLLIN):
            return out
        return self._receive(max_messages)

    def _receive(self, max_messages: int = 100) -> list[Message]:
        """What is waiting on the socket now, decoded (a bad message becomes an error event)."""
        out: list[Message] = []
        while len(out) < max_messages:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                out.append(P.decode(frames, P.SERVER_TYPES))
            except ProtocolError as exc:
                out.append(Message("error", fields={"code": exc.code, "message": f"bad message from server: {exc}"}))
        return out

    def request(self, kind: str, job: str | None = None, timeout: float = 5.0, **fields: Any) -> Message:
        """Send and wait for the reply to this request; ClientError on error or time-out."""
        msg_id = self.send(kind, job, **fields)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not self.socket.poll(int(left * 1000), zmq.POLLIN):
                break
            arrived = self._receive()
            for i, msg in enumerate(arrived):
                if msg.id == msg_id:
                    self._inbox.extend(arrived[:i] + arrived[i + 1:])
                    if msg.type == "error":
                        raise ClientError(msg.fields.get("message", "error"), msg.fields.get("code", ErrorCode.INTERNAL))
                    return msg
            self._inbox.extend(arrived)
        raise ClientError(f"no answer from {self.endpoint} within {timeout:g} s: is `promptmesh serve` running there?")

    def hello(self, timeout: float = 5.0) -> Message:
        welcome = self.request("hello", timeout=timeout, client="promptmesh-client", protocol=P.PROTOCOL_VERSION)
        if welcome.fields.get("protocol") != P.PROTOCOL_VERSION:
            raise ClientError(f"server speaks protocol {welcome.fields.get('protocol')}, this client {P.PROTOCOL_VERSION}",
                              ErrorCode.VERSION)
        return welcome

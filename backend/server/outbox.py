"""Per-client flow control on the server's ROUTER socket.

A client that does not read is bounded and never loses what must arrive: ZeroMQ holds at most
SNDHWM messages for it; beyond those its replies and its jobs' ends wait here in order, and
of the superseded kinds (progress, preview, proxy) only the newest per job, never after that
job's end. Everything kept is resent, in that order, as the client's pipe takes it.
"""

from __future__ import annotations

import logging
from collections import deque

import zmq

from ...shared import protocol as P
from ...shared.vocab import MessageType

log = logging.getLogger("promptmesh.server")

SUPERSEDED = (MessageType.PROGRESS, MessageType.PREVIEW, MessageType.PROXY)  # a newer one follows


class Outbox:
    """What each client's pipe had no room for. Owned by the request loop's thread."""

    def __init__(self, socket: zmq.Socket) -> None:
        self.socket = socket  # a ROUTER with ROUTER_MANDATORY: a full pipe raises Again
        self.ordered: dict[bytes, deque[tuple[str, list[bytes]]]] = {}  # client -> (kind, frames), in order
        self.latest: dict[bytes, dict[tuple[str, str], list[bytes]]] = {}  # client -> (job, kind) -> newest frames

    def __bool__(self) -> bool:
        """Whether anything waits (the loop then retries soon)."""
        return bool(self.ordered or self.latest)

    def send(self, client: bytes, frames: list[bytes], kind: str, job: str | None = None) -> None:
        """Send now, or keep it for the client."""
        latest = self.latest.get(client)
        if kind in P.ENDS and latest:  # after a job's end nothing of its progress may follow
            for key in [k for k in latest if k[0] == job]:
                del latest[key]
        if client not in self.ordered and not latest:
            try:
                self.socket.send_multipart([client, *frames], zmq.NOBLOCK)
                return
            except zmq.Again:  # the client's pipe is full: it does not keep up
                pass
            except zmq.ZMQError as exc:  # the client is gone; it asks `status` or `watch` when it is back
                log.debug("could not send %s: %s", kind, exc)
                return
        if kind in SUPERSEDED:
            self.latest.setdefault(client, {})[job or "", kind] = frames
        else:
            self.ordered.setdefault(client, deque()).append((kind, frames))

    def flush(self) -> None:
        """Resend what was kept, the ordered messages first, as far as each client's pipe takes it."""
        for client in list({*self.ordered, *self.latest}):
            box = self.ordered.get(client, deque())
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
                self.ordered.pop(client, None)
            if not latest:
                self.latest.pop(client, None)

    def backlog(self, client: bytes) -> tuple[int, int, bool]:
        """Bytes and messages kept for the client in order, and whether a result is among them."""
        box = self.ordered.get(client, ())
        return (sum(len(f) for _, frames in box for f in frames), len(box),
                any(kind == MessageType.RESULT for kind, _ in box))

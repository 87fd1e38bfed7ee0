"""Who hears of which job, and which CURVE key each connection proved. Owned by the loop's thread."""

from __future__ import annotations

from collections.abc import Iterable

from ...shared import protocol as P

MAX_KNOWN_CLIENTS = 10_000  # connections whose CURVE key is remembered


class Listeners:
    """A job's submitter and its watchers hear all of its events; a client that cancelled it
    hears its end. All are forgotten at the end. A connection is a ROUTER identity: a client
    that reconnects is a new one, and watches its jobs again."""

    def __init__(self) -> None:
        self.submitters: dict[str, bytes] = {}  # live job -> the connection that submitted it
        self.watchers: dict[str, set[bytes]] = {}  # live job -> connections hearing all of its events
        self.enders: dict[str, set[bytes]] = {}  # live job -> connections awaiting only its end

    def submitted(self, job: str, client: bytes) -> None:
        self.submitters[job] = client

    def watch(self, job: str, client: bytes) -> None:
        self.watchers.setdefault(job, set()).add(client)

    def await_end(self, job: str, client: bytes) -> None:
        self.enders.setdefault(job, set()).add(client)

    def submitted_by(self, client: bytes, jobs: Iterable[str]) -> int:
        """How many of `jobs` the connection submitted."""
        return sum(self.submitters.get(job) == client for job in jobs)

    def of(self, job: str, kind: str) -> set[bytes]:
        """Who hears this event of the job; at its end (done or error), everyone, once."""
        clients = self.watchers.get(job, set()) | ({self.submitters[job]} if job in self.submitters else set())
        if kind in P.ENDS:
            clients |= self.enders.pop(job, set())
            self.watchers.pop(job, None)
            self.submitters.pop(job, None)
        return clients


class KnownKeys:
    """Each connection's CURVE public key (Z85), as the ZAP handshake proved it."""

    def __init__(self) -> None:
        self.keys: dict[bytes, str] = {}

    def remember(self, client: bytes, key: str) -> None:
        if client not in self.keys and len(self.keys) >= MAX_KNOWN_CLIENTS:
            del self.keys[next(iter(self.keys))]  # the oldest connection: long gone by now
        self.keys[client] = key

    def of(self, client: bytes) -> str | None:
        return self.keys.get(client)

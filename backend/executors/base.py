"""What the request loop asks of an executor."""

from __future__ import annotations

from typing import Protocol

import zmq

from ...shared.result import JobFiles
from ...shared.spec import JobSpec


class Executor(Protocol):
    """Runs the jobs the loop hands it, at most `slots` at once, and reports back as internal
    messages (executors/messages.py) on a PUSH socket: each job's events, its end (done or
    error, after its files are written) and, whenever they change, its slots (CAPACITY). The
    loop calls every method from its own thread; `slots` and `device_name` are what the
    executor offers when it starts and are never written afterwards (changes travel as
    CAPACITY messages), so no state is shared between the loop and the executor's threads."""

    slots: int
    device_name: str  # what `welcome`, `pong` and `models` report

    def start(self, context: zmq.Context, events: str) -> None:
        """Begin work; messages go to a PUSH socket connected to the `events` endpoint."""

    def submit(self, job: str, spec: JobSpec, files: JobFiles) -> None: ...

    def cancel(self, job: str) -> None:
        """Stop a submitted job; it then reports an error with code ErrorCode.CANCELLED."""

    def close(self) -> None:
        """Stop the running jobs and the workers (the loop is going away)."""

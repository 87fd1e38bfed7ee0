"""The one internal message between the request loop, the executors and their processes.

Every hop (loop -> executor thread or relay, relay -> bridge process, Ray worker task ->
bridge, and back to the loop) carries a protocol `Message` framed as on the wire:
`[msgpack header, *array frames]`. A job's events are the wire's own messages (progress,
preview, proxy, done, error), forwarded unchanged; the words below are the internal ones,
never sent to a client (the loop's decoder for clients refuses them).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import numpy as np

from ...shared import protocol as P
from ...shared.protocol import Message


class Internal(StrEnum):
    SUBMIT = "submit"  # loop -> executor: run `job` {spec, folder}
    CANCEL = "cancel"  # loop -> executor: stop `job`
    CLOSE = "close"  # loop -> executor: stop every job and end
    STOP = "stop"  # anyone -> loop: end serve_forever
    CAPACITY = "capacity"  # executor -> loop: {slots, device}, whenever they change
    NODE = "node"  # Ray worker -> bridge: where `job` runs {node}
    OUTCOME = "outcome"  # Ray worker -> bridge: `job`'s mesh arrays and {meta}, for the bridge to write


TYPES: tuple[str, ...] = (*Internal, *P.JOB_EVENTS)


def frames(kind: str, job: str | None = None, fields: dict[str, Any] | None = None,
           arrays: dict[str, np.ndarray] | None = None) -> list[bytes]:
    """The frames of one internal message (or of a job's event)."""
    return P.encode(Message(kind, "", job, fields or {}, arrays or {}))


def decode(data: list[bytes]) -> Message:
    """An internal message; ProtocolError when it is not one (a bug on the sending side)."""
    return P.decode(data, TYPES)

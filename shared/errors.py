"""The one error base class of PromptMesh and the wire error codes.

An error meant for the person who asked (bad input, a missing model, a cancelled job)
subclasses `PromptMeshError` and carries a code: the CLI prints it as one line, the server
sends the code and the message on the wire, the add-on shows it. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

# Wire error codes (the `code` of an `error` message).
BAD_REQUEST = "BAD_REQUEST"  # a malformed or invalid request, a prompt the model cannot take
VERSION = "VERSION"  # the peer speaks another protocol version
NOT_FOUND = "NOT_FOUND"  # no such job, or no result for it
MODEL = "MODEL"  # the model cannot be found or loaded
DEVICE = "DEVICE"  # the requested device is not available
MESH = "MESH"  # the optimisation gave no usable surface
OOM = "OOM"  # out of memory
DISK = "DISK"  # the result could not be written (disk full, read-only, permissions)
CANCELLED = "CANCELLED"  # cancelled by a client
FORBIDDEN = "FORBIDDEN"  # the job belongs to another client key
BUSY = "BUSY"  # a result is still on its way to this client: read it first
QUEUE_FULL = "QUEUE_FULL"  # the server's queue, or this client's share of it, is full
WORKER_LOST = "WORKER_LOST"  # the machine or process running the job died (the Ray executor)
UNREACHABLE = "UNREACHABLE"  # the server did not answer (client side only)
INTERNAL = "INTERNAL"  # a bug: the server's log has the traceback


class PromptMeshError(Exception):
    """An error for the user: one clear line, no traceback; `code` travels on the wire."""

    code = INTERNAL

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

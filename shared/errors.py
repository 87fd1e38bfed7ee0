"""The one error base class of PromptMesh and the wire error codes.

An error meant for the person who asked (bad input, a missing model, a cancelled job)
subclasses `PromptMeshError` and carries a code: the CLI prints it as one line, the server
sends the code and the message on the wire, the add-on shows it. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

from .vocab import ErrorCode


class PromptMeshError(Exception):
    """An error for the user: one clear line, no traceback; `code` travels on the wire."""

    code: str = ErrorCode.INTERNAL  # an ErrorCode; a client may also carry a code a newer server sent

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

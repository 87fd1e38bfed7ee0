"""Waking the request loop's blocking poll when a signal arrives."""

from __future__ import annotations

import signal
import socket
import threading


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

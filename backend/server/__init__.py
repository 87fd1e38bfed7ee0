"""The job server, cut by responsibility: the request loop (loop.py), the request handlers in
a table (handlers.py), per-client flow control (outbox.py), the FIFO scheduler (scheduler.py),
who hears of which job (clients.py) and the signal wake-up of the loop's poll (wakeup.py)."""

from .loop import Server

__all__ = ["Server"]

"""Executors run the jobs the server's request loop hands them, and report back in internal
messages (messages.py): in this process (inprocess.py), or on a Ray cluster, cut by process:
the worker task (ray_task.py), the bridge process that is Ray's driver (ray_bridge.py) and the
relay thread in the server (ray_relay.py, imported only for --executor ray)."""

from .base import Executor
from .inprocess import InProcessExecutor

__all__ = ["Executor", "InProcessExecutor"]

"""The FIFO of queued jobs and the jobs handed to the executor. Owned by the loop's thread."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable


class Scheduler:
    def __init__(self, queued: Iterable[str], slots: int, device: str) -> None:
        self.pending: deque[str] = deque(queued)  # FIFO of queued jobs
        self.running: dict[str, str | None] = {}  # job handed to the executor -> its machine, where known; in start order
        self.slots, self.device = slots, device  # the executor's capacity, as it last reported it

    def add(self, job: str) -> None:
        self.pending.append(job)

    def withdraw(self, job: str) -> bool:
        """Take a queued job out of the queue; False if it is not queued."""
        if job not in self.pending:
            return False
        self.pending.remove(job)
        return True

    def capacity(self, slots: int, device: str) -> None:
        self.slots, self.device = slots, device

    def next(self) -> str | None:
        """The next queued job to hand to the executor, while it has a free slot."""
        if self.pending and len(self.running) < self.slots:
            return self.pending.popleft()
        return None

    def started(self, job: str) -> None:
        self.running[job] = None

    def located(self, job: str, node: str) -> None:
        if job in self.running:
            self.running[job] = node

    def ended(self, job: str) -> None:
        self.running.pop(job, None)

    def position(self, job: str) -> int | None:
        """Jobs ahead of a queued job (those running and those queued before it); None otherwise."""
        if job not in self.pending:
            return None
        return self.pending.index(job) + len(self.running)

    def busy(self) -> str | None:
        """The longest-running job, if any."""
        return next(iter(self.running), None)

"""The job registry: one SQLite database (WAL) in the data directory, plus a folder per job.

The server's request loop is its only user (the executors write job folders, never rows), so
it takes no lock: one thread at a time (the one that builds the server, then its loop's)."""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..shared.errors import PromptMeshError
from ..shared.result import JobFiles, jobs_root, new_job_id, remove_temporaries
from ..shared.spec import JobSpec
from ..shared.vocab import ErrorCode, JobState

SUMMARY_PROMPT_CHARS = 200
ENDED = (JobState.DONE, JobState.FAILED, JobState.CANCELLED)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    state TEXT NOT NULL,
    spec TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    error_code TEXT,
    error TEXT,
    meta TEXT,
    owner TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, seq);
"""
COLUMNS = "id, seq, state, spec, created, started, finished, error_code, error, meta, owner"
SELECT = f"SELECT {COLUMNS} FROM jobs"


@dataclass
class Job:
    id: str
    seq: int
    state: JobState
    spec: JobSpec
    created: float
    started: float | None
    finished: float | None
    error_code: str | None
    error: str | None
    meta: dict[str, Any] | None
    owner: str | None  # the submitting client's CURVE public key (Z85); None without keys

    def summary(self) -> dict[str, Any]:
        """What `status` tells of the job: small, so that a page of them fits one header."""
        prompt = self.spec.prompt if len(self.spec.prompt) <= SUMMARY_PROMPT_CHARS else \
            self.spec.prompt[: SUMMARY_PROMPT_CHARS - 1] + "\u2026"
        return {
            "job": self.id, "state": self.state, "prompt": prompt, "created": self.created,
            "started": self.started, "finished": self.finished, "error_code": self.error_code, "error": self.error,
        }


class Registry:
    """The jobs table; job folders are laid out by shared.result.JobFiles."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        jobs_root(self.root).mkdir(parents=True, exist_ok=True)
        path = self.root / "registry.sqlite3"
        try:
            # check_same_thread off: the server is built in one thread and may be served from another
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
            if "owner" not in {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}:  # a registry from 0.1
                self._db.execute("ALTER TABLE jobs ADD COLUMN owner TEXT")
        except sqlite3.Error as exc:
            raise PromptMeshError(f"cannot open the job registry {path}: {exc} (is the data directory writable?)",
                                  ErrorCode.DISK) from None

    def close(self) -> None:
        self._db.close()

    def files(self, job_id: str) -> JobFiles:
        return JobFiles.of(self.root, job_id)

    def recover(self) -> list[str]:
        """After a restart: jobs that were running are failed (the process died under them), and
        what interrupted writes left in the job folders is removed."""
        for folder in jobs_root(self.root).iterdir():
            if folder.is_dir():
                remove_temporaries(folder)
        rows = [r[0] for r in self._db.execute("SELECT id FROM jobs WHERE state = ?", (JobState.RUNNING,))]
        self._db.execute("UPDATE jobs SET state=?, finished=?, error_code=?, error=? WHERE state=?",
                         (JobState.FAILED, time.time(), ErrorCode.INTERNAL, "the server stopped while this job was running",
                          JobState.RUNNING))
        return rows

    def add(self, spec: JobSpec, owner: str | None = None, store: Callable[[JobFiles], Any] | None = None) -> Job:
        """A queued job; `store` writes its inputs into its folder first (a row always has them)."""
        job_id = new_job_id()
        files = self.files(job_id)
        files.folder.mkdir(parents=True, exist_ok=True)  # first: a row always has its folder
        if store is not None:
            try:
                store(files)
            except BaseException:
                shutil.rmtree(files.folder, ignore_errors=True)
                raise
        seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
        self._db.execute(
            "INSERT INTO jobs (id, seq, state, spec, created, owner) VALUES (?, ?, ?, ?, ?, ?)",
            (job_id, seq, JobState.QUEUED, json.dumps(spec.to_dict()), time.time(), owner),
        )
        row = self._db.execute(f"{SELECT} WHERE id = ?", (job_id,)).fetchone()
        return _job(row)

    def get(self, job_id: str) -> Job | None:
        row = self._db.execute(f"{SELECT} WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def overview(self, limit: int) -> tuple[list[Job], int]:
        """Up to `limit` jobs, the live ones (running, queued) first in FIFO order, then the most
        recently created others; and how many jobs there are in all."""
        live = (JobState.RUNNING, JobState.QUEUED)
        rows = self._db.execute(
            f"{SELECT} ORDER BY state IN (?, ?) DESC, CASE WHEN state IN (?, ?) THEN seq ELSE -seq END LIMIT ?",
            (*live, *live, limit)).fetchall()
        total = self._db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        return [_job(r) for r in rows], total

    def queued(self) -> list[Job]:
        rows = self._db.execute(f"{SELECT} WHERE state = ? ORDER BY seq", (JobState.QUEUED,)).fetchall()
        return [_job(r) for r in rows]

    def prune(self, older_than: float) -> list[str]:
        """Forget the jobs that ended before `older_than` (a time.time()): rows and folders."""
        ids = [r[0] for r in self._db.execute("SELECT id FROM jobs WHERE state IN (?, ?, ?) AND finished < ?",
                                              (*ENDED, older_than))]
        self._db.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in ids])
        for job_id in ids:
            shutil.rmtree(self.files(job_id).folder, ignore_errors=True)
        return ids

    def requeue(self, job_id: str) -> None:
        """A running job back to the queue, in its old place (its sequence number)."""
        self._db.execute("UPDATE jobs SET state=?, started=NULL WHERE id=? AND state=?",
                         (JobState.QUEUED, job_id, JobState.RUNNING))

    def set_state(self, job_id: str, state: JobState | str, *, error_code: str | None = None, error: str | None = None,
                  meta: dict[str, Any] | None = None) -> None:
        """Record a job's new state; a job that ends without a result loses its (empty) folder."""
        state = JobState(state)  # ValueError for a word that is not a state
        now = time.time()
        if state == JobState.RUNNING:
            self._db.execute("UPDATE jobs SET state=?, started=? WHERE id=?", (state, now, job_id))
        else:
            self._db.execute(
                "UPDATE jobs SET state=?, finished=?, error_code=?, error=?, meta=COALESCE(?, meta) WHERE id=?",
                (state, now, error_code, error, json.dumps(meta) if meta is not None else None, job_id),
            )
        if state in (JobState.FAILED, JobState.CANCELLED):
            try:
                self.files(job_id).folder.rmdir()
            except OSError:  # not empty (a server from before kept files), or already gone
                pass


def _job(row: tuple) -> Job:
    id_, seq, state, spec, created, started, finished, code, error, meta, owner = row
    return Job(id_, seq, JobState(state), JobSpec(**json.loads(spec)), created, started, finished, code, error,
               json.loads(meta) if meta else None, owner)

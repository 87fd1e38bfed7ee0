"""A local backend (`promptmesh serve`) started from the preferences, as a child process.

It runs in its own Python environment (the user's command), logs to a file in the add-on's
user folder, and is never waited on from the UI: the pump asks `exited()` each tick.
"""

from __future__ import annotations

import shlex
import subprocess
import time
from pathlib import Path

LOG_LINES = 8
_process: subprocess.Popen | None = None
_log_path: Path | None = None
_started_at = 0.0


class BackendStartError(RuntimeError):
    """The backend command is empty or cannot be run."""


def command_line(command: str, endpoint: str) -> list[str]:
    """The argument list: the user's command, plus `--bind ENDPOINT` unless it has one."""
    args = shlex.split(command)
    if not args:
        raise BackendStartError("set the backend command in the add-on preferences first "
                                "(e.g. /path/to/.venv/bin/promptmesh serve)")
    if "--bind" not in args:
        args += ["--bind", endpoint]
    return args


def start(command: str, endpoint: str, log_path: Path) -> None:
    global _process, _log_path, _started_at
    if running():
        return
    args = command_line(command, endpoint)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        try:
            _process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        except OSError as exc:
            raise BackendStartError(f"could not run {args[0]!r}: {exc.strerror or exc}") from exc
    _log_path, _started_at = log_path, time.monotonic()


def running() -> bool:
    return _process is not None and _process.poll() is None


def starting(grace: float = 120.0) -> bool:
    """Started by us less than `grace` seconds ago and still alive (it may be loading torch)."""
    return running() and time.monotonic() - _started_at < grace


def exited() -> str | None:
    """The exit status and last log lines if our backend died since the last call, else None."""
    global _process
    if _process is None or _process.poll() is None:
        return None
    code, _process = _process.returncode, None
    return f"backend exited with status {code}:\n" + last_lines()


def last_lines() -> str:
    if _log_path is None or not _log_path.is_file():
        return ""
    return "\n".join(_log_path.read_text(errors="replace").splitlines()[-LOG_LINES:])


def stop(timeout: float = 3.0) -> None:
    global _process
    if _process is None:
        return
    if _process.poll() is None:
        _process.terminate()
        try:
            _process.wait(timeout)
        except subprocess.TimeoutExpired:
            _process.kill()
            _process.wait(timeout)
    _process = None

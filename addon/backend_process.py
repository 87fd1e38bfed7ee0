"""A local backend (`promptmesh serve`) started from the preferences, as a child process.

It runs in its own Python environment (the user's command), logs to a file in the add-on's
user folder, and is never waited on from the UI: the pump asks `exited()` each tick.
"""

from __future__ import annotations

import os
import re
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


# What Hugging Face's libraries read to stay off the network (the backend's model loading checks the first).
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def command_line(command: str, endpoint: str, windows: bool | None = None) -> list[str] | str:
    """What to run: the user's command plus `--bind ENDPOINT` unless it has one. On Windows the
    command line stays one string, which CreateProcess splits by Windows' own rules (backslashes
    in paths kept, "quoted paths" with spaces); elsewhere it is split as a POSIX shell would."""
    windows = os.name == "nt" if windows is None else windows
    empty = BackendStartError("set the backend command in the add-on preferences first "
                              "(e.g. /path/to/.venv/bin/promptmesh serve)")
    if windows:
        line = command.strip()
        if not line:
            raise empty
        if line.count('"') % 2:
            raise BackendStartError(f"the backend command has an unbalanced quote: {line}")
        return line if re.search(r"(^|\s)--bind(=|\s|$)", line) else f"{line} --bind {endpoint}"
    try:
        args = shlex.split(command)
    except ValueError as exc:  # an unbalanced quote: say so, never a traceback
        raise BackendStartError(f"the backend command cannot be read ({exc}): {command.strip()}") from None
    if not args:
        raise empty
    if not any(a == "--bind" or a.startswith("--bind=") for a in args):
        args += ["--bind", endpoint]
    return args


def start(command: str, endpoint: str, log_path: Path, offline: bool = False) -> None:
    """Start the backend; `offline`: it may not download anything (Blender's online access is off)."""
    global _process, _log_path, _started_at
    if running():
        return
    args = command_line(command, endpoint)
    program = args if isinstance(args, str) else args[0]
    env = {**os.environ, **OFFLINE_ENV} if offline else None
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        try:
            _process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        except OSError as exc:
            raise BackendStartError(f"could not run {program!r}: {exc.strerror or exc}") from exc
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

"""`promptmesh serve` on a free loopback port, for the benchmarks that talk to a server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from promptmesh.shared.client import Client, ClientError


def start_server(data: Path, extra: list[str] | None = None, log: Path | None = None,
                 env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """The server process (data in `data`, output to `log` or nowhere, `env` added to this
    process's environment) and its endpoint, once it answers `hello`; RuntimeError if it does
    not within two minutes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    output = open(log, "wb") if log is not None else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "-m", "promptmesh.backend.cli", "serve", "--bind", endpoint,
                             "--data-dir", str(data), *(extra or [])],
                            env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=output)
    with Client(endpoint) as c:
        deadline = time.monotonic() + 120
        while True:
            try:
                c.hello(timeout=1.0)
                return proc, endpoint
            except ClientError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start (its output: {log or 'not kept'})") from None

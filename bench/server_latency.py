"""Job server figures on this machine: the latency from `generate` to the first preview, and
the preview frame rate a client receives while a job runs (preview every step). Starts its
own server on a loopback port. Prints figures; asserts nothing.

    python bench/server_latency.py [--model embedded] [--steps 60]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from promptmesh.shared.client import Client, ClientError  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="embedded")
    p.add_argument("--steps", type=int, default=60)
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"tcp://127.0.0.1:{port}"
    data = tempfile.mkdtemp()
    server = subprocess.Popen([sys.executable, "-m", "promptmesh.backend.cli", "serve", "--bind", endpoint, "--data-dir", data],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with Client(endpoint) as c:
            while True:
                try:
                    c.hello(timeout=1)
                    break
                except ClientError:
                    pass
            spec = {"prompt": "a red cube", "model": args.model, "steps": args.steps, "preview_every": 1, "mesh_resolution": 64}
            for label in ("cold (model loads)", "warm"):
                t0 = time.monotonic()
                job = c.request("generate", spec=spec).job
                first = None
                previews = []
                while True:
                    msgs = c.poll(1.0)
                    now = time.monotonic()
                    done = False
                    for m in msgs:
                        if m.type == "preview":
                            first = first or now - t0
                            previews.append(now)
                        done = done or (m.type in ("done", "error") and m.job == job)
                    if done:
                        break
                fps = (len(previews) - 1) / (previews[-1] - previews[0]) if len(previews) > 1 else 0.0
                print(f"{label}: generate -> first preview {first:.2f} s; {len(previews)} previews at {fps:.1f} per s; "
                      f"job {time.monotonic() - t0:.1f} s")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()

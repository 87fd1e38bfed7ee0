"""Job server figures on this machine: the latency from `generate` to the first preview, and
the preview frame rate a client receives while a job runs (preview every step). Starts its
own server on a loopback port. Prints figures; asserts nothing.

    python bench/server_latency.py [--model embedded] [--steps 60]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from local_server import start_server

from promptmesh.shared.client import Client


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="embedded")
    p.add_argument("--steps", type=int, default=60)
    args = p.parse_args()
    server, endpoint = start_server(Path(tempfile.mkdtemp()))
    try:
        with Client(endpoint) as c:
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

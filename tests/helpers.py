"""What several test files share: the repository root, external tool checks, the `promptmesh`
command as a subprocess, a job server process on a free loopback port, a textured mesh and a
GLB's own JSON and arrays."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from promptmesh.shared.client import Client, ClientError
from promptmesh.shared.protocol import Message

ROOT = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI") == "true"


def require_tool(available: bool, what: str) -> None:
    """Skip locally when an external checker is missing; in CI, where .ci/run installs it, fail."""
    if not available:
        if IN_CI:
            pytest.fail(f"{what} is missing in CI; .ci/run should have installed it")
        pytest.skip(f"{what} is not installed")


def promptmesh(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the `promptmesh` command as a user would (offline, one thread)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "promptmesh.backend.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`promptmesh serve` on a loopback port, started and ready (it answers hello)."""

    def __init__(self, data_dir: Path, bind: str | None = None, extra: tuple[str, ...] = (), models: Path | None = None,
                 server_key: bytes | None = None, client_keys: tuple[bytes, bytes] | None = None,
                 log_dir: Path | None = None, env: dict[str, str] | None = None) -> None:
        if models is not None:
            extra = ("--models-dir", str(models), *extra)
        self.endpoint = bind or f"tcp://127.0.0.1:{free_port()}"
        self.data_dir = data_dir
        # faulthandler: a server that does not stop is made to print every thread's stack (SIGABRT)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **(env or {})}
        self.log_path = (log_dir or data_dir.parent) / f"server-{data_dir.name}.log"
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "promptmesh.backend.cli", "serve", "--bind", self.endpoint, "--data-dir", str(data_dir),
             "--device", "cpu", *extra],
            stdout=self.log, stderr=subprocess.STDOUT, env=env,
        )
        with Client(self.endpoint, server_key=server_key, client_keys=client_keys) as c:
            deadline = time.monotonic() + 60
            while True:
                try:
                    c.hello(timeout=1.0)
                    break
                except ClientError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("server did not start: " + self.log_path.read_text()) from None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop it with `sig`; one that has not stopped within 30 s fails the test with its log
        (and its threads' stacks) and is killed, so that it cannot slow down the tests after it."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.proc.send_signal(signal.SIGABRT)
                    self.proc.wait(timeout=30)
                    pytest.fail(f"the server did not stop within 30 s of signal {sig}:\n"
                                + self.log_path.read_text(errors="replace")[-20_000:])
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.log.close()


def small_spec(model: Path, prompt: str = "a red cube", **kw) -> dict:
    """A job of a few steps at 16 px, a 64 px texture, with the tiny Stable Diffusion (offered by
    its folder name from a server's models folder): seconds on a CPU."""
    spec = {"prompt": prompt, "model": model.name, "steps": 4, "resolution": 16, "mesh_resolution": 32, "device": "cpu",
            "texture_size": 64}
    spec.update(kw)
    return spec


def running_and_queued(client: Client, model: Path) -> tuple[str, str]:
    """Two jobs: a long one optimising, and a short one queued behind it."""
    running = client.request("generate", spec=small_spec(model, steps=5000)).job
    wait_for(client, running, until=("progress",))
    return running, client.request("generate", spec=small_spec(model)).job


def wait_for(client: Client, job: str, until: tuple[str, ...] = ("done", "error"), timeout: float = 180) -> list[Message]:
    """The messages received until one of type `until` arrives for `job` (it is the last)."""
    seen: list[Message] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for msg in client.poll(0.5):
            seen.append(msg)
            if msg.job == job and msg.type in until:
                return seen
    raise AssertionError(f"job {job} did not reach {until}: saw {[m.type for m in seen]}")


def textured_sphere(size: int = 128):
    """An icosphere coloured by position (red along +X, green +Y, blue +Z: no two places alike,
    so a flipped or shifted texture shows), baked by the real xatlas into a `size` texture."""
    import trimesh

    from promptmesh.backend.texture import bake
    from promptmesh.shared.result import Mesh

    sphere = trimesh.creation.icosphere(3)
    v = sphere.vertices.astype(np.float32)
    return bake(Mesh(v, sphere.faces.astype(np.int32), 0.5 + 0.5 * v, v.copy()), size)


def glb_parts(path: Path) -> tuple[dict, bytes]:
    """A GLB's JSON chunk and binary chunk, read by the spec, not by the library that wrote it."""
    data = path.read_bytes()
    json_length = struct.unpack_from("<I", data, 12)[0]
    gltf = json.loads(data[20:20 + json_length])
    bin_start = 20 + json_length
    bin_length = struct.unpack_from("<I", data, bin_start)[0]
    return gltf, data[bin_start + 8:bin_start + 8 + bin_length]


def glb_view(gltf: dict, binary: bytes, view: int) -> bytes:
    v = gltf["bufferViews"][view]
    return binary[v.get("byteOffset", 0):v.get("byteOffset", 0) + v["byteLength"]]


def glb_accessor(gltf: dict, binary: bytes, index: int) -> np.ndarray:
    """A tightly packed accessor's values; normalised integers scaled to [0, 1]."""
    a = gltf["accessors"][index]
    dtype = {5121: np.uint8, 5123: np.uint16, 5125: np.uint32, 5126: np.float32}[a["componentType"]]
    width = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4}[a["type"]]
    view = glb_view(gltf, binary, a["bufferView"])
    values = np.frombuffer(view, dtype, a["count"] * width, a.get("byteOffset", 0)).reshape(a["count"], width)
    return values / np.iinfo(dtype).max if a.get("normalized") else values


def wait_for_id(client: Client, msg_id: str, timeout: float = 30) -> list[Message]:
    """The reply to request `msg_id` (a list of one), polling; AssertionError if none comes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for msg in client.poll(0.5):
            if msg.id == msg_id:
                return [msg]
    raise AssertionError(f"no reply to {msg_id}")


def cancel_at_step(job, step: int, checkpoint: Path, **run_options) -> None:
    """Run `job` in process with a checkpoint every 2 steps and cancel it once it reports step
    `step`; it must end Cancelled. `run_options` go to pipeline.run (a surface, a reference)."""
    from promptmesh.backend.pipeline import Cancelled, StepEvent, run

    cancel = threading.Event()
    with pytest.raises(Cancelled):
        run(job, lambda e: isinstance(e, StepEvent) and e.step == step and cancel.set(), cancel=cancel,
            checkpoint=checkpoint, checkpoint_every=2, **run_options)

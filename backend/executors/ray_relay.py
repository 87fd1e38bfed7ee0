"""The server's side of the Ray farm: `RayExecutor`, whose relay thread owns the bridge process.

The request loop hands this executor at most `slots` jobs, the cluster's capacity in jobs
(its GPUs / --gpus-per-job, or its CPUs / --cpus-per-job where it has no GPU). Ray's driver
runs in a bridge process (executors/ray_bridge.py), because a driver whose cluster goes away
blocks in Ray's calls and is then ended by Ray (after 60 s without its GCS): the server must
outlive that. The relay thread forwards the loop's commands to the bridge and the bridge's
messages to the loop; when the bridge dies it fails the jobs it had (ErrorCode.WORKER_LOST),
reports no slots (queued jobs wait) and starts a new bridge, which reconnects, with a growing
pause between tries. The slots it reports to the loop (CAPACITY) are those the bridge last
reported, none while its reports are late (the cluster does not answer) and none after a lost
worker until the next report (so a queued job does not follow it into a cluster that is going
away). Ray's output goes to `log_dir`/ray.log.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import zmq

from ...shared import protocol as P
from ...shared.errors import PromptMeshError
from ...shared.result import JobFiles
from ...shared.spec import JobSpec
from ...shared.vocab import Device, ErrorCode
from .jobs import error
from .messages import Internal, decode, frames
from .ray_bridge import CANCEL_GRACE_S

log = logging.getLogger("promptmesh.ray")

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray takes 127.0.0.1 as this node's address
# Ray ends a driver that has not reached its cluster's GCS for this long (Ray's default: 60 s);
# the relay then starts a new bridge. A test may shorten it.
GCS_TIMEOUT_ENV = "RAY_gcs_rpc_server_reconnect_timeout_s"
LATE_REPORT_S = 3.0  # a bridge silent this long has a cluster that does not answer: no slots


class RayExecutor:
    """The loop's executor for a Ray cluster; see the module's docstring."""

    slots = 0  # until the bridge reports the cluster's capacity (CAPACITY)
    device_name = "ray: connecting"

    def __init__(self, address: str | None = None, gpus_per_job: float = 1, cpus_per_job: float = 1,
                 retries: int = 0, device: str = Device.AUTO, log_dir: Path | None = None) -> None:
        if importlib.util.find_spec("ray") is None:  # the bridge would only fail again and again
            raise PromptMeshError("--executor ray needs Ray: pip install 'promptmesh[ray]'")
        self.config = {"address": address, "gpus_per_job": gpus_per_job, "cpus_per_job": cpus_per_job,
                       "retries": retries, "device": device}
        self.log_dir = log_dir

    def start(self, context: zmq.Context, events: str) -> None:
        endpoint = f"inproc://promptmesh-ray-commands-{id(self):x}"
        self._commands = context.socket(zmq.PUSH)  # the loop thread's
        self._commands.setsockopt(zmq.LINGER, 0)
        self._commands.bind(endpoint)
        self._relay = threading.Thread(target=Relay(context, endpoint, events, self.config, self.log_dir).run,
                                       name="promptmesh-ray-relay", daemon=True)
        self._relay.start()

    def submit(self, job: str, spec: JobSpec, files: JobFiles) -> None:
        self._commands.send_multipart(frames(Internal.SUBMIT, job, {"spec": spec.to_dict(), "folder": str(files.folder)}))

    def cancel(self, job: str) -> None:
        self._commands.send_multipart(frames(Internal.CANCEL, job))

    def close(self) -> None:
        self._commands.send_multipart(frames(Internal.CLOSE))
        self._relay.join(timeout=CANCEL_GRACE_S + 20)
        self._commands.close()


class Relay:
    """The relay thread's state: everything here belongs to that thread alone."""

    def __init__(self, context: zmq.Context, commands: str, events: str, config: dict[str, Any],
                 log_dir: Path | None) -> None:
        self.context, self.config, self.log_dir = context, config, log_dir
        self.commands_endpoint, self.events_endpoint = commands, events
        self.capacity = (RayExecutor.slots, RayExecutor.device_name)  # what the loop was last told
        self.in_flight: dict[str, list[bytes]] = {}  # job -> its SUBMIT, until its end

    def report(self, slots: int, device: str) -> None:
        if (slots, device) != self.capacity:
            self.capacity = (slots, device)
            self.to_loop.send_multipart(frames(Internal.CAPACITY, fields={"slots": slots, "device": device}))

    def lose(self, reason: str) -> None:
        """The bridge is gone: its jobs end, and no job is handed out until a new one reports."""
        for job in list(self.in_flight):
            self.to_loop.send_multipart(error(job, ErrorCode.WORKER_LOST, reason))
        self.in_flight.clear()
        self.report(0, "ray: cluster unreachable, reconnecting")

    def run(self) -> None:
        commands = self.context.socket(zmq.PULL)
        commands.connect(self.commands_endpoint)
        self.to_loop = self.context.socket(zmq.PUSH)
        self.to_loop.setsockopt(zmq.LINGER, 0)
        self.to_loop.connect(self.events_endpoint)
        private = Path(tempfile.mkdtemp(prefix="promptmesh-ray-"))  # 0700: no other user reaches the bridge
        bridge: Bridge | None = None
        pause, next_start, generation, last_report = 1.0, 0.0, 0, 0.0
        try:
            while True:
                if bridge is None and time.monotonic() >= next_start:
                    generation += 1
                    bridge = Bridge(self.context, private, generation, self.config, self.log_dir)
                    last_report = time.monotonic()
                poller = zmq.Poller()
                poller.register(commands, zmq.POLLIN)
                if bridge is not None:
                    poller.register(bridge.events, zmq.POLLIN)
                ready = dict(poller.poll(500))
                if commands in ready:
                    data = commands.recv_multipart()
                    command = decode(data)
                    if command.type == Internal.CLOSE:
                        break
                    job = command.job or ""
                    if command.type == Internal.SUBMIT:
                        if bridge is None:
                            self.to_loop.send_multipart(error(job, ErrorCode.WORKER_LOST,
                                                              "the Ray cluster is unreachable; submit it again"))
                            continue
                        self.in_flight[job] = data
                    if job in self.in_flight and bridge is not None:
                        bridge.commands.send_multipart(data)
                if bridge is not None and bridge.events in ready:
                    data = bridge.events.recv_multipart()
                    msg = decode(data)
                    if msg.type == Internal.CAPACITY:
                        last_report, pause = time.monotonic(), 1.0
                        self.report(int(msg.fields["slots"]), str(msg.fields["device"]))
                        continue
                    if msg.type in P.ENDS:
                        self.in_flight.pop(msg.job or "", None)
                        if msg.fields.get("code") == ErrorCode.WORKER_LOST:  # no more jobs until the cluster answers again
                            self.report(0, self.capacity[1])
                    self.to_loop.send_multipart(data)
                if bridge is not None and self.capacity[0] and time.monotonic() - last_report > LATE_REPORT_S:
                    self.report(0, "ray: the cluster does not answer")
                if bridge is not None and bridge.process.poll() is not None:
                    log.error("the Ray bridge ended (exit %s): see %s", bridge.process.returncode, bridge.log_name)
                    bridge.close()
                    bridge = None
                    self.lose("the Ray cluster was lost while the job ran; submit it again")
                    next_start, pause = time.monotonic() + pause, min(pause * 2, 30.0)
        finally:
            if bridge is not None:
                bridge.stop()
            commands.close(linger=0)
            self.to_loop.close()
            shutil.rmtree(private, ignore_errors=True)


class Bridge:
    """One bridge process and the two sockets to it (fresh per process, so that nothing meant
    for a dead one reaches the next)."""

    def __init__(self, context: zmq.Context, private: Path, generation: int, config: dict[str, Any],
                 log_dir: Path | None) -> None:
        self.commands = context.socket(zmq.PUSH)
        self.commands.setsockopt(zmq.LINGER, 0)
        self.commands.bind(f"ipc://{private}/c{generation}")
        self.events = context.socket(zmq.PULL)
        self.events.setsockopt(zmq.LINGER, 0)
        self.events.bind(f"ipc://{private}/e{generation}")
        env = dict(os.environ)
        env.setdefault(GCS_TIMEOUT_ENV, "15")
        if config["address"] is None:
            env[LOOPBACK_ENV] = "0"  # Ray reads it at import
        self.log_name = str(log_dir / "ray.log") if log_dir is not None else os.devnull
        with open(self.log_name, "ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", f"{__package__}.ray_bridge",
                 json.dumps({**config, "commands": f"ipc://{private}/c{generation}",
                             "events": f"ipc://{private}/e{generation}"})],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=env)

    def stop(self) -> None:
        """Ask it to cancel its jobs and end; kill it if it has not within the grace period."""
        self.commands.send_multipart(frames(Internal.CLOSE))
        try:
            self.process.wait(timeout=CANCEL_GRACE_S + 10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.close()

    def close(self) -> None:
        self.commands.close()
        self.events.close()

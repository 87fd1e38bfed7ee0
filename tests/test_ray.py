"""`promptmesh serve --executor ray` on a real Ray cluster on this machine: a head without
slots and two nodes of one CPU each (loopback only, Ray's token authentication as Ray sets it),
started once for this module. Jobs are embedded-prior jobs of a few seconds, sent through the
ZeroMQ front as any client sends them."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from helpers import ServerProcess, require_tool
from promptmesh.shared.client import Client
from promptmesh.shared.protocol import Message
from promptmesh.shared.result import JobFiles, read_npz
from test_addon import addon, addon_zip, bpy, given, prefs, pump_until  # noqa: F401 (fixtures for the add-on test)

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read when ray is imported: nodes on 127.0.0.1 only

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    try:
        from ray.cluster_utils import Cluster
    except ImportError:
        require_tool(False, "ray (pip install -e '.[ray]')")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def ray_server(cluster, tmp_path, *extra: str, slots: int = 2) -> ServerProcess:
    """A server on the cluster, once its bridge to Ray reports the cluster's `slots`."""
    srv = ServerProcess(tmp_path / "data", extra=("--executor", "ray", "--ray-address", cluster.address, *extra))
    with Client(srv.endpoint) as c:
        until_slots(c, slots)
    return srv


@contextmanager
def ray_client(cluster, tmp_path, *extra: str) -> Iterator[Client]:
    """A client of a server on the cluster (`ray_server`), stopped afterwards."""
    srv = ray_server(cluster, tmp_path, *extra)
    try:
        with Client(srv.endpoint) as c:
            yield c
    finally:
        srv.stop()


def until_slots(client: Client, slots: int, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while (pong := client.request("ping")).fields["slots"] != slots:
        assert time.monotonic() < deadline, pong.fields
        time.sleep(0.2)
    return pong.fields


def spec(steps: int = 60, seed: int = 0, prompt: str = "a red cube") -> dict:
    return {"prompt": prompt, "model": "embedded", "steps": steps, "seed": seed, "mesh_resolution": 32,
            "device": "cpu", "preview_every": 20}


def ends(client: Client, jobs: list[str], timeout: float = 240) -> dict[str, Message]:
    """The terminal message of each job, and every message seen on the way (by job)."""
    out: dict[str, Message] = {}
    deadline = time.monotonic() + timeout
    while len(out) < len(jobs):
        assert time.monotonic() < deadline, f"jobs did not end: {set(jobs) - set(out)}"
        for msg in client.poll(0.5):
            if msg.job in jobs and msg.type in ("done", "error"):
                out[msg.job] = msg
    return out


def statuses(client: Client) -> dict[str, dict]:
    return {s["job"]: s for s in client.request("status").fields["jobs"]}


def until_running(client: Client, jobs: list[str], timeout: float = 120) -> dict[str, dict]:
    """Status once every job in `jobs` runs and its node is known."""
    deadline = time.monotonic() + timeout
    while True:
        st = statuses(client)
        if all(st[j]["state"] == "running" and st[j]["node"] for j in jobs):
            return st
        assert time.monotonic() < deadline, st
        time.sleep(0.2)


def until_stepping(client: Client, job: str, timeout: float = 120) -> None:
    """Until the job's progress says it is optimising."""
    deadline = time.monotonic() + timeout
    while True:
        assert time.monotonic() < deadline, f"job {job} did not start optimising"
        if any(m.job == job and m.type == "progress" and m.fields["stage"] == "optimising" for m in client.poll(0.5)):
            return


def worker_pid(node: str) -> int:
    return int(re.search(r"pid (\d+)", node).group(1))


def test_two_nodes_run_two_jobs_at_once_and_a_third_waits_its_turn(cluster, tmp_path):
    with ray_client(cluster, tmp_path) as c:
        assert c.request("ping").fields["device"] == "ray: 2 slot(s) of 1 CPU"
        jobs = [c.request("generate", spec=spec(steps=100, seed=i)).job for i in range(3)]
        st = until_running(c, jobs[:2])
        assert st[jobs[0]]["node"].split(" (")[1][:8] != st[jobs[1]]["node"].split(" (")[1][:8]  # two nodes
        assert st[jobs[2]]["state"] == "queued" and st[jobs[2]]["position"] == 2
        assert c.request("ping").fields["running"].keys() == set(jobs[:2])
        end = ends(c, jobs)
        assert all(m.type == "done" for m in end.values()), {j: m.fields for j, m in end.items()}
        st = statuses(c)
        assert st[jobs[1]]["started"] < st[jobs[0]]["finished"]  # the first two overlapped
        assert st[jobs[2]]["started"] >= min(st[jobs[0]]["finished"], st[jobs[1]]["finished"])
        loads = [end[j].fields["meta"]["timings"]["load_seconds"] for j in jobs]
        assert loads[2] < 0.5 * max(loads[:2]), loads  # the third job found the prior loaded in its worker
        for job in jobs:
            files = JobFiles.of(tmp_path / "data", job)
            assert end[job].fields["meta"]["attempt"] == 1 and files.glb.is_file() and files.ply.is_file()
            fetched = c.request("result", job, timeout=30)
            stored = read_npz(files.mesh).arrays
            assert fetched.arrays.keys() == stored.keys()
            for name, array in stored.items():
                assert fetched.arrays[name].dtype == array.dtype and fetched.arrays[name].tobytes() == array.tobytes()


def test_cancel_stops_a_running_job_within_a_step_and_a_queued_one_at_once(cluster, tmp_path):
    with ray_client(cluster, tmp_path) as c:
        jobs = [c.request("generate", spec=spec(steps=5000, seed=i)).job for i in range(3)]
        until_running(c, jobs[:2])
        c.send("cancel", jobs[2])
        assert ends(c, [jobs[2]], timeout=10)[jobs[2]].fields["message"] == "cancelled while queued"
        until_stepping(c, jobs[0])  # a cancel is seen between steps: loading the prior is not one
        t0 = time.monotonic()
        assert c.request("cancel", jobs[0]).type == "cancelling"  # acknowledged at once, with the request's id
        end = ends(c, [jobs[0]], timeout=30)[jobs[0]]
        assert end.fields["code"] == "CANCELLED" and time.monotonic() - t0 < 5  # cooperative, not the forced kill
        later = c.request("generate", spec=spec(steps=20)).job  # the freed slot takes the next job
        assert ends(c, [later])[later].type == "done"
        c.send("cancel", jobs[1])
        assert ends(c, [jobs[1]], timeout=30)[jobs[1]].fields["code"] == "CANCELLED"
        st = statuses(c)
        assert [st[j]["state"] for j in jobs] == ["cancelled"] * 3
        assert not any(JobFiles.of(tmp_path / "data", j).folder.exists() for j in jobs)


def test_a_killed_worker_fails_its_job_with_the_reason_and_the_server_goes_on(cluster, tmp_path):
    with ray_client(cluster, tmp_path) as c:
        job = c.request("generate", spec=spec(steps=5000)).job
        node = until_running(c, [job])[job]["node"]
        os.kill(worker_pid(node), signal.SIGKILL)
        end = ends(c, [job], timeout=60)[job]
        assert end.type == "error" and end.fields["code"] == "WORKER_LOST", end.fields
        assert "lost" in end.fields["message"]
        assert statuses(c)[job]["state"] == "failed"
        again = c.request("generate", spec=spec(steps=20)).job
        assert ends(c, [again])[again].type == "done"


def test_with_retries_a_job_whose_worker_dies_runs_again_and_completes_once(cluster, tmp_path):
    with ray_client(cluster, tmp_path, "--retries", "1") as c:
        job = c.request("generate", spec=spec(steps=100)).job
        node = until_running(c, [job])[job]["node"]
        os.kill(worker_pid(node), signal.SIGKILL)
        stages, end = [], None
        deadline = time.monotonic() + 240
        while end is None and time.monotonic() < deadline:
            for msg in c.poll(0.5):
                if msg.job == job and msg.type == "progress":
                    stages.append(msg.fields["stage"])
                elif msg.job == job and msg.type in ("done", "error"):
                    end = msg
        assert end is not None and end.type == "done", end and end.fields
        assert "retrying" in stages and end.fields["meta"]["attempt"] == 2
        files = JobFiles.of(tmp_path / "data", job)
        assert sorted(p.name for p in files.folder.iterdir()) == sorted(
            p.name for p in (files.meta, files.mesh, files.glb, files.ply))  # one result, no leftovers


def test_a_job_from_the_add_on_runs_on_the_cluster(cluster, tmp_path, bpy, addon, prefs):  # noqa: F811
    _, session = addon
    srv = ray_server(cluster, tmp_path)
    try:
        prefs.endpoint, prefs.timeout = srv.endpoint, 10.0
        settings, st = bpy.context.scene.promptmesh, bpy.context.window_manager.promptmesh
        settings.prompt, settings.seed, settings.quality, settings.model = "a red cube", 0, "DRAFT", "embedded"
        given(settings, steps=60, mesh_resolution=32)  # Auto off: else the draft preset's 500 steps
        settings.preview_every = 20
        settings.device, settings.import_when_done = "cpu", False
        assert bpy.ops.promptmesh.generate() == {"FINISHED"}
        pump_until(session, lambda: len(st.jobs) == 1 and st.jobs[0].state in ("DONE", "FAILED", "CANCELLED"),
                   timeout=240)
        job = st.jobs[0]
        assert job.state == "DONE", job.message
        assert st.device.startswith("ray")
        import json

        meta = json.loads(session.job_files(job.job).meta.read_text())
        assert meta["attempt"] == 1 and meta["node"] and meta["steps"] == 60
    finally:
        srv.stop()


def test_the_server_outlives_its_cluster_fails_the_running_job_keeps_the_queued_one_and_reconnects(tmp_path):
    """A cluster of its own (this one is shut down and started again at the same address)."""
    from ray.cluster_utils import Cluster

    def start(port: int | None = None) -> Cluster:
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                          **({"gcs_server_port": port} if port else {})})
        c.add_node(num_cpus=1)
        c.wait_for_nodes()
        return c

    own = start()
    port = int(own.address.rsplit(":", 1)[1])
    os.environ["RAY_gcs_rpc_server_reconnect_timeout_s"] = "5"  # Ray ends a driver without its GCS this soon
    try:
        srv = ray_server(own, tmp_path, slots=1)
    finally:
        del os.environ["RAY_gcs_rpc_server_reconnect_timeout_s"]
    try:
        with Client(srv.endpoint) as c:
            running = c.request("generate", spec=spec(steps=5000)).job
            until_running(c, [running])
            queued = c.request("generate", spec=spec(steps=20)).job
            own.shutdown()
            end = ends(c, [running], timeout=60)[running]
            assert end.fields["code"] == "WORKER_LOST", end.fields
            t0 = time.monotonic()
            while time.monotonic() - t0 < 8:  # while Ray ends the bridge (5 s here) and the relay starts another
                pong = c.request("ping").fields  # the loop answers all along
                assert pong["queue"] == 1 and statuses(c)[queued]["state"] == "queued", pong
                time.sleep(1)
            assert pong["slots"] == 0 and "ray" in pong["device"]
            own = start(port)
            assert ends(c, [queued], timeout=120)[queued].type == "done"
            assert c.request("ping").fields["slots"] == 1
    finally:
        srv.stop()
        own.shutdown()


def test_without_an_address_the_server_starts_a_local_cluster_on_loopback_with_a_slot_per_core(tmp_path):
    import psutil

    srv = ServerProcess(tmp_path / "data", extra=("--executor", "ray", "--cpus-per-job", "1"))
    try:
        with Client(srv.endpoint) as c:
            until_slots(c, os.cpu_count())
            job = c.request("generate", spec=spec(steps=20)).job
            assert ends(c, [job])[job].type == "done"
            ray_pids = {p.pid for p in psutil.Process(srv.proc.pid).children(recursive=True)}
            listening = [s.laddr.ip for s in psutil.net_connections("inet") if s.status == psutil.CONN_LISTEN
                         and s.pid in ray_pids]
            assert listening and set(listening) <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening
    finally:
        srv.stop()
    assert "Ray" in (tmp_path / "data" / "ray.log").read_text()  # Ray's messages went there

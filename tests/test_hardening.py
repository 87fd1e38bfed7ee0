"""What a hostile client, a flood of jobs, a full or read-only disk and odd input must not do:
take the server down, lose a terminal message, or mislead the user."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from helpers import IN_CI, ServerProcess, promptmesh, running_and_queued, small_spec, wait_for
from promptmesh.backend.cli import printable
from promptmesh.shared import protocol as P
from promptmesh.shared.client import Client, ClientError
from promptmesh.shared.errors import PromptMeshError
from promptmesh.shared.protocol import Message
from promptmesh.shared.spec import JobSpec, SpecError
from promptmesh.shared.vocab import ErrorCode


@pytest.mark.parametrize("text, expected", [
    ("a\u00a0red\tcube\n", "a red cube"),
    ("a red cube\u200b\u202e", "a red cube"),
    ("cafe\u0301 table", "caf\u00e9 table"),  # NFC
])
def test_prompts_are_normalised_before_they_are_checked(text, expected):
    assert JobSpec(prompt=text).validate().prompt == expected


def test_a_prompt_of_invisible_characters_is_empty():
    with pytest.raises(SpecError, match="prompt: is empty"):
        JobSpec(prompt="\x00\u200b\u200d \u202e\ufeff").validate()


def test_text_from_the_wire_is_printed_with_control_characters_escaped():
    assert printable("a \x1b[31mred\x1b[0m cube\x07") == "a \\x1b[31mred\\x1b[0m cube\\x07"
    assert printable("caf\u00e9") == "caf\u00e9"


def test_keys_are_not_overwritten_secret_is_private_and_a_public_key_is_refused_as_client_key(tmp_path):
    first = promptmesh("keys", "generate", str(tmp_path), "--name", "artist")
    assert first.returncode == 0, first.stderr
    secret = tmp_path / "artist.key_secret"
    assert secret.stat().st_mode & 0o777 == 0o600 and (tmp_path / "artist.key").stat().st_mode & 0o777 == 0o644
    before = secret.read_bytes()
    again = promptmesh("keys", "generate", str(tmp_path), "--name", "artist")
    assert again.returncode == 2 and "--force" in again.stderr and secret.read_bytes() == before
    assert promptmesh("keys", "generate", str(tmp_path), "--name", "artist", "--force").returncode == 0
    assert secret.read_bytes() != before
    wrong = promptmesh("jobs", "--server-key", str(tmp_path / "artist.key"), "--client-key", str(tmp_path / "artist.key"),
                       "--timeout", "1")
    assert wrong.returncode == 2 and "holds only a public key" in wrong.stderr and "Traceback" not in wrong.stderr


def test_queue_limits_per_client_and_in_all_give_queue_full(tmp_path, tiny_sd):
    srv = ServerProcess(tmp_path / "data", models=tiny_sd.parent, extra=("--max-queue", "3", "--max-queue-per-client", "2"))
    try:
        with Client(srv.endpoint) as a, Client(srv.endpoint) as b:
            running = a.request("generate", spec=small_spec(tiny_sd, steps=5000)).job
            wait_for(a, running, until=("progress",))
            a.request("generate", spec=small_spec(tiny_sd))
            a.request("generate", spec=small_spec(tiny_sd))
            with pytest.raises(ClientError, match="most one client may queue") as mine:
                a.request("generate", spec=small_spec(tiny_sd))
            b.request("generate", spec=small_spec(tiny_sd))  # the third queued job in all
            with pytest.raises(ClientError, match="queue is full") as full:
                b.request("generate", spec=small_spec(tiny_sd))
            assert mine.value.code == full.value.code == "QUEUE_FULL"
            assert a.request("ping").fields["queue"] == 3
    finally:
        srv.stop(signal.SIGKILL)


def test_status_of_hundreds_of_jobs_fits_the_header_limit_live_jobs_first(tmp_path, tiny_sd):
    from promptmesh.backend.registry import Registry

    registry = Registry(tmp_path / "data")
    for i in range(300):
        job = registry.add(JobSpec(prompt=f"an old job {i} " + "x" * 980)).id
        registry.set_state(job, "done", meta={})
    registry.close()
    srv = ServerProcess(tmp_path / "data", models=tiny_sd.parent)
    try:
        with Client(srv.endpoint) as c:
            running, queued = running_and_queued(c, tiny_sd)
            reply = c.request("status", limit=500)  # decoded by the client: under its header limit
            summaries = reply.fields["jobs"]
            assert reply.fields["total"] == 302 and 50 <= len(summaries) < 302
            assert [s["job"] for s in summaries[:2]] == [running, queued]
            assert summaries[1]["position"] == 1
        listing = promptmesh("jobs", "--endpoint", srv.endpoint)
        assert listing.returncode == 0, listing.stderr
        lines = listing.stdout.splitlines()
        assert running in lines[0] and queued in lines[1] and "older job(s) not shown" in listing.stderr
    finally:
        srv.stop(signal.SIGKILL)


@pytest.fixture()
def tmpfs(tmp_path):
    """A 6 MB tmpfs: a disk that can be filled and made read-only (needs root; CI has it)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True, text=True)
    if proc.returncode != 0:
        if IN_CI:
            pytest.fail(f"cannot mount a tmpfs in CI: {proc.stderr.strip()}")
        pytest.skip(f"mounting a tmpfs is not permitted here: {proc.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(folder: Path, leave: int) -> Path:
    """Fill the file system of `folder` up to `leave` free bytes."""
    filler = folder / "filler"
    stat = os.statvfs(folder)
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave))
    return filler


@pytest.mark.slow
def test_a_full_disk_fails_the_job_with_disk_and_the_server_goes_on(tmpfs, tiny_sd):
    srv = ServerProcess(tmpfs / "data", models=tiny_sd.parent, log_dir=tmpfs.parent)  # its log is not on the full disk
    try:
        with Client(srv.endpoint) as c:
            filler = fill(tmpfs, leave=48 * 1024)
            job = c.request("generate", spec=small_spec(tiny_sd, mesh_resolution=96), timeout=30).job
            end = wait_for(c, job, timeout=120)[-1]
            assert end.type == "error" and end.fields["code"] == "DISK", end.fields
            assert not [p for p in (tmpfs / "data" / "jobs").rglob("*") if p.is_file()]  # no partial result
            pong = c.request("ping")
            assert pong.fields["busy"] is None and pong.fields["queue"] == 0
            filler.unlink()
            again = c.request("generate", spec=small_spec(tiny_sd)).job
            assert wait_for(c, again, timeout=120)[-1].type == "done"
            states = {s["job"]: (s["state"], s["error_code"]) for s in c.request("status").fields["jobs"]}
            assert states[job] == ("failed", "DISK") and states[again] == ("done", None)
    finally:
        srv.stop(signal.SIGINT)


def test_a_read_only_data_dir_is_one_clear_line_and_exit_2(tmpfs):
    from promptmesh.backend.registry import Registry

    Registry(tmpfs / "data").close()
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    proc = promptmesh("serve", "--bind", "tcp://127.0.0.1:0", "--data-dir", str(tmpfs / "data"), "--device", "cpu",
                      timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "data" in proc.stderr


def test_a_cancelled_jobs_folder_is_removed(tmp_path, tiny_sd):
    srv = ServerProcess(tmp_path / "data", models=tiny_sd.parent)
    try:
        with Client(srv.endpoint) as c:
            running, queued = running_and_queued(c, tiny_sd)
            for job in (queued, running):
                c.send("cancel", job)
                assert wait_for(c, job, timeout=60)[-1].fields["code"] == ErrorCode.CANCELLED
            time.sleep(0.5)
        assert not (tmp_path / "data" / "jobs" / queued).exists() and not (tmp_path / "data" / "jobs" / running).exists()
    finally:
        srv.stop(signal.SIGINT)


@pytest.fixture()
def server(tmp_path, tiny_sd):
    srv = ServerProcess(tmp_path / "data", models=tiny_sd.parent)
    yield srv
    srv.stop(signal.SIGINT)


@pytest.fixture()
def server_and_job(server, tiny_sd):
    """A server with one finished job whose mesh is a few hundred kB on the wire."""
    with Client(server.endpoint) as c:
        job = c.request("generate", spec=small_spec(tiny_sd, mesh_resolution=96)).job
        assert wait_for(c, job)[-1].type == "done"
    return server, job


def slow_reader(endpoint: str) -> tuple:
    """A DEALER that reads nothing until told, with tiny buffers so that backpressure comes fast."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 1)
    sock.setsockopt(zmq.RCVBUF, 4096)
    sock.connect(endpoint)
    return ctx, sock


def read_all(sock, quiet: float = 2.0) -> list:
    out = []
    while sock.poll(int(quiet * 1000)):
        out.append(P.decode(sock.recv_multipart(), P.SERVER_TYPES))
    return out


def test_a_client_that_does_not_read_gets_every_reply_and_its_done_later_and_is_bounded(server_and_job):
    srv, job = server_and_job
    ctx, sock = slow_reader(srv.endpoint)
    try:
        for i in range(300):
            sock.send_multipart(P.encode(Message("result", f"r{i}", job)))
        time.sleep(3.0)  # it reads nothing meanwhile; others are still served at once
        with Client(srv.endpoint) as other:
            t0 = time.monotonic()
            assert other.request("ping").type == "pong" and time.monotonic() - t0 < 1.0
        replies = read_all(sock)
        assert sorted(int(m.id[1:]) for m in replies) == list(range(300))  # every request answered once
        results = [m for m in replies if m.type == "result"]
        busy = [m for m in replies if m.type == "error"]
        assert {m.fields["code"] for m in busy} == {"BUSY"} and len(results) + len(busy) == 300
        assert 1 <= len(results) <= 40  # ZeroMQ's queue (SNDHWM) and one result in the outbox, not 300
    finally:
        sock.close()
        ctx.term()


@pytest.mark.slow
def test_a_client_that_reads_late_still_gets_its_done(server, tiny_sd):
    ctx, sock = slow_reader(server.endpoint)
    try:
        spec = small_spec(tiny_sd, steps=60, preview_every=1)
        sock.send_multipart(P.encode(Message("generate", "g", fields={"spec": spec})))
        assert sock.poll(30_000)
        accepted = P.decode(sock.recv_multipart(), P.SERVER_TYPES)  # the one message read before the job ends
        job = accepted.job
        assert accepted.type == "accepted"
        with Client(server.endpoint) as other:  # 60 steps with a preview each, none read meanwhile
            deadline = time.monotonic() + 180
            while other.request("status", job).fields["jobs"][0]["state"] in ("queued", "running"):
                assert time.monotonic() < deadline, "the job did not end"
                time.sleep(0.5)
        messages = read_all(sock)
        ends = [m for m in messages if m.job == job and m.type in ("done", "error")]
        assert [m.type for m in ends] == ["done"], [m.type for m in messages][-5:]
    finally:
        sock.close()
        ctx.term()


@pytest.mark.slow
def test_submit_wait_learns_its_jobs_outcome_after_the_server_restarts(tmp_path, tiny_sd):
    """The job is queued when the server is killed; the restarted server runs it, not knowing who
    waits: `submit --wait` asks `status` after a silence and ends with the real outcome."""
    srv = ServerProcess(tmp_path / "data", models=tiny_sd.parent)
    out = tmp_path / "b.ply"
    with Client(srv.endpoint) as c:
        blocker = c.request("generate", spec=small_spec(tiny_sd, steps=5000)).job
        wait_for(c, blocker, until=("progress",))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    waiting = subprocess.Popen(
        [sys.executable, "-m", "promptmesh.backend.cli", "submit", "a red cube", "--endpoint", srv.endpoint, "--model",
         tiny_sd.name, "--steps", "3", "--resolution", "16", "--mesh-resolution", "32", "--wait", "-o", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:  # until the second job is queued behind the first
            with Client(srv.endpoint) as c:
                if c.request("ping").fields["queue"] == 1:
                    break
            assert time.monotonic() < deadline
            time.sleep(0.2)
        srv.stop(signal.SIGKILL)
        srv = ServerProcess(tmp_path / "data", models=tiny_sd.parent, bind=srv.endpoint)
        stdout, stderr = waiting.communicate(timeout=120)
        assert waiting.returncode == 0, stderr
        assert out.is_file() and out.stat().st_size > 0
        with Client(srv.endpoint) as c:
            states = {s["job"]: s["state"] for s in c.request("status").fields["jobs"]}
        assert states[blocker] == "failed" and states[stdout.strip()] == "done"
    finally:
        waiting.kill()
        srv.stop(signal.SIGINT)


@pytest.mark.slow
def test_with_keys_only_the_owner_or_an_admin_may_cancel_a_job(tmp_path, tiny_sd):
    from promptmesh.backend.keys import generate, load_public, load_secret_pair

    keys = tmp_path / "keys"
    generate(keys, "server")
    for folder in ("authorized", "admins"):
        (keys / folder).mkdir()
    pairs = {}
    for name in ("anna", "ben", "boss"):
        public, secret = generate(tmp_path / name, name)
        (keys / "authorized" / public.name).write_bytes(public.read_bytes())
        pairs[name] = load_secret_pair(secret)
    (keys / "admins" / "boss.key").write_bytes((tmp_path / "boss" / "boss.key").read_bytes())
    srv = ServerProcess(tmp_path / "data", models=tiny_sd.parent, extra=("--keys", str(keys)),
                        server_key=load_public(keys / "server.key"), client_keys=pairs["anna"])
    server_key = load_public(keys / "server.key")
    clients = {name: Client(srv.endpoint, server_key=server_key, client_keys=pair) for name, pair in pairs.items()}
    try:
        for c in clients.values():
            c.hello(timeout=10)
        first, second = running_and_queued(clients["anna"], tiny_sd)
        with pytest.raises(ClientError, match="another key") as info:
            clients["ben"].request("cancel", first)
        assert info.value.code == "FORBIDDEN"
        assert clients["ben"].request("status", first).fields["jobs"][0]["state"] == "running"  # readable by all
        with pytest.raises(ClientError) as cancelled:  # a queued job's cancellation is the answer itself
            clients["anna"].request("cancel", second)
        assert cancelled.value.code == ErrorCode.CANCELLED
        clients["boss"].send("cancel", first)
        assert wait_for(clients["anna"], first, timeout=60)[-1].fields["code"] == ErrorCode.CANCELLED
    finally:
        for c in clients.values():
            c.close()
        srv.stop(signal.SIGINT)


def test_clients_may_name_only_the_models_the_server_offers(server, tiny_sd):
    with Client(server.endpoint) as c:
        offered = c.hello().fields["models"]
        assert {"embedded", "sd21", "sd15", "tiny-sd"} <= set(offered)
        for probe in ("/root", str(tiny_sd), "../models/tiny-sd", "..", "someone/any-repo"):
            with pytest.raises(ClientError, match="does not offer") as info:
                c.request("generate", spec={**small_spec(tiny_sd), "model": probe})
            assert info.value.code == ErrorCode.BAD_REQUEST
            assert "tokenizer" not in str(info.value) and "exist" not in str(info.value)  # nothing about files
        job = c.request("generate", spec=small_spec(tiny_sd)).job  # by its folder's name
        assert wait_for(c, job)[-1].type == "done"


def test_an_offer_resolves_aliases_folders_and_allowed_ids_and_nothing_else(tmp_path):
    from promptmesh.backend.models import Offer

    (tmp_path / "mine").mkdir()
    (tmp_path / "views" / "clip_camera_projection").mkdir(parents=True)  # a Zero-1-to-3 folder
    (tmp_path / "notes.txt").write_text("not a model")
    offer = Offer(tmp_path, ("someone/their-model",))
    assert offer.resolve("sd21") == "sd21" and offer.resolve("mine") == str(tmp_path / "mine")
    assert offer.resolve("someone/their-model") == "someone/their-model"
    assert offer.resolve("zero123-xl") == "zero123-xl" and offer.resolve("views") == str(tmp_path / "views")
    assert offer.names() == ["embedded", "sd21", "sd15", "mine", "someone/their-model"]
    assert offer.names(novel_view=True) == ["zero123-xl", "views"]
    for name in ("notes.txt", "missing", "", ".", str(tmp_path / "mine"), "someone/other"):
        with pytest.raises(PromptMeshError, match="does not offer"):
            offer.resolve(name)


@pytest.mark.slow
def test_a_job_running_when_the_server_is_stopped_resumes_from_its_checkpoint_after_a_restart(tmp_path, tiny_sd):
    srv = ServerProcess(tmp_path / "data", models=tiny_sd.parent)
    with Client(srv.endpoint) as c:
        job = c.request("generate", spec=small_spec(tiny_sd, steps=160)).job
        deadline = time.monotonic() + 120
        while not (tmp_path / "data" / "jobs" / job / "checkpoint.pt").is_file():  # written every 100 steps
            assert time.monotonic() < deadline
            c.poll(0.2)
    srv.stop(signal.SIGINT)  # a clean stop, e.g. for an upgrade
    srv = ServerProcess(tmp_path / "data", models=tiny_sd.parent, bind=srv.endpoint)
    try:
        with Client(srv.endpoint) as c:
            deadline = time.monotonic() + 120
            while (state := c.request("status", job).fields["jobs"][0])["state"] != "done":
                assert state["state"] in ("queued", "running") and time.monotonic() < deadline, state
                time.sleep(0.5)
            meta = c.request("result", job, timeout=30).fields["meta"]
        assert meta["resumed_from_step"] >= 100 and meta["steps"] == 160
    finally:
        srv.stop(signal.SIGINT)


def test_jobs_prune_removes_old_ended_jobs_and_their_results_only(tmp_path, tiny_sd):
    from promptmesh.backend.registry import Registry

    registry = Registry(tmp_path / "data")
    old, recent = (registry.add(JobSpec(prompt=p)).id for p in ("an old cube", "a recent cube"))
    for job in (old, recent):
        registry.set_state(job, "done", meta={})
        (tmp_path / "data" / "jobs" / job / "mesh.glb").write_bytes(b"glb")
    registry._db.execute("UPDATE jobs SET finished = finished - 40 * 86400 WHERE id = ?", (old,))
    registry.close()
    srv = ServerProcess(tmp_path / "data", models=tiny_sd.parent)
    try:
        with Client(srv.endpoint) as c:
            queued = c.request("generate", spec=small_spec(tiny_sd, steps=2000)).job  # live: never pruned
        proc = promptmesh("jobs", "--prune", "30", "--endpoint", srv.endpoint)
        assert proc.returncode == 0 and "removed 1 job" in proc.stderr, proc.stderr
        with Client(srv.endpoint) as c:
            left = {s["job"] for s in c.request("status").fields["jobs"]}
        assert left == {recent, queued} and not (tmp_path / "data" / "jobs" / old).exists()
        assert (tmp_path / "data" / "jobs" / recent / "mesh.glb").is_file()
    finally:
        srv.stop(signal.SIGKILL)

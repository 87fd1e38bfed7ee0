"""The job server over real loopback sockets, run as a separate process like a user runs it."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import msgpack
import numpy as np
import pytest
import trimesh
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import ServerProcess, free_port, promptmesh, running_and_queued, small_spec, wait_for, wait_for_id
from promptmesh.shared import protocol as P
from promptmesh.shared.client import Client, ClientError
from promptmesh.shared.protocol import Message
from promptmesh.shared.vocab import ErrorCode


@pytest.fixture()
def server(tmp_path, tiny_sd):
    srv = ServerProcess(tmp_path / "data", models=tiny_sd.parent)
    yield srv
    srv.stop(signal.SIGINT)


def test_a_job_streams_progress_and_previews_then_its_result(server, tiny_sd):
    with Client(server.endpoint) as c:
        welcome = c.hello()
        assert welcome.fields["protocol"] == P.PROTOCOL_VERSION and welcome.fields["device"] == "cpu"
        t0 = time.monotonic()
        job = c.request("generate", spec=small_spec(tiny_sd, preview_every=1)).job
        events = wait_for(c, job)
        assert events[-1].type == "done", events[-1].fields
        steps = [m.fields["step"] for m in events
                 if m.type == "progress" and m.fields["stage"] == "optimising" and m.fields["total"]]
        assert steps == sorted(steps) and steps[-1] == 4
        previews = [m for m in events if m.type == "preview"]
        assert previews and previews[0].arrays["rgba"].shape == (previews[0].fields["h"], previews[0].fields["w"], 4)
        first_preview = next(i for i, m in enumerate(events) if m.type == "preview")
        assert first_preview < len(events) - 1
        result = c.request("result", job, timeout=30)
        meta = events[-1].fields["meta"]
        assert result.arrays["vertices"].shape == (meta["vertices"], 3)
        assert result.arrays["faces"].shape == (meta["faces"], 3) and result.arrays["colors"].dtype == np.float32
        assert result.arrays["texture"].shape == (64, 64, 3) and result.arrays["uvs"].shape == (meta["vertices"], 2)
        folder = server.data_dir / "jobs" / job
        assert {"mesh.glb", "mesh.ply", "meta.json", "mesh.npz"} <= {p.name for p in folder.iterdir()}
        assert not list(folder.glob("*.tmp*"))
        print(f"generate -> done in {time.monotonic() - t0:.1f} s")


def test_malformed_messages_are_answered_and_the_server_survives(server, tiny_sd):
    rng = random.Random(0)
    ctx = zmq.Context()
    socks = [ctx.socket(zmq.DEALER) for _ in range(4)]
    for s in socks:
        s.setsockopt(zmq.LINGER, 0)
        s.connect(server.endpoint)
    valid = P.encode(Message("generate", "x", fields={"spec": small_spec(tiny_sd)}))
    header = msgpack.unpackb(valid[0])
    bad = [
        lambda: [rng.randbytes(rng.randint(0, 64))],
        lambda: [msgpack.packb(rng.choice([1, "x", [1, 2], None, 3.5, {"v": 1}]))],
        lambda: [msgpack.packb({**header, "v": rng.choice([0, 2, "1", None])})],
        lambda: [msgpack.packb({**header, "type": rng.choice(["", "GENERATE", "done", 7])})],
        lambda: [msgpack.packb({**header, "spec": {**header["spec"], "steps": rng.choice([-1, 0, 10**9, "5", 2.5])}})],
        lambda: [msgpack.packb({**header, "spec": {**header["spec"], "prompt": rng.choice(["", "   ", "x" * 5000, 5, None])}})],
        lambda: [msgpack.packb({**header, "spec": {**header["spec"], "resolution": rng.choice([7, 13, 100000, True])}})],
        lambda: [msgpack.packb({**header, "spec": "not a map"})],
        lambda: [msgpack.packb({"v": 1, "type": "cancel", "id": "c"})],
        lambda: [msgpack.packb({"v": 1, "type": "result", "id": "c", "job": "../../etc/passwd"})],
        lambda: [valid[0], b"extra frame"],
        lambda: [msgpack.packb({"v": 1, "type": "ping", "id": "p", "arrays": [{"name": "a", "dtype": "uint8", "shape": [2]}]}),
                 b"xyz"],
        lambda: [msgpack.packb({"v": 1, "type": "ping", "id": "x" * 500})],
    ]
    sent = 0
    for i in range(10_000):
        frames = rng.choice(bad)()
        socks[i % 4].send_multipart(frames)
        sent += 1
        if i % 500 == 0:  # drain answers so nothing backs up
            for s in socks:
                while s.poll(0):
                    s.recv_multipart()
    # an oversized message is dropped by ZMQ_MAXMSGSIZE (the peer is disconnected), not processed
    big = ctx.socket(zmq.DEALER)
    big.setsockopt(zmq.LINGER, 0)
    big.connect(server.endpoint)
    big.send_multipart([b"x" * (2 << 20)])
    answers = 0
    for s in socks:
        while s.poll(200):
            frames = s.recv_multipart()
            msg = P.decode(frames, P.SERVER_TYPES)
            assert msg.type == "error" and msg.fields["code"] in (ErrorCode.BAD_REQUEST, ErrorCode.VERSION, ErrorCode.NOT_FOUND)
            answers += 1
    for s in [*socks, big]:
        s.close()
    ctx.term()
    assert answers > 0
    with Client(server.endpoint) as c:
        pong = c.request("ping")
        assert pong.fields["queue"] == 0
        job = c.request("generate", spec=small_spec(tiny_sd)).job
        assert wait_for(c, job)[-1].type == "done"
    assert not (server.data_dir / "etc").exists()


INT64 = st.integers(-(2**63), 2**64 - 1)  # what msgpack can carry


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.dictionaries(st.sampled_from(["v", "type", "id", "job", "spec", "arrays", "extra"]),
                              st.one_of(st.none(), st.booleans(), INT64, st.floats(), st.text(max_size=20),
                                        st.lists(INT64, max_size=3), st.dictionaries(st.text(max_size=5), INT64, max_size=3))),
       frames=st.lists(st.binary(max_size=16), max_size=3))
def test_decode_turns_any_structured_garbage_into_protocol_errors(header, frames):
    try:
        P.decode([msgpack.packb(header), *frames])
    except P.ProtocolError as exc:
        assert exc.code in (ErrorCode.BAD_REQUEST, ErrorCode.VERSION)


@pytest.mark.slow
def test_eight_clients_fifo_each_sees_only_its_own_job(server, tiny_sd):
    clients = [Client(server.endpoint) for _ in range(8)]
    try:
        jobs = []
        for i, c in enumerate(clients):
            jobs.append(c.request("generate", spec=small_spec(tiny_sd, seed=i, steps=2)).job)
        finished: dict[str, float] = {}
        seen: dict[int, set] = {i: set() for i in range(8)}
        deadline = time.monotonic() + 300
        while len(finished) < 8 and time.monotonic() < deadline:
            for i, c in enumerate(clients):
                for msg in c.poll(0.05):
                    seen[i].add(msg.job)
                    if msg.type == "done":
                        finished[msg.job] = time.monotonic()
                    assert msg.type != "error", msg.fields
        assert len(finished) == 8
        assert sorted(jobs, key=finished.get) == jobs  # FIFO
        for i in range(8):
            assert seen[i] == {jobs[i]}
    finally:
        for c in clients:
            c.close()


def test_cancel_running_and_queued(server, tiny_sd):
    with Client(server.endpoint) as c:
        running = c.request("generate", spec=small_spec(tiny_sd, steps=2000)).job
        queued = c.request("generate", spec=small_spec(tiny_sd)).job
        status = {j["job"]: j for j in c.request("status").fields["jobs"]}
        assert status[queued]["position"] == 1
        # wait until the first job is optimising
        wait_for(c, running, until=("progress",))
        with pytest.raises(ClientError) as info:  # a queued job's end is the reply itself
            c.request("cancel", queued)
        assert info.value.code == ErrorCode.CANCELLED
        ack = c.request("cancel", running)  # at once, with the request's id; the end follows
        assert ack.type == "cancelling" and ack.job == running
        end = wait_for(c, running, timeout=60)[-1]
        assert end.type == "error" and end.fields["code"] == ErrorCode.CANCELLED and end.id == ""
        states = {j["job"]: j["state"] for j in c.request("status").fields["jobs"]}
        assert states[running] == states[queued] == "cancelled"
        assert c.request("ping").fields["busy"] is None


@pytest.mark.slow
def test_kill_9_marks_the_running_job_failed_and_keeps_finished_ones(tmp_path, tiny_sd):
    data = tmp_path / "data"
    srv = ServerProcess(data, models=tiny_sd.parent)
    with Client(srv.endpoint) as c:
        done_job = c.request("generate", spec=small_spec(tiny_sd)).job
        assert wait_for(c, done_job)[-1].type == "done"
        before = (data / "jobs" / done_job / "mesh.glb").read_bytes()
        long_job = c.request("generate", spec=small_spec(tiny_sd, steps=5000)).job
        wait_for(c, long_job, until=("progress",))
    srv.stop(signal.SIGKILL)
    srv2 = ServerProcess(data, models=tiny_sd.parent, bind=srv.endpoint)
    try:
        with Client(srv2.endpoint) as c:
            states = {j["job"]: j for j in c.request("status").fields["jobs"]}
            assert states[long_job]["state"] == "failed" and "stopped" in states[long_job]["error"]
            assert states[done_job]["state"] == "done"
            result = c.request("result", done_job, timeout=30)
            assert len(result.arrays["faces"]) > 0
        assert (data / "jobs" / done_job / "mesh.glb").read_bytes() == before
    finally:
        srv2.stop(signal.SIGINT)


def test_non_loopback_bind_needs_keys(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "promptmesh.backend.cli", "serve", "--bind", "tcp://0.0.0.0:0",
                           "--data-dir", str(tmp_path)],
                          capture_output=True, text=True, env={**os.environ}, timeout=120)
    assert proc.returncode == 2 and "CURVE" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_curve_client_with_an_authorised_key_works_and_others_get_nothing(tmp_path):
    from promptmesh.backend.keys import generate

    keys = tmp_path / "keys"
    generate(keys, "server")
    (keys / "authorized").mkdir()
    artist_public, artist_secret = generate(tmp_path / "artist", "artist")  # the artist's own machine
    (keys / "authorized" / artist_public.name).write_bytes(artist_public.read_bytes())  # only the public key
    generate(tmp_path / "stranger", "stranger")
    srv_port = free_port()
    env = {**os.environ}
    proc = subprocess.Popen([sys.executable, "-m", "promptmesh.backend.cli", "serve", "--bind", f"tcp://127.0.0.1:{srv_port}",
                             "--data-dir", str(tmp_path / "data"), "--keys", str(keys)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        server_public, _ = zmq.auth.load_certificate(str(keys / "server.key"))
        artist = zmq.auth.load_certificate(str(artist_secret))
        stranger = zmq.auth.load_certificate(str(tmp_path / "stranger" / "stranger.key_secret"))
        deadline = time.monotonic() + 60
        while True:
            with Client(f"tcp://127.0.0.1:{srv_port}", server_key=server_public, client_keys=artist) as c:
                try:
                    assert c.hello(timeout=1.0).type == "welcome"
                    break
                except ClientError:
                    assert time.monotonic() < deadline
        with Client(f"tcp://127.0.0.1:{srv_port}", server_key=server_public, client_keys=stranger) as c:
            with pytest.raises(ClientError):
                c.hello(timeout=2.0)
        with Client(f"tcp://127.0.0.1:{srv_port}") as c:  # plain text
            with pytest.raises(ClientError):
                c.hello(timeout=2.0)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


def test_cli_client_commands_submit_wait_jobs_fetch_cancel(server, tiny_sd, tmp_path):
    ep = ["--endpoint", server.endpoint]
    out = tmp_path / "cube.glb"
    proc = promptmesh("submit", "a red cube", *ep, "--model", tiny_sd.name, "--steps", "3", "--resolution", "16",
               "--mesh-resolution", "32", "--wait", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip()
    assert out.is_file() and out.with_suffix(".json").is_file()
    listing = promptmesh("jobs", *ep)
    assert listing.returncode == 0 and job in listing.stdout and "done" in listing.stdout
    again = tmp_path / "again.ply"
    assert promptmesh("fetch", job, *ep, "-o", str(again)).returncode == 0 and again.stat().st_size > 0
    long = promptmesh("submit", "a red cube", *ep, "--model", tiny_sd.name, "--steps", "3000", "--resolution", "16")
    long_job = long.stdout.strip()
    cancelled = promptmesh("cancel", long_job, *ep, "--timeout", "60")
    assert cancelled.returncode == 0, cancelled.stderr
    missing = promptmesh("fetch", "nosuchjob", *ep, "-o", str(tmp_path / "x.glb"))
    assert missing.returncode == 2 and "no job" in missing.stderr and "Traceback" not in missing.stderr


def test_cli_client_unreachable_server_fails_fast_with_one_line():
    t0 = time.monotonic()
    proc = promptmesh("jobs", "--endpoint", f"tcp://127.0.0.1:{free_port()}", "--timeout", "1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no answer" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert time.monotonic() - t0 < 30


def array(dtype: str, shape: list[int]) -> dict:
    return {"name": "x", "dtype": dtype, "shape": shape}


def test_messages_that_once_killed_the_server_get_error_replies_and_it_answers_ping(server):
    """A shape whose byte count overflows 64 bits, a 1,000-deep `v`, and text beside bytes keys."""
    deep: list = []
    for _ in range(1000):
        deep = [deep]
    killers = [
        [msgpack.packb({"v": 1, "type": "ping", "id": "a", "arrays": [array("uint8", [2**32, 2**32])]}), b""],
        [msgpack.packb({"v": 1, "type": "ping", "id": "b", "arrays": [array("float32", [2**62, 4])]}), b""],
        [msgpack.packb({"v": deep, "type": "ping", "id": "c"})],
        [msgpack.packb({"v": 1, "type": deep, "id": "d"})],
        [msgpack.packb({"v": 1, "type": "status", "id": "e", "extra": 1, b"": 2}, use_bin_type=True)],
    ]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.endpoint)
    try:
        for frames in killers:
            sock.send_multipart(frames)
            assert sock.poll(10_000), "no answer: the server died"
            reply = P.decode(sock.recv_multipart(), P.SERVER_TYPES)
            assert reply.type == "error" and reply.fields["code"] in (ErrorCode.BAD_REQUEST, ErrorCode.VERSION)
            sent_id = msgpack.unpackb(frames[0], raw=False, strict_map_key=False)["id"]
            assert reply.id == sent_id  # the error answers that request
            assert len(reply.fields["message"]) < 300
    finally:
        sock.close()
        ctx.term()
    with Client(server.endpoint) as c:
        assert c.request("ping").type == "pong"
    assert server.proc.poll() is None


def test_an_invalid_request_is_answered_with_its_id_and_events_are_kept_for_poll(server, tiny_sd):
    with Client(server.endpoint) as c:
        with pytest.raises(ClientError) as info:
            c.request("generate", spec=small_spec(tiny_sd, steps=-3))
        assert info.value.code == ErrorCode.BAD_REQUEST and "spec.steps" in str(info.value)
        # A job that fails at once: its error event arrives while `request` waits for another
        # reply (status), and must still reach the next poll.
        (tiny_sd.parent / "broken").mkdir(exist_ok=True)  # offered by the server, but no model
        job = c.request("generate", spec=small_spec(tiny_sd.parent / "broken")).job
        for _ in range(20):
            c.request("status", job)
        events = wait_for(c, job, timeout=60)
        assert events[-1].type == "error" and events[-1].fields["code"] == "MODEL"


@pytest.mark.slow
def test_requests_hammered_by_several_clients_while_jobs_run_are_each_answered_once(server, tiny_sd):
    """One client submits 16 short jobs; three others send thousands of ping, status, cancel and
    result requests meanwhile (up to 20 unanswered each). Every request id must be answered
    exactly once, by the reply its type gets, consistent with one serial history; a running
    job's canceller hears its end once; each job ends once for its submitter."""
    import threading

    owner = Client(server.endpoint)
    jobs = [owner.request("generate", spec=small_spec(tiny_sd, seed=i, steps=2)).job for i in range(16)]
    problems: list[str] = []
    totals: dict[str, int] = {}
    stop = threading.Event()

    def check(kind: str | None, msg: Message) -> None:
        code = msg.fields.get("code")
        if kind == "ping" and msg.type == "pong":
            if not (isinstance(msg.fields["queue"], int) and msg.fields["busy"] in (None, *jobs)):
                problems.append(f"pong {msg.fields}")
        elif kind == "status" and msg.type == "status":
            summaries = msg.fields["jobs"]
            running = [s for s in summaries if s["state"] == "running"]
            positions = [s["position"] for s in summaries if s["state"] == "queued"]
            if len(running) > 1 or positions != list(range(len(running), len(running) + len(positions))):
                problems.append(f"status: {len(running)} running, queue positions {positions}")
            if any(s["position"] is not None for s in summaries if s["state"] != "queued"):
                problems.append("a job that is not queued has a queue position")
        elif kind == "cancel" and (msg.type == "cancelling" or code in (ErrorCode.CANCELLED, ErrorCode.BAD_REQUEST)):
            pass
        elif kind == "result" and (msg.type == "result" or code in (ErrorCode.NOT_FOUND, ErrorCode.BUSY)):
            pass
        else:
            problems.append(f"{kind} answered {msg.type} {msg.fields.get('code')}")

    def hammer(k: int) -> None:
        rng = random.Random(k)
        sent: dict[str, str] = {}  # request id -> its type
        answers: dict[str, int] = {}
        acked: set[str] = set()  # running jobs this client cancelled
        ends: dict[str, int] = {}

        def take(messages: list[Message]) -> None:
            for msg in messages:
                if msg.id:
                    answers[msg.id] = answers.get(msg.id, 0) + 1
                    check(sent.get(msg.id), msg)
                    if msg.type == "cancelling":
                        acked.add(msg.job)
                elif msg.type in ("done", "error"):
                    ends[msg.job] = ends.get(msg.job, 0) + 1

        with Client(server.endpoint) as c:
            while not stop.is_set() and len(sent) < 1500:
                kind = rng.choice(("ping", "status", "status", "cancel", "result"))
                job = rng.choice(jobs[8:]) if kind == "cancel" else rng.choice(jobs) if kind == "result" else None
                sent[c.send(kind, job)] = kind
                take(c.poll(0))
                while len(sent) - len(answers) >= 20 and not stop.is_set():
                    take(c.poll(0.1))
            deadline = time.monotonic() + 60
            while len(answers) < len(sent) and time.monotonic() < deadline:
                take(c.poll(0.2))
            deadline = time.monotonic() + 60
            while any(ends.get(job, 0) == 0 for job in acked) and time.monotonic() < deadline:
                take(c.poll(0.2))
            take(c.poll(1.0))  # a second answer or end would arrive now
        missing = [i for i in sent if i not in answers]
        if missing or any(n != 1 for n in answers.values()) or set(answers) - set(sent):
            problems.append(f"client {k}: {len(missing)} unanswered, {sum(n > 1 for n in answers.values())} answered twice")
        if any(ends.get(job) != 1 for job in acked):
            problems.append(f"client {k}: the end of a job it cancelled arrived {[ends.get(j) for j in acked]} times")
        totals[f"client {k}"] = len(sent)

    threads = [threading.Thread(target=hammer, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    ends: dict[str, list[str]] = {job: [] for job in jobs}
    deadline = time.monotonic() + 300
    try:
        while any(not e for e in ends.values()) and time.monotonic() < deadline:
            for msg in owner.poll(0.5):
                if msg.type in ("done", "error") and msg.job in ends:
                    ends[msg.job].append("done" if msg.type == "done" else msg.fields["code"])
        time.sleep(1.0)  # a duplicate terminal message would arrive now
        for msg in owner.poll(0.5):
            if msg.type in ("done", "error") and msg.job in ends:
                ends[msg.job].append(msg.type)
        final = {s["job"]: s["state"] for s in owner.request("status").fields["jobs"]}
    finally:
        stop.set()
        for t in threads:
            t.join()
        owner.close()
    assert not problems, problems[:5]
    assert sum(totals.values()) >= 1000, totals
    assert all(len(e) == 1 for e in ends.values()), ends  # exactly one terminal message per job
    for job, (end,) in ends.items():
        assert final[job] == {"done": "done", ErrorCode.CANCELLED: "cancelled"}[end], (job, end, final[job])
    assert all(ends[job] == ["done"] for job in jobs[:8])  # never the target of a cancel
    print(f"{sum(totals.values())} requests, each answered once; {sum(e == ['done'] for e in ends.values())} done, "
          f"{sum(e == [ErrorCode.CANCELLED] for e in ends.values())} cancelled")


def test_submit_wait_writes_the_coarse_proxies_a_job_sends_as_ply(server, tiny_sd, tmp_path):
    proxies = tmp_path / "proxies"
    proc = promptmesh("submit", "a red cube", "--endpoint", server.endpoint, "--model", tiny_sd.name, "--steps", "150",
                      "--resolution", "16", "--mesh-resolution", "32", "--wait", "--proxy-dir", str(proxies),
                      "--proxy-every", "0.05")
    assert proc.returncode == 0, proc.stderr
    files = sorted(proxies.glob("proxy_*.ply"))
    assert len(files) >= 2
    meshes = [trimesh.load(f, process=False) for f in files]
    assert all(0 < len(m.faces) <= 20_000 and m.visual.vertex_colors.shape == (len(m.vertices), 4) for m in meshes)
    assert not list(proxies.glob(".*"))  # written atomically, nothing half-written left


def test_a_slow_client_gets_only_the_newest_proxy(server, tiny_sd):
    with Client(server.endpoint) as c:
        job = c.request("generate", spec=small_spec(tiny_sd, steps=60, proxy_every=0.05)).job
        time.sleep(8.0)  # not reading: proxies pile up only as the newest one
        events = wait_for(c, job, timeout=120)
    proxies = [m for m in events if m.type == "proxy"]
    assert proxies and events[-1].type == "done"
    assert all(m.arrays["vertices"].dtype == np.float16 and m.arrays["colors"].dtype == np.uint8 for m in proxies)
    assert [m.fields["step"] for m in proxies] == sorted(m.fields["step"] for m in proxies)
    assert events.index(proxies[-1]) < len(events) - 1  # never after `done`


def test_a_fresh_client_watching_a_running_job_gets_its_progress_previews_and_done(server, tiny_sd):
    """The submitter's connection drops mid-job; a new connection watches the job by its id."""
    with Client(server.endpoint) as first:
        job = first.request("generate", spec=small_spec(tiny_sd, steps=60, preview_every=5)).job
        wait_for(first, job, until=("progress",))
    with Client(server.endpoint) as second:
        reply = second.request("watch", job)
        assert reply.type == "watching" and reply.job == job
        assert reply.fields["summary"]["job"] == job and reply.fields["summary"]["state"] == "running"
        events = wait_for(second, job, timeout=120)
        assert events[-1].type == "done" and events[-1].id == "" and events[-1].job == job
        kinds = {m.type for m in events if m.job == job}
        assert {"progress", "preview"} <= kinds
        steps = [m.fields["step"] for m in events if m.type == "progress" and m.fields["stage"] == "optimising"]
        assert steps == sorted(steps) and steps[-1] == 60
        assert job not in second.following  # ended: not watched again after a reconnection


def test_watching_an_ended_job_sends_its_end_at_once_and_an_unknown_job_is_not_found(server, tiny_sd):
    with Client(server.endpoint) as c:
        done = c.request("generate", spec=small_spec(tiny_sd)).job
        meta = wait_for(c, done)[-1].fields["meta"]
        (tiny_sd.parent / "broken").mkdir(exist_ok=True)  # offered, but no model: fails at once
        failed = c.request("generate", spec=small_spec(tiny_sd.parent / "broken")).job
        assert wait_for(c, failed)[-1].type == "error"
    with Client(server.endpoint) as c:
        assert c.request("watch", done).fields["summary"]["state"] == "done"
        end = wait_for(c, done, timeout=10)[-1]
        assert end.type == "done" and end.fields["meta"] == meta
        assert c.request("watch", failed).fields["summary"]["state"] == "failed"
        end = wait_for(c, failed, timeout=10)[-1]
        assert end.type == "error" and end.fields["code"] == ErrorCode.MODEL
        with pytest.raises(ClientError) as info:
            c.request("watch", "0" * 16)
        assert info.value.code == ErrorCode.NOT_FOUND


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT])
def test_a_client_that_reconnects_after_a_server_restart_hears_the_end_of_its_jobs(tmp_path, tiny_sd, how):
    """The same Client object across the restart: it watches its jobs again by itself. Killed, the
    server marks the running job failed and runs the queued one; stopped with SIGINT, it puts the
    running job back in the queue: its progress reaches the client again, which cancels it."""
    srv = ServerProcess(tmp_path / "data", models=tiny_sd.parent)
    c = Client(srv.endpoint)
    try:
        c.hello()
        running, queued = running_and_queued(c, tiny_sd)
        srv.stop(how)
        srv = ServerProcess(tmp_path / "data", models=tiny_sd.parent, bind=srv.endpoint)
        if how == signal.SIGKILL:
            end = wait_for(c, running, timeout=60)[-1]
            assert end.type == "error" and "stopped" in end.fields["message"]
        else:
            wait_for(c, running, until=("progress",), timeout=120)  # running again, and heard again
            assert c.request("cancel", running).type == "cancelling"
            assert wait_for(c, running, timeout=60)[-1].fields["code"] == ErrorCode.CANCELLED
        assert wait_for(c, queued, timeout=120)[-1].type == "done"
        assert not c.following
    finally:
        c.close()
        srv.stop(signal.SIGINT)


def test_models_lists_what_the_server_offers_with_labels_and_the_default(server, tiny_sd):
    with Client(server.endpoint) as c:
        reply = c.request("models")
        assert reply.type == "models" and reply.fields["device"] == "cpu"
        entries = {m["name"]: m for m in reply.fields["models"]}
        assert list(entries) == c.hello().fields["models"]  # every offered model, in the offer's order
        assert [name for name, m in entries.items() if m["default"]] == ["embedded"]
        assert entries["sd21"]["label"] == "Stable Diffusion 2.1 base" and entries[tiny_sd.name]["label"] == tiny_sd.name
        assert all(set(m) == {"name", "label", "default", "presets"} for m in entries.values())
        # each model's presets from its own card: the embedded prior's draft is not Stable Diffusion's
        embedded, sd21 = entries["embedded"]["presets"], entries["sd21"]["presets"]
        assert embedded["draft"]["settings"] == {"steps": 500, "optim.lr_grid": 0.03, "optim.lr_mlp": 0.003}
        assert embedded["draft"]["seconds"]["cpu"] > 0
        assert sd21["draft"]["settings"] == {"steps": 1500, "resolution": 64} and sd21["draft"]["seconds"] == {}
        assert entries[tiny_sd.name]["presets"]["high"]["settings"]["steps"] == 10000  # a SD folder: SD's card


def test_download_progress_carries_bytes_not_steps():
    from promptmesh.backend.executors.jobs import event_frames
    from promptmesh.backend.pipeline import StageEvent, StepEvent

    download = P.decode(event_frames("j", StageEvent("downloading", 3 << 20, 2 << 30)), P.SERVER_TYPES)
    assert download.type == "progress" and download.fields == {"stage": "downloading", "done_bytes": 3 << 20,
                                                               "total_bytes": 2 << 30}
    step = P.decode(event_frames("j", StepEvent(5, 10, 0.5, 0.1)), P.SERVER_TYPES)
    assert step.fields["step"] == 5 and step.fields["total"] == 10 and "done_bytes" not in step.fields


def test_every_request_type_has_a_handler_and_every_reply_type_is_decodable():
    from promptmesh.backend.server.handlers import HANDLERS

    assert set(HANDLERS) == set(P.CLIENT_TYPES)
    assert {"cancelling", "watching", "models"} <= set(P.SERVER_TYPES)


def test_a_texture_job_paints_the_mesh_it_carries_and_a_bad_mesh_is_refused_with_nothing_stored(tmp_path, tiny_sd):
    srv = ServerProcess(tmp_path / "data", models=tiny_sd.parent, extra=("--max-texture-faces", "100"))
    box = trimesh.creation.box(extents=(2.0, 0.5, 1.0))
    box.apply_translation((4.0, 0.0, -2.0))
    vertices, faces = box.vertices.astype(np.float32), box.faces.astype(np.int32)
    ball = trimesh.creation.icosphere(subdivisions=2)
    try:
        with Client(srv.endpoint) as c:
            spec = small_spec(tiny_sd, prompt="a red box")
            for arrays, complaint in [
                ({"vertices": np.where(vertices > 4.5, np.nan, vertices).astype(np.float32), "faces": faces}, "not finite"),
                ({"vertices": vertices, "faces": faces + 30}, "indices must lie in"),
                ({"vertices": vertices}, "arrays.faces: is required"),
                ({"vertices": vertices, "faces": faces.astype(np.float32)}, "must be int32 or uint32"),
                ({"vertices": vertices[:, :2].copy(), "faces": faces}, "vertices must be"),
                ({"vertices": ball.vertices.astype(np.float32), "faces": ball.faces.astype(np.int32)},
                 "320 triangles; at most 100"),  # the server's own limit
            ]:
                msg_id = c.send("texture", spec=spec, arrays=arrays)
                reply = next(m for m in wait_for_id(c, msg_id))
                assert reply.type == "error" and reply.fields["code"] == ErrorCode.BAD_REQUEST, reply.fields
                assert complaint in reply.fields["message"], reply.fields["message"]
            assert c.request("status").fields["jobs"] == []  # nothing stored for any of them
            assert not (srv.data_dir / "jobs").exists() or not list((srv.data_dir / "jobs").iterdir())

            job = c.request("texture", spec=spec, arrays={"vertices": vertices, "faces": faces}).job
            events = wait_for(c, job)
            assert events[-1].type == "done", events[-1].fields
            assert any(m.type == "progress" and m.fields["stage"] == "texturing" for m in events)
            result = c.request("result", job, timeout=30)
            got = result.arrays["vertices"]
            assert np.allclose(got.min(0), vertices.min(0), atol=1e-5) and np.allclose(got.max(0), vertices.max(0), atol=1e-5)
            assert result.arrays["texture"].shape == (64, 64, 3)
            assert (srv.data_dir / "jobs" / job / "surface.npz").is_file()
    finally:
        srv.stop(signal.SIGINT)


"""The server's per-client flow control (backend/server/outbox.py) on a real ROUTER and DEALER
over loopback TCP, with buffers small enough that a client that does not read backs up at once."""

from __future__ import annotations

import time

import numpy as np
import pytest
import zmq

from promptmesh.backend.server.outbox import Outbox
from promptmesh.shared import protocol as P
from promptmesh.shared.protocol import Message
from promptmesh.shared.vocab import MessageType

PAD = 256 * 1024  # bytes per message: a few fill the pipe


@pytest.fixture()
def pair():
    """(outbox, router, dealer, the dealer's identity as the router knows it)."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.setsockopt(zmq.SNDHWM, 4)
    router.setsockopt(zmq.SNDBUF, 4096)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.RCVHWM, 1)
    dealer.setsockopt(zmq.RCVBUF, 4096)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    dealer.send(b"hi")
    assert router.poll(5000)
    identity, _ = router.recv_multipart()
    yield Outbox(router), router, dealer, identity
    router.close()
    dealer.close()
    ctx.term()


def message(kind: str, job: str | None = None, pad: int = PAD, **fields) -> list[bytes]:
    return P.encode(Message(kind, "", job, fields, {"pad": np.zeros(pad, np.uint8)} if pad else {}))


def read(dealer: zmq.Socket, outbox: Outbox, quiet: float = 1.0) -> list[Message]:
    """Everything the client gets while it reads and the loop flushes, until `quiet` seconds pass."""
    out: list[Message] = []
    last = time.monotonic()
    while time.monotonic() - last < quiet:
        outbox.flush()
        while dealer.poll(10):
            out.append(P.decode(dealer.recv_multipart(), P.SERVER_TYPES))
            last = time.monotonic()
    return out


def test_a_reading_client_gets_everything_at_once_and_nothing_is_kept(pair):
    outbox, _, dealer, client = pair
    for i in range(3):
        outbox.send(client, message(MessageType.STATUS, pad=16, n=i), MessageType.STATUS)
        assert dealer.poll(5000)
        assert P.decode(dealer.recv_multipart(), P.SERVER_TYPES).fields["n"] == i
    assert not outbox and outbox.backlog(client) == (0, 0, False)


def test_a_client_that_does_not_read_gets_replies_in_order_once_and_only_the_newest_progress(pair):
    outbox, _, dealer, client = pair
    for i in range(40):
        outbox.send(client, message(MessageType.STATUS, n=i), MessageType.STATUS)
        outbox.send(client, message(MessageType.PROGRESS, "j", pad=16, step=i), MessageType.PROGRESS, "j")
    assert outbox, "the pipe never filled"
    unread, count, has_result = outbox.backlog(client)
    assert count >= 30 and unread >= count * PAD and not has_result
    assert len(outbox.latest[client]) == 1  # of 40 progress messages, one waits: the newest
    got = read(dealer, outbox)
    replies = [m.fields["n"] for m in got if m.type == MessageType.STATUS]
    steps = [m.fields["step"] for m in got if m.type == MessageType.PROGRESS]
    assert replies == list(range(40))  # every reply, in order, once
    assert steps == sorted(steps) and steps[-1] == 39 and len(steps) < 40  # superseded ones were dropped
    assert not outbox


def test_after_a_jobs_end_none_of_its_kept_progress_follows(pair):
    outbox, _, dealer, client = pair
    for i in range(20):
        outbox.send(client, message(MessageType.PREVIEW, "j", step=i), MessageType.PREVIEW, "j")
        outbox.send(client, message(MessageType.PROGRESS, "k", pad=16, step=i), MessageType.PROGRESS, "k")
    assert outbox.latest.get(client), "nothing was kept"
    outbox.send(client, message(MessageType.DONE, "j", pad=16), MessageType.DONE, "j")
    got = read(dealer, outbox)
    kinds = [(m.type, m.job) for m in got]
    end = kinds.index((MessageType.DONE, "j"))
    assert (MessageType.PREVIEW, "j") not in kinds[end:]
    assert kinds[-1] == (MessageType.PROGRESS, "k")  # another job's newest progress still arrives


def test_a_result_in_the_backlog_is_reported(pair):
    outbox, _, _, client = pair
    for _ in range(20):
        outbox.send(client, message(MessageType.RESULT, "j"), MessageType.RESULT, "j")
    assert outbox.backlog(client)[2]


def test_what_is_sent_to_a_client_that_is_gone_is_dropped_not_kept(pair):
    outbox, _, _, _ = pair
    outbox.send(b"\x00nobody", message(MessageType.DONE, "j", pad=16), MessageType.DONE, "j")
    assert not outbox

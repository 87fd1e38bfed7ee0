"""The request handlers, one per request type, in a table. Each answers its request with
exactly one reply carrying the request's id (an error reply where it raises; the loop turns a
PromptMeshError into one); docs/protocol.md lists them."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ...shared import protocol as P
from ...shared.errors import PromptMeshError
from ...shared.image import check_camera, check_rgba
from ...shared.protocol import Message
from ...shared.result import JobFiles, atomic_write, read_npz
from ...shared.spec import JobSpec
from ...shared.surface import check_surface
from ...shared.vocab import ErrorCode, JobState, MessageType
from .. import __version__
from ..models import CATALOGUE, EMBEDDED
from ..registry import Job

if TYPE_CHECKING:
    from .loop import Server

log = logging.getLogger("promptmesh.server")

T = MessageType
STATUS_LIMIT = 100  # jobs in a `status` reply unless the client asks for another number (1..500)
DEFAULT_MODEL = next((f.default for f in dataclasses.fields(JobSpec) if f.name == "model"), None) or EMBEDDED


def on_hello(server: Server, client: bytes, msg: Message) -> None:
    server.reply(client, Message(T.WELCOME, msg.id, fields={
        "protocol": P.PROTOCOL_VERSION, "version": __version__, "device": server.scheduler.device,
        "models": server.offer.names(), "novel_views": server.offer.names(novel_view=True),
        "vocabularies": {EMBEDDED: server.embedded_words}}))


def on_ping(server: Server, client: bytes, msg: Message) -> None:
    s = server.scheduler
    server.reply(client, Message(T.PONG, msg.id, fields={
        "device": s.device, "busy": s.busy(), "queue": len(s.pending), "slots": s.slots, "running": dict(s.running)}))


def model_entry(server: Server, name: str) -> dict[str, Any]:
    """One entry of the `models` reply: what a client's model drop-down shows of one model, and
    what each quality preset sets and takes (its card), so a client can say so before a job."""
    from ..guidance.loading import model_card  # torch: only once a client asks

    entry = CATALOGUE.get(name)
    label = entry.description.split(" (")[0].split(", ")[0] if entry is not None else name
    try:
        presets = model_card(server.offer.resolve(name)).describe()
    except PromptMeshError as exc:  # a damaged card: the model is still listed, its job will say why
        log.warning("model %s: %s", name, exc)
        presets = {}
    return {"name": name, "label": label, "default": name == DEFAULT_MODEL, "presets": presets}


def on_models(server: Server, client: bytes, msg: Message) -> None:
    server.reply(client, Message(T.MODELS, msg.id, fields={
        "models": [model_entry(server, name) for name in server.offer.names()],
        "novel_views": server.offer.names(novel_view=True), "device": server.scheduler.device}))


def on_texture(server: Server, client: bytes, msg: Message) -> None:
    """A generate that paints the mesh it carries: checked whole before anything is stored; the
    mesh waits in the job's folder (surface.npz), so a restarted server still has it."""
    a = msg.arrays
    v, f, uv, warnings = check_surface(a["vertices"], a["faces"], a.get("uvs"), server.max_texture_faces)
    arrays = {"vertices": v, "faces": f, **({} if uv is None else {"uvs": uv})}
    on_generate(server, client, msg, lambda files: atomic_write(files.surface, lambda out: np.savez(out, **arrays)))
    for warning in warnings:
        log.info("texture job: %s", warning)


def on_image(server: Server, client: bytes, msg: Message) -> None:
    """A generate that makes an object of the image it carries: the image (size, foreground) and
    its camera are checked whole before anything is stored; they wait in the job's folder
    (reference.npz), so a restarted server still has them."""
    elevation, fov = check_camera(msg.fields.get("elevation", 0.0), msg.fields.get("fov"))
    rgba = check_rgba(msg.arrays["image"])
    camera = {"elevation": np.float32(elevation), **({} if fov is None else {"fov": np.float32(fov)})}
    on_generate(server, client, msg, lambda files: atomic_write(files.reference, lambda out: np.savez(out, image=rgba, **camera)))


def on_generate(server: Server, client: bytes, msg: Message,
                store: Callable[[JobFiles], Any] | None = None) -> None:
    pending = server.scheduler.pending
    if len(pending) >= server.max_queue:
        raise PromptMeshError(f"the queue is full ({len(pending)} jobs waiting): try again later", ErrorCode.QUEUE_FULL)
    if server.listeners.submitted_by(client, pending) >= server.max_queue_per_client:
        raise PromptMeshError(f"you have {server.max_queue_per_client} jobs waiting, the most one client may queue: "
                              "wait for one to start, or cancel one", ErrorCode.QUEUE_FULL)
    spec = msg.fields["spec"]
    spec.model = server.offer.resolve(spec.model)  # only what this server offers; never a client's path
    if spec.novel_view is not None:
        spec.novel_view = server.offer.resolve(spec.novel_view)
    job = server.registry.add(spec, owner=server.keys.of(client), store=store)
    server.listeners.submitted(job.id, client)
    server.scheduler.add(job.id)
    server.reply(client, Message(T.ACCEPTED, msg.id, job.id, {"position": server.scheduler.position(job.id)}))
    server.dispatch()


def on_cancel(server: Server, client: bytes, msg: Message) -> None:
    """A queued job ends at once, and that end (error CANCELLED) is the reply; a running job is
    told to stop, the reply is `cancelling`, and its end follows as an event (to the submitter,
    its watchers and every canceller)."""
    job = find(server, msg)
    key = server.keys.of(client)
    if job.owner is not None and key != job.owner and key not in server.admins:
        raise PromptMeshError(f"job {job.id} was submitted with another key: only that key or an admin key "
                              "(in the server's admins/ folder) may cancel it", ErrorCode.FORBIDDEN)
    if server.scheduler.withdraw(job.id):
        server.registry.set_state(job.id, JobState.CANCELLED, error_code=ErrorCode.CANCELLED, error="cancelled while queued")
        end = {"code": ErrorCode.CANCELLED, "message": "cancelled while queued"}
        server.reply(client, Message(T.ERROR, msg.id, job.id, end))
        server.route(job.id, Message(T.ERROR, "", job.id, end), skip=client)
    elif job.id in server.scheduler.running:
        server.executor.cancel(job.id)
        server.listeners.await_end(job.id, client)
        server.reply(client, Message(T.CANCELLING, msg.id, job.id))
    else:
        raise PromptMeshError(f"job {job.id} is {job.state}; only queued or running jobs can be cancelled",
                              ErrorCode.BAD_REQUEST)


def on_watch(server: Server, client: bytes, msg: Message) -> None:
    """The reply is `watching` with the job's summary; then its events follow as they happen,
    or its end at once if it has ended."""
    job = find(server, msg)
    server.reply(client, Message(T.WATCHING, msg.id, job.id, {"summary": server.summary(job)}))
    if JobState(job.state).final:
        server.reply(client, end_of(job))
    else:
        server.listeners.watch(job.id, client)


def end_of(job: Job) -> Message:
    """The end event of an ended job, rebuilt from the registry."""
    if job.state == JobState.DONE:
        return Message(T.DONE, "", job.id, {"meta": job.meta or {}})
    return Message(T.ERROR, "", job.id, {"code": job.error_code or ErrorCode.INTERNAL, "message": job.error or ""})


def on_status(server: Server, client: bytes, msg: Message) -> None:
    """One job, or a page of jobs (live ones first) that always fits the client's header limit."""
    jobs, total = ([find(server, msg)], 1) if msg.job else server.registry.overview(msg.fields.get("limit", STATUS_LIMIT))
    summaries = [server.summary(job) for job in jobs]
    while True:
        reply = Message(T.STATUS, msg.id, msg.job, {"jobs": summaries, "total": total})
        data = P.encode(reply)
        if len(data[0]) <= P.MAX_HEADER_BYTES or len(summaries) <= 1:
            break
        summaries = summaries[: len(summaries) * 3 // 4]
    server.outbox.send(client, data, reply.type)


def on_result(server: Server, client: bytes, msg: Message) -> None:
    job = find(server, msg)
    if job.state != JobState.DONE:
        raise PromptMeshError(f"job {job.id} has no result: it is {job.state}", ErrorCode.NOT_FOUND)
    if server.outbox.backlog(client)[2]:
        raise PromptMeshError("a result is still on its way to you: read it before asking for another", ErrorCode.BUSY)
    mesh = read_npz(JobFiles.of(server.registry.root, job.id).mesh)
    server.reply(client, Message(T.RESULT, msg.id, job.id, {"meta": job.meta}, mesh.arrays))


def on_prune(server: Server, client: bytes, msg: Message) -> None:
    if server.auth is not None and server.keys.of(client) not in server.admins:
        raise PromptMeshError("only an admin key (in the server's admins/ folder) may prune jobs", ErrorCode.FORBIDDEN)
    pruned = server.registry.prune(time.time() - msg.fields["days"] * 86400)
    log.info("pruned %d job(s) older than %g days", len(pruned), msg.fields["days"])
    server.reply(client, Message(T.PRUNED, msg.id, fields={"jobs": len(pruned)}))


def find(server: Server, msg: Message) -> Job:
    job = server.registry.get(msg.job) if msg.job else None
    if job is None:
        raise PromptMeshError(f"no job {msg.job}", ErrorCode.NOT_FOUND)
    return job


HANDLERS: dict[str, Callable[[Server, bytes, Message], None]] = {
    T.HELLO: on_hello, T.PING: on_ping, T.MODELS: on_models, T.GENERATE: on_generate, T.TEXTURE: on_texture, T.IMAGE: on_image,
    T.CANCEL: on_cancel, T.WATCH: on_watch, T.STATUS: on_status, T.RESULT: on_result, T.PRUNE: on_prune,
}

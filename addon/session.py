"""The connection to the backend, driven by one `bpy.app.timers` function: `pump`.

No threads: `pump` does non-blocking receives for at most BUDGET_S seconds per tick, keeps
only the newest preview, fetches each finished mesh into the add-on's user folder (so a result
survives Blender closing) and returns the next interval: fast while a job is live, backing off
to IDLE_S when nothing happens, and None (timer stops) when there is no connection.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import bpy
import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from . import backend_process, proxy
from .preferences import preferences
from .properties import FINAL_STATES, OFFERED_MODELS, STATE_NAMES, PROMPTMESH_PG_state
from .shared import protocol as P
from .shared.client import Client, is_loopback
from .shared.errors import PromptMeshError
from .shared.protocol import Message
from .shared.result import JOB_ID, JobFiles, Mesh, jobs_root, read_json, write_json, write_npz
from .shared.spec import unknown_words
from .shared.vocab import ErrorCode

BUDGET_S = 0.004
FAST_S = 0.05
IDLE_S = 1.0
PING_S = 5.0
SERVER_STATES = {"queued": "QUEUED", "running": "RUNNING", "done": "FETCHING", "failed": "FAILED",
                 "cancelled": "CANCELLED"}


class Session:
    """One DEALER connection plus the requests still waiting for an answer."""

    def __init__(self, endpoint: str, timeout: float, server_key: bytes | None = None,
                 client_keys: tuple[bytes, bytes] | None = None) -> None:
        self.endpoint, self.timeout = endpoint, timeout
        self.client = Client(endpoint, server_key, client_keys)
        # ZeroMQ reconnects by itself; its monitor tells when the connection drops and returns,
        # so the badge changes at once and the add-on says hello again (and catches up).
        self.monitor = self.client.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.lost = False
        self.pending: dict[str, tuple[str, float]] = {}  # message id -> (kind, sent at)
        self.last_heard = time.monotonic()
        self.preview: Message | None = None
        self.proxy: Message | None = None  # the newest proxy, shown once per tick
        self.interval = FAST_S

    def send(self, kind: str, job: str | None = None, **fields: Any) -> str:
        msg_id = self.client.send(kind, job, **fields)
        self.pending[msg_id] = (kind, time.monotonic())
        return msg_id

    def connection_events(self) -> list[int]:
        events = []
        while self.monitor.poll(0):
            events.append(recv_monitor_message(self.monitor)["event"])
        return events

    def close(self) -> None:
        self.client.socket.disable_monitor()
        self.monitor.close(linger=0)
        self.client.close()  # LINGER 0, then the context is terminated


_session: Session | None = None
_previews: Any = None
_vocabularies: dict[str, set[str]] = {}  # model -> the words a closed-vocabulary prior knows (from welcome)

# Where each stage sits on the progress bar, so that meshing and fetching move it too.
# A first download fills the bar by its bytes (minutes for Stable Diffusion); generation starts over.
# Refining counts on from the NeRF's steps (its step/total continue), so it shares the span.
STAGE_SPANS = {"loading": (0.0, 0.02), "downloading": (0.0, 1.0), "optimising": (0.02, 0.92),
               "refining": (0.02, 0.92),
               "meshing": (0.92, 0.97), "fetching": (0.97, 1.0)}
# Codes that say the request cannot be done as asked (the user can change it), not that the backend failed.
REFUSALS = {ErrorCode.BAD_REQUEST, ErrorCode.MODEL, ErrorCode.QUEUE_FULL, ErrorCode.FORBIDDEN, ErrorCode.NOT_FOUND,
            ErrorCode.MESH}


def prompt_problem(settings: Any) -> str | None:
    """A short reason why the backend's prior cannot take the prompt, known before sending."""
    vocabulary = _vocabularies.get(settings.model.strip())
    if vocabulary is None:
        return None
    unknown = unknown_words(f"{settings.prompt} {settings.negative}", vocabulary)
    if not unknown:
        return None
    return f"The {settings.model.strip()} prior does not know: {', '.join(unknown[:6])}"


def session() -> Session | None:
    return _session


def state(context: Any = None) -> PROMPTMESH_PG_state:
    return (context or bpy.context).window_manager.promptmesh


# ---- job folders ------------------------------------------------------------------------
def user_root() -> Path:
    """The add-on's user folder; job results live under its jobs/<id>/ like a server's."""
    return Path(bpy.utils.extension_path_user(__package__, create=True))


def job_files(job: str) -> JobFiles:
    """The job's files, its folder created (PromptMeshError for a string that is no job id)."""
    files = JobFiles.of(user_root(), job)
    files.folder.mkdir(parents=True, exist_ok=True)
    return files


def save_record(item: Any) -> None:
    """The job's history entry, beside its result, so a restart of Blender keeps it."""
    record = {"job": item.job, "prompt": item.prompt, "seed": item.seed, "state": item.state, "message": item.message}
    write_json(record, job_files(item.job).record)


def load_history(st: PROMPTMESH_PG_state) -> None:
    """Fill the history list from the job folders (oldest first)."""
    st.history_loaded = True
    records = []
    for path in jobs_root(user_root()).glob("*/job.json"):
        try:
            records.append((path.stat().st_mtime, read_json(path)))
        except (OSError, ValueError):
            continue
    for _, rec in sorted(records, key=lambda r: r[0]):
        if not isinstance(rec, dict) or not JOB_ID.fullmatch(str(rec.get("job", ""))) or st.job(rec["job"]):
            continue
        item = st.jobs.add()
        item.job, item.prompt, item.seed = rec["job"], str(rec.get("prompt", "")), int(rec.get("seed", 0))
        item.state = rec.get("state") if rec.get("state") in STATE_NAMES else "FAILED"
        item.message = str(rec.get("message", ""))
        if item.state == "DONE" and not job_files(item.job).mesh.is_file():
            item.state = "FETCHING"


# ---- connecting ---------------------------------------------------------------------------
def connect(context: Any) -> Session | None:
    """(Re)connect with the preferences' endpoint and keys; the answer arrives through `pump`."""
    global _session
    disconnect()
    prefs, st = preferences(context), state(context)
    endpoint = prefs.endpoint.strip()
    if not is_loopback(endpoint) and not bpy.app.online_access:  # Blender's rule for extensions
        st.connection = "ERROR"
        st.say(f"online access is off, so the remote backend {endpoint} is not contacted: allow it in "
               "Preferences > System > Network, or use a backend on this computer", error=True)
        return None
    server_key, pair = prefs.curve()
    try:
        _session = Session(endpoint, prefs.timeout, server_key, pair)
    except Exception as exc:  # zmq refuses a malformed endpoint or key
        st.connection = "ERROR"
        st.say(f"cannot use endpoint {prefs.endpoint!r}: {exc}", error=True)
        return None
    _session.send("hello", client="promptmesh-blender", protocol=P.PROTOCOL_VERSION)
    st.connection = "CONNECTING"
    st.say(f"connecting to {_session.endpoint}")
    start_timer()
    return _session


def disconnect() -> None:
    global _session
    _vocabularies.clear()  # they were that backend's
    if _session is not None:
        _session.close()
        _session = None


def start_timer() -> None:
    if not bpy.app.timers.is_registered(pump):
        bpy.app.timers.register(pump, first_interval=0.0, persistent=True)


def stop_timer() -> None:
    if bpy.app.timers.is_registered(pump):
        bpy.app.timers.unregister(pump)


def submit(context: Any, spec: dict[str, Any], prompt: str, seed: int) -> Any:
    """Queue a generate request (connecting first if needed); returns the history item."""
    st = state(context)
    sess = _session if _session is not None and st.connection in ("ONLINE", "CONNECTING") else connect(context)
    if sess is None:
        return None
    item = st.jobs.add()
    item.request = sess.send("generate", spec=spec)
    item.prompt, item.seed, item.state = prompt, seed, "SUBMITTING"
    st.jobs_index = len(st.jobs) - 1
    st.stage, st.progress, st.active_job = "submitting", 0.0, ""
    start_timer()
    return item


def cancel(job: str) -> None:
    if _session is not None:
        _session.send("cancel", job)


# ---- the pump -----------------------------------------------------------------------------
def pump() -> float | None:
    """One timer tick. Plain function: tests call it directly."""
    st = state()
    if not st.history_loaded:
        load_history(st)
    died = backend_process.exited()
    if died:
        st.backend_log = died
        st.say("the local backend stopped: its last lines are in the add-on preferences", error=True)
    sess = _session
    if sess is None:
        return None
    watch_connection(st, sess)
    t0, heard = time.perf_counter(), False
    while time.perf_counter() - t0 < BUDGET_S:
        messages = sess.client.poll(0.0, max_messages=16)
        if not messages:
            break
        heard = True
        sess.last_heard = time.monotonic()
        for msg in messages:
            handle(st, sess, msg)
            if _session is not sess:  # the message closed the session
                return _redraw(None)
    if sess.preview is not None:
        show_preview(st, sess.preview)
        sess.preview = None
    if sess.proxy is not None and bpy.context.scene.promptmesh.show_proxy:
        show_proxy(sess.proxy)
    elif not bpy.context.scene.promptmesh.show_proxy:
        proxy.remove()
    sess.proxy = None
    if not check_timeouts(st, sess):
        return _redraw(None)
    if st.connection in ("ONLINE", "CONNECTING") and time.monotonic() - sess.last_heard > PING_S and not sess.pending:
        sess.send("ping")
        resync(st, sess)
    live = sess.pending or any(j.state not in FINAL_STATES for j in st.jobs)
    sess.interval = FAST_S if (live or heard) else min(IDLE_S, sess.interval * 2)
    return _redraw(sess.interval) if heard else sess.interval


def watch_connection(st: PROMPTMESH_PG_state, sess: Session) -> None:
    """The badge follows the connection; after a drop, hello again (its welcome catches up)."""
    for event in sess.connection_events():
        if event == zmq.EVENT_DISCONNECTED and st.connection == "ONLINE":
            sess.lost = True
            st.connection = "CONNECTING"
            st.say(f"lost the backend at {sess.endpoint}: reconnecting", error=True)
        elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED and sess.lost:
            sess.lost = False
            sess.send("hello", client="promptmesh-blender", protocol=P.PROTOCOL_VERSION)


def resync(st: PROMPTMESH_PG_state, sess: Session) -> None:
    """After a silence, ask after every live job: an event lost with a dropped connection or a
    restarted backend must not leave a job 'running' here for ever."""
    for item in st.jobs:
        if item.job and item.state in ("QUEUED", "RUNNING"):
            sess.send("status", item.job)
        elif item.job and item.state == "FETCHING":
            sess.send("result", item.job)


def _redraw(interval: float | None) -> float | None:
    for window in bpy.context.window_manager.windows:
        for area in window.screen.areas:
            if area.type in ("VIEW_3D", "PREFERENCES"):
                area.tag_redraw()
    return interval


def check_timeouts(st: PROMPTMESH_PG_state, sess: Session) -> bool:
    """Give up on a backend that does not answer; False when the session was closed."""
    now = time.monotonic()
    if not any(now - sent > sess.timeout for _, sent in sess.pending.values()):
        return True
    if backend_process.starting():  # our own backend is still loading: keep waiting
        return True
    for item in st.jobs:
        if item.state == "SUBMITTING":
            item.state, item.message = "FAILED", "not sent: the backend did not answer"
    st.connection = "OFFLINE"
    st.say(f"backend unreachable at {sess.endpoint} (no answer in {sess.timeout:g} s): start it with "
           "`promptmesh serve` or with Start in the add-on preferences", error=True)
    disconnect()
    return False


def handle(st: PROMPTMESH_PG_state, sess: Session, msg: Message) -> None:
    kind = sess.pending.pop(msg.id, ("", 0.0))[0]
    handler = HANDLERS.get(msg.type)
    if handler is not None:
        handler(st, sess, msg, kind)


def on_welcome(st: PROMPTMESH_PG_state, sess: Session, msg: Message, kind: str) -> None:
    if msg.fields.get("protocol") != P.PROTOCOL_VERSION:
        version_mismatch(st, msg.fields.get("protocol"))
        return
    st.connection, st.device = "ONLINE", str(msg.fields.get("device", "?"))
    st.say(f"connected: backend {msg.fields.get('version', '?')} on {st.device}")
    models = msg.fields.get("models")
    OFFERED_MODELS[:] = [str(m) for m in models] if isinstance(models, list) else []
    vocabularies = msg.fields.get("vocabularies")
    _vocabularies.clear()
    if isinstance(vocabularies, dict):
        _vocabularies.update({str(k): set(map(str, v)) for k, v in vocabularies.items() if isinstance(v, list)})
    for item in st.jobs:  # catch up with jobs that moved on while we were away
        if item.job and item.state not in FINAL_STATES:
            sess.send("status", item.job)


def version_mismatch(st: PROMPTMESH_PG_state, theirs: Any) -> None:
    st.connection = "ERROR"
    st.say(f"the backend speaks protocol {theirs}, this add-on {P.PROTOCOL_VERSION}: "
           "update the add-on and the backend to the same release", error=True)
    disconnect()


def on_pong(st: PROMPTMESH_PG_state, sess: Session, msg: Message, kind: str) -> None:
    st.connection, st.device = "ONLINE", str(msg.fields.get("device", st.device))


def on_status(st: PROMPTMESH_PG_state, sess: Session, msg: Message, kind: str) -> None:
    for summary in msg.fields.get("jobs", []):
        item = st.job(str(summary.get("job", "")))
        new = SERVER_STATES.get(summary.get("state"))
        if item is None or new is None or item.state == new:
            continue
        item.state, item.message = new, str(summary.get("error") or "")
        if new == "FETCHING":
            sess.send("result", item.job)
        save_record(item)


def on_accepted(st: PROMPTMESH_PG_state, sess: Session, msg: Message, kind: str) -> None:
    item = next((j for j in st.jobs if j.request == msg.id), None)
    if item is None or not msg.job or not JOB_ID.fullmatch(msg.job):
        return
    item.job, item.request, item.state = msg.job, "", "QUEUED"
    position = msg.fields.get("position", 0)
    item.message = f"{position} job(s) ahead" if position else ""
    st.active_job, st.stage, st.progress = msg.job, "queued", 0.0
    save_record(item)


def on_progress(st: PROMPTMESH_PG_state, sess: Session, msg: Message, kind: str) -> None:
    item = st.job(msg.job or "")
    if item is None:
        return
    step, total = int(msg.fields.get("step", 0)), int(msg.fields.get("total", 0))
    if item.state != "RUNNING":
        item.state, item.message = "RUNNING", ""
        save_record(item)
    item.step, item.total = step, total
    if msg.job == st.active_job:
        stage = str(msg.fields.get("stage", ""))
        if stage != st.stage:
            st.stage, st.stage_started = stage, time.monotonic()
        lo, hi = STAGE_SPANS.get(stage, (st.progress, st.progress))
        st.progress = lo + (hi - lo) * (step / total if total else 0.0)
        st.eta = (eta_text(time.monotonic() - st.stage_started, step, total) if stage == "optimising"
                  else f"{step / 1e9:.2f} of {total / 1e9:.2f} GB" if stage == "downloading" and total else "")


def eta_text(elapsed: float, step: int, total: int) -> str:
    """'0:42 elapsed, about 2:10 left' from the step rate so far."""
    def clock(seconds: float) -> str:
        return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"

    if step < 3 or not total:
        return f"{clock(elapsed)} elapsed"
    return f"{clock(elapsed)} elapsed, about {clock(elapsed / step * (total - step))} left"


def on_preview(st: PROMPTMESH_PG_state, sess: Session, msg: Message, kind: str) -> None:
    if msg.job == st.active_job and "rgba" in msg.arrays:
        sess.preview = msg  # only the newest is drawn


def on_proxy(st: PROMPTMESH_PG_state, sess: Session, msg: Message, kind: str) -> None:
    if msg.job == st.active_job and {"vertices", "faces", "colors"} <= msg.arrays.keys():
        sess.proxy = msg  # only the newest is shown


def end_proxy(sess: Session) -> None:
    sess.proxy = None
    proxy.remove()


def show_proxy(msg: Message) -> None:
    arrays = msg.arrays
    if arrays["vertices"].ndim == 2 and arrays["faces"].ndim == 2 and len(arrays["faces"]):
        try:
            proxy.update(bpy.context, arrays["vertices"], arrays["faces"], arrays["colors"])
        except PromptMeshError:  # inconsistent arrays: skip this one
            pass


def on_done(st: PROMPTMESH_PG_state, sess: Session, msg: Message, kind: str) -> None:
    item = st.job(msg.job or "")
    if item is not None:
        item.state = "FETCHING"
        save_record(item)
        sess.send("result", item.job)
    if msg.job == st.active_job:
        st.stage, st.progress, st.eta = "fetching", STAGE_SPANS["fetching"][0], ""


def on_result(st: PROMPTMESH_PG_state, sess: Session, msg: Message, kind: str) -> None:
    item = st.job(msg.job or "")
    if item is None:
        return
    try:
        mesh = Mesh.from_arrays(msg.arrays)
    except PromptMeshError as exc:
        item.state, item.message = "FAILED", str(exc)
        save_record(item)
        return
    files = job_files(item.job)
    meta = msg.fields.get("meta") or {}
    write_npz(mesh, files.mesh)
    write_json(meta, files.meta)
    item.state, item.message = "DONE", "; ".join(map(str, meta.get("warnings") or []))  # e.g. why it has no texture
    save_record(item)
    if item.job == st.active_job:
        end_proxy(sess)  # the result replaces it
        st.stage, st.progress = "done", 1.0
        st.say(f"done: {item.prompt}")
        if bpy.context.scene.promptmesh.import_when_done:
            from .importer import import_job

            try:
                import_job(bpy.context, item.job)
            except Exception as exc:  # shown in the panel, never as a traceback
                st.say(f"import failed: {exc}", error=True)


def on_error(st: PROMPTMESH_PG_state, sess: Session, msg: Message, kind: str) -> None:
    code, text = str(msg.fields.get("code", ErrorCode.INTERNAL)), str(msg.fields.get("message", "error"))
    if code == ErrorCode.VERSION:
        version_mismatch(st, "another version")
        return
    if code == ErrorCode.BUSY:  # a result is still on its way: it will arrive
        return
    item = st.job(msg.job or "") or next((j for j in st.jobs if j.request and j.request == msg.id), None)
    if item is not None and kind != "status":
        item.state = "CANCELLED" if code == ErrorCode.CANCELLED else "FAILED"
        item.message = text
        if item.job:
            save_record(item)
        if item.job == st.active_job or kind == "generate":
            st.stage = item.state.lower()
            end_proxy(sess)
    elif item is not None and code == ErrorCode.NOT_FOUND:
        item.state, item.message = "FAILED", "this backend does not know the job"
        save_record(item)
    if code == ErrorCode.CANCELLED:
        st.say(f"cancelled: {text}")
    else:  # what the user can change reads differently from a backend that failed
        st.say(f"{'cannot do that' if code in REFUSALS else 'backend error'}: {text}", error=True)


HANDLERS = {"welcome": on_welcome, "pong": on_pong, "status": on_status, "accepted": on_accepted,
            "progress": on_progress, "preview": on_preview, "proxy": on_proxy, "done": on_done, "result": on_result,
            "error": on_error}


# ---- the live preview -----------------------------------------------------------------------
def preview() -> Any:
    """The preview icon (bpy.utils.previews), created on first use."""
    global _previews
    import bpy.utils.previews

    if _previews is None:
        _previews = bpy.utils.previews.new()
    return _previews.get("live") or _previews.new("live")


def show_preview(st: PROMPTMESH_PG_state, msg: Message) -> None:
    rgba = msg.arrays["rgba"]
    if rgba.dtype != np.uint8 or rgba.ndim != 3 or rgba.shape[2] != 4:
        return
    h, w = rgba.shape[:2]
    icon = preview()
    icon.image_size = (w, h)
    icon.image_pixels_float.foreach_set((rgba[::-1].astype(np.float32) / 255.0).ravel())  # Blender is bottom-up
    st.preview_step = int(msg.fields.get("step", 0))


def release() -> None:
    """Everything register() or use created: timer, socket and context, preview icons."""
    global _previews
    stop_timer()
    disconnect()
    if _previews is not None:
        import bpy.utils.previews

        bpy.utils.previews.remove(_previews)
        _previews = None

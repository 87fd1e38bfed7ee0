"""The connection to the backend, driven by one `bpy.app.timers` function: `pump`.

No threads: `pump` does non-blocking receives for at most BUDGET_S seconds per tick, keeps
only the newest preview, fetches each finished mesh into the add-on's user folder (so a result
survives Blender closing) and returns the next interval: fast while a job is live, backing off
to IDLE_S when nothing happens. The timer runs from register to unregister: it loads the job
history, connects by itself, re-attaches to jobs still running (after a reconnect or a restart
of Blender) and never stops on an error: it reports it and goes on.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bpy
import numpy as np
import zmq

from . import backend_process, proxy
from .preferences import preferences
from .properties import (
    BACKEND_DEVICE,
    FINAL_STATES,
    MODELS,
    NOVEL_VIEWS,
    OFFERED_MODELS,
    SEED_MAX,
    SERVER_STATES,
    STATE_NAMES,
    PROMPTMESH_PG_state,
    clock,
)
from .shared import protocol as P
from .shared.client import Client, is_loopback
from .shared.errors import PromptMeshError
from .shared.protocol import Message
from .shared.result import JOB_ID, JobFiles, Mesh, jobs_root, read_json, write_json, write_npz
from .shared.spec import unknown_words
from .shared.vocab import ErrorCode, MessageType, Stage

T = MessageType
BUDGET_S = 0.004
FAST_S = 0.05
IDLE_S = 1.0
PING_S = 5.0
RETRY_S = 15.0  # between quiet connection attempts while jobs of ours may still be running
REPEAT_S = 1.0  # a second Generate of the same settings within this is a double click
SLOW_LINK_BPS = 250_000  # a result's time-out allows this slow a link
NOMINAL_BPS = 10_000_000  # how fast the fetch bar moves when a result is large
LARGE_RESULT = 1_000_000  # results above this many bytes show their size and time while fetching


@dataclass
class Pending:
    """A request still waiting for its reply."""

    kind: str
    sent: float
    job: str = ""
    deadline: float = 0.0


class Session:
    """One DEALER connection plus the requests still waiting for an answer."""

    def __init__(self, endpoint: str, timeout: float, server_key: bytes | None = None,
                 client_keys: tuple[bytes, bytes] | None = None) -> None:
        self.endpoint, self.timeout = endpoint, timeout
        self.encrypted = server_key is not None
        self.client = Client(endpoint, server_key, client_keys)
        self.shook = False  # a handshake succeeded on this connection
        self.lost = False
        self.quiet = False  # started by the add-on itself: no alarm when nobody answers
        self.can_watch = True  # the backend understands `watch` (an older one answers BAD_REQUEST)
        self.pending: dict[str, Pending] = {}
        self.last_heard = time.monotonic()
        self.preview: Message | None = None
        self.proxy: Message | None = None  # the newest proxy, shown once per tick
        self.interval = FAST_S

    def send(self, kind: str, job: str | None = None, extra_s: float = 0.0, **fields: Any) -> str:
        """Send a request; its reply is due within the timeout plus `extra_s` seconds."""
        msg_id = self.client.send(kind, job, **fields)
        now = time.monotonic()
        self.pending[msg_id] = Pending(kind, now, job or "", now + self.timeout + extra_s)
        return msg_id

    def watch(self, job: str) -> None:
        """Follow a job's events on this connection (the client watches it again after each reconnection)."""
        msg_id = self.client.watch(job) if self.can_watch else self.client.send(T.STATUS, job)
        now = time.monotonic()
        self.pending[msg_id] = Pending(T.WATCH if self.can_watch else T.STATUS, now, job, now + self.timeout)

    def close(self) -> None:
        self.client.close()  # LINGER 0, then the context is terminated


_session: Session | None = None
_previews: Any = None
_vocabularies: dict[str, set[str]] = {}  # model -> the words a closed-vocabulary prior knows (from welcome)
_next_auto_connect: float | None = 0.0  # monotonic time of the next quiet connection attempt; None: none
_opened = 1  # counts the files opened in this Blender session (load_post): jobs import into the one they began in
_last_generate: tuple[str, float] = ("", 0.0)  # settings and time of the last Generate, to drop a double click
# Job id -> the opened file (_opened) it was begun in, for this Blender session's jobs. Kept here,
# not on the job list: opening a file may give Blender a new window manager and the list with it.
_begun_in: dict[str, int] = {}

# Where each stage sits on the progress bar, so that meshing and fetching move it too.
# A first download fills the bar by its bytes (minutes for Stable Diffusion); generation starts over.
# Refining counts on from the NeRF's steps (its step/total continue), so it shares the span.
STAGE_SPANS = {Stage.LOADING: (0.0, 0.02), Stage.DOWNLOADING: (0.0, 1.0), Stage.OPTIMISING: (0.02, 0.92),
               Stage.REFINING: (0.02, 0.92), Stage.TEXTURING: (0.02, 0.92), Stage.MESHING: (0.92, 0.97), "fetching": (0.97, 1.0)}
# Codes that say the request cannot be done as asked (the user can change it), not that the backend failed.
REFUSALS = {ErrorCode.BAD_REQUEST, ErrorCode.MODEL, ErrorCode.QUEUE_FULL, ErrorCode.FORBIDDEN, ErrorCode.NOT_FOUND,
            ErrorCode.MESH}


def prompt_problem(settings: Any) -> str | None:
    """A short reason why the backend's prior cannot take the prompt, known before sending. The
    negative prompt is not checked: the backend does not check it either."""
    vocabulary = _vocabularies.get(settings.model.strip())
    if vocabulary is None:
        return None
    unknown = unknown_words(settings.prompt, vocabulary)
    if not unknown:
        return None
    return f"The {settings.model.strip()} prior does not know: {', '.join(unknown[:6])}"


def session() -> Session | None:
    return _session


def state(context: Any = None) -> PROMPTMESH_PG_state:
    return (context or bpy.context).window_manager.promptmesh


def opened() -> int:
    """Which file of this Blender session is open now (File > Open and New count up)."""
    return _opened


def in_a_window() -> Any:
    """A context with a window and its screen for the timer's work: Blender runs timers without
    one, and undo steps, reports and the import (the window's view layer) want one."""
    windows = bpy.context.window_manager.windows
    if bpy.context.window is not None or not windows:
        return contextlib.nullcontext()
    return bpy.context.temp_override(window=windows[0], screen=windows[0].screen)


def notify(text: str, error: bool = False) -> None:
    """A notice in Blender's status bar (and its Info log), from the timer as from an operator."""
    try:
        with in_a_window():
            bpy.ops.promptmesh.notice(message=text, error=error)  # type: ignore[attr-defined]  # our own operator
    except Exception:  # no window to report to (the add-on is being disabled): the console has it
        print(f"PromptMesh: {text}")


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
    record = {"job": item.job, "prompt": item.prompt, "seed": item.seed, "state": item.state, "message": item.message,
              "target": item.target, "uv_map": item.uv_map}
    write_json(record, job_files(item.job).record)


def load_history(st: PROMPTMESH_PG_state) -> None:
    """Fill the history list from the job folders (oldest first); the newest live job is shown."""
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
        item.target, item.uv_map = str(rec.get("target", "")), str(rec.get("uv_map", ""))
        if item.state == "DONE" and not job_files(item.job).mesh.is_file():
            item.state = "FETCHING"
    live = [j for j in st.jobs if j.job and j.state not in FINAL_STATES]
    if live and st.job(st.active_job) is None:
        st.active_job, st.stage = live[-1].job, live[-1].state.lower()


# ---- connecting ---------------------------------------------------------------------------
def connect(context: Any, quiet: bool = False) -> Session | None:
    """(Re)connect with the preferences' endpoint and keys; the answer arrives through `pump`.
    `quiet`: the add-on's own attempt (at start-up), which says nothing loud if nobody answers."""
    global _session, _next_auto_connect
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
    _session.quiet = quiet
    if not quiet:  # asked for: the start-up attempt is not needed, retries resume after a while
        _next_auto_connect = time.monotonic() + RETRY_S
    _session.send(T.HELLO, client="promptmesh-blender", protocol=P.PROTOCOL_VERSION)
    st.connection = "CONNECTING"
    st.say(f"connecting to {_session.endpoint}")
    start_timer()
    return _session


def disconnect(by_user: bool = False) -> None:
    """Close the connection; what came from that backend goes with it (its models, its proxy).
    `by_user`: the artist stopped it, so the add-on does not connect again by itself."""
    global _session, _next_auto_connect
    _vocabularies.clear()
    MODELS.clear()
    OFFERED_MODELS.clear()
    NOVEL_VIEWS.clear()
    if by_user:
        _next_auto_connect = None
    if _session is not None:
        _session.close()
        _session = None
        proxy.remove()


def auto_connect(st: PROMPTMESH_PG_state) -> None:
    """Connect without being asked: once when the add-on starts, then every RETRY_S while jobs
    of ours may still be running somewhere, so that they are re-attached when the backend is up."""
    global _next_auto_connect
    now = time.monotonic()
    if _next_auto_connect is None or now < _next_auto_connect:
        return
    first = _next_auto_connect == 0.0
    _next_auto_connect = now + RETRY_S
    if not first and not any(j.job and j.state not in FINAL_STATES for j in st.jobs):
        return
    if not is_loopback(preferences().endpoint.strip()) and not bpy.app.online_access:
        return  # Connect says why when the artist asks
    connect(bpy.context, quiet=True)


def start_timer() -> None:
    if not bpy.app.timers.is_registered(pump):
        bpy.app.timers.register(pump, first_interval=0.0, persistent=True)


def stop_timer() -> None:
    if bpy.app.timers.is_registered(pump):
        bpy.app.timers.unregister(pump)


# ---- generating ------------------------------------------------------------------------------
def seeds(settings: Any) -> list[int]:
    """The seeds of the next Generate: locked, the seed and the ones after it; unlocked, new ones."""
    n = max(1, int(settings.variations))
    if settings.lock_seed:
        return [(settings.seed + i) % (SEED_MAX + 1) for i in range(n)]
    return random.sample(range(SEED_MAX + 1), n)


def repeated(spec: dict[str, Any], variations: int) -> bool:
    """True for a second Generate of the same settings within REPEAT_S (a double click)."""
    global _last_generate
    key = json.dumps({**spec, "seed": None, "variations": variations}, sort_keys=True, default=str)
    now = time.monotonic()
    again = key == _last_generate[0] and now - _last_generate[1] < REPEAT_S
    _last_generate = (key, now)
    return again


def result_bytes(vertices: int, faces: int, texture: int) -> int:
    """About how many bytes a result takes on the wire: positions, colours, normals and UVs per
    vertex, three indices per face, an RGB texture."""
    return vertices * (12 + 12 + 12 + 8) + faces * 12 + texture * texture * 3


def submit(context: Any, spec: dict[str, Any], prompt: str, seed: int, surface: dict[str, np.ndarray] | None = None,
           target: str = "", uv_map: str = "", image: np.ndarray | None = None, elevation: float = 0.0) -> Any:
    """Queue a generate request (connecting first if needed); returns the history item. With a
    `surface` (vertices, faces, uvs?) it is a texture request, whose result goes onto `target`;
    with an `image` (checked RGBA uint8), an image request seen from `elevation` degrees."""
    st = state(context)
    sess = _session if _session is not None and st.connection in ("ONLINE", "CONNECTING") else connect(context)
    if sess is None:
        return None
    sess.quiet = False  # the artist is waiting now: say so if nobody answers
    item = st.jobs.add()
    if image is not None:  # its reply waits for the image to arrive
        item.request = sess.send(T.IMAGE, extra_s=image.nbytes / SLOW_LINK_BPS, spec=spec, elevation=float(elevation),
                                 arrays={"image": image})
    elif surface is None:
        item.request = sess.send(T.GENERATE, spec=spec)
    else:
        upload = sum(a.nbytes for a in surface.values())  # its reply waits for the mesh to arrive
        item.request = sess.send(T.TEXTURE, extra_s=upload / SLOW_LINK_BPS, spec=spec, arrays=surface)
    item.prompt, item.seed, item.state, item.opened = prompt, seed, "SUBMITTING", _opened
    item.target, item.uv_map = target, uv_map
    faces = len(surface["faces"]) if surface is not None else spec.get("max_faces") or 20000  # default decimation
    item.expect_bytes = min(result_bytes(faces // 2, faces, int(spec.get("texture_size") or 0)), 2**31 - 1)
    st.jobs_index = len(st.jobs) - 1
    active = st.job(st.active_job)
    if active is None or active.state in FINAL_STATES:  # the last job's bar and preview make way
        st.stage, st.progress, st.eta, st.active_job, st.preview_step = "submitting", 0.0, "", "", 0
    start_timer()
    return item


def find(st: PROMPTMESH_PG_state, key: str) -> Any:
    """A history item by job id or, before it is accepted, by its request id."""
    return st.job(key) or next((j for j in st.jobs if j.request and j.request == key), None) if key else None


def cancel(item: Any) -> bool:
    """Ask the backend to stop a queued or running job (one not yet accepted is cancelled as soon
    as it is); False when there is no connection to ask through."""
    if item.state == "SUBMITTING":
        item.cancel_asked = True
        return True
    if _session is None or not item.job:
        return False
    _session.send(T.CANCEL, item.job)
    return True


# ---- the pump -----------------------------------------------------------------------------
def pump() -> float:
    """One timer tick. Plain function: tests call it directly. An error is reported in the
    panel and the console, and the timer goes on: a frozen panel helps nobody."""
    try:
        return _pump()
    except Exception as exc:
        fault(exc)
        return IDLE_S


def fault(exc: BaseException) -> None:
    traceback.print_exc()
    try:
        state().say(f"the add-on hit an error and keeps going: {type(exc).__name__}: {exc} "
                    "(the system console has the details)", error=True)
    except Exception:  # no window manager (Blender is closing)
        pass


def _pump() -> float:
    st = state()
    if not st.history_loaded:
        load_history(st)
    died = backend_process.exited()
    if died:
        st.backend_log = died
        st.say("the local backend stopped: its last lines are in the add-on preferences", error=True)
    if _session is None:
        auto_connect(st)
    sess = _session
    if sess is None:
        return IDLE_S
    if not watch_connection(st, sess):
        return _redraw(IDLE_S)
    t0, heard = time.perf_counter(), False
    while time.perf_counter() - t0 < BUDGET_S:
        messages = sess.client.poll(0.0, max_messages=16)
        if not messages:
            break
        heard = True
        sess.last_heard = time.monotonic()
        for msg in messages:
            try:
                handle(st, sess, msg)
            except Exception as exc:  # one bad message costs itself, not the ones after it
                fault(exc)
            if _session is not sess:  # the message closed the session
                return _redraw(IDLE_S)
    settings = bpy.context.scene.promptmesh
    if sess.preview is not None:
        show_preview(st, sess.preview)
        sess.preview = None
    if sess.proxy is not None and settings.show_proxy:
        show_proxy(st, sess.proxy)
    elif not settings.show_proxy:
        proxy.remove()
    sess.proxy = None
    fetch_progress(st, sess)
    if not check_timeouts(st, sess):
        return _redraw(IDLE_S)
    if st.connection in ("ONLINE", "CONNECTING") and time.monotonic() - sess.last_heard > PING_S and not sess.pending:
        sess.send(T.PING)
        resync(st, sess)
    live = sess.pending or any(j.state not in FINAL_STATES for j in st.jobs)
    sess.interval = FAST_S if (live or heard) else min(IDLE_S, sess.interval * 2)
    return _redraw(sess.interval) if heard else sess.interval


def watch_connection(st: PROMPTMESH_PG_state, sess: Session) -> bool:
    """The badge follows the connection (the client's monitor, ZeroMQ reconnects by itself);
    after a drop, hello again: its welcome re-attaches the live jobs. False when the session
    was closed: a connection that drops before any handshake succeeded is a handshake refused
    (CURVE keys that do not match, or encryption on one side only), which ZeroMQ would retry in
    silence for ever."""
    for event in sess.client.connection_events():
        if event == zmq.EVENT_DISCONNECTED and not sess.shook:
            handshake_failed(st, sess)
            return False
        if event == zmq.EVENT_DISCONNECTED and st.connection == "ONLINE":
            sess.lost = True
            st.connection = "CONNECTING"
            st.say(f"lost the backend at {sess.endpoint}: reconnecting", error=True)
            proxy.remove()  # a proxy the backend can no longer update; re-attaching brings it back
        elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            sess.shook = True
            if sess.lost:
                sess.lost = False
                sess.send(T.HELLO, client="promptmesh-blender", protocol=P.PROTOCOL_VERSION)
    return True


def handshake_failed(st: PROMPTMESH_PG_state, sess: Session) -> None:
    """Wrong or missing CURVE keys: ZeroMQ would retry for ever; say which settings to check."""
    if sess.encrypted:
        advice = ("check Server Public Key (the server's server.key), Client Public Key and Client Secret Key in "
                  "the add-on preferences: the client's public key must be in the server's authorized/ folder; "
                  "for a backend without encryption leave all three keys empty")
    else:
        advice = ("it wants encryption: set Server Public Key, Client Public Key and Client Secret Key in the "
                  "add-on preferences")
    for item in st.jobs:
        if item.state == "SUBMITTING":
            item.state, item.message = "FAILED", "not sent: the encryption handshake failed"
    st.connection = "ERROR"
    st.say(f"the backend at {sess.endpoint} refused the encryption handshake: {advice}", error=True)
    disconnect()


def resync(st: PROMPTMESH_PG_state, sess: Session) -> None:
    """After a silence, ask after every live job: an event lost with a dropped connection or a
    restarted backend must not leave a job 'running' here for ever."""
    for item in st.jobs:
        if item.job and item.state in ("QUEUED", "RUNNING"):
            sess.send(T.STATUS, item.job)
        elif item.job and item.state == "FETCHING":
            fetch(sess, item)


def fetch(sess: Session, item: Any) -> None:
    """Ask for a finished job's mesh (once at a time), with a time-out that grows with its size (a slow link)."""
    if not any(p.kind == T.RESULT and p.job == item.job for p in sess.pending.values()):
        sess.send(T.RESULT, item.job, extra_s=item.expect_bytes / SLOW_LINK_BPS)


def fetch_progress(st: PROMPTMESH_PG_state, sess: Session) -> None:
    """While a large result travels, the bar moves on at a nominal rate and says its size and time."""
    item = st.job(st.active_job)
    if item is None or item.state != "FETCHING" or item.expect_bytes < LARGE_RESULT:
        return
    sent = [p.sent for p in sess.pending.values() if p.kind == T.RESULT and p.job == item.job]
    if not sent:
        return
    elapsed = time.monotonic() - min(sent)
    lo, hi = STAGE_SPANS["fetching"]
    guess = min(0.95, elapsed / (item.expect_bytes / NOMINAL_BPS))
    st.progress = max(st.progress, lo + (hi - lo) * guess)
    st.eta = f"fetching {item.expect_bytes / 1e6:.1f} MB: {clock(elapsed)}"


def _redraw(interval: float) -> float:
    for window in bpy.context.window_manager.windows:
        for area in window.screen.areas:
            if area.type in ("VIEW_3D", "PREFERENCES"):
                area.tag_redraw()
    return interval


def check_timeouts(st: PROMPTMESH_PG_state, sess: Session) -> bool:
    """Give up on a backend that does not answer; False when the session was closed."""
    now = time.monotonic()
    if not any(now > p.deadline for p in sess.pending.values()):
        return True
    if backend_process.starting():  # our own backend is still loading: keep waiting
        return True
    for item in st.jobs:
        if item.state == "SUBMITTING":
            item.state, item.message = "FAILED", "not sent: the backend did not answer"
    st.connection = "OFFLINE"
    if sess.quiet:  # nobody asked yet: the badge says Offline, the status what to do
        st.say(f"no backend at {sess.endpoint} yet: start it with `promptmesh serve` or with Start in the add-on "
               "preferences, then press the refresh button")
    else:
        st.say(f"backend unreachable at {sess.endpoint} (no answer in {sess.timeout:g} s): start it with "
               "`promptmesh serve` or with Start in the add-on preferences", error=True)
    disconnect()
    return False


def handle(st: PROMPTMESH_PG_state, sess: Session, msg: Message) -> None:
    pending = sess.pending.pop(msg.id, None) if msg.id else None
    if msg.type in (T.DONE, T.ERROR) and msg.job:  # a job's end answers any cancel of it still waiting
        for msg_id in [i for i, p in sess.pending.items() if p.kind == T.CANCEL and p.job == msg.job]:
            del sess.pending[msg_id]
    kind = pending.kind if pending else ""
    if kind in (T.WATCH, T.MODELS):
        (on_watch_reply if kind == T.WATCH else on_models_reply)(st, sess, msg, pending)
        return
    handler = HANDLERS.get(msg.type)
    if handler is not None:
        handler(st, sess, msg, kind)


def on_welcome(st: PROMPTMESH_PG_state, sess: Session, msg: Message, kind: str) -> None:
    if msg.fields.get("protocol") != P.PROTOCOL_VERSION:
        version_mismatch(st, msg.fields.get("protocol"))
        return
    st.connection, st.device = "ONLINE", str(msg.fields.get("device", "?"))
    BACKEND_DEVICE[0] = st.device
    st.say(f"connected: backend {msg.fields.get('version', '?')} on {st.device}")
    models = msg.fields.get("models")
    OFFERED_MODELS[:] = [str(m) for m in models] if isinstance(models, list) else []
    novel = msg.fields.get("novel_views")
    NOVEL_VIEWS[:] = [str(m) for m in novel] if isinstance(novel, list) else []
    vocabularies = msg.fields.get("vocabularies")
    _vocabularies.clear()
    if isinstance(vocabularies, dict):
        _vocabularies.update({str(k): set(map(str, v)) for k, v in vocabularies.items() if isinstance(v, list)})
    sess.send(T.MODELS)
    for item in st.jobs:  # re-attach to jobs that went on while we were away (the client re-watches its own)
        if item.job and item.state in ("QUEUED", "RUNNING") and item.job not in sess.client.following:
            sess.watch(item.job)
        elif item.job and item.state == "FETCHING":
            fetch(sess, item)


def on_models_reply(st: PROMPTMESH_PG_state, sess: Session, msg: Message, pending: Any) -> None:
    """The model drop-down and the quality tooltips; a backend without `models` keeps the welcome's names."""
    models = msg.fields.get("models") if msg.type == T.MODELS else None
    if not isinstance(models, list):
        return
    MODELS[:] = [m for m in models if isinstance(m, dict) and isinstance(m.get("name"), str)]
    novel = msg.fields.get("novel_views")
    if isinstance(novel, list):
        NOVEL_VIEWS[:] = [str(m) for m in novel]
    BACKEND_DEVICE[0] = str(msg.fields.get("device") or st.device)
    settings = bpy.context.scene.promptmesh
    default = next((m["name"] for m in MODELS if m.get("default")), None)
    if default and not settings.is_property_set("model"):  # the scene never chose: the backend's default
        settings.model = default


def on_watch_reply(st: PROMPTMESH_PG_state, sess: Session, msg: Message, pending: Any) -> None:
    """The watched job's summary (its events follow on this connection), or why not."""
    item = st.job(pending.job)
    if item is None:
        return
    if msg.type != T.ERROR:
        on_watching(st, sess, msg, T.WATCH)
        return
    code = msg.fields.get("code")
    if code == ErrorCode.NOT_FOUND:
        item.state, item.message = "FAILED", "this backend does not know the job"
        save_record(item)
    elif code == ErrorCode.BAD_REQUEST:  # a backend without `watch`: its status, and the ping's resync
        sess.can_watch = False
        sess.client.following.discard(item.job)
        sess.watch(item.job)


def on_watching(st: PROMPTMESH_PG_state, sess: Session, msg: Message, kind: str) -> None:
    """A watch's reply (ours, or the client's own after a reconnection): the job's summary."""
    summary = msg.fields.get("summary")
    apply_summary(st, sess, {"job": msg.job, **summary} if isinstance(summary, dict) else {})
    item, active = st.job(msg.job or ""), st.job(st.active_job)
    if item is not None and item.state == "RUNNING" and (active is None or active.state != "RUNNING"):
        st.active_job, st.stage = item.job, ""  # the bar and previews follow it again


def version_mismatch(st: PROMPTMESH_PG_state, theirs: Any) -> None:
    st.connection = "ERROR"
    st.say(f"the backend speaks protocol {theirs}, this add-on {P.PROTOCOL_VERSION}: "
           "update the add-on and the backend to the same release", error=True)
    disconnect()


def on_pong(st: PROMPTMESH_PG_state, sess: Session, msg: Message, kind: str) -> None:
    st.connection, st.device = "ONLINE", str(msg.fields.get("device", st.device))


def apply_summary(st: PROMPTMESH_PG_state, sess: Session, summary: Any) -> None:
    """A job's state as the backend's summary tells it (status and watch replies)."""
    if not isinstance(summary, dict):
        return
    item = st.job(str(summary.get("job", "")))
    new = SERVER_STATES.get(str(summary.get("state")))
    if item is None or new is None or item.state == new or item.state in ("FETCHING", "DONE") and new == "FETCHING":
        return
    item.state, item.message = new, str(summary.get("error") or "")
    if new == "FETCHING":
        fetch(sess, item)
    save_record(item)
    if new in FINAL_STATES:
        ended(st, sess, item)


def on_status(st: PROMPTMESH_PG_state, sess: Session, msg: Message, kind: str) -> None:
    for summary in msg.fields.get("jobs", []):
        apply_summary(st, sess, summary)


def on_accepted(st: PROMPTMESH_PG_state, sess: Session, msg: Message, kind: str) -> None:
    item = next((j for j in st.jobs if j.request == msg.id), None)
    if item is None or not msg.job or not JOB_ID.fullmatch(msg.job):
        return
    item.job, item.request, item.state = msg.job, "", "QUEUED"
    _begun_in[msg.job] = item.opened
    position = msg.fields.get("position", 0)
    item.message = f"{position} job(s) ahead" if position else ""
    active = st.job(st.active_job)
    if active is None or active.state in FINAL_STATES:
        st.active_job, st.stage, st.progress = msg.job, "queued", 0.0
    save_record(item)
    if item.cancel_asked:  # Cancel was pressed while it travelled
        sess.send(T.CANCEL, item.job)


def on_progress(st: PROMPTMESH_PG_state, sess: Session, msg: Message, kind: str) -> None:
    item = st.job(msg.job or "")
    if item is None:
        return
    step, total = int(msg.fields.get("step", 0)), int(msg.fields.get("total", 0))
    if item.state != "RUNNING":
        item.state, item.message = "RUNNING", ""
        save_record(item)
    item.step, item.total = step, total
    active = st.job(st.active_job)
    if msg.job != st.active_job and (active is None or active.state != "RUNNING"):
        st.active_job, st.stage, st.preview_step = item.job, "", 0  # the bar follows the job that runs
    if msg.job == st.active_job:
        stage = str(msg.fields.get("stage", ""))
        if stage != st.stage:
            st.stage, st.stage_started = stage, time.monotonic()
        if stage == Stage.DOWNLOADING and "total_bytes" in msg.fields:
            step, total = int(msg.fields.get("done_bytes", 0)), int(msg.fields.get("total_bytes") or 0)
        lo, hi = STAGE_SPANS.get(stage, (st.progress, st.progress))
        st.progress = lo + (hi - lo) * (step / total if total else 0.0)
        st.eta = (eta_text(time.monotonic() - st.stage_started, step, total) if stage in (Stage.OPTIMISING, Stage.TEXTURING)
                  else download_text(msg.fields) if stage == Stage.DOWNLOADING else "")


def download_text(fields: dict[str, Any]) -> str:
    """'0.42 of 2.60 GB' from the bytes a download event carries (older backends: step and total)."""
    done, total = fields.get("done_bytes", fields.get("step", 0)), fields.get("total_bytes", fields.get("total", 0))
    return f"{int(done) / 1e9:.2f} of {int(total) / 1e9:.2f} GB" if total else ""


def eta_text(elapsed: float, step: int, total: int) -> str:
    """'0:42 elapsed, about 2:10 left' from the step rate so far."""
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


def show_proxy(st: PROMPTMESH_PG_state, msg: Message) -> None:
    item = st.job(msg.job or "")
    if item is None or _begun_in.get(item.job) != _opened or item.target:  # another file's; or the object shows it
        return
    arrays = msg.arrays
    if arrays["vertices"].ndim == 2 and arrays["faces"].ndim == 2 and len(arrays["faces"]):
        try:
            proxy.update(bpy.context, arrays["vertices"], arrays["faces"], arrays["colors"])
        except PromptMeshError:  # inconsistent arrays: skip this one
            pass


def on_done(st: PROMPTMESH_PG_state, sess: Session, msg: Message, kind: str) -> None:
    item = st.job(msg.job or "")
    if item is None:
        return
    meta = msg.fields.get("meta")
    if isinstance(meta, dict) and isinstance(meta.get("vertices"), int) and isinstance(meta.get("faces"), int):
        size = result_bytes(meta["vertices"], meta["faces"], int(meta.get("texture_size") or 0))
        item.expect_bytes = min(size, 2**31 - 1)
    item.state = "FETCHING"
    save_record(item)
    fetch(sess, item)
    if msg.job == st.active_job:
        st.stage, st.progress, st.eta = "fetching", STAGE_SPANS["fetching"][0], ""


def on_result(st: PROMPTMESH_PG_state, sess: Session, msg: Message, kind: str) -> None:
    item = st.job(msg.job or "")
    if item is None or item.state == "DONE":
        return
    try:
        mesh = Mesh.from_arrays(msg.arrays)
    except PromptMeshError as exc:
        item.state, item.message = "FAILED", str(exc)
        save_record(item)
        ended(st, sess, item)
        return
    meta = msg.fields.get("meta") or {}
    try:
        files = job_files(item.job)
        write_npz(mesh, files.mesh)
        write_json(meta, files.meta)
    except OSError as exc:  # a full disk, a read-only folder: the job is done, its mesh not kept
        item.state, item.message = "FAILED", f"the result could not be saved in {user_root()}: {exc.strerror or exc}"
        with contextlib.suppress(OSError):  # the same disk may refuse this too; the panel has it anyway
            save_record(item)
        ended(st, sess, item)
        return
    item.state, item.message = "DONE", "; ".join(map(str, meta.get("warnings") or []))  # e.g. why it has no texture
    save_record(item)
    ended(st, sess, item)


def ended(st: PROMPTMESH_PG_state, sess: Session, item: Any) -> None:
    """A job of ours reached its end: the bar and proxy let go, the result goes into the scene
    it was started from, and a notice says so."""
    if item.job == st.active_job:
        end_proxy(sess)  # the result replaces it
        st.stage, st.eta = item.state.lower(), ""
        if item.state == "DONE":
            st.progress = 1.0
    if item.state == "DONE":
        st.say(f"done: {item.prompt}")
        settings, begun = bpy.context.scene.promptmesh, _begun_in.get(item.job, 0)
        if begun == _opened and settings.import_when_done:
            auto_import(st, item)
            return
        if begun and begun != _opened:  # this Blender session began it, in another file
            notify(f"PromptMesh: '{item.prompt}' is done; it was started in another file: import it from the Jobs list")
            return
        notify(f"PromptMesh: '{item.prompt}' is done")
    elif item.state == "FAILED":
        notify(f"PromptMesh: '{item.prompt}' failed: {item.message}", error=True)
    elif item.state == "CANCELLED":
        notify(f"PromptMesh: '{item.prompt}' cancelled")


def auto_import(st: PROMPTMESH_PG_state, item: Any) -> None:
    """Import as its own undo step: Ctrl+Z takes the object away and redo brings it back."""
    from .importer import import_job

    verb = "textured" if item.target else "imported"
    try:
        with in_a_window():
            name = import_job(bpy.context, item.job).name
    except Exception as exc:  # shown in the panel and the status bar, never as a traceback
        st.say(f"import failed: {exc}", error=True)
        notify(f"PromptMesh: '{item.prompt}' is done but its import failed: {exc}", error=True)
        return
    try:
        with in_a_window():
            bpy.ops.ed.undo_push(message=f"PromptMesh: {verb} {name}")
    except RuntimeError as exc:  # the object is there; only Ctrl+Z will not single it out
        print(f"PromptMesh: no undo step for the import of {name}: {exc}")
    notify(f"PromptMesh: '{item.prompt}' is done: {verb} {name}")


def on_error(st: PROMPTMESH_PG_state, sess: Session, msg: Message, kind: str) -> None:
    code, text = str(msg.fields.get("code", ErrorCode.INTERNAL)), str(msg.fields.get("message", "error"))
    if code == ErrorCode.VERSION:
        version_mismatch(st, "another version")
        return
    if code == ErrorCode.BUSY:  # a result is still on its way: it will arrive
        return
    item = find(st, msg.job or "") or find(st, msg.id)
    if kind == T.CANCEL and code != ErrorCode.CANCELLED:  # too late to cancel: the job goes on to its end
        st.say(f"cannot cancel: {text}", error=True)
        return
    if item is not None and kind != T.STATUS and item.state not in FINAL_STATES:
        item.state = "CANCELLED" if code == ErrorCode.CANCELLED else "FAILED"
        item.message = text
        if item.job:
            save_record(item)
        ended(st, sess, item)
    elif item is not None and kind == T.STATUS and code == ErrorCode.NOT_FOUND:
        item.state, item.message = "FAILED", "this backend does not know the job"
        save_record(item)
    if code == ErrorCode.CANCELLED:
        st.say(f"cancelled: {text}")
    else:  # what the user can change reads differently from a backend that failed
        st.say(f"{'cannot do that' if code in REFUSALS else 'backend error'}: {text}", error=True)


Handler = Callable[[PROMPTMESH_PG_state, Session, Message, str], None]
HANDLERS: dict[str, Handler] = {
    T.WELCOME: on_welcome, T.PONG: on_pong, T.STATUS: on_status, T.ACCEPTED: on_accepted, T.WATCHING: on_watching,
    T.PROGRESS: on_progress, T.PREVIEW: on_preview, T.PROXY: on_proxy, T.DONE: on_done, T.RESULT: on_result,
    T.ERROR: on_error}


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


# ---- files opened while jobs run ----------------------------------------------------------------
@bpy.app.handlers.persistent
def _after_load(*_: Any) -> None:
    """File > Open or New: results of jobs begun in the old file are not imported into this one
    (they wait in the Jobs list); the job list comes back from disk if Blender dropped it."""
    global _opened
    _opened += 1
    proxy.remove()
    start_timer()


def register() -> None:
    global _next_auto_connect
    _next_auto_connect = 0.0
    if _after_load not in bpy.app.handlers.load_post:
        bpy.app.handlers.load_post.append(_after_load)
    start_timer()  # history and connection come up by themselves


def release() -> None:
    """Everything register() or use created: timer, socket and context, preview icons."""
    global _previews
    stop_timer()
    disconnect()
    if _previews is not None:
        import bpy.utils.previews

        bpy.utils.previews.remove(_previews)
        _previews = None


def unregister() -> None:
    if _after_load in bpy.app.handlers.load_post:
        bpy.app.handlers.load_post.remove(_after_load)
    release()

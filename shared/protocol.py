"""The PromptMesh wire protocol: `[msgpack header, *raw frames]` over ZeroMQ.

The header is a msgpack map `{v, type, id, job?, ...fields}`; arrays travel as raw frames,
described in the header's `arrays` list as `{name, dtype, shape}` in frame order. `decode`
checks everything a peer sends and raises ProtocolError naming the field at fault.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from .errors import PromptMeshError
from .spec import JobSpec, SpecError
from .vocab import ErrorCode, MessageType

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
MAX_FRAME_BYTES = 256 * 1024 * 1024
MAX_ID_CHARS = 64
MAX_STATUS_LIMIT = 500
MAX_PRUNE_DAYS = 36500  # jobs a client may ask `status` for at once
DTYPES = ("uint8", "int32", "uint32", "float16", "float32")

T = MessageType
CLIENT_TYPES = (T.HELLO, T.PING, T.GENERATE, T.TEXTURE, T.IMAGE, T.CANCEL, T.STATUS, T.RESULT, T.PRUNE, T.WATCH, T.MODELS)
SERVER_TYPES = (T.WELCOME, T.PONG, T.ACCEPTED, T.CANCELLING, T.WATCHING, T.PROGRESS, T.PREVIEW, T.PROXY, T.DONE, T.RESULT,
                T.ERROR, T.STATUS, T.PRUNED, T.MODELS)
JOB_EVENTS = (T.PROGRESS, T.PREVIEW, T.PROXY, T.DONE, T.ERROR)  # what a job's listeners hear of it
ENDS = (T.DONE, T.ERROR)  # a job's last event

class ProtocolError(PromptMeshError):
    """A malformed or invalid message; `code` is one of the codes in errors.py. `msg_id` is the
    request's id when it could be read, so the error answers that request."""

    def __init__(self, message: str, field: str | None = None, code: str = ErrorCode.BAD_REQUEST) -> None:
        self.field, self.msg_id = field, ""
        super().__init__(f"{field}: {message}" if field else message, code)


def show(value: Any, limit: int = 40) -> str:
    """A short, flat description of an untrusted value for an error text: scalars quoted and
    cut to `limit` characters, containers only named (a deep one must not recurse)."""
    if value is None or isinstance(value, (bool, int, float)):
        text = repr(value)
    elif isinstance(value, (str, bytes)):
        text = repr(value[:limit])
    else:
        return f"a {type(value).__name__}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class Message:
    type: str
    id: str = ""
    job: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def encode(msg: Message) -> list[bytes]:
    """Frames for `msg`: the header first, then one frame per array (C order)."""
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": msg.type, "id": msg.id, **msg.fields}
    if msg.job is not None:
        header["job"] = msg.job
    frames: list[bytes] = []
    if msg.arrays:
        header["arrays"] = []
        for name, arr in msg.arrays.items():
            arr = np.ascontiguousarray(arr)
            if arr.dtype.name not in DTYPES:
                raise ProtocolError(f"dtype {arr.dtype.name} cannot travel; use one of {DTYPES}", name)
            header["arrays"].append({"name": name, "dtype": arr.dtype.name, "shape": list(arr.shape)})
            frames.append(arr.tobytes())
    return [msgpack.packb(header, use_bin_type=True), *frames]


def _str(value: Any, name: str, max_chars: int, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"expected text, got {type(value).__name__}", name)
    if len(value) > max_chars:
        raise ProtocolError(f"longer than {max_chars} characters", name)
    if not allow_empty and not value:
        raise ProtocolError("must not be empty", name)
    return value


def decode(frames: list[bytes], expect: tuple[str, ...] = CLIENT_TYPES) -> Message:
    """Parse and validate a multipart message whose type must be one of `expect`."""
    if not frames:
        raise ProtocolError("empty message", "header")
    raw = frames[0]
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}", "header")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_bin_len=0, max_ext_len=0)
    except Exception as exc:  # msgpack raises several unrelated types for bad bytes
        raise ProtocolError(f"not valid msgpack ({type(exc).__name__})", "header") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"expected a map, got {type(header).__name__}", "header")
    msg_id = header.get("id", "")
    try:
        return _decode_header(header, frames[1:], expect)
    except ProtocolError as exc:
        if isinstance(msg_id, str) and len(msg_id) <= MAX_ID_CHARS:
            exc.msg_id = msg_id
        raise


def _decode_header(header: dict, frames: list[bytes], expect: tuple[str, ...]) -> Message:
    version = header.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {show(version)} is not {PROTOCOL_VERSION}", "v", ErrorCode.VERSION)
    kind = header.get("type")
    if not isinstance(kind, str) or kind not in expect:
        raise ProtocolError(f"unknown message type {show(kind)}; expected one of {', '.join(expect)}", "type")
    msg_id = _str(header.get("id", ""), "id", MAX_ID_CHARS)
    job = header.get("job")
    if job is not None:
        job = _str(job, "job", MAX_ID_CHARS, allow_empty=False)
    arrays = _decode_arrays(header.get("arrays", []), frames)
    fields = {k: v for k, v in header.items() if k not in ("v", "type", "id", "job", "arrays")}
    msg = Message(kind, msg_id, job, fields, arrays)
    if expect is CLIENT_TYPES:
        _validate_client(msg)
    return msg


SURFACE_ARRAYS = {"vertices": ("float32",), "faces": ("int32", "uint32"), "uvs": ("float32",)}  # uvs optional


def _check_surface_arrays(arrays: dict[str, np.ndarray]) -> None:
    """The arrays of a texture job: names and dtypes here; the geometry is the server's to check
    (shared.surface.check_surface, with its own face limit)."""
    for name in ("vertices", "faces"):
        if name not in arrays:
            raise ProtocolError("is required for a texture job", f"arrays.{name}")
    for name, arr in arrays.items():
        if name not in SURFACE_ARRAYS:
            raise ProtocolError(f"is not a mesh array ({', '.join(SURFACE_ARRAYS)})", f"arrays.{name}")
        if arr.dtype.name not in SURFACE_ARRAYS[name]:
            raise ProtocolError(f"must be {' or '.join(SURFACE_ARRAYS[name])}, got {arr.dtype.name}", f"arrays.{name}")


IMAGE_ARRAY = "image"  # the array an image job carries (a field name, not the message type of the same word)


def _check_image_arrays(arrays: dict[str, np.ndarray]) -> None:
    """The array of an image job: one `image`, uint8 [H, W, 4]; its size and foreground are the
    server's to check (shared.image.check_rgba)."""
    if IMAGE_ARRAY not in arrays:
        raise ProtocolError("is required for an image job", "arrays.image")
    extra = sorted(set(arrays) - {IMAGE_ARRAY})
    if extra:
        raise ProtocolError("is not an image job's array (image)", f"arrays.{extra[0]}")
    image = arrays[IMAGE_ARRAY]
    if image.dtype.name != "uint8" or image.ndim != 3 or image.shape[2] != 4:
        raise ProtocolError(f"must be uint8 [H, W, 4] (RGBA), got {image.dtype.name} {list(image.shape)}", "arrays.image")


def _decode_arrays(specs: Any, frames: list[bytes]) -> dict[str, np.ndarray]:
    if not isinstance(specs, list):
        raise ProtocolError("expected a list", "arrays")
    if len(specs) != len(frames):
        raise ProtocolError(f"{len(specs)} arrays described but {len(frames)} frames sent", "arrays")
    out = {}
    for i, (spec, frame) in enumerate(zip(specs, frames, strict=True)):
        where = f"arrays[{i}]"
        if not isinstance(spec, dict):
            raise ProtocolError("expected a map", where)
        name = _str(spec.get("name"), f"{where}.name", 32, allow_empty=False)
        dtype = spec.get("dtype")
        if dtype not in DTYPES:
            raise ProtocolError(f"dtype must be one of {DTYPES}", f"{where}.dtype")
        shape = spec.get("shape")
        if not isinstance(shape, list) or len(shape) > 4 or not all(type(n) is int and n >= 0 for n in shape):
            raise ProtocolError("expected up to 4 non-negative integers", f"{where}.shape")
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize  # Python integers: no overflow
        if len(frame) > MAX_FRAME_BYTES or nbytes != len(frame):
            raise ProtocolError(f"frame has {len(frame)} bytes, shape {shape} of {dtype} needs {nbytes}", where)
        out[name] = np.frombuffer(frame, dtype=dtype).reshape(shape)
    return out


def _validate_client(msg: Message) -> None:
    """Per-type checks of what a client may send; unknown fields are refused."""
    allowed: dict[str, tuple[str, ...]] = {T.HELLO: ("client", "protocol"), T.PING: (), T.CANCEL: (), T.STATUS: ("limit",),
                                           T.RESULT: (), T.PRUNE: ("days",), T.WATCH: (), T.MODELS: ()}
    if msg.type in (T.GENERATE, T.TEXTURE, T.IMAGE):
        try:
            msg.fields["spec"] = JobSpec.from_dict(msg.fields.pop("spec", None), image=msg.type == T.IMAGE)
        except SpecError as exc:
            raise ProtocolError(str(exc).split(": ", 1)[-1], f"spec.{exc.field}") from None
        except TypeError as exc:
            raise ProtocolError(str(exc), "spec") from None
        extra = set(msg.fields) - ({"spec", "elevation", "fov"} if msg.type == T.IMAGE else {"spec"})
    else:
        extra = set(msg.fields) - set(allowed[msg.type])
    if extra:  # keys may be text or (empty) bytes: sort their texts
        raise ProtocolError("is not a known field", min(show(k) for k in extra))
    if msg.type in (T.CANCEL, T.RESULT, T.WATCH) and msg.job is None:
        raise ProtocolError("is required", "job")
    if msg.type == T.TEXTURE:
        _check_surface_arrays(msg.arrays)
    elif msg.type == T.IMAGE:
        _check_image_arrays(msg.arrays)
    elif msg.arrays:
        raise ProtocolError("clients send no arrays but a texture job's mesh and an image job's image", "arrays")
    if msg.type == T.HELLO and "client" in msg.fields:
        _str(msg.fields["client"], "client", 128)
    if msg.type == T.PRUNE:
        days = msg.fields.get("days")
        if not isinstance(days, (int, float)) or isinstance(days, bool) or not 0 <= days <= MAX_PRUNE_DAYS:
            raise ProtocolError(f"must be a number of days from 0 to {MAX_PRUNE_DAYS}, got {show(days)}", "days")
    if msg.type == T.STATUS and "limit" in msg.fields:
        limit = msg.fields["limit"]
        if type(limit) is not int or not 1 <= limit <= MAX_STATUS_LIMIT:
            raise ProtocolError(f"must be an integer from 1 to {MAX_STATUS_LIMIT}, got {show(limit)}", "limit")

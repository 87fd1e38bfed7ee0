"""A generation result on disk and on the wire: the mesh arrays and their names, the job id, the
job folder layout, and the one way every PromptMesh file is written (atomically).

Torch-free: the server, the CLI, `promptmesh export` and the Blender add-on all use it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import numpy as np

from .errors import PromptMeshError
from .vocab import ErrorCode

MESH_ARRAYS = ("vertices", "faces", "colors", "normals")
TEXTURE_ARRAYS = ("uvs", "texture")  # optional, together: a baked base-colour texture
JOB_ID = re.compile(r"[0-9a-f]{16}")  # what new_job_id() makes
FILE_MODE = 0o644  # every file we write: readable like any file the user makes; the folder guards privacy
TMP_SUFFIX = ".tmp"


def new_job_id() -> str:
    """The first 16 hex digits of a uuid4: short enough to type, unique enough for one server."""
    return uuid.uuid4().hex[:16]


@dataclass
class Mesh:
    """A triangle mesh in the backend's world (Z up, front -Y); colours are display sRGB."""

    vertices: np.ndarray  # [V, 3] float32
    faces: np.ndarray  # [F, 3] int32, counter-clockwise seen from outside
    colors: np.ndarray  # [V, 3] float32 in [0, 1], sRGB
    normals: np.ndarray  # [V, 3] float32, unit, outward
    uvs: np.ndarray | None = None  # [V, 2] float32 in [0, 1], origin at the texture's bottom left
    texture: np.ndarray | None = None  # [H, W, 3] uint8 sRGB base colour, row 0 at the top (v = 1)

    @property
    def counts(self) -> dict[str, int]:
        return {"vertices": int(len(self.vertices)), "faces": int(len(self.faces))}

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays by name, as they travel in a `result` message and in mesh.npz."""
        names = MESH_ARRAYS + (TEXTURE_ARRAYS if self.texture is not None else ())
        return {name: getattr(self, name) for name in names}

    def without_texture(self) -> Mesh:
        return replace(self, uvs=None, texture=None)

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> Mesh:
        """A mesh from named arrays (a message's frames, an npz); PromptMeshError if one is missing
        or the shapes disagree."""
        missing = [name for name in MESH_ARRAYS if name not in arrays]
        if missing:
            raise PromptMeshError(f"the result lacks the array(s) {', '.join(missing)}", ErrorCode.BAD_REQUEST)
        v = np.asarray(arrays["vertices"], np.float32)
        f = np.asarray(arrays["faces"], np.int32)
        c = np.asarray(arrays["colors"], np.float32)
        n = np.asarray(arrays["normals"], np.float32)
        if v.ndim != 2 or v.shape[1] != 3 or f.ndim != 2 or f.shape[1] != 3 or c.shape != v.shape or n.shape != v.shape:
            raise PromptMeshError(f"inconsistent mesh arrays: vertices {v.shape}, faces {f.shape}, colors {c.shape}, "
                                  f"normals {n.shape}", ErrorCode.BAD_REQUEST)
        if not any(name in arrays for name in TEXTURE_ARRAYS):
            return cls(v, f, c, n)
        if not all(name in arrays for name in TEXTURE_ARRAYS):
            raise PromptMeshError("the result has one of uvs and texture without the other", ErrorCode.BAD_REQUEST)
        uv = np.asarray(arrays["uvs"], np.float32)
        tex = np.asarray(arrays["texture"])
        if uv.shape != (len(v), 2) or tex.dtype != np.uint8 or tex.ndim != 3 or tex.shape[2] != 3 or 0 in tex.shape:
            raise PromptMeshError(f"inconsistent texture arrays: uvs {uv.shape} for {len(v)} vertices, texture "
                                  f"{tex.shape} {tex.dtype} (expected [H, W, 3] uint8)", ErrorCode.BAD_REQUEST)
        return cls(v, f, c, n, uv, tex)


def proxy_arrays(mesh: Mesh) -> dict[str, np.ndarray]:
    """A coarse mesh as a `proxy` message carries it: float16 positions, uint8 sRGB colours."""
    return {"vertices": mesh.vertices.astype(np.float16), "faces": mesh.faces.astype(np.int32),
            "colors": np.round(np.clip(mesh.colors, 0, 1) * 255).astype(np.uint8)}


# ---- writing files ------------------------------------------------------------------------
def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform opens folders (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_target(path: str | Path) -> Iterator[Path]:
    """A temporary file name beside `path` (same extension) for a writer to fill; on success it is
    fsynced, renamed over `path` and the folder fsynced: readers never see half a file, and a
    power loss cannot leave a renamed but empty one. On failure the temporary is removed."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX + path.suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write(path: str | Path, data: bytes | Callable[[IO[bytes]], Any]) -> Path:
    """Write `data` (bytes, or a function writing to a binary file) atomically (atomic_target)."""
    with atomic_target(path) as tmp, open(tmp, "wb") as f:
        if callable(data):
            data(f)
        else:
            f.write(data)
    return Path(path)


def atomic_folder(path: str | Path, save: Callable[[Path], Any]) -> Path:
    """A folder written by `save(folder)` (e.g. a library's save_pretrained) appears whole at
    `path`: saved beside it, then renamed in place of the old one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX))
    old = path.with_name(f".{path.name}.old{TMP_SUFFIX}")
    try:
        save(tmp)
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(path.parent)
    return path


def remove_temporaries(folder: Path) -> list[Path]:
    """Delete what an interrupted atomic_write left in `folder` (found at start-up)."""
    stale = [p for p in folder.glob(f".*{TMP_SUFFIX}*") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def write_json(data: Any, path: str | Path) -> Path:
    return atomic_write(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def write_npz(mesh: Mesh, path: str | Path) -> Path:
    return atomic_write(path, lambda f: np.savez(f, **mesh.arrays))


def read_npz(path: str | Path) -> Mesh:
    with np.load(path) as data:
        return Mesh.from_arrays({k: data[k] for k in data.files})


# ---- job folders --------------------------------------------------------------------------
@dataclass(frozen=True)
class JobFiles:
    """The files of one job under `ROOT/jobs/<id>/`: the server's data directory and the add-on's
    user folder share this layout."""

    folder: Path

    @classmethod
    def of(cls, root: str | Path, job: str) -> JobFiles:
        """The job's folder under `root`; a string that is no job id is refused (never a path)."""
        if not isinstance(job, str) or not JOB_ID.fullmatch(job):
            raise PromptMeshError(f"not a job id: {str(job)[:40]!r} (job ids are 16 hex digits)", ErrorCode.NOT_FOUND)
        return cls(jobs_root(root) / job)

    @property
    def id(self) -> str:
        return self.folder.name

    mesh = property(lambda self: self.folder / "mesh.npz")  # the arrays, what `result` sends
    meta = property(lambda self: self.folder / "meta.json")  # prompt, seed, model, recipe, timings
    glb = property(lambda self: self.folder / "mesh.glb")
    ply = property(lambda self: self.folder / "mesh.ply")
    checkpoint = property(lambda self: self.folder / "checkpoint.pt")
    surface = property(lambda self: self.folder / "surface.npz")  # a texture job's mesh to paint, as given
    reference = property(lambda self: self.folder / "reference.npz")  # an image job's image and camera, as checked
    record = property(lambda self: self.folder / "job.json")  # the add-on's history entry


def jobs_root(root: str | Path) -> Path:
    return Path(root) / "jobs"

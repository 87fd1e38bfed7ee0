"""The torch-free shared code: result files, the job folder layout, and the protocol's limits."""

from __future__ import annotations

import os

import msgpack
import numpy as np
import pytest

from promptmesh.shared import protocol as P
from promptmesh.shared.errors import PromptMeshError
from promptmesh.shared.result import (
    FILE_MODE,
    JobFiles,
    Mesh,
    atomic_folder,
    atomic_target,
    atomic_write,
    new_job_id,
    read_npz,
    remove_temporaries,
    write_npz,
)


def mesh() -> Mesh:
    v = np.random.default_rng(0).random((5, 3), dtype=np.float32)
    return Mesh(v, np.array([[0, 1, 2], [2, 3, 4]], np.int32), v[:, ::-1].copy(), v / np.linalg.norm(v, axis=1)[:, None])


def test_mesh_round_trips_through_npz_and_message_arrays(tmp_path):
    m = mesh()
    back = read_npz(write_npz(m, tmp_path / "mesh.npz"))
    again = Mesh.from_arrays(P.decode(P.encode(P.Message("result", "r", fields={}, arrays=m.arrays)),
                                      P.SERVER_TYPES).arrays)
    for other in (back, again):
        for name, array in m.arrays.items():
            assert np.array_equal(getattr(other, name), array)
    assert (tmp_path / "mesh.npz").stat().st_mode & 0o777 == FILE_MODE


def test_mesh_from_arrays_names_what_is_missing_or_inconsistent():
    arrays = mesh().arrays
    with pytest.raises(PromptMeshError, match="normals"):
        Mesh.from_arrays({k: v for k, v in arrays.items() if k != "normals"})
    with pytest.raises(PromptMeshError, match="inconsistent"):
        Mesh.from_arrays({**arrays, "colors": arrays["colors"][:3]})


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "meta.json"
    atomic_write(target, b"old")

    def crash(f):
        f.write(b"half of the new")
        raise RuntimeError("disk pulled out")

    with pytest.raises(RuntimeError):
        atomic_write(target, crash)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["meta.json"]


def test_atomic_target_keeps_the_extension_for_writers_that_need_it(tmp_path):
    with atomic_target(tmp_path / "video.mp4") as tmp:
        assert tmp.suffix == ".mp4" and tmp.parent == tmp_path and tmp.name.startswith(".video.mp4.")
        tmp.write_bytes(b"frames")
    assert (tmp_path / "video.mp4").read_bytes() == b"frames" and len(os.listdir(tmp_path)) == 1


def test_atomic_folder_replaces_a_folder_whole(tmp_path):
    (tmp_path / "prior").mkdir()
    (tmp_path / "prior" / "old.bin").write_bytes(b"old")
    atomic_folder(tmp_path / "prior", lambda folder: (folder / "new.bin").write_bytes(b"new"))
    assert os.listdir(tmp_path / "prior") == ["new.bin"] and os.listdir(tmp_path) == ["prior"]


def test_remove_temporaries_finds_what_interrupted_writes_left(tmp_path):
    (tmp_path / "mesh.glb").write_bytes(b"whole")
    (tmp_path / ".mesh.npz.k2j3.tmp").write_bytes(b"half")
    (tmp_path / ".video.mp4.x9.tmp.mp4").write_bytes(b"half")
    assert {p.name for p in remove_temporaries(tmp_path)} == {".mesh.npz.k2j3.tmp", ".video.mp4.x9.tmp.mp4"}
    assert os.listdir(tmp_path) == ["mesh.glb"]


def test_job_files_accept_only_job_ids(tmp_path):
    job = new_job_id()
    files = JobFiles.of(tmp_path, job)
    assert files.folder == tmp_path / "jobs" / job and files.mesh.name == "mesh.npz" and files.id == job
    for bad in ("../../etc", "0" * 32, "ABCDEF0123456789", "", 5):
        with pytest.raises(PromptMeshError, match="not a job id"):
            JobFiles.of(tmp_path, bad)


def test_error_texts_quote_untrusted_values_flat_and_short():
    deep: list = []
    for _ in range(500):  # msgpack packs at most 512 levels
        deep = [deep]
    assert P.show(deep) == "a list" and P.show({"a": deep}) == "a dict"
    assert len(P.show("x" * 10_000)) <= 40 and P.show(None) == "None"
    with pytest.raises(P.ProtocolError) as info:
        P.decode([msgpack.packb({"v": deep, "type": "ping", "id": "q"})])
    assert info.value.msg_id == "q" and "a list" in str(info.value)


def test_array_sizes_are_computed_without_overflow():
    header = {"v": 1, "type": "ping", "id": "a", "arrays": [{"name": "x", "dtype": "float32", "shape": [2**62, 4]}]}
    with pytest.raises(P.ProtocolError, match="needs 73786976294838206464"):
        P.decode([msgpack.packb(header), b""])

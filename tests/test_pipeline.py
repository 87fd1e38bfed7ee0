"""pipeline.run: events, cancellation and checkpoint/resume."""

import json
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch

from helpers import cancel_at_step
from promptmesh.backend.guidance.loading import model_card
from promptmesh.backend.pipeline import (
    PROXY_MAX_FACES,
    Cancelled,
    PreviewEvent,
    ProxyEvent,
    ResultEvent,
    StageEvent,
    StepEvent,
    cached_guidance,
    run,
)
from promptmesh.backend.recipe import Recipe, resolve
from promptmesh.shared.errors import PromptMeshError
from promptmesh.shared.spec import JobSpec
from promptmesh.shared.vocab import ErrorCode


def with_recipe(monkeypatch, tiny_sd, **changes) -> None:
    """The loaded tiny pipeline's card with its recipe changed, for this test only."""
    guidance = cached_guidance(str(tiny_sd), "cpu")
    monkeypatch.setattr(guidance, "card", replace(guidance.card, recipe=replace(guidance.card.recipe, **changes)))


def spec(tiny_sd, **kw):
    return JobSpec(**{"prompt": "a blue sphere", "model": str(tiny_sd), "steps": 6, "resolution": 32,
                      "mesh_resolution": 40, **kw})


def test_events_arrive_in_order(tiny_sd):
    events = []
    result = run(spec(tiny_sd, preview_every=3), events.append)
    stages = [e.stage for e in events if isinstance(e, StageEvent)]
    assert stages == ["loading", "optimising", "meshing", "done"]
    steps = [e.step for e in events if isinstance(e, StepEvent)]
    assert steps == [1, 2, 3, 4, 5, 6]
    previews = [e for e in events if isinstance(e, PreviewEvent)]
    assert [p.step for p in previews] == [3, 6]
    assert previews[0].rgba.shape == (64, 64, 4) and previews[0].rgba.dtype == np.uint8
    assert isinstance(events[-1], ResultEvent) and events[-1].result is result
    assert result.metadata["faces"] == len(result.mesh.faces)


def test_the_result_records_the_resolved_recipe(tiny_sd):
    job = spec(tiny_sd, guidance_scale=7.5)
    result = run(job)
    recorded = Recipe.from_dict(json.loads(json.dumps(result.metadata["recipe"])))
    assert recorded == resolve(model_card(str(tiny_sd)), job) == result.nerf.ctx.recipe
    assert (recorded.schedule.steps, recorded.resolution, recorded.guidance_scale, recorded.mesh.resolution) == (6, 32, 7.5, 40)


def test_cancel_stops_within_a_step(tiny_sd):
    cancel = threading.Event()
    seen = []

    def on_event(e):
        if isinstance(e, StepEvent):
            seen.append(e.step)
            if e.step == 2:
                cancel.set()

    with pytest.raises(Cancelled):
        run(spec(tiny_sd), on_event, cancel=cancel)
    assert seen == [1, 2]


def test_resume_from_a_checkpoint_matches_an_uninterrupted_run(tiny_sd, tmp_path):
    full = run(spec(tiny_sd))
    ckpt = tmp_path / "job.ckpt.pt"
    cancel_at_step(spec(tiny_sd), 4, ckpt)
    assert [m["step"] for m in torch.load(ckpt, weights_only=False)["stages"]] == [4]
    resumed_steps = []
    resumed = run(spec(tiny_sd), lambda e: isinstance(e, StepEvent) and resumed_steps.append(e.step),
                  checkpoint=ckpt, checkpoint_every=2, resume=True)
    assert resumed_steps == [5, 6]
    assert np.array_equal(resumed.mesh.vertices, full.mesh.vertices)
    assert not ckpt.exists()


def test_resume_under_another_recipe_is_refused_naming_the_setting(tiny_sd, tmp_path, monkeypatch):
    def with_steps(steps):
        base = model_card(str(tiny_sd)).recipe
        with_recipe(monkeypatch, tiny_sd, schedule=replace(base.schedule, steps=steps))

    job = JobSpec(prompt="a blue sphere", model=str(tiny_sd), resolution=32, mesh_resolution=40)  # steps: the recipe's
    ckpt = tmp_path / "job.ckpt.pt"
    with_steps(6)
    cancel_at_step(job, 2, ckpt)
    with_steps(8)
    with pytest.raises(PromptMeshError, match=r"was made with a different recipe \(schedule\.steps: 6 -> 8\)") as err:
        run(job, checkpoint=ckpt, resume=True)
    assert err.value.code == ErrorCode.BAD_REQUEST
    assert torch.load(ckpt, weights_only=False)["stages"][0]["step"] == 2  # refused, left as it was


@pytest.mark.slow
def test_proxies_arrive_while_it_optimises_coarse_and_changing(tiny_sd):
    events = []
    run(spec(tiny_sd, steps=150, resolution=16, proxy_every=0.01), events.append)  # as often as 5 % of the time allows
    proxies = [e for e in events if isinstance(e, ProxyEvent)]
    assert len(proxies) >= 3
    assert all(0 < len(p.mesh.faces) <= PROXY_MAX_FACES for p in proxies)
    assert [p.step for p in proxies] == sorted({p.step for p in proxies})
    meshing = next(i for i, e in enumerate(events) if isinstance(e, StageEvent) and e.stage == "meshing")
    assert all(events.index(p) < meshing for p in proxies)  # only while it optimises


def test_no_proxies_unless_asked(tiny_sd):
    events = []
    run(spec(tiny_sd, steps=20), events.append)
    assert not any(isinstance(e, ProxyEvent) for e in events)


def test_the_result_records_which_weights_made_it(tiny_sd):
    import hashlib

    result = run(spec(tiny_sd, steps=2))
    weights = result.metadata["weights"]
    assert weights["source"] == str(tiny_sd.resolve())
    unet = next(p for p in (tiny_sd / "unet").iterdir() if p.suffix == ".safetensors")
    assert weights["sha256"][f"unet/{unet.name}"] == hashlib.sha256(unet.read_bytes()).hexdigest()
    assert {k.split("/")[0] for k in weights["sha256"]} == {"unet", "vae", "text_encoder"}


def test_refinement_stage_follows_the_nerf_and_resumes_after_it(tiny_sd, tmp_path, monkeypatch):
    """Refining counts on from the NeRF's steps; the NeRF's last state is checkpointed, so a job
    cancelled while refining resumes at the refinement, not at step 1."""
    small = replace(model_card(str(tiny_sd)).recipe.refine, resolution=64, grid=24)  # not 512 px on a CPU
    with_recipe(monkeypatch, tiny_sd, refine=small)
    events = []
    job = spec(tiny_sd, refine_steps=4, preview_every=2)
    result = run(job, events.append)
    assert [e.stage for e in events if isinstance(e, StageEvent)] == ["loading", "optimising", "refining", "meshing", "done"]
    steps = [(e.step, e.total, e.stage) for e in events if isinstance(e, StepEvent)]
    assert steps == [(i, 10, "optimising") for i in range(1, 7)] + [(i, 10, "refining") for i in range(7, 11)]
    assert [e.step for e in events if isinstance(e, PreviewEvent)] == [2, 4, 6, 8, 10]
    assert result.metadata["refine_steps"] == 4 and result.metadata["timings"]["refining_seconds"] > 0
    assert result.metadata["recipe"]["refine"]["steps"] == 4 and len(result.mesh.faces) > 0

    ckpt, cancel, seen = tmp_path / "job.ckpt.pt", threading.Event(), []

    def cancel_when_refining(e):
        if isinstance(e, StepEvent):
            seen.append(e.step)
            if e.stage == "refining":
                cancel.set()

    with pytest.raises(Cancelled):
        run(job, cancel_when_refining, cancel=cancel, checkpoint=ckpt, checkpoint_every=100)
    assert ckpt.exists() and seen[-1] == 7
    resumed = []
    run(job, resumed.append, checkpoint=ckpt, resume=True)
    assert [e.step for e in resumed if isinstance(e, StepEvent)] == [7, 8, 9, 10]
    assert not ckpt.exists()

    # The mesh stage checkpoints too: cancelled after a checkpoint inside it, the job resumes
    # there and ends as the uninterrupted run did (its last step tunes the NeRF's colour).
    cancel_at_step(job, 9, ckpt)
    assert [m["step"] for m in torch.load(ckpt, weights_only=False)["stages"]] == [6, 2]
    resumed = []
    again = run(job, resumed.append, checkpoint=ckpt, checkpoint_every=2, resume=True)
    assert [e.step for e in resumed if isinstance(e, StepEvent)] == [9, 10]
    # Bit-equal on one thread; on several the rasteriser's scatter-adds round in any order (two
    # uninterrupted runs differ by 3e-7 on two threads).
    assert np.allclose(again.mesh.vertices, result.mesh.vertices, atol=1e-5)
    assert np.allclose(again.mesh.colors, result.mesh.colors, atol=1e-4)


def run_job_in(folder, job_spec) -> tuple:
    """A job run as the server's worker runs it: (its terminal message, its files)."""
    from promptmesh.backend.executors.jobs import run_job
    from promptmesh.shared.protocol import SERVER_TYPES, decode
    from promptmesh.shared.result import JobFiles

    files = JobFiles(folder / ("0" * 16))
    files.folder.mkdir(parents=True)
    frames = run_job(files.id, job_spec, files, threading.Event(), lambda frames: None, threading.Event(), threads=1)
    return decode(frames, SERVER_TYPES), files


def test_a_jobs_result_gains_a_baked_texture(tiny_sd, tmp_path):
    from promptmesh.shared.result import read_json, read_npz

    msg, files = run_job_in(tmp_path, spec(tiny_sd, texture_size=64))
    assert msg.type == "done", msg.fields
    mesh = read_npz(files.mesh)
    assert mesh.texture.shape == (64, 64, 3) and mesh.uvs.shape == (len(mesh.vertices), 2)
    assert 0 <= mesh.uvs.min() and mesh.uvs.max() <= 1 and mesh.texture.std() > 0  # not one flat colour
    meta = read_json(files.meta)
    assert (meta["texture_size"], meta["recipe"]["mesh"]["texture_size"], meta["warnings"]) == (64, 64, [])
    assert meta["vertices"] == len(mesh.vertices)  # counted after the seams split vertices
    assert b"baseColorTexture" in files.glb.read_bytes()


def test_a_failed_bake_leaves_the_job_done_with_its_vertex_colours(tiny_sd, tmp_path, monkeypatch):
    from promptmesh.backend import texture
    from promptmesh.shared.result import read_json, read_npz

    def crash(mesh, size):
        raise texture.TextureError("the UV unwrapper (xatlas) crashed (signal 11) on this mesh")

    monkeypatch.setattr(texture, "atlas", crash)
    msg, files = run_job_in(tmp_path, spec(tiny_sd, texture_size=64))
    assert msg.type == "done", msg.fields
    mesh = read_npz(files.mesh)
    assert mesh.texture is None and mesh.uvs is None and len(mesh.faces) and mesh.colors.shape == mesh.vertices.shape
    meta = read_json(files.meta)
    assert meta["texture_size"] == 0 and "crashed (signal 11)" in meta["warnings"][0]
    assert b"baseColorTexture" not in files.glb.read_bytes()


def test_texture_size_zero_bakes_nothing(tiny_sd, monkeypatch):
    from promptmesh.backend import texture

    monkeypatch.setattr(texture, "atlas", lambda *a: pytest.fail("baked although the texture is off"))
    result = run(spec(tiny_sd, texture_size=0))
    assert result.mesh.texture is None and result.metadata["texture_size"] == 0

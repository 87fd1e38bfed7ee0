"""Image to 3D: the image and its foreground checked (shared/image.py), the reference camera and
recentring, the Magic123-style stage end to end with the embedded prior and tiny Stable
Diffusion, the CLI's refusals and the server's image request."""

from __future__ import annotations

import json
import math
import signal

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import ServerProcess, cancel_at_step, promptmesh, small_spec, wait_for, wait_for_id
from promptmesh.backend.cameras import CameraRanges, make_cameras
from promptmesh.backend.framing import frame_share, recentre, reference_camera, reference_distance
from promptmesh.backend.pipeline import PreviewEvent, StageEvent, run
from promptmesh.backend.prior.data import render_primitives
from promptmesh.backend.prior.shapes import PALETTE
from promptmesh.shared.client import Client
from promptmesh.shared.image import ImageError, Reference, border_matte, check_camera, check_rgba, foreground_rgba, read_image
from promptmesh.shared.spec import JobSpec
from promptmesh.shared.vocab import ErrorCode, MessageType, Stage


def rendered(name: str = "duck", color: str = "yellow", elevation: float = 0.0, size: int = 96) -> np.ndarray:
    """RGB uint8 of our own renderer's image of `name` from the front, on white."""
    one = lambda v: torch.tensor([float(v)])  # noqa: E731
    cams = make_cameras(one(elevation), one(0.0), one(2.15), one(42.5))
    img = render_primitives([name], torch.tensor([PALETTE[color]]), cams, size)[0]
    return (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def disc_rgba(size: int = 64, radius: float = 0.3) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    inside = (xx - size / 2) ** 2 + (yy - size / 2) ** 2 < (radius * size) ** 2
    rgba = np.full((size, size, 4), 255, np.uint8)
    rgba[inside, :3] = (200, 30, 30)
    rgba[..., 3] = np.where(inside, 255, 0)
    return rgba


# ---- checks (torch-free, shared) -------------------------------------------------------------
@pytest.mark.parametrize("rgba, complaint", [
    (np.zeros((64, 64, 4), np.float32), "must be uint8 [H, W, 4]"),
    (np.zeros((64, 64, 3), np.uint8), "must be uint8 [H, W, 4]"),
    (np.zeros((16, 64, 4), np.uint8), "its height is 16 pixels"),
    (np.zeros((64, 64, 4), np.uint8), "covers 0.0% of it, too small"),
    (np.full((64, 64, 4), 255, np.uint8), "the whole frame"),
])
def test_a_bad_image_is_refused_naming_what_is_wrong(rgba, complaint):
    with pytest.raises(ImageError, match=None) as exc:
        check_rgba(rgba)
    assert complaint in str(exc.value) and exc.value.code == ErrorCode.BAD_REQUEST


def test_the_border_matte_finds_a_render_on_white_and_refuses_a_busy_border():
    rgb = rendered()
    fg = border_matte(rgb)
    # the renderer's own silhouette: every pixel not pure background
    truth = np.abs(rgb.astype(int) - 255).sum(-1) > 0
    assert (fg & truth).sum() / (fg | truth).sum() > 0.95
    noise = np.random.default_rng(0).integers(0, 256, rgb.shape, dtype=np.uint8)
    with pytest.raises(ImageError, match="border is not one plain colour"):
        border_matte(noise)


def test_the_foreground_comes_from_a_mask_before_alpha_before_the_matte():
    rgb = rendered()
    alpha = np.zeros(rgb.shape[:2], np.uint8)
    alpha[20:60, 20:60] = 255
    mask = np.zeros(rgb.shape[:2], np.uint8)
    mask[10:30, 40:90] = 255
    assert np.array_equal(foreground_rgba(rgb, alpha, mask)[..., 3] > 0, mask > 0)
    assert np.array_equal(foreground_rgba(rgb, alpha)[..., 3] > 0, alpha > 0)
    opaque = np.full(rgb.shape[:2], 255, np.uint8)  # no transparency at all: the matte decides
    assert np.array_equal(foreground_rgba(rgb, opaque)[..., 3] > 0, border_matte(rgb))
    with pytest.raises(ImageError, match="mask: its size"):
        foreground_rgba(rgb, mask=mask[:50])


@pytest.mark.parametrize("elevation, fov, complaint", [
    (75.0, None, "elevation: must be"), (0.0, 5.0, "fov: must be"), ("0", None, "elevation"), (True, None, "elevation"),
])
def test_the_reference_camera_is_checked(elevation, fov, complaint):
    with pytest.raises(ImageError, match=complaint):
        check_camera(elevation, fov)
    assert check_camera(30, None) == (30.0, None)


def test_image_files_are_read_with_pillow_and_bad_ones_refused(tmp_path):
    rgba = disc_rgba(96)
    Image.fromarray(rgba).save(tmp_path / "disc.png")
    assert np.array_equal(read_image(str(tmp_path / "disc.png")), rgba)
    Image.fromarray(rgba[..., :3]).convert("CMYK").save(tmp_path / "cmyk.jpg")
    (tmp_path / "notes.png").write_text("not an image")
    Image.fromarray(rgba).resize((20, 20)).save(tmp_path / "small.png")
    for name, complaint in [("cmyk.jpg", "CMYK channels"), ("notes.png", "not an image Pillow can read"),
                            ("small.png", "its width is 20 pixels"), ("missing.png", "no file")]:
        with pytest.raises(ImageError, match=complaint):
            read_image(str(tmp_path / name))
    # an opaque photo with a separate mask: the mask is the foreground
    Image.fromarray(rendered(size=96)).save(tmp_path / "photo.png")
    Image.fromarray(np.where(disc_rgba(96)[..., 3] > 0, 255, 0).astype(np.uint8)).save(tmp_path / "mask.png")
    got = read_image(str(tmp_path / "photo.png"), str(tmp_path / "mask.png"))
    assert np.array_equal(got[..., 3] > 0, disc_rgba(96)[..., 3] > 0)


def test_a_file_larger_than_travels_is_shrunk_with_its_mask_and_a_mask_of_another_size_refused(tmp_path):
    big = np.full((1000, 2500, 3), 255, np.uint8)
    big[200:800, 1000:1500] = (20, 20, 200)
    Image.fromarray(big).save(tmp_path / "big.png")
    mask = np.zeros((1000, 2500), np.uint8)
    mask[200:800, 1000:1250] = 255  # only the left half of the box
    Image.fromarray(mask).save(tmp_path / "mask.png")
    got = read_image(str(tmp_path / "big.png"), str(tmp_path / "mask.png"))
    assert got.shape == (819, 2048, 4)  # 2048 / 2500 of each side: one request carries at most 16 MB of it
    assert abs((got[..., 3] > 0).mean() - (mask > 0).mean()) < 0.002
    Image.fromarray(mask[:, :2000]).save(tmp_path / "narrow.png")
    with pytest.raises(ImageError, match="mask: its size 2000x1000 is not the image's 2500x1000"):
        read_image(str(tmp_path / "big.png"), str(tmp_path / "narrow.png"))


# ---- the reference camera and recentring ----------------------------------------------------------
def test_the_reference_camera_stands_at_the_front_framing_as_the_prior_does():
    ranges = CameraRanges()
    cam = reference_camera(ranges, 0.0, None)
    assert torch.allclose(cam.origins[0], torch.tensor([0.0, -2.15, 0.0]), atol=1e-5)  # azimuth 0: the front, -Y
    # a narrower lens stands further back so that the object spans the same share of the frame
    d = reference_distance(ranges, 20.0)
    assert math.isclose(0.55 / (d * math.tan(math.radians(10.0))), frame_share(ranges), rel_tol=1e-6)
    high = reference_camera(ranges, 30.0, 30.0)
    assert math.isclose(float(high.elevation[0]), 30.0) and high.origins[0, 2] > 0


def test_recentring_centres_the_foreground_and_scales_it_to_the_prior_framing():
    rgba = np.zeros((200, 300, 4), np.uint8)
    rgba[20:60, 30:110] = (10, 200, 10, 255)  # an 80 x 40 box off centre in a wide image
    rgb, mask = recentre(rgba, 64, 0.5)
    cols = np.nonzero(mask[0, 0].numpy().max(0) > 0.5)[0]
    rows = np.nonzero(mask[0, 0].numpy().max(1) > 0.5)[0]
    assert abs(len(cols) - 32) <= 1 and abs(len(rows) - 16) <= 1  # the longer side is half the frame
    assert abs((cols.min() + cols.max()) / 2 - 31.5) <= 0.5 and abs((rows.min() + rows.max()) / 2 - 31.5) <= 0.5
    inside = mask[0, 0] > 0.99
    assert torch.allclose(rgb[0, :, inside], torch.tensor([10, 200, 10]).float()[:, None] / 255, atol=1e-3)


def lopsided_rgba(size: int = 64) -> np.ndarray:
    """A disc with a bar to its right, as a mug's body and handle: its box is not centred on it."""
    yy, xx = np.mgrid[:size, :size]
    inside = ((xx - 0.4 * size) ** 2 + (yy - size / 2) ** 2 < (0.2 * size) ** 2)
    inside |= (xx > 0.55 * size) & (xx < 0.8 * size) & (abs(yy - size / 2) < 0.04 * size)
    rgba = np.full((size, size, 4), 255, np.uint8)
    rgba[inside, :3] = (200, 30, 30)
    rgba[..., 3] = np.where(inside, 255, 0)
    return rgba


def test_the_reference_camera_moves_to_where_the_prior_centres_a_lopsided_object():
    """Recentring centres the disc-and-bar's box, so the disc sits left of the frame's centre
    while the field's first blob sits on the axis. The reference error's gradient moves the
    camera right (the blob then shows left), a step that way lowers the error, and the learnt
    move survives a checkpoint; without `offset_lr` the camera stays where it started."""
    from promptmesh.backend.pipeline import cached_guidance
    from promptmesh.backend.recipe import resolve
    from promptmesh.backend.stages import JobContext
    from promptmesh.backend.stages.reference import ReferenceNeRFModel

    guidance = cached_guidance("embedded", "cpu")
    reference = Reference(lopsided_rgba(), 0.0)

    def model(offset_lr: float) -> ReferenceNeRFModel:
        recipe = resolve(guidance.card, JobSpec(prompt="a red mug")).changed({"reference": {"offset_lr": offset_lr}})
        ctx = JobContext.create(guidance, guidance.embed_prompt("a red mug", ""), recipe, 0, torch.device("cpu"))
        return ReferenceNeRFModel(ctx, 0, reference)

    still = model(0.0)
    assert not still.offset.requires_grad
    moving = model(1e-3)
    assert len(moving.optimizer.param_groups) == len(still.optimizer.param_groups) + 1
    loss = moving.reference_loss()
    loss.backward()
    grad = moving.offset.grad
    assert grad is not None and grad[0] < 0 and abs(grad[0]) > abs(grad[2]), grad  # right, not up or down
    with torch.no_grad():
        moving.offset.copy_(torch.tensor([0.05, 0.0, 0.0]))
        assert moving.reference_loss() < loss
        assert torch.allclose(moving.reference_view.origins - moving.camera.origins, torch.tensor([[0.05, 0.0, 0.0]]))
    restored = model(1e-3)
    restored.load_state_dict(moving.state_dict())
    assert torch.equal(restored.offset, moving.offset)


# ---- end to end ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_embedded_prior_fits_the_reference_view_of_an_image_it_rendered():
    """A duck rendered by our renderer, no prompt: after a short run the reference camera sees
    the image's silhouette (what the mask term fits), and the previews show the image beside an
    orbit view."""
    from promptmesh.backend.renderer import render
    from promptmesh.backend.stages.reference import ReferenceNeRFModel

    reference = Reference(foreground_rgba(rendered()), 0.0)
    events: list = []
    models: list = []
    original = ReferenceNeRFModel.__init__

    def keep(self, *a, **k):  # the stage model, to look through its reference camera afterwards
        original(self, *a, **k)
        models.append(self)

    ReferenceNeRFModel.__init__ = keep  # type: ignore[method-assign]
    try:
        result = run(JobSpec(prompt="", steps=60, texture_size=0, mesh_resolution=32, preview_every=30, device="cpu"),
                     events.append, reference=reference, threads=1)
    finally:
        ReferenceNeRFModel.__init__ = original  # type: ignore[method-assign]
    model = models[0]
    with torch.no_grad():
        out = render(model.field, model.background, model.reference_view, 32, 32, occupancy=model.occupancy,
                     config=model.ctx.recipe.render)
    seen, truth = out.opacity[0, 0] > 0.5, model.mask[0, 0] > 0.5
    assert (seen & truth).sum() / (seen | truth).sum() > 0.6, float((seen & truth).sum() / (seen | truth).sum())
    previews = [e.rgba for e in events if isinstance(e, PreviewEvent)]
    assert len(previews) == 2 and previews[0].shape == (64, 128, 4)
    assert [e.stage for e in events if isinstance(e, StageEvent)][:2] == [Stage.LOADING, Stage.OPTIMISING]
    meta = result.metadata
    assert meta["prompt"] == "" and meta["reference"]["azimuth"] == 0.0 and meta["reference"]["elevation"] == 0.0
    assert meta["reference"]["offset"] == [round(v, 4) for v in model.offset.tolist()] != [0.0] * 3  # learnt, recorded
    assert any("name the object in the prompt" in w for w in meta["warnings"])
    assert len(result.mesh.faces) > 0


def test_tiny_stable_diffusion_makes_an_object_of_an_image_with_a_prompt(tiny_sd):
    events: list = []
    spec = JobSpec(prompt="a red ball", model=str(tiny_sd), steps=4, resolution=32, mesh_resolution=32, texture_size=0,
                   preview_every=2)
    result = run(spec, events.append, reference=Reference(disc_rgba(), 20.0, 30.0))
    previews = [e.rgba for e in events if isinstance(e, PreviewEvent)]
    assert [p.shape for p in previews] == [(64, 128, 4)] * 2
    assert result.metadata["reference"]["fov"] == 30.0 and result.metadata["stages"] == [Stage.OPTIMISING]


def test_an_image_job_resumes_its_checkpoint_only_with_the_same_image_and_camera(tiny_sd, tmp_path):
    from promptmesh.backend.pipeline import StepEvent
    from promptmesh.shared.errors import PromptMeshError

    spec = JobSpec(prompt="", model=str(tiny_sd), steps=6, resolution=32, mesh_resolution=32, texture_size=0)
    ckpt = tmp_path / "job.ckpt.pt"
    cancel_at_step(spec, 2, ckpt, reference=Reference(disc_rgba(), 10.0))
    for other in (Reference(disc_rgba(), 20.0), Reference(disc_rgba(radius=0.2), 10.0)):
        with pytest.raises(PromptMeshError, match="belongs to a different job"):
            run(spec, checkpoint=ckpt, resume=True, reference=other)
    steps: list[int] = []
    run(spec, lambda e: isinstance(e, StepEvent) and steps.append(e.step), checkpoint=ckpt, resume=True,
        reference=Reference(disc_rgba(), 10.0))
    assert steps == [3, 4, 5, 6]


def test_a_job_is_either_a_texture_or_an_image_job_and_only_an_image_job_may_lack_a_prompt():
    from promptmesh.backend.stages import Surface

    with pytest.raises(ValueError, match="not both"):
        run(JobSpec(prompt="x"), surface=Surface.checked(np.eye(3), np.array([[0, 1, 2]])), reference=Reference(disc_rgba()))
    with pytest.raises(Exception, match="prompt: is empty"):
        JobSpec(prompt="").validate()
    assert JobSpec(prompt="").validate(image=True).prompt == ""


# ---- the CLI and the server ----------------------------------------------------------------------
@pytest.mark.parametrize("make, args, fragment", [
    (None, ["--image", "missing.png"], "no file"),
    ("full", ["--image", "disc.png", "--mask", "white.png"], "the whole frame"),
    ("disc", ["--image", "disc.png", "--elevation", "80"], "elevation: must be"),
    (None, ["a red cube", "--mask", "m.png"], "--mask belongs to an image job"),
    (None, ["a red cube", "--novel-view", "zero123-xl"], "--novel-view belongs to an image job"),
    (None, [], "prompt: is empty"),
])
def test_the_cli_refuses_a_bad_image_job_in_one_line(make, args, fragment, tmp_path):
    if make is not None:
        Image.fromarray(disc_rgba()).save(tmp_path / "disc.png")
    if make == "full":  # a mask that calls everything the object
        Image.fromarray(np.full((64, 64), 255, np.uint8)).save(tmp_path / "white.png")
    before = set(tmp_path.iterdir())
    proc = promptmesh("generate", *args, "--steps", "1", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and fragment in errors[0], proc.stderr
    assert set(tmp_path.iterdir()) == before


def test_the_cli_says_at_the_start_that_an_image_job_without_a_prompt_guesses_its_unseen_sides(tmp_path):
    Image.fromarray(disc_rgba()).save(tmp_path / "disc.png")
    proc = promptmesh("generate", "--image", "disc.png", "--steps", "1", "--mesh-resolution", "32", "--texture-size", "0",
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    notes = [line for line in proc.stderr.splitlines() if line.startswith("note: no prompt")]
    assert len(notes) == 1 and proc.stderr.index(notes[0]) < proc.stderr.index("wrote ")
    assert any("no prompt" in w for w in json.loads((tmp_path / "disc.json").read_text())["warnings"])


@pytest.mark.slow
def test_an_image_job_travels_as_an_array_frame_and_a_bad_image_stores_nothing(tmp_path, tiny_sd):
    srv = ServerProcess(tmp_path / "data", models=tiny_sd.parent)
    try:
        with Client(srv.endpoint) as c:
            spec = small_spec(tiny_sd, prompt="", preview_every=2)
            for arrays, fields, complaint in [
                ({"image": disc_rgba()[..., :3].copy()}, {}, "must be uint8 [H, W, 4]"),
                ({"image": disc_rgba().astype(np.float32)}, {}, "must be uint8 [H, W, 4]"),
                ({"image": np.full((64, 64, 4), 255, np.uint8)}, {}, "the whole frame"),
                ({"image": disc_rgba()[:20].copy()}, {}, "its height is 20 pixels"),
                ({"image": disc_rgba()}, {"elevation": 90}, "elevation: must be"),
                ({"image": disc_rgba()}, {"zoom": 2}, "is not a known field"),
                ({}, {}, "arrays.image: is required"),
            ]:
                msg_id = c.send(MessageType.IMAGE, spec=spec, arrays=arrays, **fields)
                reply = next(m for m in wait_for_id(c, msg_id))
                assert reply.type == MessageType.ERROR and reply.fields["code"] == ErrorCode.BAD_REQUEST, reply.fields
                assert complaint in reply.fields["message"], reply.fields["message"]
            for bad, complaint in [({"novel_view": "/tmp"}, "does not offer the model '/tmp'"),
                                   ({"novel_view": 5}, "novel_view: must be")]:
                msg_id = c.send(MessageType.IMAGE, spec={**spec, **bad}, arrays={"image": disc_rgba()})
                reply = next(m for m in wait_for_id(c, msg_id))
                assert reply.type == MessageType.ERROR and complaint in reply.fields["message"], reply.fields
            msg_id = c.send(MessageType.GENERATE, spec={**spec, "prompt": "a ball", "novel_view": "zero123-xl"})
            reply = next(m for m in wait_for_id(c, msg_id))
            assert "novel_view: only an image job" in reply.fields["message"], reply.fields
            assert c.request(MessageType.STATUS).fields["jobs"] == []  # nothing stored for any of them
            assert not (srv.data_dir / "jobs").exists() or not list((srv.data_dir / "jobs").iterdir())

            job = c.request(MessageType.IMAGE, spec=spec, arrays={"image": disc_rgba()}, elevation=15.0).job
            events = wait_for(c, job)
            assert events[-1].type == MessageType.DONE, events[-1].fields
            assert events[-1].fields["meta"]["reference"]["elevation"] == 15.0
            previews = [m for m in events if m.type == MessageType.PREVIEW]
            assert previews and all(m.fields["w"] == 2 * m.fields["h"] for m in previews)
            with np.load(srv.data_dir / "jobs" / job / "reference.npz") as stored:
                assert np.array_equal(stored["image"], disc_rgba()) and float(stored["elevation"]) == 15.0

        # the CLI's submit sends the same request from a file, checked first as the server checks it
        Image.fromarray(disc_rgba()).save(tmp_path / "disc.png")
        proc = promptmesh("submit", "--image", str(tmp_path / "disc.png"), "--elevation", "10", "--endpoint", srv.endpoint,
                          "--model", tiny_sd.name, "--steps", "4", "--resolution", "16", "--device", "cpu", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "note: no prompt" in proc.stderr  # said before the job is sent, as generate says it
        with np.load(srv.data_dir / "jobs" / proc.stdout.split()[-1] / "reference.npz") as stored:
            assert np.array_equal(stored["image"], disc_rgba()) and float(stored["elevation"]) == 10.0
    finally:
        srv.stop(signal.SIGINT)



@pytest.mark.parametrize("name", ["duck", "mug"])
def test_the_front_judge_finds_where_an_objects_front_is(name):
    """The analytic object itself has its front where the image's is; turned a half or a quarter
    turn, it does not, and the judge says by how much it is turned."""
    from skimage.measure import marching_cubes

    from promptmesh.backend.prior.judge import judge_front
    from promptmesh.backend.prior.shapes import object_sdf
    from promptmesh.shared.result import Mesh

    n = 64
    axis = np.linspace(-1, 1, n, dtype=np.float32)
    points = torch.from_numpy(np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3))
    v, f, _, _ = marching_cubes(object_sdf(name, points).numpy().reshape(n, n, n), 0.0, spacing=(2 / (n - 1),) * 3)
    v = (v - 1).astype(np.float32)
    for turn in (0.0, 90.0, 180.0):
        a = math.radians(turn)
        rot = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]], np.float32)
        mesh = Mesh(v @ rot.T, f.astype(np.int32), np.full((len(v), 3), 0.5, np.float32), np.zeros_like(v))
        verdict = judge_front(mesh, name)
        assert verdict.right == (turn == 0.0) and verdict.iou > 0.8, (turn, verdict)
        assert abs((verdict.yaw - turn + 180) % 360 - 180) <= 5, (turn, verdict)

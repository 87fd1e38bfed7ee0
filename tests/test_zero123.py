"""Zero-1-to-3 (backend/guidance/zero123.py): the relative camera and the posed embedding, then
the novel-view prior loaded from a tiny random copy saved in the released checkpoints' diffusers
layout (tests/tiny_zero123.py): the camera, the image's embedding and latents each reach the
noise prediction and the unconditional row sees none of them, its distillation checked by hand,
and an image job that uses it."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import promptmesh
from promptmesh.backend.cameras import make_cameras
from promptmesh.backend.guidance import ModelLoadError, load_novel_view
from promptmesh.backend.guidance.loading import load_guidance, model_card
from promptmesh.backend.guidance.zero123 import NovelViewGuidance, PosedImageEmbedding, clip_pixels, relative_camera
from promptmesh.backend.models import CATALOGUE, sds_files
from promptmesh.backend.pipeline import run
from promptmesh.shared.image import Reference
from promptmesh.shared.spec import JobSpec, SpecError
from tiny_zero123 import save_tiny_zero123

WIDTH = 32


def test_the_relative_camera_is_polar_angle_sine_cosine_azimuth_and_radius():
    same = relative_camera(torch.tensor([20.0]), torch.tensor([30.0]), torch.tensor([2.0]), 20.0, 30.0, 2.0)
    assert torch.allclose(same, torch.tensor([[0.0, 0.0, 1.0, 0.0]]), atol=1e-6)
    right = relative_camera(torch.tensor([0.0]), torch.tensor([90.0]), torch.tensor([2.5]), 0.0, 0.0, 2.0)
    assert torch.allclose(right, torch.tensor([[0.0, 1.0, 0.0, 0.5]]), atol=1e-6)
    up = relative_camera(torch.tensor([30.0]), torch.tensor([0.0]), torch.tensor([2.0]), 0.0, 0.0, 2.0)
    assert math.isclose(float(up[0, 0]), -math.pi / 6, rel_tol=1e-6)  # raised 30 degrees: the polar angle shrinks
    around = relative_camera(torch.tensor([0.0]), torch.tensor([370.0]), torch.tensor([2.0]), 0.0, 0.0, 2.0)
    assert torch.allclose(around, relative_camera(torch.tensor([0.0]), torch.tensor([10.0]), torch.tensor([2.0]), 0.0, 0.0,
                                                  2.0), atol=1e-6)


def test_the_posed_embedding_starts_as_the_image_embedding_alone():
    posed = PosedImageEmbedding(WIDTH)
    e = torch.randn(3, WIDTH)
    cams = relative_camera(torch.tensor([0.0, 10, 40]), torch.tensor([0.0, 90, 200]), torch.tensor([2.0, 2, 3]))
    out = posed(e, cams)
    assert out.shape == (3, 1, WIDTH) and torch.allclose(out[:, 0], e, atol=1e-6)


# ---- the novel-view prior from a folder in the released layout ----------------------------------
@pytest.fixture(scope="module")
def zero123_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_zero123(tmp_path_factory.mktemp("models") / "tiny-zero123")


def cameras_at(elevation: list[float], azimuth: list[float], distance: list[float], fov: float):
    n = len(elevation)
    return make_cameras(torch.tensor(elevation), torch.tensor(azimuth), torch.tensor(distance), torch.full((n,), fov))


@torch.no_grad()
def test_the_camera_and_the_input_image_reach_the_noise_and_the_unconditional_row_sees_neither(zero123_folder):
    prior = NovelViewGuidance(str(zero123_folder))
    with torch.no_grad():  # a trained projection mixes the camera in strongly; the tiny random one barely
        prior.posed.proj.weight.add_(torch.randn_like(prior.posed.proj.weight) * 0.5)
    g = torch.Generator().manual_seed(1)
    emb = prior.embed_image(torch.rand(1, 3, 48, 48, generator=g), 0.0, 2.0, 40.0, 0.55)
    embeds, latents, pose, keep = emb.plain_rows(1)
    assert embeds.shape == (1, WIDTH)
    noisy, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])
    side, back = cameras_at([0.0], [90.0], [2.0], 40.0), cameras_at([0.0], [180.0], [2.0], 40.0)

    def eps(cameras, image_latents=latents, image_embeds=embeds, kept=keep):
        return prior.predict_noise(noisy, t, (image_embeds, image_latents, pose, kept), cameras)

    base = eps(side)
    assert base.shape == (1, 4, 8, 8) and torch.isfinite(base).all()
    assert not torch.allclose(base, eps(back), atol=1e-4)  # the relative camera matters
    assert not torch.allclose(base, eps(side, image_latents=latents + 1), atol=1e-4)  # so does the input's latent
    assert not torch.allclose(base, eps(side, image_embeds=embeds + 1), atol=1e-4)  # and its CLIP embedding
    # the unconditional row sees neither camera nor image
    dropped = keep * 0
    assert torch.allclose(eps(side, kept=dropped), eps(back, image_latents=latents + 1, kept=dropped), atol=1e-5)
    # the conditional row, as the UNet computes it from 8 channels and the posed token
    camera = relative_camera(torch.tensor([0.0]), torch.tensor([90.0]), torch.tensor([0.0]))
    direct = prior.unet(torch.cat([noisy, latents], 1), t, encoder_hidden_states=prior.posed(embeds, camera)).sample
    assert torch.allclose(base, direct, atol=1e-5)


@torch.no_grad()
def test_a_zero123_folder_loads_and_predicts_as_the_paper_conditions(zero123_folder):
    """Each view is told its camera relative to the reference (polar angle, azimuth, radius in
    the units of an object in a unit cube), the image's CLIP embedding through the released
    projection, and the image's unscaled latents on extra channels; a dropped row sees zeros."""
    prior = NovelViewGuidance(str(zero123_folder))
    assert prior.image_size == 64 and set(prior.weights["sha256"]) == {
        "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
        "image_encoder/model.safetensors", "clip_camera_projection/diffusion_pytorch_model.safetensors"}
    g = torch.Generator().manual_seed(3)
    image = torch.rand(1, 3, 40, 40, generator=g)
    emb = prior.embed_image(image, elevation=10.0, distance=2.0, fov=40.0, half_extent=0.55)
    # by hand: the reference's CLIP embedding and its VAE posterior's mode at the prior's size
    x = torch.nn.functional.interpolate(image, (64, 64), mode="bilinear", align_corners=False)
    embeds = prior.image_encoder(pixel_values=clip_pixels(x, 32)).image_embeds
    latents = prior.vae.encode(x * 2 - 1).latent_dist.mode()
    cams = cameras_at([40.0, 10.0], [90.0, -120.0], [2.2, 2.0], 40.0)
    noisy, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([300, 700])
    scale = 0.5 / 0.55
    rel = torch.tensor([[math.radians(-30.0), 1.0, 0.0, 0.2 * scale], [0.0, math.sin(math.radians(-120.0)),
                                                                        math.cos(math.radians(-120.0)), 0.0]])
    weight = prior.posed.proj.weight
    context = (torch.cat([embeds.expand(2, -1), rel], -1) @ weight.T + prior.posed.proj.bias)[:, None]
    want = prior.unet(torch.cat([noisy, latents.expand(2, -1, -1, -1)], 1), t, encoder_hidden_states=context).sample
    got = prior.predict_noise(noisy, t, emb.plain_rows(2), cams)
    assert torch.allclose(got, want, atol=1e-4)
    dropped = prior.unet(torch.cat([noisy, torch.zeros(2, 4, 8, 8)], 1), t,
                         encoder_hidden_states=torch.zeros(2, 1, 32)).sample
    assert torch.allclose(prior.predict_noise(noisy, t, emb.negative_rows(2), cams), dropped, atol=1e-5)
    # the same framing farther away at a narrower field of view is the same relative radius
    far = cameras_at([40.0], [90.0], [2.2 * math.tan(math.radians(20)) / math.tan(math.radians(12.5))], 25.0)
    assert torch.allclose(prior.predict_noise(noisy[:1], t[:1], emb.plain_rows(1), far), want[:1], atol=1e-4)


@torch.no_grad()
def test_distillation_through_zero123_is_the_one_sds_formula(zero123_folder):
    prior = NovelViewGuidance(str(zero123_folder))
    g = torch.Generator().manual_seed(4)
    emb = prior.embed_image(torch.rand(1, 3, 64, 64, generator=g), 0.0, 2.0, 40.0, 0.55)
    latents, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([200, 600])
    cams = cameras_at([20.0, 0.0], [45.0, 180.0], [2.0, 2.0], 40.0)
    grad = prior.sds_grad(latents, emb, cams, 5.0, t, noise)
    a = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    eps_u = prior.predict_noise(noisy, t, emb.negative_rows(2), cams)
    eps_c = prior.predict_noise(noisy, t, emb.plain_rows(2), cams)
    assert torch.allclose(grad, (1 - a) * (eps_u + 5.0 * (eps_c - eps_u) - noise), atol=1e-4)


def test_a_folder_that_is_not_zero123_is_refused_naming_what_it_lacks(zero123_folder, tiny_sd, tmp_path):
    with pytest.raises(ModelLoadError, match="image_encoder, clip_camera_projection"):
        load_novel_view(str(tiny_sd))
    renamed = tmp_path / "renamed"
    shutil.copytree(zero123_folder, renamed)
    from safetensors.torch import load_file, save_file

    weights = renamed / "clip_camera_projection" / "diffusion_pytorch_model.safetensors"
    save_file({k.replace("proj", "linear"): v for k, v in load_file(weights).items()}, str(weights))
    with pytest.raises(ModelLoadError, match="camera projection.*proj.weight"):
        load_novel_view(str(renamed))
    with pytest.raises(ModelLoadError, match="text prior, not a novel-view prior"):
        load_novel_view("sd21")
    with pytest.raises(ModelLoadError, match="zero123-xl is a novel-view prior for image jobs: pass it as --novel-view"):
        load_guidance("zero123-xl")
    with pytest.raises(ModelLoadError, match="--novel-view"):
        model_card("zero123-xl")


def test_the_catalogue_offers_zero123_xl_with_its_licence_and_fetches_only_what_it_loads(zero123_folder):
    entry = CATALOGUE["zero123-xl"]
    assert entry.novel_view and entry.licence.startswith("MIT") and entry.repos[0] == "bennyguo/zero123-xl-diffusers"
    assert not any("stable-zero123" in repo.lower() for repo in entry.repos)  # non-commercial: not offered
    listing = promptmesh("models")
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    line = next(i for i, text in enumerate(lines) if text.startswith("zero123-xl "))
    assert "licence MIT" in lines[line + 1] and not any("draft" in text for text in lines[line + 2:])  # no presets
    names = [p.relative_to(zero123_folder).as_posix() for p in zero123_folder.rglob("*") if p.is_file()]
    names += ["feature_extractor/preprocessor_config.json", "clip_camera_projection/zero123.py", "README.md"]
    assert sorted(sds_files(names, entry.weights)) == sorted([
        "model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
        "image_encoder/config.json", "image_encoder/model.safetensors", "clip_camera_projection/config.json",
        "clip_camera_projection/diffusion_pytorch_model.safetensors"])


def test_only_an_image_job_takes_a_novel_view_prior():
    with pytest.raises(SpecError, match="novel_view: only an image job"):
        JobSpec(prompt="a red cube", novel_view="zero123-xl").validate()
    with pytest.raises(SpecError, match="novel_view: must be"):
        JobSpec(prompt="", novel_view=" ").validate(image=True)
    assert JobSpec(prompt="", novel_view="zero123-xl").validate(image=True).novel_view == "zero123-xl"


def disc(size: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    inside = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.3 * size) ** 2
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[inside] = (200, 40, 30, 255)
    return rgba


def test_an_image_job_with_a_novel_view_prior_distils_from_both_and_says_so(zero123_folder, tiny_sd):
    """The 3D prior's gradient reaches the scene (the field ends elsewhere than without it,
    from the same seed), and the result records the joint prior's weights and the weights used."""
    spec = dict(prompt="", model=str(tiny_sd), steps=3, resolution=32, mesh_resolution=32, texture_size=0)
    reference = Reference(disc(), 10.0, 40.0)
    plain = run(JobSpec(**spec), reference=reference)
    joint = run(JobSpec(**spec, novel_view=str(zero123_folder)), reference=reference)
    again = run(JobSpec(**spec, novel_view=str(zero123_folder)), reference=reference)
    params = [dict(r.nerf.field.named_parameters()) for r in (plain, joint, again)]
    assert any(not torch.equal(params[0][k], params[1][k]) for k in params[0])
    assert all(torch.equal(params[1][k], params[2][k]) for k in params[1])  # seeded: the joint job repeats exactly
    meta = joint.metadata["reference"]
    assert meta["priors"] == {"2d": 1.0, "3d": 40.0} and plain.metadata["reference"]["priors"]["3d"] is None
    # no prompt: only the job without a novel-view prior is told that its unseen sides are a guess
    assert any("no prompt" in w for w in plain.metadata["warnings"]) and joint.metadata["warnings"] == []
    assert meta["novel_view"]["model"] == str(zero123_folder) and meta["novel_view"]["guidance_scale"] == 5.0
    assert "clip_camera_projection/diffusion_pytorch_model.safetensors" in meta["novel_view"]["weights"]["sha256"]
    assert json.loads(json.dumps(joint.metadata))  # what the result file keeps


def test_the_cli_fetches_zero123_xl_from_a_mirror_for_an_image_job_and_records_it(zero123_folder, tiny_sd, tmp_path):
    """`generate --image --novel-view zero123-xl` on a machine without it: the first mirror is
    gone, the second serves it; only what the prior loads is fetched, then the job runs and its
    result names the repository and commit it used."""
    import os
    import subprocess
    import sys

    from PIL import Image

    from fake_hub import FakeHub

    first, second = CATALOGUE["zero123-xl"].repos
    files = {p.relative_to(zero123_folder).as_posix(): p.read_bytes() for p in zero123_folder.rglob("*") if p.is_file()}
    files["feature_extractor/preprocessor_config.json"] = b"{}"  # in the release; not needed
    Image.fromarray(disc()).save(tmp_path / "disc.png")
    with FakeHub({second: files}) as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "0",
               "HF_HUB_DISABLE_XET": "1", "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-m", "promptmesh.backend.cli", "generate", "--image", "disc.png", "--model",
                               str(tiny_sd), "--novel-view", "zero123-xl", "--steps", "2", "--resolution", "32",
                               "--mesh-resolution", "32", "--texture-size", "0", "-o", "disc.glb"],
                              capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
        assert proc.returncode == 0, proc.stderr
        assert "no prompt" not in proc.stderr  # the novel-view prior sees the unseen sides
        got = {r.split("/resolve/")[1].split("/", 1)[1] for r in hub.requests if r.startswith("GET /" + second)}
    assert got == set(sds_files(list(files), CATALOGUE["zero123-xl"].weights))
    assert "feature_extractor/preprocessor_config.json" not in got
    novel = json.loads((tmp_path / "disc.json").read_text())["reference"]["novel_view"]
    assert novel["model"] == "zero123-xl" and novel["weights"]["source"] == second
    assert novel["weights"]["revision"] == hub.commits[second]

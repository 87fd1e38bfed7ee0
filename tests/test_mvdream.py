"""`promptmesh models convert-mvdream`: MVDream's original-layout checkpoint -> a diffusers folder."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from transformers import CLIPTextModel

from helpers import promptmesh
from promptmesh.backend.cameras import make_cameras, mvdream_cameras, sample_camera_groups
from promptmesh.backend.guidance import load_guidance
from promptmesh.backend.multiview import MultiViewAttnProcessor, load_unet
from promptmesh.backend.mvdream import ORIGINAL_CONFIG, ConversionError, convert, unet_config
from promptmesh.backend.pipeline import run
from promptmesh.shared.spec import JobSpec
from tiny_ldm import CONFIG, TEXT_LAYERS, tiny_checkpoint


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_sd):
    root = tmp_path_factory.mktemp("mvdream")
    state = tiny_checkpoint()
    torch.save(state, root / "sd-v2.1-base-4view.pt")
    return state, convert(root / "sd-v2.1-base-4view.pt", root / "out", tiny_sd / "tokenizer", CONFIG)


def test_every_tensor_of_the_checkpoint_lands_once_in_the_converted_models(converted):
    """Each converted weight is a contiguous run of one original tensor (the text encoder's
    fused q/k/v projections are split by rows), no run is used twice, and together they cover
    every original tensor but those Stable Diffusion 2 does not use (the text tower's last
    layer, read at the penultimate one, its projection and logit scale)."""
    state, folder = converted
    unet, vae = load_unet(folder / "unet"), AutoencoderKL.from_pretrained(folder / "vae")
    text = CLIPTextModel.from_pretrained(folder / "text_encoder")
    names = list(state)
    flat = np.concatenate([state[k].numpy().ravel() for k in names]).astype(np.float32)
    starts = np.cumsum([0] + [state[k].numel() for k in names])
    buffer, runs = flat.tobytes(), []
    for model in (unet, vae, text):
        for name, tensor in model.state_dict().items():
            if name.endswith("position_ids"):
                continue
            at = buffer.find(tensor.detach().float().numpy().tobytes())
            assert at >= 0 and at % 4 == 0, f"{name} is not a run of any original tensor"
            runs.append((at // 4, at // 4 + tensor.numel()))
    runs.sort()
    assert all(a[1] <= b[0] for a, b in zip(runs, runs[1:], strict=False)), "a weight was used twice"
    used = np.zeros(len(flat), bool)
    for a, b in runs:
        used[a:b] = True
    unused = {names[i] for i in range(len(names)) if not used[starts[i]:starts[i + 1]].all()}
    text_prefix = "cond_stage_model.model."
    assert unused == {k for k in names if k.startswith(f"{text_prefix}transformer.resblocks.{TEXT_LAYERS - 1}.")} | {
        f"{text_prefix}text_projection", f"{text_prefix}logit_scale"}
    assert torch.equal(unet.class_embedding.linear_1.weight, state["model.diffusion_model.camera_embed.0.weight"])


def test_the_converted_folder_is_a_four_view_denoiser_with_the_camera(converted):
    _, folder = converted
    unet = load_unet(folder / "unet").eval()
    assert {type(p) for n, p in unet.attn_processors.items() if n.endswith("attn1.processor")} == {MultiViewAttnProcessor}
    four = torch.full((4,), 15.0)
    cams = mvdream_cameras(make_cameras(four, torch.tensor([0.0, 90.0, 180.0, 270.0]), four * 0 + 2.0, four * 0 + 40))
    x, text = torch.randn(4, 4, 8, 8), torch.randn(4, 7, 64)
    with torch.no_grad():
        out = unet(x, torch.full((4,), 400), encoder_hidden_states=text, class_labels=cams).sample
        turned = unet(x, torch.full((4,), 400), encoder_hidden_states=text, class_labels=cams.roll(1, 0)).sample
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, turned)  # the camera is read
    assert (folder / "tokenizer").is_dir() and (folder / "scheduler" / "scheduler_config.json").is_file()



def test_a_generation_with_the_converted_model_scores_groups_of_four_views_with_one_timestep_each(converted):
    _, folder = converted
    guidance = load_guidance(str(folder))
    assert guidance.views_per_group == 4 and guidance.recipe.view_prompts.words is False  # the camera tells the view
    seen = []
    predict = guidance.predict_noise
    guidance.predict_noise = lambda noisy, t, cond, cams: seen.append((t.clone(), cams.azimuth.clone())) or predict(
        noisy, t, cond, cams)
    embeddings = guidance.embed_prompt("a red cube")
    cams = sample_camera_groups(2, 4, torch.Generator().manual_seed(0))
    images = torch.rand(8, 3, 16, 16, requires_grad=True)
    guidance.sds_loss(images, embeddings, cams, 50.0, (0.02, 0.98), torch.Generator().manual_seed(1)).backward()
    (t, azimuth), = seen
    assert len(t) == 16 and len(set(t[:4].tolist())) == 1 and len(set(t[4:8].tolist())) == 1  # CFG doubles the batch
    assert t[0] != t[4] and torch.equal(t[:8], t[8:])
    turns = (azimuth[:4] - azimuth[0]) % 360
    assert torch.allclose(turns, torch.tensor([0.0, 90.0, 180.0, 270.0]), atol=1e-3)
    assert images.grad is not None and images.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="not whole groups of 4"):
        guidance.sds_loss(images[:6], embeddings, cams[:6], 50.0, (0.02, 0.98), torch.Generator())
    result = run(JobSpec(prompt="a red cube", model=str(folder), steps=3, resolution=16, mesh_resolution=32, device="cpu"))
    assert result.metadata["recipe"]["guidance_scale"] == 50.0 and len(result.mesh.faces) > 0


def test_mvdream_cameras_follow_the_published_convention():
    """MVDream's camera for elevation e, azimuth a: a unit-distance OpenGL camera-to-world matrix
    of a Y-up world at (cos e sin a, sin e, cos e cos a), turned into Blender's Z-up axes."""
    e, a = 20.0, 60.0
    got = mvdream_cameras(make_cameras(torch.tensor([e]), torch.tensor([a]), torch.tensor([2.5]), torch.tensor([40.0])))
    er, ar = math.radians(e), math.radians(a)
    pos = np.array([math.cos(er) * math.sin(ar), math.sin(er), math.cos(er) * math.cos(ar)])
    forward = -pos / np.linalg.norm(pos)
    right = np.cross(forward, [0, 1, 0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    gl = np.eye(4)
    gl[:3, :3], gl[:3, 3] = np.stack([right, up, -forward], 1), pos
    flip_yz = np.array([[1, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]])
    assert np.allclose(got.numpy().reshape(4, 4), flip_yz @ gl, atol=1e-5)


def test_the_published_configuration_gives_mvdreams_unet():
    """MVDream's SD 2.1-base UNet at its published sizes (built on the meta device: no memory):
    SD 2.1's 865 M parameters plus the camera embedding, 32x32 latents, 1024-wide text."""
    from diffusers import UNet2DConditionModel

    state = {"model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": torch.empty(320, 1024)}
    config = unet_config(ORIGINAL_CONFIG, state)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    assert tuple(config["block_out_channels"]) == (320, 640, 1280, 1280) and config["cross_attention_dim"] == 1024
    assert config["sample_size"] == 32 and config["use_linear_projection"] and config["in_channels"] == 4
    camera = sum(p.numel() for p in unet.class_embedding.parameters())
    assert camera == 16 * 1280 + 1280 + 1280 * 1280 + 1280
    assert 864e6 < sum(p.numel() for p in unet.parameters()) - camera < 867e6


class NotATensor:
    pass


def test_bad_checkpoints_get_one_clear_line(tmp_path, tiny_sd):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConversionError, match="cannot read"):
        convert(tmp_path / "junk.pt", tmp_path / "out", tiny_sd / "tokenizer", CONFIG)
    (tmp_path / "code.pt").write_bytes(pickle.dumps({"model.diffusion_model.x": NotATensor()}))
    with pytest.raises(ConversionError, match="cannot read"):  # weights_only: no pickled code runs
        convert(tmp_path / "code.pt", tmp_path / "out", tiny_sd / "tokenizer", CONFIG)
    plain = {k: v for k, v in tiny_checkpoint().items() if "camera_embed" not in k}
    torch.save(plain, tmp_path / "sd21.pt")
    with pytest.raises(ConversionError, match="without MVDream's camera embedding"):
        convert(tmp_path / "sd21.pt", tmp_path / "out", tiny_sd / "tokenizer", CONFIG)
    assert not (tmp_path / "out").exists()
    result = promptmesh("models", "convert-mvdream", str(tmp_path / "sd21.pt"), str(tmp_path / "out2"),
                        "--tokenizer", str(tiny_sd / "tokenizer"))
    assert result.returncode == 2 and "without MVDream's camera embedding" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1

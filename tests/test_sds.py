"""SDS against a tiny random Stable Diffusion saved to disk and loaded through from_pretrained."""

from dataclasses import replace

import pytest
import torch

from promptmesh.backend.cameras import make_cameras, view_word
from promptmesh.backend.guidance import ModelLoadError, load_guidance
from promptmesh.backend.guidance.base import Guidance
from promptmesh.backend.guidance.loading import model_card
from promptmesh.backend.guidance.stable_diffusion import StableDiffusionGuidance
from promptmesh.backend.recipe import Objective, resolve
from promptmesh.backend.stages import JobContext, NeRFModel
from promptmesh.shared.spec import JobSpec


def cams(azimuth: float):
    one = lambda v: torch.tensor([float(v)])  # noqa: E731
    return make_cameras(one(15), one(azimuth), one(2.2), one(45))


def test_loads_every_component_from_a_saved_folder(tiny_sd):
    g = load_guidance(str(tiny_sd))
    assert isinstance(g, StableDiffusionGuidance)
    assert g.image_size == 64  # unet sample size 8 x vae factor 8, as 64 x 8 = 512 for SD 2.1-base
    assert not any(p.requires_grad for p in g.unet.parameters())
    assert g.alphas_cumprod.shape == (1000,) and g.alphas_cumprod[0] > g.alphas_cumprod[-1]


def test_missing_component_is_named(tiny_sd, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ModelLoadError, match="vae"):
        load_guidance(str(broken))


def test_unknown_model_names_are_refused():
    with pytest.raises(ModelLoadError, match="unknown model"):
        load_guidance("./no/such/folder")


def test_sds_gradient_equals_hand_computation(tiny_sd):
    g = load_guidance(str(tiny_sd))
    emb = g.embed_prompt("a red cube", "blurry")
    camera = cams(170)  # a back view
    assert view_word(camera.elevation, camera.azimuth) == ["back"]
    torch.manual_seed(0)
    latents = torch.randn(1, 4, 8, 8)
    noise = torch.randn(1, 4, 8, 8)
    t = torch.tensor([500])
    scale = 7.5
    grad = g.sds_grad(latents, emb, camera, scale, t, noise)

    # by hand: noise the latents, run the UNet on the negative and on the back-view prompt
    a = g.alphas_cumprod[500]
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    with torch.no_grad():
        text_neg = g.encode_text(["blurry"])
        text_back = g.encode_text(["a red cube, back view"])
        e_u = g.unet(noisy, t, encoder_hidden_states=text_neg).sample
        e_c = g.unet(noisy, t, encoder_hidden_states=text_back).sample
    expected = (1 - a) * (e_u + scale * (e_c - e_u) - noise)
    assert torch.allclose(grad, expected, atol=1e-5)
    assert grad.abs().sum() > 0


def test_sds_loss_pushes_latents_by_the_gradient(tiny_sd):
    """d loss / d latents of 0.5 * ||z - sg(z - grad)||^2 / B is exactly grad / B."""
    g = load_guidance(str(tiny_sd))
    emb = g.embed_prompt("a red cube")
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    gen = torch.Generator().manual_seed(0)
    camera = cams(0).cat(cams(90))
    captured = {}
    original = g.sds_grad

    def spy(*args, **kwargs):
        captured["grad"] = original(*args, **kwargs)
        return captured["grad"]

    g.sds_grad = spy
    latents_holder = {}
    original_encode = g.encode_images

    def encode(x, generator=None):
        z = original_encode(x, generator)
        z.retain_grad()
        latents_holder["z"] = z
        return z

    g.encode_images = encode
    loss = g.sds_loss(images, emb, camera, 100.0, (0.02, 0.98), gen)
    loss.backward()
    assert torch.allclose(latents_holder["z"].grad, captured["grad"] / 2, atol=1e-5)
    assert images.grad is not None and images.grad.abs().sum() > 0  # flows through the VAE encoder


def test_the_vae_draws_its_latents_from_the_jobs_generator_not_the_global_one(tiny_sd):
    """Same generator state, different global RNG state: the same loss (a resumed job on a GPU
    repeats its run only if every draw comes from the one generator the checkpoint saves)."""
    g = load_guidance(str(tiny_sd))
    emb = g.embed_prompt("a red cube")
    images = torch.rand(1, 3, 32, 32)
    losses = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        losses.append(g.sds_loss(images, emb, cams(0), 100.0, (0.02, 0.98), torch.Generator().manual_seed(0)))
    assert torch.equal(losses[0], losses[1])
    other = g.sds_loss(images, emb, cams(0), 100.0, (0.02, 0.98), torch.Generator().manual_seed(1))
    assert not torch.equal(losses[0], other)


def test_nan_in_the_prediction_is_zeroed(tiny_sd):
    g = load_guidance(str(tiny_sd))
    emb = g.embed_prompt("a red cube")
    g.predict_noise = lambda noisy, t, cond, cameras: torch.full_like(noisy, float("nan"))
    grad = g.sds_grad(torch.randn(1, 4, 8, 8), emb, cams(0), 100.0, torch.tensor([10]), torch.randn(1, 4, 8, 8))
    assert torch.equal(grad, torch.zeros_like(grad))


def test_an_alias_falls_back_to_its_next_mirror(tiny_sd, monkeypatch):
    from promptmesh.backend import models

    mirrors = models.Model("mirrored", "a test alias", (str(tiny_sd.parent / "gone"), str(tiny_sd)))
    monkeypatch.setitem(models.CATALOGUE, "mirrored", mirrors)
    assert isinstance(load_guidance("mirrored"), StableDiffusionGuidance)
    monkeypatch.setitem(models.CATALOGUE, "mirrored", models.Model("mirrored", "", (str(tiny_sd.parent / "gone"),)))
    with pytest.raises(ModelLoadError, match="gone"):
        load_guidance("mirrored")


def test_a_hub_id_that_no_longer_exists_gets_one_line_naming_the_aliases():
    from huggingface_hub.errors import RepositoryNotFoundError

    from promptmesh.backend.guidance.stable_diffusion import repository_missing

    not_found = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # as huggingface_hub raises it, minus the HTTP reply
    Exception.__init__(not_found, "404 Client Error")
    try:
        try:
            raise not_found
        except RepositoryNotFoundError as inner:
            raise OSError("stabilityai/stable-diffusion-2-1-base is not a local folder") from inner
    except OSError as wrapped:
        assert repository_missing(wrapped)
    assert not repository_missing(OSError("disk full"))


def test_the_half_precision_path_runs_end_to_end_in_bfloat16_on_the_cpu(tiny_sd):
    """What CUDA runs in fp16 (VAE and UNet in half precision, SDS arithmetic in fp32), shaken
    out on the CPU in bfloat16: every tensor on the right dtype, a finite gradient that reaches
    the render."""
    g = StableDiffusionGuidance(model_card(str(tiny_sd)), str(tiny_sd), dtype=torch.bfloat16)
    assert next(g.unet.parameters()).dtype == torch.bfloat16 and g.alphas_cumprod.dtype == torch.float32
    emb = g.embed_prompt("a red cube")
    images = torch.rand(1, 3, 16, 16, requires_grad=True)
    loss = g.sds_loss(images, emb, cams(30), 7.5, (0.02, 0.98), torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_a_folder_with_only_fp16_weights_loads_them(tiny_sd, tmp_path):
    """What `promptmesh models download` keeps of a repository that has fp16 variants."""
    import shutil

    from diffusers import UNet2DConditionModel

    folder = tmp_path / "fp16-only"
    shutil.copytree(tiny_sd, folder)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    shutil.rmtree(folder / "unet")
    unet.save_pretrained(folder / "unet", variant="fp16")
    assert [p.name for p in (folder / "unet").glob("*.safetensors")] == ["diffusion_pytorch_model.fp16.safetensors"]
    g = load_guidance(str(folder))
    assert torch.equal(next(g.unet.parameters()), next(unet.parameters()))


def test_only_an_uncached_hub_model_is_downloaded_and_never_offline(tiny_sd, tmp_path, monkeypatch):
    from promptmesh.backend.models import needs_download

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert needs_download("sd21") and needs_download("someone/some-model")
    assert not needs_download("embedded") and not needs_download(str(tiny_sd)) and not needs_download("./a/b")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not needs_download("sd21")


def test_the_full_size_sd21_configuration_runs_our_sds_code_on_the_meta_device():
    """Stable Diffusion 2.1 base at its published sizes, in fp16 as on CUDA, built on the meta
    device (no memory): our encode -> UNet -> SDS code keeps every shape and dtype, and the
    weights are the 2.6 GB the README's VRAM budget counts."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from promptmesh.backend.prompts import PromptEmbeddings

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=64, block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
            cross_attention_dim=1024, use_linear_projection=True, layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3).half()
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                            sample_size=512).half()
        text = CLIPTextModel(CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                            num_attention_heads=16, hidden_act="gelu", max_position_embeddings=77)).half()
    weights = sum(p.numel() * p.element_size() for m in (unet, vae, text) for p in m.parameters())
    assert 2.4e9 < weights < 2.7e9
    g = StableDiffusionGuidance.__new__(StableDiffusionGuidance)
    torch.nn.Module.__init__(g)
    g.unet, g.vae, g.dtype, g.image_size, g.scaling_factor = unet, vae, torch.float16, 512, 0.18215
    g.register_buffer("alphas_cumprod", torch.empty(1000, device="meta"))
    latents = g.encode_images(torch.empty(1, 3, 64, 64, device="meta"))  # a 64 px render, upsampled to 512
    assert latents.shape == (1, 4, 64, 64) and latents.dtype == torch.float16
    emb = PromptEmbeddings("a mug", "", lambda texts: torch.empty(len(texts), 77, 1024, device="meta", dtype=torch.float16))
    t = torch.full((1,), 500, device="meta", dtype=torch.long)
    grad = g.sds_grad(latents, emb, cams(30), 100.0, t, torch.empty_like(latents))
    assert grad.shape == latents.shape and grad.dtype == torch.float32  # the SDS arithmetic in fp32


def test_perp_neg_noise_equals_a_hand_computation_and_adds_only_orthogonal_terms():
    from promptmesh.backend.prompts import perp_neg_noise

    g = torch.Generator().manual_seed(0)
    e_u, e_p, e_f, e_s = (torch.randn(2, 4, 3, 3, generator=g) for _ in range(4))
    w = torch.tensor([[-1.5, -0.25], [0.0, -2.0]])
    got = perp_neg_noise(e_u, e_p, [e_f, e_s], w, 7.5)
    expected = []
    for b in range(2):  # one sample at a time, with plain vector algebra
        d_pos = (e_p[b] - e_u[b]).flatten()
        total = d_pos.clone()
        for i, e in enumerate((e_f, e_s)):
            d = (e[b] - e_u[b]).flatten()
            perp = d - torch.dot(d, d_pos) / torch.dot(d_pos, d_pos) * d_pos
            assert abs(torch.dot(perp, d_pos)) < 1e-4 * d_pos.norm() * perp.norm()  # orthogonal to the prompt's direction
            total += w[b, i] * perp
        expected.append((e_u[b].flatten() + 7.5 * total).view(4, 3, 3))
    assert torch.allclose(got, torch.stack(expected), atol=1e-5)
    added = (got - e_u) / 7.5 - (e_p - e_u)  # what the negatives add: nothing along d_pos
    assert torch.allclose((added * (e_p - e_u)).flatten(1).sum(1), torch.zeros(2), atol=1e-4)
    assert torch.allclose(perp_neg_noise(e_u, e_p, [e_f, e_s], torch.zeros(2, 2), 7.5), e_u + 7.5 * (e_p - e_u))


def test_perp_neg_weights_at_the_front_the_side_and_the_back():
    from promptmesh.backend.prompts import perp_neg_weights

    w = perp_neg_weights(torch.tensor([0.0, 90.0, -90.0, 180.0, -180.0, 45.0]), -2.0, 2.0, 10.0)
    # (front, side): facing the front only "side" is pushed away; at the side only "front";
    # from behind both; at 45 degrees "front" is pushed by -2 e^-1 and "side" by -2 e^-5.
    expected = torch.tensor([[0.0, -2.0], [-2.0, 0.0], [-2.0, 0.0], [-2.0, -2.0], [-2.0, -2.0],
                             [-2.0 * torch.e ** -1, -2.0 * torch.e ** -5]])
    assert torch.allclose(w, expected, atol=1e-6)
    assert (perp_neg_weights(torch.linspace(-360, 360, 97), -2.0, 2.0, 10.0) <= 0).all()


def test_interpolated_view_prompts_blend_front_side_back_with_the_azimuth(tiny_sd):
    g = load_guidance(str(tiny_sd))
    emb = g.embed_prompt("a red cube")
    front, side, back = (g.encode_text([f"a red cube, {v} view"]) for v in ("front", "side", "back"))
    el = torch.full((4,), 15.0)
    got = emb.blend(el, torch.tensor([0.0, 45.0, -135.0, 180.0]))
    expected = torch.cat([front, (front + side) / 2, (side + back) / 2, back])
    assert torch.allclose(got, expected, atol=1e-5)
    overhead = emb.blend(torch.tensor([70.0]), torch.tensor([30.0]))
    assert torch.allclose(overhead, g.encode_text(["a red cube, overhead view"]), atol=1e-5)


@pytest.mark.parametrize("views", [dict(interpolate=True), dict(perp_neg=True), dict(words=False)])
def test_sds_with_view_blends_perp_neg_or_no_view_word_runs_the_denoiser_on_the_right_prompts(tiny_sd, views):
    from promptmesh.backend.prompts import perp_neg_noise, perp_neg_weights
    from promptmesh.backend.recipe import ViewPrompts

    g = load_guidance(str(tiny_sd))
    emb = g.embed_prompt("a red cube", "blurry")
    camera = cams(60)
    torch.manual_seed(0)
    latents, noise, t = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), torch.tensor([500])
    grad = g.sds_grad(latents, emb, camera, 7.5, t, noise, ViewPrompts(**views))
    a = g.alphas_cumprod[500]
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    text = {v: g.encode_text([f"a red cube, {v} view"]) for v in ("front", "side")}
    with torch.no_grad():
        unet = lambda c: g.unet(noisy, t, encoder_hidden_states=c).sample  # noqa: E731
        e_u = unet(g.encode_text(["blurry"]))
        e_p = unet(text["front"] / 3 + 2 * text["side"] / 3)  # 60 degrees: two thirds of the way to the side
        if views.get("words") is False:
            e_p = unet(g.encode_text(["a red cube"]))
        if views.get("perp_neg"):
            w = perp_neg_weights(torch.tensor([60.0]), -2.0, 2.0, 10.0)
            eps = perp_neg_noise(e_u, e_p, [unet(text["front"]), unet(text["side"])], w, 7.5)
        else:
            eps = e_u + 7.5 * (e_p - e_u)
    assert torch.allclose(grad, (1 - a) * (eps - noise), atol=1e-5)


def test_the_x0_objective_without_rescale_is_sds_weighted_by_the_noise_to_signal_ratio(tiny_sd):
    g = load_guidance(str(tiny_sd))
    emb = g.embed_prompt("a red cube")
    torch.manual_seed(1)
    latents, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([300, 800])
    camera = cams(30).cat(cams(200))
    sds = g.sds_grad(latents, emb, camera, 7.5, t, noise)
    x0 = g.sds_grad(latents, emb, camera, 7.5, t, noise, objective=Objective("x0"))
    a = g.alphas_cumprod[t].view(-1, 1, 1, 1)
    # latents - x0_hat = sqrt((1 - a) / a) * (eps_guided - eps), and SDS is (1 - a) * (eps_guided - eps)
    assert torch.allclose(x0, sds * ((1 - a) / a).sqrt() / (1 - a), atol=1e-4)
    with pytest.raises(ValueError, match="unknown objective"):
        g.sds_grad(latents, emb, camera, 7.5, t, noise, objective=Objective("l1"))


def test_cfg_rescale_pulls_each_objects_spread_towards_the_unguided_one():
    g = Guidance()
    g.views_per_group = 2
    gen = torch.Generator().manual_seed(0)
    noisy, eps, eps_text = (torch.randn(4, 3, 4, 4, generator=gen) for _ in range(3))
    a = torch.tensor([0.3, 0.3, 0.7, 0.7]).view(-1, 1, 1, 1)
    out = g._reconstruction(noisy, a, eps, eps_text, rescale=0.5)
    x0 = (noisy - (1 - a).sqrt() * eps) / a.sqrt()
    x0_text = (noisy - (1 - a).sqrt() * eps_text) / a.sqrt()
    for obj in (slice(0, 2), slice(2, 4)):  # by hand, one object (two views) at a time
        factor = x0_text[obj].std() / x0[obj].std()
        assert torch.allclose(out[obj], 0.5 * x0[obj] * factor + 0.5 * x0[obj], atol=1e-5)
    full = g._reconstruction(noisy, a, eps, eps_text, rescale=1.0)
    for obj in (slice(0, 2), slice(2, 4)):
        assert torch.allclose(full[obj].std(), x0_text[obj].std(), atol=1e-5)  # the unguided spread exactly
    assert torch.equal(g._reconstruction(noisy, a, eps, eps_text, rescale=0.0), x0)


def test_fused_adam_makes_the_unfused_update_up_to_float_rounding(tiny_sd):
    """The recipe's `fused_adam` (on for Stable Diffusion, off for the embedded prior) changes
    the speed of the update, not the update: a few steps agree to rounding."""
    guidance = load_guidance(str(tiny_sd))
    base = resolve(guidance.card, JobSpec("a red cube", steps=6, resolution=32))

    def flat(trainer: NeRFModel) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in trainer.field.parameters()])

    runs = []
    for fused in (True, False):
        recipe = replace(base, optim=replace(base.optim, fused_adam=fused))
        trainer = NeRFModel(JobContext.create(guidance, guidance.embed_prompt("a red cube"), recipe, 0, torch.device("cpu")), 0)
        start = flat(trainer)
        for _ in range(3):
            trainer.train_step()
        assert trainer.optimizer.param_groups[0]["fused"] is fused
        runs.append((start, flat(trainer)))
    (start, fused_end), (unfused_start, unfused_end) = runs
    assert torch.equal(start, unfused_start)  # one seed, one initial field
    moved, apart = (fused_end - start).norm(), (fused_end - unfused_end).abs()
    # Adam's step is about lr * sign(g) even for a g of 1e-15 (its eps), so a few values of
    # nearly no gradient may round either way, each up to 2 lr apart per step (their count,
    # not their size, tells; 47 of 5M on one thread); every other value agrees to rounding.
    assert moved > 0.1, moved
    assert int((apart > 1e-4).sum()) < 1e-4 * apart.numel(), int((apart > 1e-4).sum())

"""The distillation objectives beyond SDS (NFSD, CSD, ISM, VSD), each against a hand computation
on the tiny Stable Diffusion loaded from disk, and chosen per job through spec, card and recipe."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from helpers import cancel_at_step
from promptmesh.backend.cameras import make_cameras
from promptmesh.backend.guidance import load_guidance
from promptmesh.backend.guidance.vsd import ObjectiveState
from promptmesh.backend.pipeline import run
from promptmesh.backend.recipe import ModelCard, Objective, resolve
from promptmesh.shared.spec import JobSpec, SpecError
from promptmesh.shared.vocab import Objective as Kind


def cams(*azimuths: float):
    n = len(azimuths)
    return make_cameras(torch.full((n,), 15.0), torch.tensor(azimuths), torch.full((n,), 2.2), torch.full((n,), 45.0))


@pytest.fixture(scope="module")
def g(tiny_sd):
    return load_guidance(str(tiny_sd))


def unet(g, noisy, t, text: str, **kw):
    with torch.no_grad():
        return g.unet(noisy, t, encoder_hidden_states=g.encode_text([text]).expand(len(noisy), -1, -1), **kw).sample


def setup(seed: int, t: list[int]):
    torch.manual_seed(seed)
    return torch.randn(len(t), 4, 8, 8), torch.randn(len(t), 4, 8, 8), torch.tensor(t)


def test_nfsd_is_the_condition_term_plus_the_denoising_term_split_at_t_200(g):
    """Katzir et al.: w(t) * (delta_D + s * delta_C), delta_C = eps(y) - eps(null), delta_D =
    eps(null) for t < 200, eps(null) - eps(negative) above; the job's negative is the negative."""
    emb = g.embed_prompt("a red cube", "blurry")
    latents, noise, t = setup(0, [100, 600])
    camera = cams(170, 170)  # back views
    grad = g.sds_grad(latents, emb, camera, 7.5, t, noise, objective=Objective(Kind.NFSD))
    for i, step in enumerate(t.tolist()):
        a = g.alphas_cumprod[step]
        noisy = a.sqrt() * latents[i:i + 1] + (1 - a).sqrt() * noise[i:i + 1]
        e_null, e_y, e_neg = (unet(g, noisy, t[i:i + 1], text) for text in ("", "a red cube, back view", "blurry"))
        delta_d = e_null if step < 200 else e_null - e_neg
        expected = (1 - a) * (delta_d + 7.5 * (e_y - e_null))
        assert torch.allclose(grad[i:i + 1], expected, atol=1e-5), step
    # the two regimes differ by exactly the negative's direction
    assert not torch.allclose(grad[1], g.sds_grad(latents, g.embed_prompt("a red cube"), camera, 7.5, t, noise,
                                                  objective=Objective(Kind.NFSD))[1], atol=1e-4)


def test_the_objective_negative_is_the_jobs_else_the_cards_where_the_prior_reads_it(g):
    nfsd = Objective(Kind.NFSD, negative="ugly, blurry")
    assert g.objective_negative(g.embed_prompt("a red cube", "dull"), nfsd) == "dull"
    assert g.objective_negative(g.embed_prompt("a red cube"), nfsd) == "ugly, blurry"
    assert g.objective_negative(g.embed_prompt("a red cube"), Objective(Kind.NFSD)) is None

    from promptmesh.backend.guidance.embedded import EmbeddedGuidance
    from promptmesh.backend.prior import WEIGHTS_DIR

    embedded = EmbeddedGuidance(ModelCard.load(WEIGHTS_DIR))
    # the embedded prior knows only its primitives' words: the paper's negative is dropped, not refused
    assert embedded.objective_negative(embedded.embed_prompt("a red cube"), nfsd) is None


def test_csd_is_the_classifier_score_minus_the_annealed_negative_term(g):
    """Yu et al.: w(t) * (s * (eps(y) - eps(null)) - w_neg * (eps(neg) - eps(null))), w_neg
    annealed linearly over the run (here from 1.0 to 0.5, half-way: 0.75)."""
    emb = g.embed_prompt("a red cube", "blurry")
    latents, noise, t = setup(1, [700])
    state = ObjectiveState(steps=10, step=5)
    objective = Objective(Kind.CSD, csd_negative_weight=(1.0, 0.5))
    grad = g.sds_grad(latents, emb, cams(170), 40.0, t, noise, objective=objective, state=state)
    a = g.alphas_cumprod[700]
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    e_null, e_y, e_neg = (unet(g, noisy, t, text) for text in ("", "a red cube, back view", "blurry"))
    expected = (1 - a) * (40.0 * (e_y - e_null) - 0.75 * (e_neg - e_null))
    assert torch.allclose(grad, expected, atol=1e-4)
    assert state.passes == 3  # null, prompt and negative in one batch
    # no noise term at all: the drawn noise changes only where the latents are noised
    other = g.sds_grad(latents, emb, cams(170), 40.0, t, noise * 0, objective=objective, state=state)
    e_null0, e_y0, e_neg0 = (unet(g, a.sqrt() * latents, t, text) for text in ("", "a red cube, back view", "blurry"))
    assert torch.allclose(other, (1 - a) * (40.0 * (e_y0 - e_null0) - 0.75 * (e_neg0 - e_null0)), atol=1e-4)


def ddim(g, x, eps, frm: int, to: int):
    af, at = g.alphas_cumprod[frm], g.alphas_cumprod[to]
    return at.sqrt() * (x - (1 - af).sqrt() * eps) / af.sqrt() + (1 - at).sqrt() * eps


@pytest.mark.parametrize("t_value,inversions", [(620, 3), (130, 1), (40, 0)])
def test_ism_inverts_ddim_in_strides_and_matches_the_interval_score(g, t_value, inversions):
    """LucidDreamer: s = t - 50; x_s from x0 by DDIM inversion with the null prompt in strides of
    200 (0 -> 200 -> 400 -> 570 for t = 620), x_t one more step; grad = w(t) * (eps_guided(x_t, t)
    - eps_null(x_s, s)). Its cost: the inversion's passes + 1 + the 2 of CFG, counted."""
    emb = g.embed_prompt("a red cube")
    latents, noise, t = setup(2, [t_value])
    state = ObjectiveState()
    grad = g.sds_grad(latents, emb, cams(170), 7.5, t, noise, objective=Objective(Kind.ISM), state=state)
    s = max(0, t_value - 50)
    x, now = latents, 0
    stops = []
    while now < s:
        nxt = min(now + 200, s)
        x = ddim(g, x, unet(g, x, torch.tensor([now]), ""), now, nxt)
        stops.append(nxt)
        now = nxt
    assert len(stops) == inversions == math.ceil(s / 200)
    eps_s = unet(g, x, torch.tensor([s]), "")
    x_t = ddim(g, x, eps_s, s, t_value)
    e_u, e_y = unet(g, x_t, t, ""), unet(g, x_t, t, "a red cube, back view")
    a = g.alphas_cumprod[t_value]
    assert torch.allclose(grad, (1 - a) * (e_u + 7.5 * (e_y - e_u) - eps_s), atol=1e-4)
    assert state.passes == inversions + 1 + 2


def test_ism_over_a_batch_inverts_each_sample_to_its_own_s(g):
    emb = g.embed_prompt("a red cube")
    latents, noise, t = setup(3, [620, 130])
    both = g.sds_grad(latents, emb, cams(170, 170), 7.5, t, noise, objective=Objective(Kind.ISM))
    for i in range(2):
        one = g.sds_grad(latents[i:i + 1], emb, cams(170), 7.5, t[i:i + 1], noise[i:i + 1], objective=Objective(Kind.ISM))
        assert torch.allclose(both[i:i + 1], one, atol=1e-4)


def test_vsd_is_the_guided_prediction_minus_the_camera_conditioned_loras(g):
    """ProlificDreamer: w(t) * (eps_guided - eps_lora(x_t; y, c)); the LoRA (a copy of the UNet's
    modules sharing its weights) starts as the prior and learns on the renders, the prior never."""
    emb = g.embed_prompt("a red cube")
    objective = Objective(Kind.VSD, lora_lr=1e-2)
    state = g.objective_state(objective, 10, seed=0)
    lora = state.lora.unet
    assert {id(p) for p in g.unet.parameters()} <= {id(p) for p in lora.parameters()}  # shared, not copied
    assert all(not p.requires_grad for p in g.unet.parameters())
    assert not any("lora" in name for name, _ in g.unet.named_modules())  # the shared prior stays as it was
    assert any("lora" in name for name, _ in lora.named_modules())
    latents, noise, t = setup(4, [500])
    camera = cams(170)
    a = g.alphas_cumprod[500]
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    e_u, e_y = unet(g, noisy, t, ""), unet(g, noisy, t, "a red cube, back view")
    guided = e_u + 7.5 * (e_y - e_u)
    grad = g.sds_grad(latents, emb, camera, 7.5, t, noise, objective=objective, state=state)
    assert torch.allclose(grad, (1 - a) * (guided - e_y), atol=1e-5)  # untrained: the LoRA is the prior

    prior_before = [p.clone() for p in g.unet.parameters()]
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(1, 3, 32, 32)
    for _ in range(3):
        g.sds_loss(images, emb, camera, 7.5, (0.02, 0.98), gen, objective=objective, state=state)
    assert all(torch.equal(p, q) for p, q in zip(prior_before, g.unet.parameters(), strict=True))
    # the first gradient cost 3 passes; each step then 4: CFG, the LoRA, its training pass
    assert len(state.lora_losses) == 3 and state.passes == 3 + 3 * (2 + 1 + 1)
    grad = g.sds_grad(latents, emb, camera, 7.5, t, noise, objective=objective, state=state)
    with torch.no_grad():  # by hand: the LoRA UNet told the camera-to-world matrix as its class label
        e_lora = lora(noisy, t, encoder_hidden_states=g.encode_text(["a red cube, back view"]),
                      class_labels=camera.c2w.reshape(1, 16)).sample
    assert not torch.allclose(e_lora, e_y, atol=1e-4)  # it learnt something
    assert torch.allclose(grad, (1 - a) * (guided - e_lora), atol=1e-5)
    # the camera matters to it now
    e_other = lora(noisy, t, encoder_hidden_states=g.encode_text(["a red cube, back view"]),
                   class_labels=cams(20).c2w.reshape(1, 16)).sample
    assert not torch.allclose(e_other, e_lora, atol=1e-6)


def test_the_loras_training_step_is_the_standard_diffusion_loss_on_the_detached_latents(g):
    objective = Objective(Kind.VSD, lora_camera_dropout=0.0)
    state = g.objective_state(objective, 10, seed=0)
    emb = g.embed_prompt("a red cube")
    latents = torch.randn(2, 4, 8, 8, requires_grad=True)
    camera = cams(0, 90)
    cond = g.conditions(emb, camera, g.recipe.view_prompts)[1]
    gen = torch.Generator().manual_seed(5)
    draws = torch.Generator().set_state(gen.get_state())  # the same draws, by hand
    loss = state.lora.train_step(g.predict_noise, g.alphas_cumprod, latents, cond, camera, gen)
    t = torch.randint(20, 980 + 1, (2,), generator=draws)
    noise = torch.randn(latents.shape, generator=draws)
    a = g.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents.detach() + (1 - a).sqrt() * noise
    assert latents.grad is None  # the renders get no gradient from the LoRA's loss
    # the loss was measured before the step; the same inputs after one step of Adam give a lower loss
    with torch.no_grad():
        after = torch.nn.functional.mse_loss(
            state.lora.unet(noisy, t, encoder_hidden_states=cond, class_labels=camera.c2w.reshape(2, 16)).sample, noise)
        before_fresh = torch.nn.functional.mse_loss(
            g.unet(noisy, t, encoder_hidden_states=cond).sample, noise)
    assert abs(loss - float(before_fresh)) < 1e-5  # a fresh LoRA predicts as the prior does
    assert float(after) < loss


def test_objectives_are_chosen_per_job_through_spec_card_and_recipe(g, tmp_path):
    card = g.card
    assert resolve(card, JobSpec("a red cube")).objective == card.recipe.objective  # None: the card's
    assert resolve(card, JobSpec("a red cube", objective="nfsd")).objective.kind == Kind.NFSD
    with pytest.raises(SpecError, match="objective"):
        JobSpec("a red cube", objective="magic").validate()
    tuned = replace(card, objectives={"csd": {"csd_negative_weight": [0.5, 0.0]}, "vsd": {"lora_lr": 3e-3}})
    assert resolve(tuned, JobSpec("a red cube", objective="csd")).objective.csd_negative_weight == (0.5, 0.0)
    assert resolve(tuned, JobSpec("a red cube", objective="vsd")).objective.lora_lr == 3e-3
    tuned.save(tmp_path)
    assert ModelCard.load(tmp_path) == tuned
    with pytest.raises(ValueError, match="nfsd_split"):
        ModelCard.from_dict({**tuned.to_dict(), "objectives": {"nfsd": {"nfsd_split": 0.3}}})


def test_the_shipped_stable_diffusion_card_carries_each_papers_settings_marked_unmeasured():
    from promptmesh.backend.recipe import CARDS_DIR

    card = ModelCard.load(CARDS_DIR / "stable-diffusion.json")
    assert {"vsd", "nfsd", "csd", "ism"} <= set(card.objectives)
    assert "not yet run on a GPU" in card.notes
    spec = JobSpec("a red cube")
    assert resolve(card, replace(spec, objective="nfsd")).objective.negative  # the paper's negative prompt
    ism = resolve(card, replace(spec, objective="ism")).objective
    assert (ism.ism_delta_s, ism.ism_delta_t) == (200, 80)  # LucidDreamer's xs_delta_t and delta_t
    csd = resolve(card, replace(spec, objective="csd"))  # the authors' scales: text 1, negative 0 -> 1
    assert (csd.guidance_scale, csd.objective.csd_negative_weight) == (1.0, (0.0, 1.0))
    vsd = resolve(card, replace(spec, objective="vsd"))  # the paper's guidance scale and t schedule, not SDS's 100
    assert (vsd.guidance_scale, vsd.schedule.t_max_end, vsd.objective.lora_lr) == (7.5, 0.5, 1e-4)
    assert resolve(card, replace(spec, objective="vsd", guidance_scale=3.0)).guidance_scale == 3.0  # explicit wins
    assert resolve(card, replace(spec, quality="draft", objective="csd")).schedule.steps == 1500  # the preset still applies
    assert resolve(card, spec) == card.recipe and card.recipe.guidance_scale == 100.0


def test_the_cli_sends_the_objective_and_leaves_it_out_when_not_given():
    from promptmesh.backend.cli import _spec, build_parser

    def spec(*argv):
        return _spec(build_parser().parse_args(["generate", "a red cube", *argv]))

    assert spec().objective is None and spec("--objective", "ism").objective == Kind.ISM
    with pytest.raises(SystemExit):
        spec("--objective", "magic")


def test_a_vsd_job_resumed_from_its_checkpoint_continues_the_lora(tiny_sd, tmp_path):
    """The LoRA and its optimiser travel in the checkpoint: a resumed run ends where the
    uninterrupted one does, LoRA included."""
    job = JobSpec(prompt="a blue sphere", model=str(tiny_sd), steps=6, resolution=32, mesh_resolution=40, objective="vsd")
    full = run(job)
    ckpt = tmp_path / "job.ckpt.pt"
    cancel_at_step(job, 4, ckpt)
    saved = torch.load(ckpt, weights_only=False)
    assert saved["objective"]["step"] == 4 and saved["objective"]["lora"]["lora"]
    resumed = run(job, checkpoint=ckpt, checkpoint_every=2, resume=True)
    assert np.array_equal(resumed.mesh.vertices, full.mesh.vertices)
    ours, theirs = resumed.nerf.ctx.objective.lora.trainable(), full.nerf.ctx.objective.lora.trainable()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    fresh = resumed.nerf.ctx.guidance.objective_state(resumed.nerf.ctx.recipe.objective, 6, 0).lora.trainable()
    assert any(not torch.equal(ours[k], fresh[k]) for k in ours)  # it did train


def test_vsd_on_the_embedded_prior_trains_a_lora_beside_the_traced_unet():
    from promptmesh.backend.guidance.embedded import EmbeddedGuidance
    from promptmesh.backend.prior import WEIGHTS_DIR

    emb_g = EmbeddedGuidance(ModelCard.load(WEIGHTS_DIR))
    objective = Objective(Kind.VSD, lora_lr=1e-2)
    state = emb_g.objective_state(objective, 10, seed=0)
    emb = emb_g.embed_prompt("a red cube")
    camera = cams(30)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    t, noise = torch.tensor([400]), torch.randn(1, 3, 32, 32)
    grad0 = emb_g.sds_grad(x, emb, camera, 5.0, t, noise, objective=objective, state=state)
    sds_like = emb_g.sds_grad(x, emb, camera, 5.0, t, noise)  # (1 - a) * (eps_guided - noise)
    a = emb_g.alphas_cumprod[400]
    noisy = a.sqrt() * x + (1 - a).sqrt() * noise
    uncond, cond = emb_g.conditions(emb, camera, emb_g.recipe.view_prompts)
    with torch.no_grad():
        e_y = emb_g.predict_noise(noisy, t, cond, camera)
    # an untrained LoRA is the prior: VSD = SDS with the text prediction in place of the drawn noise
    assert torch.allclose(grad0, sds_like + (1 - a) * (noise - e_y), atol=1e-5)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        emb_g.sds_loss(torch.rand(1, 3, 32, 32), emb, camera, 5.0, (0.02, 0.98), gen, objective=objective, state=state)
    grad3 = emb_g.sds_grad(x, emb, camera, 5.0, t, noise, objective=objective, state=state)
    assert not torch.allclose(grad3, grad0, atol=1e-5)
    with torch.no_grad():  # the traced pretrained UNet is unchanged by the LoRA's training
        assert torch.equal(emb_g.predict_noise(noisy, t, cond, camera), e_y)

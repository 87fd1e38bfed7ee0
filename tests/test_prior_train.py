"""Training the embedded prior (backend/prior/train.py): a 2D run that resumes exactly, and a
multi-view run (MVDream's recipe on our world) whose prior loads and guides as one."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from promptmesh.backend.cameras import orbit_groups
from promptmesh.backend.guidance import load_guidance
from promptmesh.backend.guidance.embedded import EmbeddedGuidance
from promptmesh.backend.multiview import MultiViewAttnProcessor, single_views
from promptmesh.backend.pipeline import run
from promptmesh.backend.prior.data import ViewBias, make_batch
from promptmesh.backend.prior.model import EmbeddedPrior, camera_features
from promptmesh.backend.prior.sample import sample, sample_grid
from promptmesh.backend.prior.train import RECIPE, TrainConfig, draw_batch, learning_rate, train
from promptmesh.backend.recipe import CARDS_DIR, ModelCard, Recipe, resolve
from promptmesh.shared.errors import PromptMeshError
from promptmesh.shared.spec import JobSpec

TINY = TrainConfig(steps=2, batch_size=8, dataset_size=16, warmup=1, checkpoint_every=1)


def weights(prior: EmbeddedPrior) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in prior.parameters()])


def test_multiview_batches_are_groups_of_one_subject_a_quarter_turn_apart():
    batch = make_batch(12, 16, torch.Generator().manual_seed(2), RECIPE, views=4)
    cams = batch.cameras
    for g in range(3):
        s = slice(4 * g, 4 * g + 4)
        assert len(set(batch.shape_ids[s].tolist())) == 1 and len(set(batch.color_ids[s].tolist())) == 1
        assert len(set(batch.prompts[s])) == 1
        turns = (cams.azimuth[s] - cams.azimuth[4 * g]) % 360
        assert torch.allclose(turns, torch.tensor([0.0, 90.0, 180.0, 270.0]), atol=1e-3)
        for shared in (cams.elevation, cams.distance, cams.fovy):
            assert torch.allclose(shared[s], shared[4 * g].expand(4))
    # every view of a group is a different picture of it
    assert all(not torch.equal(batch.images[0], batch.images[k]) for k in (1, 2, 3))
    with pytest.raises(ValueError, match="whole groups"):
        make_batch(6, 16, torch.Generator(), RECIPE, views=4)


def test_a_training_batch_gives_each_group_one_timestep_and_each_view_its_own_noise():
    batch = make_batch(16, 8, torch.Generator().manual_seed(0), RECIPE, views=4)
    data = {"images": (batch.images * 255).round().to(torch.uint8), "prompts": batch.prompts,
            "cameras": torch.stack([batch.cameras.elevation, batch.cameras.azimuth, batch.cameras.distance,
                                    torch.rad2deg(batch.cameras.fovy)], -1)}
    alphas = EmbeddedPrior.create().scheduler.alphas_cumprod
    noisy, captions, cameras, t, noise = draw_batch(data, torch.zeros(16, dtype=torch.bool), 8, 4,
                                                    torch.Generator().manual_seed(1), alphas, TINY)
    assert noisy.shape == (8, 3, 8, 8) and len(captions) == 8
    assert not any(c.endswith(" view") for c in captions)  # a group's camera tells its view
    for s in (slice(0, 4), slice(4, 8)):
        assert len(set(t[s].tolist())) == 1 and len(set(captions[s])) == 1
        turns = (cameras.azimuth[s] - cameras.azimuth[s.start]) % 360
        assert torch.allclose(turns, torch.tensor([0.0, 90.0, 180.0, 270.0]), atol=1e-3)
        assert all(not torch.equal(noise[s.start], noise[s.start + k]) for k in (1, 2, 3))


def test_a_run_stopped_by_ctrl_c_resumes_to_the_very_weights_of_an_uninterrupted_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    config = dataclasses.replace(TINY, steps=3)
    whole = train(tmp_path / "whole", config)

    def interrupt_at_step_2(step: int, config: TrainConfig) -> float:
        if step == 2:
            raise KeyboardInterrupt
        return learning_rate(step, config)

    with monkeypatch.context() as m:
        m.setattr("promptmesh.backend.prior.train.learning_rate", interrupt_at_step_2)
        with pytest.raises(KeyboardInterrupt):
            train(tmp_path / "cut", config)
    resumed = train(tmp_path / "cut", config, resume=True)
    assert torch.equal(weights(resumed), weights(whole))
    assert not torch.equal(weights(resumed), weights(EmbeddedPrior.create()))
    assert len((tmp_path / "cut" / "loss.csv").read_text().splitlines()) == 1 + 3
    # other settings are refused, and a checkpoint written before a field existed reads it at its default
    with pytest.raises(PromptMeshError, match="other settings"):
        train(tmp_path / "cut", dataclasses.replace(TINY, steps=3, lr=5e-4), resume=True)
    ckpt = tmp_path / "cut" / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=False)
    del state["config"]["views"], state["config"]["single_view_share"]
    torch.save(state, ckpt)
    train(tmp_path / "cut", config, resume=True)
    # ... unless no value of it gives back how it trained: captions were dropped once per image
    del state["config"]["empty_caption_rate"]
    torch.save(state, ckpt)
    with pytest.raises(PromptMeshError, match="empty_caption_rate.*once per image"):
        train(tmp_path / "cut", config, resume=True)
    with pytest.raises(PromptMeshError, match="whole groups"):
        train(tmp_path / "bad", dataclasses.replace(TINY, views=3))
    with pytest.raises(PromptMeshError, match="empty-caption rate"):
        train(tmp_path / "bad", dataclasses.replace(TINY, empty_caption_rate=1.0))


def test_the_view_bias_is_set_from_the_command_line_recorded_with_the_data_and_held_on_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    from promptmesh.backend.cli import EXIT_ERROR, main

    out = tmp_path / "run"
    tiny = ["prior", "train", "--device", "cpu", "--steps", "1", "--batch-size", "8", "--dataset-size", "16",
            "--out", str(out)]
    assert main([*tiny, "--front-sigma", "20", "--uniform-share", "0"]) == 0
    data = torch.load(out / "dataset.pt", weights_only=False)
    assert data["bias"] == {**dataclasses.asdict(ViewBias()), "front_sigma": 20.0, "uniform_share": 0.0}
    # the azimuths drawn follow it: about 20 degrees of spread (the default's would be about 50)
    assert 10 < data["cameras"][:, 1].std() < 30
    capsys.readouterr()
    assert main([*tiny, "--front-sigma", "35", "--uniform-share", "0", "--resume"]) == EXIT_ERROR
    assert "front_sigma" in capsys.readouterr().err
    for flag, value, words in (("--uniform-share", "1.5", "uniform share must be between 0 and 1, not 1.5"),
                               ("--front-sigma", "0", "front sigma must be above 0 degrees, not 0.0")):
        assert main([*tiny[:-1], str(tmp_path / "bad"), flag, value]) == EXIT_ERROR
        assert capsys.readouterr().err.strip() == f"promptmesh: error: the view bias's {words}"
        assert not (tmp_path / "bad" / "dataset.pt").exists()  # refused before rendering


@pytest.fixture(scope="module")
def multiview_prior(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mv")
    train(out, dataclasses.replace(TINY, views=4, single_view_share=0.5, steps=4))
    return out / "prior"


def test_a_multiview_run_writes_a_prior_that_loads_and_guides_in_groups(multiview_prior: Path):
    prior = EmbeddedPrior.from_pretrained(multiview_prior)
    assert prior.views_per_group == 4
    attn1 = [p for n, p in prior.unet.attn_processors.items() if n.endswith("attn1.processor")]
    assert attn1 and all(isinstance(p, MultiViewAttnProcessor) for p in attn1)
    guidance = load_guidance(str(multiview_prior))
    assert isinstance(guidance, EmbeddedGuidance) and guidance.views_per_group == 4
    assert not guidance.recipe.view_prompts.words  # the camera tells the view, as in its training captions
    # rows of samples are drawn as whole groups, shown in orbit order
    grid = sample_grid(prior, "a red mug", views=8, rows=1, steps=2)
    assert grid.shape == (32, 8 * 32, 3)
    cameras, back = orbit_groups(8, 4)
    assert torch.allclose(cameras.azimuth[back] % 360, torch.arange(8) * 45.0)
    assert torch.allclose((cameras.azimuth[1:4] - cameras.azimuth[0]) % 360, torch.tensor([90.0, 180.0, 270.0]))
    with pytest.raises(ValueError, match="whole groups"):
        sample(prior, "a red mug", cameras[:3], steps=2)


def test_single_views_makes_a_multiview_unet_denoise_each_entry_alone(multiview_prior: Path):
    prior = EmbeddedPrior.from_pretrained(multiview_prior)
    n = 4
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(n, 3, 32, 32, generator=g), torch.full((n,), 400)
    states, pooled = prior.encode_text(["a red mug"] * n)
    cams = camera_features(orbit_groups(4, 4)[0], RECIPE.cameras)
    with torch.no_grad():
        joint = prior.predict_noise(x, t, states, pooled, cams)
        with single_views(prior.unet):
            alone = prior.predict_noise(x, t, states, pooled, cams)
            first = prior.predict_noise(x[:1], t[:1], states[:1], pooled[:1], cams[:1])
        assert torch.allclose(alone[:1], first, atol=1e-5)  # entry 0 sees no other entry
        assert not torch.allclose(joint[:1], first, atol=1e-4)  # but sees its group's views without it
    assert all(p.views == 4 for p in prior.unet.attn_processors.values() if isinstance(p, MultiViewAttnProcessor))


def test_a_generation_with_the_multiview_prior_renders_whole_groups_and_records_its_recipe(
    multiview_prior: Path, monkeypatch: pytest.MonkeyPatch
):
    seen: list[torch.Tensor] = []
    real = EmbeddedGuidance.predict_noise

    def spy(self, noisy, t, cond, cameras):  # type: ignore[no-untyped-def]
        seen.append(cameras.azimuth.clone())
        return real(self, noisy, t, cond, cameras)

    monkeypatch.setattr(EmbeddedGuidance, "predict_noise", spy)
    job = JobSpec(prompt="a red mug", model=str(multiview_prior), steps=3, mesh_resolution=32, texture_size=0)
    result = run(job)
    assert len(seen) == 3
    for azimuth in seen:  # cond and uncond rows of one group of four views a quarter-turn apart
        assert azimuth.shape == (8,)
        assert torch.allclose((azimuth[:4] - azimuth[0]) % 360, torch.tensor([0.0, 90.0, 180.0, 270.0]), atol=1e-3)
    recorded = Recipe.from_dict(result.metadata["recipe"])
    assert recorded == resolve(ModelCard.load(multiview_prior), job) and not recorded.view_prompts.words
    assert ModelCard.load(multiview_prior).recipe == ModelCard.load(CARDS_DIR / "embedded-multiview.json").recipe


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_prior_train_on_cuda_without_a_gpu_is_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from promptmesh.backend.cli import EXIT_ERROR, main

    out = tmp_path / "run"
    assert main(["prior", "train", "--device", "cuda", "--steps", "1", "--out", str(out)]) == EXIT_ERROR
    assert capsys.readouterr().err.strip() == ("promptmesh: error: CUDA was requested but no CUDA device is available; "
                                               "use --device cpu")
    assert not out.exists()  # refused before any dataset is rendered


def test_samples_name_the_view_as_the_prior_was_trained(multiview_prior: Path, monkeypatch: pytest.MonkeyPatch):
    """A 2D prior learnt view words; a multi-view prior's groups never had them (the camera tells)."""
    for prior, named in ((EmbeddedPrior.from_pretrained(multiview_prior), False), (EmbeddedPrior.create(), True)):
        seen: list[str] = []

        def encode(captions: list[str], prior: EmbeddedPrior = prior, seen: list[str] = seen):
            seen.extend(captions)
            return EmbeddedPrior.encode_text(prior, captions)

        monkeypatch.setattr(prior, "encode_text", encode)
        sample(prior, "a red mug", orbit_groups(4, 4)[0], steps=1)
        assert any(c.endswith(" view") for c in seen) == named

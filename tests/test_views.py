"""The embedded novel-view prior (backend/prior/views.py): its pair data, its widened UNet and
its training, then an image job that uses what the training wrote (--novel-view FOLDER)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from promptmesh.backend.framing import frame_share
from promptmesh.backend.guidance import ModelLoadError, load_novel_view
from promptmesh.backend.guidance.embedded import EmbeddedNovelView
from promptmesh.backend.pipeline import run
from promptmesh.backend.prior import WEIGHTS_DIR
from promptmesh.backend.prior.model import EmbeddedPrior
from promptmesh.backend.prior.train import CARD
from promptmesh.backend.prior.views import ViewsConfig, render_pairs, train_views, widen
from promptmesh.shared.image import Reference
from promptmesh.shared.spec import JobSpec


@torch.no_grad()
def test_the_widened_unet_starts_as_the_prior_whatever_the_picture():
    prior = EmbeddedPrior.from_pretrained(WEIGHTS_DIR)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 32, 32, generator=g), torch.tensor([100, 800])
    states, pooled = prior.encode_text(["a red cube", ""])
    labels = torch.cat([pooled, torch.randn(2, 6, generator=g)], -1)
    before = prior.denoise(x, t, states, labels)
    widen(prior.unet)
    assert prior.unet.config.in_channels == 6
    picture = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    assert torch.allclose(prior.denoise(torch.cat([x, picture], 1), t, states, labels), before, atol=1e-5)


def test_each_pair_is_a_picture_from_the_front_framed_as_an_image_job_frames_it_and_views_of_that_subject():
    data = render_pairs(6, 2, torch.Generator().manual_seed(1), CARD.recipe)
    assert data["references"].shape == (6, 3, 32, 32) and data["targets"].shape == (12, 3, 32, 32)
    assert data["owner"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    share = frame_share(CARD.recipe.cameras)
    for ref in data["references"]:
        fg = (ref.float() / 255 - 1).abs().amax(0) > 0.08  # not white
        rows, cols = np.nonzero(fg.numpy())
        side = max(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1)
        assert abs(side / 32 - share) < 0.1  # the foreground's longer side spans the prior's share of the frame
        assert abs((rows.max() + rows.min()) / 2 - 15.5) <= 1.5 and abs((cols.max() + cols.min()) / 2 - 15.5) <= 1.5
    # the same subject and colour in both: a target's mean colour is its reference's, not another's
    mean = lambda x: (x.float() / 255).flatten(1)  # noqa: E731
    refs, targets = mean(data["references"]), mean(data["targets"])
    ranks = [int(torch.cdist(targets[i:i + 1], refs).argmin()) for i in range(12)]
    assert sum(r == i // 2 for i, r in enumerate(ranks)) >= 9


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("views")
    train_views(out, ViewsConfig(steps=3, batch_size=8, references=8, checkpoint_every=2))
    return out


def test_training_writes_a_novel_view_prior_that_an_image_job_takes(trained):
    assert (trained / "loss.csv").read_text().count("\n") == 4  # a header and three steps
    prior = load_novel_view(str(trained / "prior"))
    assert isinstance(prior, EmbeddedNovelView) and prior.prior.unet.config.in_channels == 6
    spec = dict(prompt="a red cube", steps=3, mesh_resolution=32, texture_size=0)
    picture = (np.zeros((64, 64, 4), np.uint8))
    picture[16:48, 16:48] = (200, 40, 30, 255)
    result = run(JobSpec(**spec, novel_view=str(trained / "prior")), reference=Reference(picture, 0.0))
    meta = result.metadata["reference"]
    assert meta["priors"]["3d"] == 40.0 and meta["novel_view"]["weights"]["source"] == str(trained / "prior")
    with pytest.raises(ModelLoadError, match="not a novel-view prior: its UNet takes 3 channels"):
        load_novel_view(str(WEIGHTS_DIR))


def test_a_resume_under_other_settings_is_refused(trained):
    from promptmesh.shared.errors import PromptMeshError

    with pytest.raises(PromptMeshError, match="other settings"):
        train_views(trained, ViewsConfig(steps=5, batch_size=8, references=8, checkpoint_every=2), resume=True)

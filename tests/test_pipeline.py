"""pipeline.run: events, cancellation and checkpoint/resume."""

import threading

import numpy as np
import pytest
import torch

from promptmesh.backend.pipeline import Cancelled, PreviewEvent, ResultEvent, StageEvent, StepEvent, run
from promptmesh.shared.spec import JobSpec


def spec(tiny_sd, **kw):
    return JobSpec(prompt="a blue sphere", model=str(tiny_sd), steps=6, resolution=32, mesh_resolution=40, **kw)


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
    cancel = threading.Event()

    def stop_after_4(e):
        if isinstance(e, StepEvent) and e.step == 4:
            cancel.set()

    with pytest.raises(Cancelled):
        run(spec(tiny_sd), stop_after_4, cancel=cancel, checkpoint=ckpt, checkpoint_every=2)
    assert torch.load(ckpt, weights_only=False)["trainer"]["step"] == 4
    resumed_steps = []
    resumed = run(spec(tiny_sd), lambda e: isinstance(e, StepEvent) and resumed_steps.append(e.step),
                  checkpoint=ckpt, checkpoint_every=2, resume=True)
    assert resumed_steps == [5, 6]
    assert np.array_equal(resumed.mesh.vertices, full.mesh.vertices)
    assert not ckpt.exists()

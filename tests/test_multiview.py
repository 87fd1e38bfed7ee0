"""The multi-view UNet (backend/multiview.py): attention across the views of one object only."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from promptmesh.backend.multiview import MultiViewAttnProcessor, load_unet, make_multiview

VIEWS = 4


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
        class_embed_type="projection", projection_class_embeddings_input_dim=16,
    ).eval()


def inputs(groups: int, seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    n = groups * VIEWS
    x = torch.randn(n, 3, 8, 8, generator=g)
    text = torch.randn(n, 5, 16, generator=g)
    cameras = torch.randn(n, 16, generator=g)  # flattened camera-to-world matrices
    return x, torch.full((n,), 500), text, cameras


def run(unet: UNet2DConditionModel, x, t, text, cameras) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=text, class_labels=cameras).sample


def test_self_attention_joins_the_views_of_one_object_and_no_other():
    plain, multi = tiny_unet(), make_multiview(tiny_unet(), VIEWS)
    procs = multi.attn_processors
    assert {type(p) for n, p in procs.items() if n.endswith("attn1.processor")} == {MultiViewAttnProcessor}
    assert not any(isinstance(p, MultiViewAttnProcessor) for n, p in procs.items() if n.endswith("attn2.processor"))
    x, t, text, cameras = inputs(2)
    out = run(multi, x, t, text, cameras)
    # the views of an object see each other: not what each view alone gives
    assert not torch.allclose(out, run(plain, x, t, text, cameras), atol=1e-4)
    # ... and nothing of the other object: changing object 2 leaves object 1 as it was
    x2, text2 = x.clone(), text.clone()
    x2[VIEWS:] += 1.0
    text2[VIEWS:] *= -1
    out2 = run(multi, x2, t, text2, cameras)
    assert torch.allclose(out2[:VIEWS], out[:VIEWS], atol=1e-5) and not torch.allclose(out2[VIEWS:], out[VIEWS:])
    # the views form a set: permuting them (with their cameras and texts) permutes the outputs
    perm = torch.tensor([2, 0, 3, 1, 4, 5, 6, 7])
    assert torch.allclose(run(multi, x[perm], t, text[perm], cameras[perm]), out[perm], atol=1e-5)


def test_one_view_per_object_is_the_plain_unet():
    x, t, text, cameras = inputs(1)
    assert torch.allclose(run(make_multiview(tiny_unet(), 1), x, t, text, cameras),
                          run(tiny_unet(), x, t, text, cameras), atol=1e-5)


def test_a_saved_multiview_unet_loads_with_its_processor_and_gives_the_same_output(tmp_path):
    unet = make_multiview(tiny_unet(), VIEWS)
    unet.save_pretrained(tmp_path / "unet")
    again = load_unet(tmp_path / "unet").eval()
    assert again.config["multiview_views"] == VIEWS
    assert isinstance(again.attn_processors["down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"],
                      MultiViewAttnProcessor)
    assert torch.equal(run(again, *inputs(2)), run(unet, *inputs(2)))


def test_a_batch_that_is_not_whole_groups_is_refused():
    x, t, text, cameras = inputs(1)
    with pytest.raises(ValueError, match="not a whole number of 4-view groups"):
        run(make_multiview(tiny_unet(), VIEWS), x[:3], t[:3], text[:3], cameras[:3])


def test_a_traced_multiview_unet_gives_the_eager_output_with_one_trace_per_group_count():
    """The guidance replays the UNet from a trace (backend/guidance/traced.py): the views are
    joined by reshapes the trace records for one batch size, so each group count needs its own."""
    from promptmesh.backend.guidance.traced import Traced

    unet = make_multiview(tiny_unet(), VIEWS).requires_grad_(False)  # frozen, as the guidance holds it
    traced = Traced(lambda x, t, text, cameras: unet(x, t, encoder_hidden_states=text, class_labels=cameras).sample)
    with torch.no_grad():
        for groups, seed in ((1, 1), (2, 2), (1, 3)):
            args = inputs(groups, seed)
            assert torch.allclose(traced(*args), run(unet, *args), atol=1e-6)
    assert len(traced.traces) == 2
    args = inputs(2, 4)
    with torch.enable_grad():  # training: the module itself runs, and nothing is traced
        assert torch.allclose(traced(*args), run(unet, *args), atol=1e-6)
    assert len(traced.traces) == 2

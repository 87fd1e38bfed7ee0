import pytest
import torch

from promptmesh.backend.field import FieldConfig, HashGrid


@pytest.fixture(params=[1, 2], ids=["serial", "parallel"])
def threads(request):
    """The kernels' serial build runs at one torch thread, the parallel one above."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("active", [8, 5])
def test_the_fused_cpu_lookup_computes_what_grid_sample_computes_up_to_rounding(active, threads):
    """Values, the grids' gradients and the points' gradients of every dense level, with points
    beyond the border (clipped, no gradient), on cell corners, and levels switched off."""
    torch.manual_seed(0)
    grid = HashGrid(FieldConfig())
    assert len(grid.dense) == 8 and not grid.hashed
    for level in grid.dense:  # values of order one, so a wrong corner or weight shows
        level.data.normal_()
    grid.active_levels = active
    x = torch.cat([torch.rand(6000, 3) * 2.4 - 1.2,
                   torch.tensor([[-1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.5, -0.25, 0.125]])]).requires_grad_(True)
    weights = torch.randn(len(x), 8 * 2)

    fused = grid(x)
    fused_grads = torch.autograd.grad((fused * weights).sum(), [x, *grid.dense], materialize_grads=True)
    reference = grid._dense_grid_sample(x)
    reference_grads = torch.autograd.grad((reference * weights).sum(), [x, *grid.dense], materialize_grads=True)

    assert fused.shape == (len(x), 16)
    torch.testing.assert_close(fused, reference, rtol=0, atol=2e-6)
    assert not fused[:, active * 2:].any()
    torch.testing.assert_close(fused_grads[0], reference_grads[0], rtol=1e-5, atol=1e-3)  # points: scale 1e2
    assert not fused_grads[0][(x.detach().abs() > 1).any(1)].all(1).any()  # a clipped axis has no gradient
    for level, (ours, theirs) in enumerate(zip(fused_grads[1:], reference_grads[1:], strict=True)):
        if level < active:
            torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-6)
        else:
            assert not ours.any()

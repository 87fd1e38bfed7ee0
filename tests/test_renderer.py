import math

import torch
from torch import nn

from promptmesh.backend.background import SolidBackground
from promptmesh.backend.cameras import make_cameras, ray_bundle
from promptmesh.backend.field import FieldConfig, NeRFField
from promptmesh.backend.renderer import OccupancyGrid, RenderConfig, render

RADIUS = 0.5


class AnalyticSphere(nn.Module):
    """A hard sphere of constant albedo, with the field's interface."""

    radius = 1.0  # the renderer samples the whole bounding sphere

    def forward(self, x):
        inside = (x.norm(dim=-1) < RADIUS).float()
        return inside * 1e4, torch.tensor([0.8, 0.2, 0.1]).expand(len(x), 3)

    def density(self, x):
        return self.forward(x)[0]

    def normals(self, x):
        return torch.nn.functional.normalize(x, dim=-1)


def front_camera(fov=40.0, distance=2.0):
    one = lambda v: torch.tensor([float(v)])  # noqa: E731
    return make_cameras(one(0), one(0), one(distance), one(fov))


def test_sphere_silhouette_and_depth_are_right_to_a_pixel():
    size, fov, dist = 64, 40.0, 2.0
    cams = front_camera(fov, dist)
    out = render(AnalyticSphere(), SolidBackground(), cams, size, size, shading="albedo")
    focal = 0.5 * size / math.tan(math.radians(fov) / 2)
    radius_px = focal * math.tan(math.asin(RADIUS / dist))
    c = (torch.arange(size) + 0.5 - size / 2)
    r = torch.sqrt(c[None, :] ** 2 + c[:, None] ** 2)
    opaque = out.opacity[0, 0] > 0.5
    clear = (r - radius_px).abs() > 1.0  # pixels more than a pixel away from the true edge
    assert torch.equal(opaque[clear], (r < radius_px)[clear])
    # depth along each ray vs the analytic ray-sphere intersection, within one sample step
    _, dirs = ray_bundle(cams, size, size)
    o = cams.origins[0]
    d = dirs[0]
    b = (d * o).sum(-1)
    disc = b * b - (o @ o - RADIUS**2)
    true_depth = -b - torch.sqrt(disc.clamp_min(0))
    step = 2.0 / RenderConfig().samples_per_ray
    inside = opaque & clear
    err = (out.depth[0, 0][inside] / out.opacity[0, 0][inside] - true_depth[inside]).abs()
    assert err.max() < step
    # background is white where nothing was hit, the albedo where the sphere is
    assert torch.allclose(out.rgb[0, :, 0, 0], torch.ones(3), atol=1e-4)
    assert torch.allclose(out.rgb[0, :, size // 2, size // 2], torch.tensor([0.8, 0.2, 0.1]), atol=1e-3)


def test_lambertian_is_brightest_facing_the_light():
    cams = front_camera()
    out = render(AnalyticSphere(), SolidBackground(), cams, 32, 32, shading="lambertian", ambient=0.2)
    red = out.rgb[0, 0]
    centre = red[16, 16]
    edge = red[16, 11]  # closer to the silhouette: the normal turns away from the light (at the camera)
    assert centre > edge > 0.2 * 0.8 - 1e-3
    assert torch.allclose(out.normals[0, :, 16, 16], torch.tensor([0.0, -1.0, 0.0]), atol=0.1)


def test_occupancy_grid_skips_empty_space_without_changing_the_image():
    field = NeRFField(FieldConfig())
    grid = OccupancyGrid(RenderConfig())
    grid.update(field)
    assert 0.0 < grid.occupied_fraction < 0.6  # the initial blob, not the whole cube
    cams = front_camera()
    with torch.no_grad():
        full = render(field, SolidBackground(), cams, 32, 32, shading="albedo")
        culled = render(field, SolidBackground(), cams, 32, 32, shading="albedo", occupancy=grid)
    assert culled.samples < 0.5 * full.samples
    # A cell is empty where a sample is under 1 % opaque; the one-cell margin around occupied
    # cells leaves the initial blob's soft edge within half a percent (two cells: 0.02 %).
    assert torch.allclose(full.rgb, culled.rgb, atol=5e-3)
    assert torch.allclose(full.opacity, culled.opacity, atol=1e-2)


def test_a_bounded_field_has_no_density_beyond_its_radius():
    bounded = NeRFField(FieldConfig(radius=0.5))
    free = NeRFField(FieldConfig())
    free.load_state_dict(bounded.state_dict())
    directions = torch.nn.functional.normalize(torch.randn(200, 3, generator=torch.Generator().manual_seed(0)), dim=-1)
    points = directions * torch.linspace(0.05, 0.99, 200)[:, None]
    inside = points.norm(dim=-1) <= 0.5
    with torch.no_grad():
        d_bounded, d_free = bounded.density(points), free.density(points)
    assert (d_bounded[~inside] == 0).all() and (d_free[~inside] > 0).all()  # softplus: the free field is never 0
    assert torch.equal(d_bounded[inside], d_free[inside])


class Unbounded(nn.Module):
    """A field seen as filling the whole bounding sphere: the renderer samples all of it."""

    radius = 1.0

    def __init__(self, field):
        super().__init__()
        self.field = field

    def forward(self, x):
        return self.field(x)

    def density(self, x):
        return self.field.density(x)

    def normals(self, x):
        return self.field.normals(x)


def test_rays_are_sampled_only_inside_a_bounded_field_at_the_same_spacing():
    field = NeRFField(FieldConfig(radius=0.5, blob_density=30.0, blob_radius=0.45))
    cams = front_camera()
    with torch.no_grad():
        inside = render(field, SolidBackground(), cams, 32, 32, shading="albedo")
        whole = render(Unbounded(field), SolidBackground(), cams, 32, 32, shading="albedo")
    assert inside.samples < 0.55 * whole.samples  # half the chord, a quarter of the rays' cross-section
    assert torch.allclose(inside.opacity, whole.opacity, atol=0.03)
    assert torch.allclose(inside.rgb, whole.rgb, atol=0.03)


def test_the_grid_gives_the_same_features_and_gradients_whatever_the_thread_count():
    field = NeRFField(FieldConfig(max_resolution=32))
    for p in field.encoding.parameters():
        p.data.normal_()
    x = torch.rand(1001, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1  # odd: one thread's share is padded
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            field.zero_grad()
            feats = field.encoding(x)
            (feats * torch.linspace(-1, 1, feats.shape[1])).sum().backward()
            results.append((feats.detach(), [p.grad.clone() for p in field.encoding.parameters()]))
    finally:
        torch.set_num_threads(threads)
    (f1, g1), (f3, g3) = results
    assert torch.equal(f1, f3)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g1, g3, strict=True))


def test_field_gradients_reach_the_grid_through_render():
    field = NeRFField(FieldConfig())
    out = render(field, SolidBackground(), front_camera(), 16, 16, shading="lambertian",
                 generator=torch.Generator().manual_seed(0))
    out.rgb.mean().backward()
    grads = [p.grad for p in field.encoding.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0


def instant_ngp_slot(x: int, y: int, z: int, table_size: int) -> int:
    """Instant-NGP's spatial hash (Müller et al. 2022, eq. 4), in Python integers."""
    return (x * 1 ^ y * 2654435761 ^ z * 805459861) % table_size


def test_hashed_level_hits_its_table_at_nodes_and_interpolates_between():
    cfg = FieldConfig(levels=1, base_resolution=8, max_resolution=8, log2_table_size=9)  # 9^3 > 2^9: hashed
    enc = NeRFField(cfg).encoding
    assert len(enc.hashed) == 1 and not len(enc.dense)
    table = enc.hashed[0].data
    table.normal_()
    nodes = [(1, 2, 3), (4, 4, 4), (7, 0, 5)]
    x = torch.tensor(nodes) / 8 * 2 - 1
    expected = table[[instant_ngp_slot(*n, 512) for n in nodes]]
    assert torch.allclose(enc(x), expected, atol=1e-5)
    # halfway between two nodes along x, y or z: the mean of the two node features
    for step in ((1, 0, 0), (0, 1, 0), (0, 0, 1)):
        a, b = nodes[0], tuple(i + j for i, j in zip(nodes[0], step, strict=True))
        mid = (torch.tensor(a) + torch.tensor(b)) / 2 / 8 * 2 - 1
        fa, fb = table[instant_ngp_slot(*a, 512)], table[instant_ngp_slot(*b, 512)]
        assert torch.allclose(enc(mid[None])[0], (fa + fb) / 2, atol=1e-5)


def test_dense_level_matches_trilinear_interpolation_axis_order():
    cfg = FieldConfig(levels=1, base_resolution=4, max_resolution=4)
    enc = NeRFField(cfg).encoding
    grid = enc.dense[0].data  # [1, F, z, y, x]
    grid.normal_()
    node = torch.tensor([1, 2, 3])  # (x, y, z)
    x = (node / 4 * 2 - 1)[None].float()
    assert torch.allclose(enc(x)[0], grid[0, :, 3, 2, 1], atol=1e-5)


def test_levels_keep_their_columns_and_points_their_rows_across_dense_and_hashed_levels():
    # Two dense levels and one hashed; the dense grids hold linear functions of position, which
    # trilinear interpolation reproduces exactly, so each point's features are known.
    cfg = FieldConfig(levels=3, base_resolution=4, max_resolution=16, log2_table_size=10)
    enc = NeRFField(cfg).encoding
    assert len(enc.dense) == 2 and len(enc.hashed) == 1
    for param in enc.dense:
        n = param.shape[-1]
        axis = torch.linspace(-1, 1, n)
        param.data[0, 0] = axis.view(1, 1, n).expand(n, n, n)  # x (W)
        param.data[0, 1] = axis.view(n, 1, 1).expand(n, n, n) * (n - 1)  # z (D), scaled by level
    enc.hashed[0].data.fill_(7.0)
    x = torch.rand(1001, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2, 3):  # the points split into 1-3 parts, padded when odd
            torch.set_num_threads(n_threads)
            enc.active_levels = 3
            f = enc(x)
            for level, param in enumerate(enc.dense):
                assert torch.allclose(f[:, 2 * level], x[:, 0], atol=1e-5)
                assert torch.allclose(f[:, 2 * level + 1], x[:, 2] * (param.shape[-1] - 1), atol=1e-4)
            assert torch.allclose(f[:, 4:], torch.full((1001, 2), 7.0))
            enc.active_levels = 1
            f = enc(x)
            assert torch.allclose(f[:, 0], x[:, 0], atol=1e-5) and not f[:, 2:].any()
    finally:
        torch.set_num_threads(threads)


def test_the_chunked_mlp_gives_the_modules_values_and_gradients():
    field = NeRFField(FieldConfig(max_resolution=32))
    torch.nn.init.normal_(field.mlp[0].bias)  # some hidden units off for some rows
    gen = torch.Generator().manual_seed(2)
    features = torch.randn(10001, field.encoding.output_dim, generator=gen)  # 3 chunks, the last partial
    weights = torch.randn(10001, 4, generator=gen)
    results = []
    for run in (field.mlp, field.head):
        field.zero_grad()
        x = features.clone().requires_grad_()
        out = run(x)
        (out * weights).sum().backward()
        results.append([out.detach(), x.grad] + [p.grad.clone() for p in field.mlp.parameters()])
    for a, b in zip(*results, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(a.abs().max()))
    with torch.no_grad():
        assert torch.allclose(field.head(features), field.mlp(features), atol=1e-6)
    x = features.clone()  # features that need no gradient: only the weights get one
    field.zero_grad()
    (field.head(x) * weights).sum().backward()
    assert x.grad is None and torch.allclose(field.mlp[0].weight.grad, results[0][2], rtol=1e-5, atol=1e-3)


def test_a_field_the_occupancy_grid_left_empty_on_the_views_still_learns():
    """ISM faded a chair (objectives bench, a yellow chair at 1,000 steps) until the grid held no
    cell on a step's rays: the render evaluated nothing, the loss had no gradient, and the job
    died in backward. A grid that would leave a render empty now culls nothing, so the step
    moves the field."""
    from promptmesh.backend.guidance import load_guidance
    from promptmesh.backend.recipe import resolve
    from promptmesh.backend.stages import JobContext, NeRFModel
    from promptmesh.shared.spec import JobSpec

    guidance = load_guidance("embedded")
    recipe = resolve(guidance.card, JobSpec("a red cube", steps=100))
    trainer = NeRFModel(JobContext.create(guidance, guidance.embed_prompt("a red cube"), recipe, 0, torch.device("cpu")), 0)
    trainer.step = recipe.optim.occupancy_warmup + 1  # the grid in use, and not refreshed on this step
    assert trainer.step % recipe.optim.occupancy_every != 0
    trainer.occupancy.mask.zero_()
    with torch.no_grad():
        full = render(trainer.field, trainer.background, front_camera(), 32, 32)
        culled = render(trainer.field, trainer.background, front_camera(), 32, 32, occupancy=trainer.occupancy)
    assert culled.samples == full.samples > 0 and torch.equal(culled.rgb, full.rgb)
    before = [p.detach().clone() for p in trainer.field.mlp.parameters()]
    trainer.train_step()
    moved = [not torch.equal(a, p) for a, p in zip(before, trainer.field.mlp.parameters(), strict=True)]
    assert all(moved), moved
    assert not trainer.occupancy.mask.any()  # the grid itself is left to its own refresh

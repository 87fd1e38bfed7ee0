"""Painting a given mesh: the input checked, its geometry, place and size kept, its UVs kept,
and the prompt's colour on it."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh

from promptmesh.backend.framing import FIT_HALF_EXTENT, FIT_RMS_RADIUS
from promptmesh.backend.pipeline import StageEvent, StepEvent, run
from promptmesh.backend.prior.judge import color_word
from promptmesh.backend.prior.shapes import SHAPES, sdf
from promptmesh.backend.stages import Surface
from promptmesh.backend.stages.texture import rms_radius
from promptmesh.shared.spec import JobSpec
from promptmesh.shared.surface import SurfaceError, check_surface
from promptmesh.shared.vocab import Stage


def box(offset=(5.0, -3.0, 10.0), extents=(2.0, 0.6, 1.0)) -> trimesh.Trimesh:
    mesh = trimesh.creation.box(extents=extents)
    mesh.apply_translation(offset)
    return mesh


def test_the_rms_radius_is_exact_against_sampled_surface_points():
    mesh = trimesh.creation.cone(radius=1.5, height=3.0, sections=24)
    centre = np.array([0.2, -0.1, 0.7])
    points, _ = trimesh.sample.sample_surface(mesh, 200_000, seed=0)
    sampled = float(np.sqrt(((points - centre) ** 2).sum(1).mean()))
    assert rms_radius(mesh.vertices, mesh.faces, centre) == pytest.approx(sampled, rel=0.01)


def test_a_given_mesh_is_fitted_to_the_size_the_prior_draws_its_primitives_at():
    """The fit's constants are the embedded prior's world: its primitives' RMS radii lie near
    FIT_RMS_RADIUS and none reaches past FIT_HALF_EXTENT. A 3-unit cube then shrinks to the
    prior's cube (half-extent 0.42, not the sphere's 0.55), and a rod stops at the half-extent cap."""
    import torch
    from skimage.measure import marching_cubes

    grid = np.linspace(-0.8, 0.8, 96)
    points = torch.from_numpy(np.stack(np.meshgrid(grid, grid, grid, indexing="ij"), -1).astype(np.float32))
    for shape in SHAPES:
        vertices, faces, *_ = marching_cubes(sdf(shape, points).numpy(), 0.0, spacing=(grid[1] - grid[0],) * 3)
        vertices -= 0.8
        lo, hi = vertices.min(0), vertices.max(0)
        assert abs(rms_radius(vertices, faces, (lo + hi) / 2) - FIT_RMS_RADIUS) < 0.06, shape
        assert (hi - lo).max() / 2 < FIT_HALF_EXTENT + 0.03, shape
    cube = box(extents=(3.0, 3.0, 3.0))
    centre, scale = Surface(cube.vertices, cube.faces).fit()
    assert np.allclose(centre, (5.0, -3.0, 10.0)) and 1.5 * scale == pytest.approx(0.403, abs=0.005)
    rod = box(extents=(0.1, 0.1, 4.0))
    assert 2.0 * Surface(rod.vertices, rod.faces).fit()[1] == pytest.approx(FIT_HALF_EXTENT)


@pytest.mark.parametrize("vertices, faces, complaint", [
    (np.zeros((0, 3)), np.zeros((0, 3), int), "empty"),
    (np.array([[0, 0, 0], [1, 0, 0], [np.nan, 1, 0]]), np.array([[0, 1, 2]]), "not finite"),
    (np.eye(3), np.array([[0, 1, 3]]), "indices must lie in 0..2"),
    (np.array([[0, 0, 0], [1, 0, 0], [2, 0, 0]]), np.array([[0, 1, 2]]), "degenerate"),
    (np.eye(3), np.array([[0.0, 1, 2]]), "faces must be \\[F, 3\\] integers"),
    (np.eye(4)[:, :2], np.array([[0, 1, 2]]), "vertices must be \\[V, 3\\]"),
])
def test_a_bad_mesh_is_refused_naming_what_is_wrong(vertices, faces, complaint):
    with pytest.raises(SurfaceError, match=complaint):
        check_surface(vertices, faces)


def test_too_many_faces_and_unusable_uvs():
    mesh = box()
    with pytest.raises(SurfaceError, match="12 triangles; at most 10"):
        check_surface(mesh.vertices, mesh.faces, max_faces=10)
    tiled = np.full((len(mesh.vertices), 2), 1.5)
    *_, uvs, warnings = check_surface(mesh.vertices, mesh.faces, tiled)
    assert uvs is None and "outside 0..1" in warnings[0]
    with pytest.raises(SurfaceError, match="uvs must be"):
        check_surface(mesh.vertices, mesh.faces, tiled[:3])


def test_tiny_stable_diffusion_paints_a_mesh_in_place_keeping_its_uvs(tiny_sd):
    sphere = trimesh.creation.uv_sphere(radius=3.0, count=(8, 12))
    sphere.apply_translation((-20.0, 4.0, 1.0))
    uvs = (sphere.vertices[:, :2] - sphere.vertices[:, :2].min(0)) / np.ptp(sphere.vertices[:, :2], 0)  # planar, in 0..1
    events: list = []
    spec = JobSpec(prompt="a red ball", model=str(tiny_sd), steps=4, resolution=32, texture_size=64, preview_every=2)
    result = run(spec, events.append, surface=Surface.checked(sphere.vertices, sphere.faces, uvs))
    assert [e.stage for e in events if isinstance(e, StageEvent)] == [Stage.LOADING, Stage.TEXTURING, Stage.MESHING,
                                                                       Stage.DONE]
    assert [(e.step, e.stage) for e in events if isinstance(e, StepEvent)] == [(i, Stage.TEXTURING) for i in range(1, 5)]
    mesh = result.mesh
    assert np.allclose(mesh.vertices, sphere.vertices, atol=1e-5) and np.array_equal(mesh.faces, sphere.faces)
    assert np.allclose(mesh.uvs, uvs, atol=1e-6) and mesh.texture.shape == (64, 64, 3)  # its own UVs, baked onto
    assert result.nerf is None and result.metadata["stages"] == [Stage.TEXTURING]


@pytest.mark.slow
def test_the_embedded_prior_paints_a_box_at_an_odd_place_and_size_red():
    """A mesh we did not generate, far from the origin and not unit-sized, comes back in place,
    red by the judge, its texture (an xatlas unwrap: it had no UVs) red too, at the default steps."""
    given = box()
    result = run(JobSpec(prompt="a red cube", texture_size=128), surface=Surface.checked(given.vertices, given.faces))
    mesh = result.mesh
    assert np.allclose(mesh.vertices.min(0), given.bounds[0], atol=1e-5) and np.allclose(mesh.vertices.max(0), given.bounds[1])
    assert color_word(np.clip(mesh.colors.mean(0), 0, 1)) == "red", mesh.colors.mean(0)
    texels = mesh.texture.reshape(-1, 3).astype(float)
    assert (texels[:, 0] > 2 * texels[:, 1:].max(1)).mean() > 0.95  # the baked texture is red all over


def test_a_mesh_split_at_its_uv_seams_renders_as_the_same_geometry_welded(tiny_sd):
    """A cube unwrapped per side arrives as six loose squares (vertices copied at every seam).
    The painter must see the cube, not outlined squares with flat normals: it renders exactly
    as the welded cube does, so the distillation has no seam to paint over."""
    import torch

    from promptmesh.backend.cameras import orbit_cameras
    from promptmesh.backend.guidance import load_guidance
    from promptmesh.backend.recipe import resolve
    from promptmesh.backend.stages import JobContext, TextureModel

    guidance = load_guidance(str(tiny_sd))
    recipe = resolve(guidance.card, JobSpec("a red cube", resolution=32), painting=True)
    ctx = JobContext.create(guidance, guidance.embed_prompt("a red cube"), recipe, 0, torch.device("cpu"))
    welded, split = box(), box()
    split.unmerge_vertices()
    assert len(split.vertices) == 36 and len(welded.vertices) == 8
    cameras = orbit_cameras(4, elevation=30.0, start_azimuth=20.0)
    renders = [TextureModel(ctx, Surface.checked(m.vertices, m.faces), seed=3).render(cameras, 48, "lambertian")
               for m in (welded, split)]
    for a, b in zip(*renders, strict=True):
        assert torch.allclose(a, b, atol=1e-6)

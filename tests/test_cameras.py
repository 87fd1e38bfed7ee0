import math

import pytest
import torch

from promptmesh.backend.cameras import (
    CameraRanges,
    look_at,
    make_cameras,
    ray_bundle,
    sample_cameras,
    sphere_near_far,
    spherical_position,
    view_word,
)


def one(v: float) -> torch.Tensor:
    return torch.tensor([float(v)])


def test_front_camera_sits_on_minus_y_and_looks_at_origin():
    cams = make_cameras(one(0), one(0), one(2), one(40))
    assert torch.allclose(cams.origins[0], torch.tensor([0.0, -2.0, 0.0]), atol=1e-6)
    forward = -cams.c2w[0, :3, 2]
    assert torch.allclose(forward, torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)
    up = cams.c2w[0, :3, 1]
    assert torch.allclose(up, torch.tensor([0.0, 0.0, 1.0]), atol=1e-6)
    right = cams.c2w[0, :3, 0]
    assert torch.allclose(right, torch.tensor([1.0, 0.0, 0.0]), atol=1e-6)


def test_look_at_is_orthonormal_and_right_handed():
    eye = torch.randn(64, 3) * 3
    eye[:, 2] = eye[:, 2].clamp(-1, 1)  # keep away from the poles
    r = look_at(eye)[:, :3, :3]
    assert torch.allclose(r.transpose(1, 2) @ r, torch.eye(3).expand(64, 3, 3), atol=1e-5)
    assert torch.allclose(torch.linalg.det(r), torch.ones(64), atol=1e-5)


def test_spherical_position_angles():
    p = spherical_position(one(90), one(0), one(3))
    assert torch.allclose(p[0], torch.tensor([0.0, 0.0, 3.0]), atol=1e-5)
    p = spherical_position(one(0), one(90), one(1))  # azimuth 90: the right side, +X
    assert torch.allclose(p[0], torch.tensor([1.0, 0.0, 0.0]), atol=1e-6)


@pytest.mark.parametrize(
    "elevation, azimuth, word",
    [(10, 0, "front"), (10, 44, "front"), (10, -44, "front"), (10, 90, "side"), (10, -100, "side"),
     (10, 180, "back"), (10, -150, "back"), (70, 0, "overhead"), (56, 180, "overhead"), (-10, 200, "back")],
)
def test_view_words(elevation, azimuth, word):
    assert view_word(one(elevation), one(azimuth)) == [word]


def test_sampled_cameras_stay_in_ranges_and_are_seeded():
    ranges = CameraRanges()
    a = sample_cameras(500, torch.Generator().manual_seed(3), ranges)
    b = sample_cameras(500, torch.Generator().manual_seed(3), ranges)
    assert torch.equal(a.c2w, b.c2w) and torch.equal(a.light_dir, b.light_dir)
    assert a.elevation.min() >= ranges.elevation[0] and a.elevation.max() <= ranges.elevation[1]
    assert a.distance.min() >= ranges.distance[0] and a.distance.max() <= ranges.distance[1]
    assert torch.allclose(a.origins.norm(dim=-1), a.distance, atol=1e-5)
    # the light is near the camera: on average it lies well within 45 degrees of the view direction
    cos = (a.light_dir * torch.nn.functional.normalize(a.origins, dim=-1)).sum(-1)
    assert cos.mean() > math.cos(math.radians(45))


def test_centre_ray_hits_origin_and_bound_sphere():
    cams = make_cameras(one(30), one(60), one(2.5), one(45))
    origins, dirs = ray_bundle(cams, 2, 2)  # four rays symmetric about the centre
    mean_dir = torch.nn.functional.normalize(dirs.reshape(-1, 3).mean(0), dim=0)
    to_origin = torch.nn.functional.normalize(-cams.origins[0], dim=0)
    assert torch.allclose(mean_dir, to_origin, atol=1e-5)
    near, far, hit = sphere_near_far(cams.origins, to_origin[None])
    assert hit.all() and torch.allclose(near, torch.tensor([1.5])) and torch.allclose(far, torch.tensor([3.5]))

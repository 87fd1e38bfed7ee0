"""Camera and light sampling in the DreamFusion style.

World convention (named once, here): right-handed, **Z up**, like Blender. The object's
front faces -Y, so azimuth 0 puts the camera on the -Y axis looking towards +Y (Blender's
front view), azimuth 90 on +X (right side). Cameras follow the OpenGL convention: they look
along their local -Z with +Y up. Export converts to each file format's axes (see export.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

WORLD_UP = (0.0, 0.0, 1.0)
BOUND_RADIUS = 1.0  # the scene lives inside this sphere around the origin


@dataclass(frozen=True)
class CameraRanges:
    """Ranges the training cameras are drawn from (degrees and scene units)."""

    elevation: tuple[float, float] = (-10.0, 70.0)
    azimuth: tuple[float, float] = (-180.0, 180.0)
    distance: tuple[float, float] = (1.9, 2.4)
    fovy: tuple[float, float] = (35.0, 50.0)
    light_jitter: float = 0.4  # std of the light position around the camera, in units of distance


@dataclass
class Cameras:
    """A batch of pinhole cameras with a directional light each."""

    c2w: torch.Tensor  # [B, 4, 4] camera-to-world
    fovy: torch.Tensor  # [B] radians
    elevation: torch.Tensor  # [B] degrees
    azimuth: torch.Tensor  # [B] degrees in (-180, 180]
    distance: torch.Tensor  # [B]
    light_dir: torch.Tensor  # [B, 3] unit vector from the surface towards the light

    @property
    def origins(self) -> torch.Tensor:
        return self.c2w[:, :3, 3]

    def __len__(self) -> int:
        return self.c2w.shape[0]

    def to(self, device: torch.device | str) -> Cameras:
        return Cameras(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))

    def __getitem__(self, index: slice | torch.Tensor) -> Cameras:
        return Cameras(*(getattr(self, f)[index] for f in self.__dataclass_fields__))

    def cat(self, *others: Cameras) -> Cameras:
        return Cameras(*(torch.cat([getattr(c, f) for c in (self, *others)]) for f in self.__dataclass_fields__))

    def moved(self, offset: torch.Tensor) -> Cameras:
        """The cameras shifted by `offset` ([3], world units) without turning, differentiably in
        it (an image job learns where its reference camera stands). `distance` keeps the value
        they were made with."""
        shift = torch.nn.functional.pad(offset.reshape(1, 3, 1), (3, 0, 0, 1))  # [1, 4, 4]: the last column's xyz
        return replace(self, c2w=self.c2w + shift)


def spherical_position(elevation: torch.Tensor, azimuth: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """Camera position on a sphere; angles in degrees. Azimuth 0 is the front (-Y)."""
    el, az = torch.deg2rad(elevation), torch.deg2rad(azimuth)
    return torch.stack(
        [distance * torch.cos(el) * torch.sin(az), -distance * torch.cos(el) * torch.cos(az), distance * torch.sin(el)], -1
    )


def look_at(eye: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Camera-to-world matrices [B, 4, 4] for cameras at `eye` [B, 3] looking at `target`."""
    target = torch.zeros_like(eye) if target is None else target
    forward = torch.nn.functional.normalize(target - eye, dim=-1)
    up = torch.tensor(WORLD_UP, dtype=eye.dtype, device=eye.device).expand_as(eye)
    right = torch.nn.functional.normalize(torch.cross(forward, up, dim=-1), dim=-1)
    true_up = torch.cross(right, forward, dim=-1)
    c2w = torch.eye(4, dtype=eye.dtype, device=eye.device).repeat(eye.shape[0], 1, 1)
    c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2], c2w[:, :3, 3] = right, true_up, -forward, eye
    return c2w


def make_cameras(
    elevation: torch.Tensor,
    azimuth: torch.Tensor,
    distance: torch.Tensor,
    fovy_deg: torch.Tensor,
    light_pos: torch.Tensor | None = None,
) -> Cameras:
    """Build cameras from spherical coordinates; the light defaults to the camera position."""
    eye = spherical_position(elevation, azimuth, distance)
    light = eye if light_pos is None else light_pos
    azimuth = torch.remainder(azimuth + 180.0, 360.0) - 180.0
    return Cameras(
        c2w=look_at(eye),
        fovy=torch.deg2rad(fovy_deg),
        elevation=elevation,
        azimuth=azimuth,
        distance=distance,
        light_dir=torch.nn.functional.normalize(light, dim=-1),
    )


def mvdream_cameras(cameras: Cameras) -> torch.Tensor:
    """[B, 16]: MVDream's camera input. Its published convention (camera_utils.py of
    bytedance/MVDream) is an OpenGL camera-to-world matrix (columns right, up, backward) in a
    Z-up world whose front view (azimuth 0) looks from -Y, which is ours, with the translation
    scaled to unit length, flattened row by row."""
    c2w = cameras.c2w.clone()
    c2w[:, :3, 3] = torch.nn.functional.normalize(c2w[:, :3, 3], dim=-1)
    return c2w.reshape(-1, 16)


def sample_cameras(
    batch: int, generator: torch.Generator, ranges: CameraRanges = CameraRanges(), azimuth: torch.Tensor | None = None
) -> Cameras:
    """Random training cameras: uniform elevation, azimuth, distance and field of view; the
    light sits at the camera plus Gaussian jitter (DreamFusion places it near the camera).
    A given `azimuth` [batch] replaces the uniform one (the same numbers are drawn either way)."""

    def uniform(lo_hi: tuple[float, float]) -> torch.Tensor:
        lo, hi = lo_hi
        return lo + (hi - lo) * torch.rand(batch, generator=generator)

    elevation, uniform_azimuth = uniform(ranges.elevation), uniform(ranges.azimuth)
    azimuth = uniform_azimuth if azimuth is None else azimuth
    distance, fovy = uniform(ranges.distance), uniform(ranges.fovy)
    return _lit_cameras(elevation, azimuth, distance, fovy, generator, ranges)


def _lit_cameras(elevation: torch.Tensor, azimuth: torch.Tensor, distance: torch.Tensor, fovy: torch.Tensor,
                 generator: torch.Generator, ranges: CameraRanges) -> Cameras:
    """Cameras with the light at each camera plus Gaussian jitter (drawn from `generator`)."""
    eye = spherical_position(elevation, azimuth, distance)
    jitter = torch.randn(len(eye), 3, generator=generator) * ranges.light_jitter * distance[:, None]
    return make_cameras(elevation, azimuth, distance, fovy, light_pos=eye + jitter)


def sample_camera_groups(
    groups: int, views: int, generator: torch.Generator, ranges: CameraRanges = CameraRanges(),
    azimuth: torch.Tensor | None = None,
) -> Cameras:
    """`groups` x `views` cameras for a multi-view prior (MVDream's sampling): in each group the
    views stand at a random azimuth (or the group's given `azimuth`) + k * 360 / views and share
    elevation, distance and field of view; each has its own light jitter. Entries
    [g * views, (g + 1) * views) are group g."""
    first = sample_cameras(groups, generator, ranges, azimuth)
    turn = torch.arange(views, dtype=torch.float32) * (360.0 / views)
    each = lambda x: x.repeat_interleave(views)  # noqa: E731
    azimuth = each(first.azimuth) + turn.repeat(groups)
    elevation, distance, fovy = each(first.elevation), each(first.distance), each(torch.rad2deg(first.fovy))
    return _lit_cameras(elevation, azimuth, distance, fovy, generator, ranges)


def sample_views(views: int, generator: torch.Generator, ranges: CameraRanges = CameraRanges()) -> Cameras:
    """One SDS step's cameras: one random camera for a 2D prior, one group of `views` for a
    multi-view prior."""
    return sample_cameras(1, generator, ranges) if views == 1 else sample_camera_groups(1, views, generator, ranges)


def orbit_cameras(
    count: int, start_azimuth: float = 0.0, elevation: float = 20.0, distance: float = 2.2, fovy: float = 45.0
) -> Cameras:
    """Evenly spaced cameras around the object from `start_azimuth` (previews and video)."""
    azimuth = start_azimuth + torch.arange(count, dtype=torch.float32) * (360.0 / count)
    full = lambda v: torch.full((count,), float(v))  # noqa: E731
    return make_cameras(full(elevation), azimuth, full(distance), full(fovy))


def orbit_groups(count: int, views: int) -> tuple[Cameras, torch.Tensor]:
    """orbit_cameras(count) reordered into groups of `views` cameras 360 / views degrees apart,
    as a multi-view prior sees an object, and the order that puts them back in orbit order."""
    if count % views:
        raise ValueError(f"{count} cameras are not whole groups of {views} views")
    order = torch.arange(count).view(views, count // views).T.flatten()  # group g's view k: orbit g + k * count / views
    return orbit_cameras(count)[order], order.argsort()


OVERHEAD_ABOVE = 55.0  # degrees of elevation above which a view is "overhead" (DreamFusion's threshold)


def view_word(elevation: torch.Tensor, azimuth: torch.Tensor, overhead_above: float = OVERHEAD_ABOVE) -> list[str]:
    """DreamFusion's view word for each camera: overhead, front, side or back."""
    words = []
    for el, az in zip(elevation.tolist(), azimuth.tolist(), strict=True):
        az = (az + 180.0) % 360.0 - 180.0
        if el > overhead_above:
            words.append("overhead")
        elif abs(az) <= 45.0:
            words.append("front")
        elif abs(az) >= 135.0:
            words.append("back")
        else:
            words.append("side")
    return words


def ray_bundle(cameras: Cameras, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """World-space ray origins and unit directions, each [B, H, W, 3], through pixel centres."""
    device, dtype = cameras.c2w.device, cameras.c2w.dtype
    focal = 0.5 * height / torch.tan(0.5 * cameras.fovy)  # [B]
    j, i = torch.meshgrid(
        torch.arange(height, device=device, dtype=dtype), torch.arange(width, device=device, dtype=dtype), indexing="ij"
    )
    x = (i + 0.5 - 0.5 * width)[None] / focal[:, None, None]
    y = -(j + 0.5 - 0.5 * height)[None] / focal[:, None, None]
    dirs_cam = torch.stack([x, y, -torch.ones_like(x)], -1)  # [B, H, W, 3]
    dirs = torch.einsum("bij,bhwj->bhwi", cameras.c2w[:, :3, :3], dirs_cam)
    dirs = torch.nn.functional.normalize(dirs, dim=-1)
    origins = cameras.origins[:, None, None, :].expand_as(dirs)
    return origins, dirs


def sphere_near_far(
    origins: torch.Tensor, dirs: torch.Tensor, radius: float = BOUND_RADIUS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entry and exit distances of rays through the bounding sphere, and a hit mask."""
    b = (origins * dirs).sum(-1)
    c = (origins * origins).sum(-1) - radius * radius
    disc = b * b - c
    hit = disc > 0
    root = torch.sqrt(disc.clamp_min(0.0))
    near = (-b - root).clamp_min(0.0)
    far = (-b + root).clamp_min(0.0)
    return near, far, hit & (far > near)

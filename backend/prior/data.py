"""Procedural training data for the embedded prior: shaded coloured primitives and objects
with a front (mug, chair, arrow, duck), with captions.

Elevation, distance, field of view, light, shading and background follow the NeRF pipeline
exactly (cameras.py, shading.py, background.py) with the settings of the embedded prior's
recipe, and captions are the prompts SDS uses (prompts.py). The azimuth and the captions carry
a web photo collection's bias instead (ViewBias): objects are seen mostly from the front and
their captions rarely name the view. That bias is what makes a 2D prior paint a front on
every side of a 3D object (the Janus problem), so our world can show it and measure fixes.
Captions are drawn afresh at every training step (`draw_captions`), not stored with the images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cameras import Cameras, ray_bundle, sample_camera_groups, sample_cameras, view_word
from ..prompts import VIEWS, view_prompt
from ..recipe import Recipe
from ..shading import ShadingConfig, lambertian
from .shapes import FEATURE_AZIMUTH, OBJECTS, PALETTE, SHAPES, sdf

SUBJECTS = SHAPES + OBJECTS
# Subjects that look the same mirrored left-right (x -> -x): every primitive, and the objects
# whose feature lies on the mirror plane (front or back). A mug's handle at the side would move
# to the other side: mirroring it would teach the prior a Janus.
MIRROR_SYMMETRIC = frozenset(SHAPES) | {o for o in OBJECTS if FEATURE_AZIMUTH[o] % 180 == 0}


@dataclass(frozen=True)
class ViewBias:
    """How the training images frame their subjects, as a photo collection does: the azimuth
    is a wrapped normal around the front (sigma `front_sigma` degrees) except for a share
    `uniform_share` drawn uniformly around the object; only `view_word_rate` of the captions
    drawn for single images name the view. The defaults put 83 % of views within 60 degrees
    of the front and 4 % within 45 degrees of the back."""

    front_sigma: float = 35.0
    uniform_share: float = 0.15
    view_word_rate: float = 0.3
    object_share: float = 0.5  # share of images showing an object with a front (else a primitive)


def biased_azimuth(count: int, generator: torch.Generator, bias: ViewBias) -> torch.Tensor:
    """Azimuths in degrees in [-180, 180) drawn with `bias`."""
    around_front = torch.randn(count, generator=generator) * bias.front_sigma
    anywhere = torch.rand(count, generator=generator) * 360.0 - 180.0
    pick = torch.rand(count, generator=generator) < bias.uniform_share
    return (torch.where(pick, anywhere, around_front) + 180.0) % 360.0 - 180.0


@dataclass
class Batch:
    images: torch.Tensor  # [B, 3, S, S] in [0, 1], display colour
    prompts: list[str]  # "a red cube": the caption before draw_captions names a view or drops it
    cameras: Cameras
    shape_ids: torch.Tensor  # [B] indices into SUBJECTS
    color_ids: torch.Tensor  # [B]


def render_primitives(
    shapes: list[str],
    colors: torch.Tensor,
    cameras: Cameras,
    size: int,
    supersample: int = 2,
    ambient: float = ShadingConfig.ambient,
    background: tuple[float, float, float] = (1.0, 1.0, 1.0),
    iterations: int = 64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Sphere-trace each primitive from its camera on `device`; returns [B, 3, size, size]
    images there. Each subject's SDF runs once per march step over all images showing it."""
    res = size * supersample
    cameras = cameras.to(device)
    origins, dirs = ray_bundle(cameras, res, res)  # [B, R, R, 3]
    start = (cameras.distance - 1.0).clamp_min(0.0)[:, None, None]
    t = start.expand(origins.shape[:-1]).clone()
    hit = torch.zeros_like(t, dtype=torch.bool)
    groups = [(name, torch.tensor([s == name for s in shapes], device=device)) for name in dict.fromkeys(shapes)]

    def field(points: torch.Tensor) -> torch.Tensor:
        out = torch.empty(points.shape[:-1], device=device)
        for name, rows in groups:
            out[rows] = sdf(name, points[rows])
        return out

    for _ in range(iterations):
        d = field(origins + t[..., None] * dirs)
        hit = hit | (d.abs() < 1e-3)
        t = torch.where(hit, t, t + d)
    points = origins + t[..., None] * dirs
    hit = hit & (field(points).abs() < 5e-3)
    eps = 1e-3
    offsets = torch.eye(3, device=device) * eps
    grad = torch.stack([field(points + o) - field(points - o) for o in offsets], -1)
    normals = torch.nn.functional.normalize(grad, dim=-1)
    albedo = colors.to(device)[:, None, None, :].expand_as(points)
    light = cameras.light_dir[:, None, None, :]
    rgb = lambertian(albedo, normals, light, ambient)
    bg = torch.tensor(background, device=device).expand_as(rgb)
    image = torch.where(hit[..., None], rgb, bg).permute(0, 3, 1, 2)
    return torch.nn.functional.avg_pool2d(image, supersample) if supersample > 1 else image


def make_batch(
    count: int, size: int, generator: torch.Generator, recipe: Recipe, bias: ViewBias = ViewBias(), views: int = 1,
    device: torch.device | str = "cpu",
) -> Batch:
    """Random subjects, colours and cameras drawn and lit as `recipe` draws and lights SDS views,
    with the azimuth of `bias`, and their prompts; deterministic for a given generator state (drawn
    on the CPU; the images are rendered on `device` and returned on the CPU).

    With `views` > 1 the batch holds `count` / `views` groups for a multi-view prior, drawn as
    multi-view SDS draws its cameras (cameras.sample_camera_groups): one subject and colour per
    group, seen from a biased azimuth + k * 360 / views, the views sharing elevation, distance
    and field of view."""
    if count % views:
        raise ValueError(f"{count} images are not whole groups of {views} views")
    groups = count // views
    each = lambda x: x.repeat_interleave(views, 0)  # noqa: E731
    is_object = torch.rand(groups, generator=generator) < bias.object_share
    shape_ids = each(torch.where(
        is_object,
        len(SHAPES) + torch.randint(len(OBJECTS), (groups,), generator=generator),
        torch.randint(len(SHAPES), (groups,), generator=generator),
    ))
    color_ids = each(torch.randint(len(PALETTE), (groups,), generator=generator))
    palette = torch.tensor(list(PALETTE.values()))
    jitter = each((torch.rand(groups, 3, generator=generator) - 0.5) * 0.08)
    colors = (palette[color_ids] + jitter).clamp(0, 1)
    azimuth = biased_azimuth(groups, generator, bias)
    cameras = (sample_cameras(count, generator, recipe.cameras, azimuth=azimuth) if views == 1
               else sample_camera_groups(groups, views, generator, recipe.cameras, azimuth=azimuth))
    shapes = [SUBJECTS[i] for i in shape_ids.tolist()]
    images = render_primitives(shapes, colors, cameras, size, ambient=recipe.shading.ambient, device=device).cpu()
    names = list(PALETTE)
    prompts = [f"a {names[c]} {s}" for c, s in zip(color_ids.tolist(), shapes, strict=True)]
    return Batch(images, prompts, cameras, shape_ids, color_ids)


def draw_captions(prompts: list[str], cameras: Cameras, views: int, generator: torch.Generator, empty_rate: float,
                  view_word_rate: float) -> list[str]:
    """Captions for one training draw of images in groups of `views`: per group, empty with
    `empty_rate` (classifier-free guidance's unconditional share), else the prompt, naming the
    camera's view with `view_word_rate` if `views` is 1 (a multi-view group never names one:
    the camera tells it, as in MVDream's data). Drawn at every step, so that every image trains
    the conditional and the unconditional branch, with and without the view word (drawn once
    per image, as datasets were until now, the unconditional branch learnt from a tenth of the
    images only)."""
    groups = len(prompts) // views
    each = lambda x: x.repeat_interleave(views, 0).tolist()  # noqa: E731
    drop = each(torch.rand(groups, generator=generator) < empty_rate)
    named = each(torch.rand(groups, generator=generator) < view_word_rate)
    words = view_word(cameras.elevation, cameras.azimuth)
    return ["" if d else view_prompt(p, w) if n and views == 1 else p
            for p, w, d, n in zip(prompts, words, drop, named, strict=True)]


def possible_captions(prompts: set[str]) -> list[str]:
    """Every caption draw_captions can make of these prompts, sorted: training tokenizes them once."""
    return sorted({"", *prompts, *(view_prompt(p, w) for p in prompts for w in VIEWS)})

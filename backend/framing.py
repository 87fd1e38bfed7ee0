"""How an image job frames its picture and places its camera, stated once for the stage, the
novel-view prior's training data and the result's metadata: the size the prior draws objects
at (FIT_HALF_EXTENT, which a texture job fits a given mesh to as well), the share of the frame
such an object spans in the prior's renders, and the picture recentred to that share (as
Magic123 and stable-dreamfusion preprocess theirs)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .cameras import CameraRanges, Cameras, make_cameras

# A given mesh is scaled for the cameras to the size the prior draws objects at, or it gets
# painted to look that size: a mesh larger than the prior's idea of its subject has its rim
# painted the background's white (a 3-unit cube fitted by its box to 0.55: 27 % of it even).
# Size is the surface's RMS distance from its box centre (area-weighted), which the embedded
# prior's primitives share (0.47-0.55; a cube's box half-extent is 0.42, a sphere's 0.55), and
# never a box half-extent over 0.55 (their largest; thin objects, a mug or an arrow, have a
# small RMS). Every shipped card's cameras frame that size whole.
FIT_RMS_RADIUS = 0.52
FIT_HALF_EXTENT = 0.55


def mean_fov(ranges: CameraRanges) -> float:
    return sum(ranges.fovy) / 2


def frame_share(ranges: CameraRanges) -> float:
    """The share of the frame's side that an object FIT_HALF_EXTENT across (half) spans in the
    prior's renders at the mean distance and field of view of `ranges`."""
    distance = sum(ranges.distance) / 2
    return FIT_HALF_EXTENT / (distance * math.tan(math.radians(mean_fov(ranges)) / 2))


def reference_distance(ranges: CameraRanges, fov: float) -> float:
    """The camera distance at which an object keeps the prior's framing at field of view `fov`."""
    return FIT_HALF_EXTENT / (frame_share(ranges) * math.tan(math.radians(fov) / 2))


def reference_camera(ranges: CameraRanges, elevation: float, fov: float | None) -> Cameras:
    """The front camera (azimuth 0) at `elevation`, lit from where it stands."""
    fov = mean_fov(ranges) if fov is None else fov
    one = lambda v: torch.tensor([float(v)])  # noqa: E731
    return make_cameras(one(elevation), one(0.0), one(reference_distance(ranges, fov)), one(fov))


def recentre(rgba: np.ndarray, size: int, share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """([1, 3, size, size] colour, [1, 1, size, size] mask) of a checked RGBA image: the
    foreground's box centred with its longer side `share` of the frame, resampled with
    antialiasing (colour premultiplied by the mask, so no background bleeds into the edge)."""
    mask = rgba[..., 3] >= 128
    rows, cols = np.nonzero(mask)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    side = max(bottom - top, right - left) / share  # the square frame around it, in source pixels
    cy, cx = (top + bottom) / 2, (left + right) / 2
    x = torch.from_numpy(rgba.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    x = torch.cat([x[:, :3] * (x[:, 3:] >= 0.5), (x[:, 3:] >= 0.5).float()], 1)  # premultiplied, binary mask
    # The frame as an affine grid over the source: pixels outside it are empty (zeros).
    h, w = mask.shape
    theta = torch.tensor([[[side / w, 0.0, (2 * cx / w) - 1], [0.0, side / h, (2 * cy / h) - 1]]], dtype=torch.float32)
    fine = max(size, min(1024, int(round(side))))  # sample at the source's density, then average down
    grid = F.affine_grid(theta, [1, 4, fine, fine], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = F.interpolate(out, (size, size), mode="area") if fine != size else out
    alpha = out[:, 3:]
    return out[:, :3] / alpha.clamp_min(1e-6) * (alpha > 1e-6), alpha

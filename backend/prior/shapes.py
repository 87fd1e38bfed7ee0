"""Analytic primitives as signed distance functions (scene units, Z up, centred).

Used to render the prior's training images and, by the quality benchmark, to judge meshes.
"""

from __future__ import annotations

import torch

SHAPES = ("sphere", "cube", "cylinder", "cone", "torus")

# Display (sRGB) albedo of each colour word; none is close to the white background.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.10, 0.10),
    "green": (0.12, 0.68, 0.16),
    "blue": (0.12, 0.22, 0.88),
    "yellow": (0.95, 0.82, 0.08),
    "purple": (0.56, 0.16, 0.76),
}


def _length2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(a * a + b * b)


def sdf(shape: str, p: torch.Tensor) -> torch.Tensor:
    """Signed distance from points p [..., 3] to a unit-scale primitive or object (negative inside)."""
    if shape in OBJECTS:
        return object_sdf(shape, p)
    x, y, z = p.unbind(-1)
    if shape == "sphere":
        return p.norm(dim=-1) - 0.55
    if shape == "cube":
        q = p.abs() - 0.42
        return q.clamp_min(0).norm(dim=-1) + q.max(-1).values.clamp_max(0)
    if shape == "cylinder":
        dx, dz = _length2(x, y) - 0.42, z.abs() - 0.48
        return torch.maximum(dx, dz).clamp_max(0) + _length2(dx.clamp_min(0), dz.clamp_min(0))
    if shape == "cone":  # apex at z = 0.55, base radius 0.52 at z = -0.5
        radius, height = 0.52, 1.05
        wx, wy = _length2(x, y), z - 0.55
        t = ((wx * radius - wy * height) / (radius * radius + height * height)).clamp(0, 1)
        ax, ay = wx - radius * t, wy + height * t
        bx, by = wx - radius * (wx / radius).clamp(0, 1), wy + height
        dist = torch.sqrt(torch.minimum(ax * ax + ay * ay, bx * bx + by * by))
        inside = torch.maximum(-(wx * -height - wy * radius), -(wy + height)) < 0
        return torch.where(inside, -dist, dist)
    if shape == "torus":
        return _length2(_length2(x, y) - 0.4, z) - 0.17
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES + OBJECTS}")


# ---- objects with a front (the Janus problem's test pieces) ----------------------------------
# Each is a body plus one feature placed at an azimuth: a feature "at azimuth a" lies in the
# direction (sin a, -cos a) from the axis, where a camera at azimuth a stands (0 = the front, -Y;
# 90 = +X). A Janus variant repeats the feature at other azimuths; it is a different shape.
OBJECTS = ("mug", "chair", "arrow", "duck")
FEATURE_AZIMUTH = {"mug": 90.0, "chair": 180.0, "arrow": 90.0, "duck": 0.0}  # where the one feature is
JANUS_VARIANTS = {"180": (0.0, 180.0), "+90": (0.0, 90.0), "-90": (0.0, -90.0), "all4": (0.0, 90.0, 180.0, 270.0)}


def _box(p: torch.Tensor, centre: tuple[float, float, float], half: tuple[float, float, float]) -> torch.Tensor:
    q = (p - p.new_tensor(centre)).abs() - p.new_tensor(half)
    return q.clamp_min(0).norm(dim=-1) + q.max(-1).values.clamp_max(0)


def _capped_cylinder(p: torch.Tensor, radius: float, half_height: float, z0: float = 0.0) -> torch.Tensor:
    x, y, z = p.unbind(-1)
    dx, dz = _length2(x, y) - radius, (z - z0).abs() - half_height
    return torch.maximum(dx, dz).clamp_max(0) + _length2(dx.clamp_min(0), dz.clamp_min(0))


def _ellipsoid(p: torch.Tensor, centre: tuple[float, float, float], radii: tuple[float, float, float]) -> torch.Tensor:
    """An approximate distance (exact on the axes; good enough for occupancy and rendering)."""
    q = (p - p.new_tensor(centre)) / p.new_tensor(radii)
    return (q.norm(dim=-1) - 1) * min(radii)


def _facing(p: torch.Tensor, azimuth: float) -> torch.Tensor:
    """p in the frame turned by `azimuth` about Z, so that what lies at that azimuth lies at 0 (-Y)."""
    a = torch.deg2rad(torch.tensor(azimuth))
    c, s = torch.cos(a), torch.sin(a)
    x, y, z = p.unbind(-1)
    return torch.stack([c * x + s * y, -s * x + c * y, z], -1)


def _body(name: str, p: torch.Tensor) -> torch.Tensor:
    if name == "mug":
        outer = _capped_cylinder(p, 0.30, 0.36)
        inner = _capped_cylinder(p, 0.24, 0.36, z0=0.08)
        return torch.maximum(outer, -inner)
    if name == "chair":
        seat = _box(p, (0.0, 0.0, -0.02), (0.34, 0.34, 0.05))
        legs = [_box(p, (sx * 0.26, sy * 0.26, -0.30), (0.08, 0.08, 0.24)) for sx in (-1, 1) for sy in (-1, 1)]
        return torch.stack([seat, *legs]).min(0).values
    if name == "arrow":  # a shaft along the X axis
        x, y, z = p.unbind(-1)
        dr, dx = _length2(y, z) - 0.11, x.abs() - 0.45
        return torch.maximum(dr, dx).clamp_max(0) + _length2(dr.clamp_min(0), dx.clamp_min(0))
    if name == "duck":
        return _ellipsoid(p, (0.0, 0.08, -0.12), (0.30, 0.42, 0.24))
    raise ValueError(f"unknown object {name!r}; expected one of {OBJECTS}")


def _feature(name: str, q: torch.Tensor) -> torch.Tensor:
    """The feature in its own frame, where it lies toward -Y (the direction of azimuth 0)."""
    if name == "mug":  # a handle: a torus in the vertical plane through the axis
        x, y, z = q.unbind(-1)
        ring = _length2(_length2(y + 0.36, z) - 0.18, x) - 0.09
        return torch.maximum(ring, -(-y - 0.30))  # only the half outside the body
    if name == "chair":  # a backrest
        return _box(q, (0.0, -0.28, 0.28), (0.34, 0.08, 0.26))
    if name == "arrow":  # a head: a cone along -Y at the end of the shaft
        x, y, z = q.unbind(-1)
        along = -y - 0.30  # 0 at the base of the head, 0.38 at its tip
        radius = 0.28 * (1 - along / 0.38)
        side = (_length2(x, z) - radius) * 0.8
        return torch.maximum(side, torch.maximum(-along, along - 0.38))
    if name == "duck":  # a head with a beak, above the front of the body
        neck = _capped_cylinder(q - q.new_tensor((0.0, -0.28, 0.0)), 0.12, 0.14, z0=0.12)
        head = _ellipsoid(q, (0.0, -0.30, 0.30), (0.21, 0.21, 0.21))
        beak = _ellipsoid(q, (0.0, -0.50, 0.27), (0.10, 0.16, 0.07))
        return torch.stack([neck, head, beak]).min(0).values
    raise ValueError(f"unknown object {name!r}; expected one of {OBJECTS}")


def object_sdf(name: str, p: torch.Tensor, offsets: tuple[float, ...] = (0.0,)) -> torch.Tensor:
    """An object with its feature at FEATURE_AZIMUTH[name] + each of `offsets` degrees: (0,)
    is the right object; JANUS_VARIANTS' offsets give its Janus variants."""
    base = FEATURE_AZIMUTH[name]
    parts = [_body(name, p)] + [_feature(name, _facing(p, base + o)) for o in offsets]
    return torch.stack(parts).min(0).values

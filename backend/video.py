"""A turntable video of the final NeRF (MP4 through imageio-ffmpeg, or GIF)."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np

from ..shared.result import atomic_target
from .cameras import orbit_cameras
from .stages import NeRFModel


def write_turntable(nerf: NeRFModel, path: str | Path, frames: int = 48, size: int = 128, fps: int = 24) -> Path:
    """Render `frames` views around the object and write them to `path` (.mp4 or .gif)."""
    path = Path(path)
    cams = orbit_cameras(frames)
    rgba = np.concatenate([nerf.render_rgba(cams[i : i + 8], size) for i in range(0, frames, 8)])
    rgb = rgba[..., :3]
    with atomic_target(path) as tmp:
        if path.suffix.lower() == ".gif":
            iio.imwrite(tmp, rgb, duration=1000 / fps, loop=0)
        else:
            iio.imwrite(tmp, rgb, fps=fps, codec="libx264", macro_block_size=16)
    return path

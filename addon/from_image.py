"""From Image: a picture in Blender becomes the reference of an image job.

The image is the one chosen in the panel (any image in the .blend, or a file opened into it),
else the Image Editor's. Its pixels go as the backend's `image` request wants them: uint8 RGBA,
top row first, display (sRGB) values; the foreground is found, and checked, by the same torch-
free code as the CLI's (shared/image.py), so an image without a clear object is refused here,
before anything is sent.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .shared.image import MAX_SIDE, ImageError, foreground_rgba


def editor_image(context: Any) -> Any:
    """The image shown in an Image Editor of the current screen (the first one), or None."""
    screen = getattr(context, "screen", None)
    for area in screen.areas if screen is not None else ():
        if area.type == "IMAGE_EDITOR" and area.spaces.active.image is not None:
            return area.spaces.active.image
    return None


def chosen_image(context: Any) -> Any:
    """The image a From Image job uses: the panel's, else the Image Editor's; None if neither."""
    return context.scene.promptmesh.image or editor_image(context)


def _srgb(linear: np.ndarray) -> np.ndarray:
    """Linear light to sRGB display values (IEC 61966-2-1), for float images."""
    x = np.clip(linear, 0.0, 1.0)
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * np.power(x, 1 / 2.4) - 0.055)


def image_rgba(image: Any) -> np.ndarray:
    """The image as the backend checks it: uint8 RGBA [H, W, 4], top row first, sRGB, its alpha
    the foreground (its own transparency, else a matte of a plain background); one larger than
    MAX_SIDE is shrunk (the reference is rendered at the prior's resolution, far smaller).
    ImageError saying why an image cannot be used."""
    if image is None:
        raise ImageError("image: choose one in the panel, or show one in an Image Editor")
    w, h = image.size  # reading the size loads the file
    if w == 0 or h == 0:
        raise ImageError(f"image: '{image.name}' has no pixels (its file is missing or unreadable)")
    pixels = np.empty(w * h * 4, np.float32)
    image.pixels.foreach_get(pixels)  # bottom row first, floats; byte images keep their stored (sRGB) values
    is_float = bool(image.is_float)
    rgba = pixels.reshape(h, w, 4)[::-1]
    if max(w, h) > MAX_SIDE:  # to travel, the nearest pixel of each of MAX_SIDE columns or rows
        scale = MAX_SIDE / max(w, h)
        rows = ((np.arange(max(1, round(h * scale))) + 0.5) / scale).astype(int)
        cols = ((np.arange(max(1, round(w * scale))) + 0.5) / scale).astype(int)
        rgba = rgba[np.minimum(rows, h - 1)][:, np.minimum(cols, w - 1)]
    rgb = _srgb(rgba[..., :3]) if is_float else np.clip(rgba[..., :3], 0.0, 1.0)
    to_byte = lambda x: np.round(x * 255.0).astype(np.uint8)  # noqa: E731
    alpha = to_byte(np.clip(rgba[..., 3], 0.0, 1.0))
    return foreground_rgba(np.ascontiguousarray(to_byte(rgb)), alpha)

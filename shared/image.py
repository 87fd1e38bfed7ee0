"""A picture someone brings to be made into an object (`promptmesh generate --image`, the
`image` request): its pixels and its foreground checked before any work starts, by the client
and again by the server. Torch-free (numpy only), so the add-on can use it too.

The foreground is, in this order: a given mask; else the image's alpha where it has any
transparency; else a matte for a plain background (`border_matte`): pixels far in colour from
the median colour of the image's border. That matte assumes one even background colour that
differs from the object's; a gradient, a shadow, a textured backdrop or an object of the
background's colour defeats it, and an image that shows no clear foreground is refused.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .errors import PromptMeshError
from .vocab import ErrorCode

MIN_SIDE = 32  # pixels: below this an image cannot show an object's outline
# An image travels whole in one request, which a server takes up to 32 MB of: 2048^2 RGBA is 16 MB.
# The reference view is rendered at the prior's resolution (32 to 128 px), so nothing is lost;
# read_image shrinks a larger file to fit.
MAX_SIDE = 2048
MIN_FOREGROUND = 0.01  # share of the pixels: less is a speck, not an object
MAX_FOREGROUND = 0.95  # share of the pixels: more is the whole frame, no outline to fit
# The border matte: a pixel is foreground when its RGB distance (0..441) from the border's median
# colour exceeds this. 40 is about 9 % of the range: above JPEG noise and soft shading of a plain
# backdrop, below the difference between any two of the prior's palette colours and white.
MATTE_DISTANCE = 40.0
BORDER_SPREAD = 25.0  # border pixels' median distance from their median: above it, the background is not plain
ELEVATION_RANGE = (-30.0, 60.0)  # degrees: the reference camera, within what the priors' cameras see
FOV_RANGE = (15.0, 90.0)  # degrees, vertical


class ImageError(PromptMeshError):
    """The image cannot be made into an object as given; the message says why."""

    code = ErrorCode.BAD_REQUEST


@dataclass
class Reference:
    """An image checked for a job: RGBA uint8 [H, W, 4] whose alpha is the foreground mask, and
    the camera it was taken from (degrees; azimuth 0, the object's front)."""

    rgba: np.ndarray
    elevation: float = 0.0
    fov: float | None = None  # vertical field of view; None: the prior's own mean

    def identity(self) -> dict[str, object]:
        """What tells this image and camera from another (a checkpoint records it)."""
        digest = hashlib.sha256(np.ascontiguousarray(self.rgba).tobytes()).hexdigest()[:16]
        return {"image": f"{self.rgba.shape[1]}x{self.rgba.shape[0]} sha256:{digest}", "elevation": self.elevation,
                "fov": self.fov}


# Measured on the embedded prior (docs/image_to_3d.md, "Without a prompt"): 3 of 24 image jobs
# right with no prompt, 16 with one.
NO_PROMPT = ("no prompt and no novel-view prior: the sides the image does not show are guessed without words, "
             "mostly wrongly in our tests (docs/image_to_3d.md); name the object in the prompt")


def image_job_warnings(prompt: str, novel_view: str | None) -> list[str]:
    """What an image job's author should know before its result: said by the CLI's generate and
    submit at the start and kept in the result's warnings (which the add-on shows). Torch-free,
    so the client side can say it before anything is sent."""
    return [NO_PROMPT] if not prompt.strip() and novel_view is None else []


def check_camera(elevation: object, fov: object) -> tuple[float, float | None]:
    """The reference camera's elevation and field of view as numbers in range, or ImageError."""

    def degrees(name: str, value: object, lo: float, hi: float) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
            raise ImageError(f"{name}: must be a number of degrees from {lo:g} to {hi:g}, got {str(value)[:40]!r}")
        return float(value)

    return degrees("elevation", elevation, *ELEVATION_RANGE), None if fov is None else degrees("fov", fov, *FOV_RANGE)


def check_rgba(rgba: np.ndarray) -> np.ndarray:
    """An image as it travels: uint8 [H, W, 4] with both sides within MIN_SIDE..MAX_SIDE, its
    alpha the foreground; ImageError naming what is wrong, including a foreground that is no
    object (`check_foreground`)."""
    a = np.asarray(rgba)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 4:
        raise ImageError(f"image: must be uint8 [H, W, 4] (RGBA), got {a.dtype} {list(a.shape)}")
    check_size(a.shape[1], a.shape[0])
    check_foreground(a[..., 3] >= 128)
    return np.ascontiguousarray(a)


def check_size(width: int, height: int) -> None:
    for side, name in ((width, "width"), (height, "height")):
        if not MIN_SIDE <= side <= MAX_SIDE:
            raise ImageError(f"image: its {name} is {side} pixels; it must be {MIN_SIDE} to {MAX_SIDE}")


def check_foreground(mask: np.ndarray) -> None:
    """ImageError when the mask [H, W] bool shows no object: nearly empty, or the whole frame."""
    share = float(mask.mean())
    if share < MIN_FOREGROUND:
        raise ImageError(f"image: its foreground covers {share:.1%} of it, too small to be an object (at least "
                         f"{MIN_FOREGROUND:.0%}); give a mask (--mask) or crop closer")
    if share > MAX_FOREGROUND:
        raise ImageError(f"image: its foreground covers {share:.1%} of it, the whole frame, so it has no outline "
                         f"to fit (at most {MAX_FOREGROUND:.0%}); give a mask (--mask), an image with transparency, "
                         "or one on a plain background with room around the object")


def border_matte(rgb: np.ndarray) -> np.ndarray:
    """Foreground [H, W] bool of an RGB uint8 image on a plain background: pixels whose colour is
    further than MATTE_DISTANCE from the median colour of the one-pixel border. ImageError when
    the border is not one colour (its spread exceeds BORDER_SPREAD)."""
    x = rgb.astype(np.float32)
    border = np.concatenate([x[0], x[-1], x[1:-1, 0], x[1:-1, -1]])
    background = np.median(border, axis=0)
    spread = float(np.median(np.linalg.norm(border - background, axis=1)))
    if spread > BORDER_SPREAD:
        raise ImageError("image: it has no transparency and its border is not one plain colour, so its foreground "
                         "cannot be told from the background; give a mask (--mask) or an image with transparency")
    return np.linalg.norm(x - background, axis=-1) > MATTE_DISTANCE


def foreground_rgba(rgb: np.ndarray, alpha: np.ndarray | None = None, mask: np.ndarray | None = None) -> np.ndarray:
    """RGBA uint8 [H, W, 4] whose alpha is the foreground: `mask` [H, W] (nonzero: object) when
    given, else `alpha` [H, W] when it has any transparency, else `border_matte`; checked whole
    (`check_rgba`)."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ImageError(f"image: must be uint8 [H, W, 3] colour, got {rgb.dtype} {list(rgb.shape)}")
    check_size(rgb.shape[1], rgb.shape[0])
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != rgb.shape[:2]:
            raise ImageError(f"mask: its size {m.shape[1]}x{m.shape[0]} is not the image's {rgb.shape[1]}x{rgb.shape[0]}")
        fg = m > (127 if m.dtype == np.uint8 else 0)
    elif alpha is not None and int(np.asarray(alpha).min()) < 255:
        fg = np.asarray(alpha) >= 128
    else:
        fg = border_matte(rgb)
    rgba = np.concatenate([rgb, np.where(fg, 255, 0).astype(np.uint8)[..., None]], -1)
    return check_rgba(rgba)


def read_image(path: str, mask_path: str | None = None) -> np.ndarray:
    """An image file (PNG, JPEG, WebP, ... whatever Pillow reads) and an optional mask file as
    a checked RGBA uint8 array (`foreground_rgba`); ImageError for a file that is not an image
    or has a mode or size that cannot be used. Pillow is imported here: only the CLI needs it."""
    from PIL import Image, UnidentifiedImageError

    def load(p: str, what: str) -> Image.Image:
        try:
            img = Image.open(p)
            img.load()
        except FileNotFoundError:
            raise ImageError(f"{what}: no file {p}") from None
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
            raise ImageError(f"{what}: {p} is not an image Pillow can read ({exc})") from None
        return img

    img = load(path, "image")
    if img.mode not in ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "I;16", "I", "F"):
        raise ImageError(f"image: {path} has {img.mode} channels; give RGB(A) or grey (CMYK and others are not read)")
    has_alpha = img.mode in ("LA", "PA", "RGBA") or (img.mode == "P" and "transparency" in img.info)
    size = img.size
    img = img.convert("RGBA")
    if max(size) > MAX_SIDE:  # shrunk to travel; the mask, if any, follows
        img = img.resize(_fit(size), Image.Resampling.LANCZOS)
    check_size(*img.size)
    rgba = np.asarray(img)
    mask = None
    if mask_path is not None:
        m = load(mask_path, "mask")
        if m.size != size:
            raise ImageError(f"mask: its size {m.size[0]}x{m.size[1]} is not the image's {size[0]}x{size[1]}")
        m = m.resize(img.size, Image.Resampling.NEAREST) if m.size != img.size else m
        alpha_channel = np.asarray(m.getchannel("A")) if m.mode in ("LA", "RGBA") else None
        transparent = alpha_channel is not None and int(alpha_channel.min()) < 255
        mask = alpha_channel if transparent else np.asarray(m.convert("L"))
    return foreground_rgba(np.ascontiguousarray(rgba[..., :3]), rgba[..., 3] if has_alpha else None, mask)


def _fit(size: tuple[int, int]) -> tuple[int, int]:
    """`size` (w, h) scaled so that its longer side is MAX_SIDE."""
    scale = MAX_SIDE / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))

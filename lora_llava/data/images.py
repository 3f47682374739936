"""Images: safe paths under the image folder, decoding with guards, RGB, LLaVA-1.5's pad-to-square."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from PIL import Image

from ..errors import ImageError
from ..llava.constants import CLIP_MEAN

__all__ = ["MAX_PIXELS", "expand_to_square", "image_header", "load_image", "mean_fill", "probe_image",
           "resolve_image_path", "to_rgb"]
MAX_PIXELS = 64_000_000
"""Images larger than this are refused (decompression-bomb guard); a 336 px model never needs more."""


def resolve_image_path(root: str | Path | None, relative: str) -> Path:
    """``root / relative``, refusing anything that would leave ``root`` (``..``, absolute paths, symlinks out)."""
    if root is None:
        raise ImageError(f"image '{relative}' needs data.image_folder to be set")
    root = Path(root).resolve()
    path = (root / relative).resolve()
    if path != root and root not in path.parents:
        raise ImageError(f"image path '{relative}' leaves the image folder '{root}'")
    return path


def _read(root: str | Path | None, relative: str,
          decode: bool) -> tuple[os.stat_result, tuple[int, int], Image.Image | None]:
    """The checks every image read makes (under ``root``, present, a format PIL reads, within :data:`MAX_PIXELS`):
    the file's ``stat``, its ``(height, width)`` from the header, and with ``decode`` the pixels as RGB. Any failure is
    an :class:`ImageError` naming the image."""
    path = resolve_image_path(root, relative)
    if not path.is_file():
        raise ImageError(f"image '{relative}' not found (looked at '{path}')")
    stat = path.stat()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise ImageError(f"image '{relative}' is {im.width}x{im.height}, over the {MAX_PIXELS} pixel limit")
                size = (im.height, im.width)
                if not decode:
                    return stat, size, None
                im.load()
                return stat, size, to_rgb(im)
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ImageError(f"image '{relative}' cannot be decoded ({e})") from None


def probe_image(root: str | Path | None, relative: str) -> os.stat_result:
    """Cheap checks of an image, without decoding its pixels: it exists under ``root``, its header names a format PIL
    reads and a size within :data:`MAX_PIXELS`. Returns the file's ``stat`` (size and time tell a changed file)."""
    return _read(root, relative, decode=False)[0]


def image_header(root: str | Path | None, relative: str) -> tuple[os.stat_result, tuple[int, int]]:
    """:func:`probe_image` plus the image's ``(height, width)``, read from its header (PIL opens lazily: no pixel is
    decoded). That is the size the image processor sees: :func:`to_rgb` never changes it, and EXIF orientation is
    not applied in training either."""
    stat, size, _ = _read(root, relative, decode=False)
    return stat, size


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Paste ``image`` centred on a square of colour ``fill`` (LLaVA-1.5 ``pad``)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), fill)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as RGB the way training reads it (16-bit greyscale scaled, transparency over white)."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):
        # 16-bit greyscale (PNG): PIL's convert() clips every value above 255, so most of the picture turns white.
        # Scale 0..65535 onto 0..255 instead.
        import numpy as np

        grey = np.rint(np.asarray(image, dtype=np.float64) / 257).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels over white, as a person viewing the image sees them.
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def load_image(root: str | Path | None, relative: str, aspect: str = "pad",
               mean: tuple[float, float, float] = CLIP_MEAN) -> Image.Image:
    """Open an image under ``root`` as RGB, padded to a square when ``aspect == "pad"``."""
    image = _read(root, relative, decode=True)[2]
    if aspect == "pad":
        image = expand_to_square(image, mean_fill(mean))
    return image


def mean_fill(mean: tuple[float, ...]) -> tuple[int, int, int]:
    """The pad colour of ``pad``: the image processor's mean, in 0..255 (truncated, as the reference)."""
    return tuple(int(c * 255) for c in mean)

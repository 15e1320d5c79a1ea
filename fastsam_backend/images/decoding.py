"""Image bytes → ``(H, W, 3)`` uint8 RGB, EXIF orientation applied; refuses what it should not decode.

- Only the formats Label Studio shows (``FORMATS``): Pillow reads many more, some through
  decoders rarely exercised on hostile input (EPS even runs Ghostscript).
- The pixel count is checked on the header, before any pixel is decoded (decompression bombs).
- Truncated or corrupt data is an error, not a partly grey image.
- Animated GIF/WebP: the first frame. 16-bit greyscale is scaled to 8 bits; palette, CMYK,
  greyscale and alpha images become RGB (alpha dropped, transparent pixels keep their colour).
"""

from __future__ import annotations

import io
import logging
import sys

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fastsam_backend.errors import ImageError

log = logging.getLogger(__name__)

# JPEG includes phones' multi-picture (MPO) files; AVIF only where Pillow was built with it
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")


def _formats() -> tuple[str, ...]:
    Image.init()  # registers the plugins once; later calls return at once
    return tuple(f for f in FORMATS if f in Image.OPEN)


def decode_image(data: bytes, source: str, content_type: str | None, max_pixels: int) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB of ``data``; ``source`` names the origin in messages.

    Raises:
        ImageError: not an image of ``FORMATS``, corrupt or truncated, or over ``max_pixels``.
    """
    try:
        with _pillow_open()(io.BytesIO(data), formats=_formats()) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(f"image from {source} is {width}x{height}, over the limit of "
                                 f"{max_pixels} pixels (MAX_IMAGE_PIXELS)")
            image.load()  # decode now: a truncated file fails here, not in the EXIF step below
            try:
                upright = ImageOps.exif_transpose(image)
            except Exception as exc:  # a broken EXIF block should not lose the image
                log.warning("ignoring unreadable EXIF in image from %s: %s", source, exc)
                upright = image
            return _to_rgb(upright)
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError(f"image from {source} is too large to decode safely") from None
    except UnidentifiedImageError:
        cause = f"not a recognised image format ({len(data)} bytes"
        cause += f" of {content_type})" if content_type else ")"
        cause += "; accepted: " + ", ".join(_formats())
    except Exception as exc:  # Pillow raises many types on corrupt data
        cause = f"{type(exc).__name__}: {exc}"
    log.warning("could not decode image from %s (%d bytes): %s", source, len(data), cause)
    raise ImageError(f"could not decode image from {source}: {cause}")


def _pillow_open():
    """Pillow's own ``Image.open``. Importing ultralytics replaces it process-wide with a wrapper
    that, on bytes Pillow cannot identify, tries to pip-install pi-heif: never on our request path."""
    patches = sys.modules.get("ultralytics.utils.patches")
    if patches is not None and Image.open is getattr(patches, "image_open", None):
        return getattr(patches, "_image_open", Image.open)
    return Image.open


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode.startswith("I") or image.mode == "F":  # 16/32-bit integer and float greyscale
        grey = np.asarray(image).astype(np.float32)
        if image.mode.startswith("I;16") or (image.mode == "I" and grey.max(initial=0) > 255):
            grey /= 257.0  # 16-bit range onto 8-bit
        grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode in ("P", "PA", "La"):  # palette transparency, premultiplied alpha
        image = image.convert("RGBA")
    return np.array(image if image.mode == "RGB" else image.convert("RGB"), dtype=np.uint8)

"""Robust image decoding to RGB, shared by every CPU path and by check-data.

Real ImageNet is messier than its extensions say: a few ".JPEG" files are PNGs,
some JPEGs are CMYK, some are grayscale. We detect the format from the bytes,
convert every mode to 8-bit RGB, and turn any decoding failure into a
CorruptImageError that names the file, so a bad image never surfaces as an
opaque trace mid-epoch. PIL's global LOAD_TRUNCATED_IMAGES is left untouched:
a truncated file is an error here, not a silently gray-padded image.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipelines.sources import DataError

# Leading bytes of the formats we name in reports; anything else PIL opens is "other".
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)

# Formats the extension promises; used to flag e.g. PNG-inside-.JPEG.
_EXTENSION_FORMAT = {".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png", ".bmp": "bmp", ".gif": "gif",
                     ".tif": "tiff", ".tiff": "tiff", ".webp": "webp"}


class CorruptImageError(DataError):
    """A file that cannot be decoded (truncated, corrupt, or not an image); the message names it."""


class ImageInfo(NamedTuple):
    """What `probe_image` learns from a file's header without decoding its pixels."""

    width: int
    height: int
    mode: str
    """PIL mode as stored: "RGB", "L", "CMYK", "P", "RGBA", "I;16", ..."""
    format: str
    """Format detected from the bytes ("jpeg", "png", ...), whatever the extension says."""


def sniff_format(header: bytes) -> str:
    """The format named by a file's first bytes: "jpeg", "png", "gif", "bmp", "tiff", "webp" or "unknown"."""
    for magic, name in _SIGNATURES:
        if header.startswith(magic):
            return name
    if header[:4] == b"RIFF" and header[8:12] == b"WEBP":
        return "webp"
    return "unknown"


def extension_format(path: str | Path) -> str | None:
    """The format a file's extension promises (".JPEG" -> "jpeg"), or None for an unknown extension."""
    return _EXTENSION_FORMAT.get(os.path.splitext(str(path))[1].lower())


def _open_checked(source: BinaryIO, name: str) -> Image.Image:
    """Image.open with every failure mapped to CorruptImageError naming `name`."""
    try:
        return Image.open(source)
    except UnidentifiedImageError as err:
        raise CorruptImageError(f"{name} is not an image PIL can identify (empty, garbage, or an unsupported "
                                f"format): delete or replace it, or run `byol-fast check-data` on the tree") from err
    except Image.DecompressionBombError as err:
        raise CorruptImageError(f"{name} is implausibly large ({err}): replace it with a normal-sized image") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise CorruptImageError(f"{name} has a corrupt header ({err}): delete or replace it") from err


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (the pixels must already be loaded).

    Alpha is dropped (the colour channels are kept as stored), matching
    torchvision's ImageFolder loader; 16/32-bit grayscale is scaled to 8 bits
    instead of being clipped; CMYK uses PIL's conversion, which also undoes
    the inverted CMYK of Adobe JPEGs at decode time.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        # PNG 16-bit grayscale decodes as "I;16" or "I" (0..65535); convert("L") would clip at 255.
        wide = np.asarray(image, dtype=np.int64)
        return Image.fromarray((np.clip(wide, 0, 65535) >> 8).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if values.max(initial=0.0) <= 1.0 else 1.0
        return Image.fromarray(np.clip(values * scale, 0, 255).round().astype(np.uint8), "L").convert("RGB")
    if mode in ("P", "PA"):
        # Go through RGBA so palette transparency is honoured without PIL's transparency warning.
        image = image.convert("RGBA")
    return image.convert("RGB")


def decode_rgb(source: bytes | BinaryIO, name: str = "<bytes>") -> Image.Image:
    """Decode an in-memory or open image to an RGB PIL image; `name` labels errors.

    The format comes from the bytes, never from an extension. Raises
    CorruptImageError for truncated, corrupt and non-image data.
    """
    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    image = _open_checked(stream, name)
    try:
        image.load()
        # Inside the try: a mode PIL cannot convert (e.g. a LAB TIFF) is reported by path too.
        return to_rgb(image)
    except Image.DecompressionBombError as err:
        raise CorruptImageError(f"{name} is implausibly large ({err}): replace it with a normal-sized image") from err
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as err:
        # PIL reports truncation as OSError("image file is truncated ...") and bad streams as assorted errors.
        raise CorruptImageError(f"{name} is truncated or corrupt ({type(err).__name__}: {err}): "
                                f"re-download or delete it; `byol-fast check-data` lists every such file") from err


def load_rgb(path: str | Path) -> Image.Image:
    """Decode the image file at `path` to an RGB PIL image (JPEG, PNG, ... by content).

    CMYK, grayscale, palette and alpha images come back as RGB. Raises
    CorruptImageError (a DataError) naming the path for truncated, corrupt and
    non-image files, and DataError for a missing file.
    """
    name = str(path)
    try:
        with open(path, "rb") as handle:
            return decode_rgb(handle, name)
    except FileNotFoundError as err:
        raise DataError(f"image {name} does not exist: re-scan the data folder (files moved since indexing?)") from err
    except IsADirectoryError as err:
        raise DataError(f"{name} is a folder, not an image: check the data layout") from err


def probe_image(path: str | Path) -> ImageInfo:
    """Read only the header of an image: size, stored mode and true format.

    Cheap (no pixel decoding), so it cannot detect truncation; `load_rgb`
    does. Raises CorruptImageError for files PIL cannot identify.
    """
    name = str(path)
    if not os.path.isfile(name):
        raise DataError(f"image {name} does not exist or is not a file: re-scan the data folder")
    with open(path, "rb") as handle:
        header = handle.read(16)
        handle.seek(0)
        with _open_checked(handle, name) as image:
            width, height = image.size
            mode = image.mode
            pil_format = (image.format or "").lower()
    detected = sniff_format(header)
    return ImageInfo(width=width, height=height, mode=mode,
                     format=detected if detected != "unknown" else (pil_format or "unknown"))

"""Reading and writing images with Pillow: 8-bit RGB arrays in, any Pillow format out."""

from __future__ import annotations

import io
import os
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..format.container import DEFAULT_MAX_PIXELS, MAX_DIM, check_pixels
from ..errors import ImageError, LimitError


def to_rgb(img: Image.Image) -> tuple[np.ndarray, list[str]]:
    """Any Pillow image -> (H, W, 3) uint8 RGB and a list of warnings (alpha flattened on white)."""
    notes = []
    img = ImageOps.exif_transpose(img)
    w, h = img.size
    if not (1 <= w <= MAX_DIM and 1 <= h <= MAX_DIM):
        raise LimitError(f"image is {w}x{h}; width and height must be 1..{MAX_DIM}")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.float64)
        a = np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8)
        img = Image.fromarray(a, "L")
    elif img.mode == "F":
        a = np.clip(np.round(np.asarray(img, dtype=np.float64)), 0, 255).astype(np.uint8)
        img = Image.fromarray(a, "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:
            notes.append("the image has transparency; it was flattened onto white")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy(), notes


def read(path: str | os.PathLike, max_pixels: int | None = None) -> tuple[np.ndarray, bytes | None, list[str]]:
    """An image file -> (RGB array, ICC profile or None, warnings). Errors are ImageError/LimitError.

    The size is checked against the pixel budget (container.check_pixels) before any pixel is decoded.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.is_dir():
        raise ImageError(f"{path} is a directory")
    return _read(path, str(path), max_pixels)


def read_data(data: bytes, name: str = "<stdin>", max_pixels: int | None = None) -> tuple[np.ndarray, bytes | None, list[str]]:
    """read() for the bytes of an image file (standard input); the same pixels as from the file."""
    return _read(io.BytesIO(data), name, max_pixels)


def _read(source, path: str, max_pixels: int | None) -> tuple[np.ndarray, bytes | None, list[str]]:
    old_limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Pillow's own check, at our budget, for the time of this call (it warns above the budget)
            Image.MAX_IMAGE_PIXELS = max(1, min(MAX_DIM * MAX_DIM, DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels))
            with Image.open(source) as img:
                w, h = img.size
                if not (1 <= w <= MAX_DIM and 1 <= h <= MAX_DIM):
                    raise LimitError(f"{path}: image is {w}x{h}; width and height must be 1..{MAX_DIM}")
                check_pixels(w, h, max_pixels, path)
                img.load()
                icc = img.info.get("icc_profile")
                arr, notes = to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise LimitError(f"{path}: image is too large for the pixel budget (raise it with --max-pixels)") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError, struct.error) as e:
        raise ImageError(f"{path}: cannot read image ({e})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = old_limit
    return arr, (bytes(icc) if icc else None), notes


def to_pil(arr: np.ndarray, icc: bytes | None = None) -> Image.Image:
    img = Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8), "RGB")
    if icc:
        img.info["icc_profile"] = icc
    return img


def format_for(suffix: str) -> str | None:
    """The Pillow format that writes files with this suffix (".png" -> "PNG"), or None.

    Pillow's common formats first (Image.preinit): loading every plugin (registered_extensions) takes
    longer than writing a photo's PNG, so that waits for a suffix they lack."""
    Image.preinit()
    fmt = Image.EXTENSION.get(suffix.lower())
    if fmt not in Image.SAVE:
        fmt = Image.registered_extensions().get(suffix.lower())
    return fmt if fmt in Image.SAVE else None


def encode_image(img: Image.Image, path: str | os.PathLike) -> bytes:
    """The bytes of img saved in the format named by path's extension."""
    buf = io.BytesIO()
    fmt = format_for(Path(path).suffix)
    if fmt is None:
        raise ImageError(f"{path}: unknown image format (use .png, .jpg, .webp, ...)")
    kw = {"compress_level": 1} if fmt == "PNG" else {}  # 7x faster than level 6 for 10% more bytes
    icc = img.info.get("icc_profile")
    if icc and fmt in ("PNG", "JPEG", "WEBP", "TIFF"):
        kw["icc_profile"] = icc
    try:
        img.save(buf, format=fmt, **kw)
    except (OSError, KeyError, ValueError) as e:
        raise ImageError(f"{path}: cannot write {fmt} ({e})") from None
    return buf.getvalue()

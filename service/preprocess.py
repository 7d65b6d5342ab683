"""Untrusted image bytes -> the model's input, exactly as training fed it, torch-free.

Training (`training/data.py`) converts every image to the run's color mode with PIL, resizes it to img_size with
PIL bilinear, and `to_tensor` scales by 1/255 and normalises with the train-split mean/std into NCHW float32.
Every way an upload can be bad ends in `BadImage` with an HTTP status and a message that says what was wrong.
"""
from __future__ import annotations

import io
import warnings
from typing import NamedTuple, Optional

import numpy as np

__all__ = ["BadImage", "InputSpec", "ALLOWED_FORMATS", "INLINE_DECODE_PIXELS", "decode_image", "header_pixels",
           "decode_inline", "normalize"]

# Decoders PIL may use on uploads: the common raster formats, nothing that shells out (EPS) or is exotic.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "PPM")

# Uploads whose header declares at most this many pixels decode on the event loop (well under a millisecond, less
# than a thread hop); decoding cost follows pixels, not bytes: a flat 3000 x 3000 PNG is ~10 KB and takes seconds.
INLINE_DECODE_PIXELS = 128 * 128


class BadImage(ValueError):
    """An upload that is not a usable image; `status` is the HTTP code to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class InputSpec(NamedTuple):
    """The manifest's `input` block, reduced to what preprocessing needs."""

    img_size: int
    color_mode: str  # 'L' | 'RGB'
    mean: np.ndarray  # (C, 1, 1) float32
    std: np.ndarray  # (C, 1, 1) float32
    divisor: np.float32  # 1 / scale = 255: divide like training's `div_(255.0)`, bit for bit

    @classmethod
    def from_manifest(cls, inp: dict) -> "InputSpec":
        c = int(inp["channels"])
        mode = inp["color_mode"]
        if mode not in ("L", "RGB") or c != (1 if mode == "L" else 3):
            raise ValueError(f"unsupported input spec: color_mode {mode!r} with {c} channels")
        if inp.get("layout", "NCHW") != "NCHW" or inp.get("resize", "bilinear") != "bilinear":
            raise ValueError(f"unsupported input spec: layout {inp.get('layout')!r}, resize {inp.get('resize')!r}")
        mean = np.asarray(inp["mean"], np.float32).reshape(c, 1, 1)
        std = np.asarray(inp["std"], np.float32).reshape(c, 1, 1)
        return cls(int(inp["img_size"]), mode, mean, std, np.float32(1.0 / float(inp["scale"])))


def normalize(images_u8: np.ndarray, spec: InputSpec) -> np.ndarray:
    """uint8 (N, S, S, C) at the model's size -> normalised float32 (N, C, S, S), the offline reference path."""
    x = images_u8.astype(np.float32).transpose(0, 3, 1, 2) / spec.divisor
    return (x - spec.mean[None]) / spec.std[None]


def header_pixels(data: bytes) -> Optional[int]:
    """width × height as the image header declares it (PIL's `Image.open` parses the header only and decodes no
    pixel), or None when no allowed decoder can read the header."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as im:
                w, h = im.size
    except Exception:  # noqa: BLE001 - any unreadable header: decode_image says what is wrong
        return None
    return int(w) * int(h)


def decode_inline(data: bytes, limit: int = INLINE_DECODE_PIXELS) -> bool:
    """Whether `decode_image(data, ...)` is cheap enough to run on the event loop: its header declares at most
    `limit` pixels, or it has no readable header (then decode_image fails at the same header read, at once)."""
    pixels = header_pixels(data) if data else None
    return pixels is None or pixels <= limit


def decode_image(data: bytes, spec: InputSpec, max_pixels: int) -> np.ndarray:
    """Decode, validate and preprocess one upload -> float32 (C, S, S). Raises BadImage."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise BadImage("the 'image' upload is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise BadImage(f"the 'image' upload is not an image PIL can read as {', '.join(ALLOWED_FORMATS)}",
                       415) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage(f"image dimensions exceed the limit of {max_pixels} pixels", 413) from None
    except Exception as e:  # noqa: BLE001 - PIL plugins raise many types on malformed headers
        raise BadImage(f"cannot read the image header (truncated or corrupt?): {_first_line(e)}") from None
    with im:
        w, h = im.size
        if w < 1 or h < 1:
            raise BadImage(f"image has zero size ({w}x{h})")
        if w * h > max_pixels:  # checked from the header, before any pixel is decoded
            raise BadImage(f"image is {w}x{h} = {w * h} pixels, above the limit of {max_pixels}", 413)
        try:
            im.load()  # first frame only for animations
        except Exception as e:  # noqa: BLE001 - truncated / corrupt pixel data
            raise BadImage(f"cannot decode the {im.format} image (truncated or corrupt?): {_first_line(e)}") from None
        try:
            # "P"/"PA" with transparency, "I;16", "CMYK", ... all go through PIL's own conversion, like training
            im = im.convert(spec.color_mode)
        except Exception as e:  # noqa: BLE001 - modes PIL cannot convert
            raise BadImage(f"unsupported image mode {im.mode!r}: {_first_line(e)}", 415) from None
        s = spec.img_size
        if im.size != (s, s):
            im = im.resize((s, s), Image.BILINEAR)
        arr = np.asarray(im, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[..., None]  # (S, S, 1)
    x = arr.transpose(2, 0, 1).astype(np.float32) / spec.divisor  # (C, S, S)
    return (x - spec.mean) / spec.std


def _first_line(e: Exception) -> str:
    s = str(e).strip()
    return (s.splitlines()[0] if s else type(e).__name__)[:200]

"""Where an upload decodes: by the pixels its header declares, not by its byte size."""
from __future__ import annotations

import io

import numpy as np
import pytest

from steerprune.service.preprocess import INLINE_DECODE_PIXELS, decode_inline, header_pixels

pytest.importorskip("PIL")


def _encode(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def test_a_small_file_that_inflates_to_megapixels_decodes_off_the_event_loop():
    bomb = _encode(np.full((3000, 3000), 127, np.uint8))  # 9 MP of one grey: a few KB on the wire
    assert len(bomb) < 32 << 10  # the byte-size rule this replaces decoded it on the event loop
    assert header_pixels(bomb) == 9_000_000
    assert not decode_inline(bomb)


def test_small_images_decode_inline_whatever_their_byte_size():
    rng = np.random.default_rng(0)
    noisy = _encode(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8), "BMP")  # 48 KB, 16 K pixels
    assert len(noisy) > 32 << 10 and header_pixels(noisy) == 128 * 128 == INLINE_DECODE_PIXELS
    assert decode_inline(noisy)
    assert not decode_inline(_encode(rng.integers(0, 256, (129, 128, 3), dtype=np.uint8), "BMP"))
    assert decode_inline(_encode(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "JPEG"))
    assert not decode_inline(_encode(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)), limit=1023)


def test_the_header_alone_gives_the_size():
    png = _encode(np.full((2000, 1500), 3, np.uint8))
    cut = png[:64]  # header chunks only, no pixel data: decoding would fail, the size is still known
    assert header_pixels(cut) == 2000 * 1500 and not decode_inline(cut)
    # no readable header: decode_image refuses at the same header read, so it stays on the event loop
    assert header_pixels(b"not an image") is None and decode_inline(b"not an image") and decode_inline(b"")

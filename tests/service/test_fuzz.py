"""Inputs nobody thought of: the image decoder under hypothesis (random bytes, broken real PNG/JPEG/WebP, extreme
sizes and modes), /classify fuzzed from the service's own OpenAPI document with schemathesis, and odd multipart
framing against a real server. Every case is a 200 or a 4xx, never a 5xx, and the server stays ready.

Example counts: STEERPRUNE_FUZZ_EXAMPLES (default 60 per property; the suite stays well under a minute) scales
every property; each test prints how many cases ran (pytest -s)."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from steerprune.service.preprocess import BadImage, InputSpec, decode_image  # noqa: E402

N = int(os.environ.get("STEERPRUNE_FUZZ_EXAMPLES", "60"))
FAST = settings(max_examples=N, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
SPECS = {m: InputSpec.from_manifest({"img_size": 16, "channels": c, "color_mode": m, "mean": [0.5] * c,
                                     "std": [0.25] * c, "scale": 1 / 255}) for m, c in (("L", 1), ("RGB", 3))}
MAX_PIXELS = 1 << 20


def check_decode(data: bytes, mode: str = "RGB", max_pixels: int = MAX_PIXELS):
    """decode_image's contract: a finite (C, 16, 16) float32 array or BadImage with a 4xx status; nothing else."""
    try:
        x = decode_image(data, SPECS[mode], max_pixels)
    except BadImage as e:
        assert e.status in (400, 413, 415) and str(e)
        return e.status
    assert x.shape == ((1 if mode == "L" else 3), 16, 16) and x.dtype == np.float32 and np.isfinite(x).all()
    return 200


def encode(pixels: np.ndarray, mode: str, fmt: str) -> bytes:
    from PIL import Image

    im = Image.fromarray(pixels).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": 50} if fmt in ("JPEG", "WEBP") else {}))
    return buf.getvalue()


FORMATS = {"PNG": ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"), "JPEG": ("L", "RGB", "CMYK"),
           "WEBP": ("RGB", "RGBA"), "GIF": ("L", "P"), "BMP": ("1", "L", "P", "RGB"),
           "TIFF": ("1", "L", "RGB", "RGBA", "CMYK", "I", "F"), "PPM": ("L", "RGB")}
fmt_mode = st.sampled_from([(f, m) for f, modes in FORMATS.items() for m in modes])
side = st.sampled_from([1, 2, 3, 5, 16, 31, 64, 257])


@st.composite
def real_images(draw):
    (fmt, mode), w, h = draw(fmt_mode), draw(side), draw(side)
    seed = draw(st.integers(0, 2**16))
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return fmt, mode, encode(pixels, mode, fmt)


counts: dict[str, int] = {}


def _count(name):
    counts[name] = counts.get(name, 0) + 1


@FAST
@given(data=st.binary(max_size=4096), mode=st.sampled_from(["L", "RGB"]))
def test_random_bytes_never_crash_the_decoder(data, mode):
    _count("random_bytes")
    assert check_decode(data, mode) in (400, 413, 415)  # random bytes are not an image


@FAST
@given(img=real_images(), mode=st.sampled_from(["L", "RGB"]))
def test_real_images_in_every_format_and_mode_decode(img, mode):
    _count("real_images")
    fmt, im_mode, data = img
    assert check_decode(data, mode) == 200, (fmt, im_mode)


@FAST
@given(img=real_images(), cut=st.floats(0, 1, exclude_max=True), flips=st.lists(
    st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=0, max_size=8))
def test_truncated_and_mutated_images_are_200_or_4xx(img, cut, flips):
    _count("broken_images")
    fmt, mode, data = img
    data = bytearray(data[: max(1, int(len(data) * (1 - cut * cut)))])  # often whole, often cut short
    for pos, byte in flips:
        data[int(pos * len(data))] = byte
    check_decode(bytes(data))


@FAST
@given(w=st.sampled_from([1, 2, 4096, 65_535, 100_000]), h=st.sampled_from([1, 3, 4097, 70_000]),
       fmt=st.sampled_from(["PNG", "GIF", "BMP", "TIFF"]))
def test_extreme_declared_dimensions_are_refused_before_decoding(w, h, fmt):
    _count("extreme_sizes")
    if w * h > MAX_PIXELS:  # build only the header's claim: a 1-bit image of that size, cheap to encode for PNG
        data = _huge_header(fmt, w, h)
        if data is None:
            return
        assert check_decode(data) == 413
    elif fmt != "GIF" or max(w, h) < 65_536:  # GIF stores sizes in 16 bits
        assert check_decode(encode(np.zeros((h, w, 3), np.uint8), "L", fmt)) == 200


def _huge_header(fmt: str, w: int, h: int):
    """A valid header declaring w x h, pixel data truncated (never decoded if the size check works)."""
    import struct
    import zlib

    if fmt == "PNG":
        ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
        chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
    if fmt == "GIF" and w < 65_536 and h < 65_536:
        return b"GIF89a" + struct.pack("<HH", w, h) + b"\x00\x00\x00" + b",\x00\x00\x00\x00" + \
            struct.pack("<HH", w, h) + b"\x00\x02\x02\x44\x01\x00;"
    if fmt == "BMP":
        return b"BM" + struct.pack("<IHHI", 0, 0, 0, 54) + struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, 0, 0, 0,
                                                                        0, 0) + b"\0" * 64
    return None


def test_decoder_case_counts():
    """Runs last in this file: every property above ran its examples."""
    for name in ("random_bytes", "real_images", "broken_images", "extreme_sizes"):
        assert counts.get(name, 0) >= min(N, 10), counts
    print(f"\ndecoder cases: {counts} (STEERPRUNE_FUZZ_EXAMPLES={N})")


# ---------------------------------------------------------------------------------------------- over HTTP

def _env(tmp):
    return dict(os.environ, BENTOML_DO_NOT_TRACK="true", BENTOML_HOME=str(tmp / "bentoml_home"))


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    from steerprune.service.cli import free_port, start_server, stop_server

    tmp = tmp_path_factory.mktemp("fuzz")
    proc = start_server(tiny_bundle, port=free_port(), timeout=120, log_path=tmp / "server.log", env=_env(tmp),
                        threads=1, verify=False)
    yield proc
    stop_server(proc)


def _ready(url) -> bool:
    import httpx

    return httpx.get(url + "/readyz", timeout=10).status_code == 200


@pytest.mark.http
@pytest.mark.slow
def test_openapi_document_describes_classify_and_routes(server):
    import httpx

    spec = httpx.get(server.url + "/docs.json", timeout=10).json()
    post = spec["paths"]["/classify"]["post"]
    form = post["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["image"] and form["properties"]["image"]["format"] == "binary"
    assert set(form["properties"]) == {"image", "hint", "top_k"}
    assert {"200", "400", "413", "415", "503"} <= set(post["responses"])
    assert "Retry-After" in post["responses"]["503"]["headers"]
    answer = spec["components"]["schemas"]["ClassifyAnswer"]
    assert {"label", "scores", "route", "model", "fallback", "bundle_id"} <= set(answer["required"])
    assert "200" in spec["paths"]["/routes"]["get"]["responses"]


@pytest.mark.http
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_classify_fuzzed_from_its_openapi_schema(server, mode):
    schemathesis = pytest.importorskip("schemathesis")
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                                   status_code_conformance)

    schema = schemathesis.openapi.from_url(server.url + "/docs.json")
    statuses: dict[int, int] = {}
    gen = GenerationMode.POSITIVE if mode == "positive" else GenerationMode.NEGATIVE
    ops = [schema["/classify"]["POST"], schema["/routes"]["GET"]]

    @FAST
    @given(data=st.data())
    def run(data):
        case = data.draw(st.sampled_from(ops).flatmap(lambda op: op.as_strategy(generation_mode=gen)))
        resp = case.call(base_url=server.url, timeout=30)
        statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
        assert resp.status_code < 500 or resp.status_code == 503 and "Retry-After" in resp.headers, resp.text[:300]
        case.validate_response(resp, checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                                             response_schema_conformance])

    run()
    print(f"\nschemathesis {mode}: {sum(statuses.values())} cases, statuses {dict(sorted(statuses.items()))}")
    assert sum(statuses.values()) >= min(N, 10)
    assert _ready(server.url)


@st.composite
def odd_multipart(draw):
    """A multipart body whose framing is off in one of many ways, with a real PNG inside."""
    png = encode(np.full((8, 8, 3), 128, np.uint8), "L", "PNG")
    boundary = draw(st.sampled_from(["xyz", "a" * 70, "----WebKitFormBoundary7MA4YWxkTrZu0gW", "b d", "=?", ""]))
    crlf = draw(st.sampled_from(["\r\n", "\n", "\r"]))
    disp = draw(st.sampled_from([
        'form-data; name="image"; filename="x.png"', 'form-data; name=image; filename=x.png',
        'form-data; name="image"', 'form-data; filename="x.png"', 'form-data; name="image"; filename=""',
        'form-data; name="IMAGE"; filename="x.png"', "attachment", 'form-data; name="image"; filename*=UTF-8\'\'%E2.png',
        ""]))
    head = f"--{boundary}{crlf}Content-Disposition: {disp}{crlf}"
    if draw(st.booleans()):
        head += f"Content-Type: {draw(st.sampled_from(['image/png', 'text/plain', 'x/y; a=b', '']))}{crlf}"
    if draw(st.booleans()):
        head += f"X-Junk: {'j' * draw(st.integers(0, 9000))}{crlf}"
    body = head.encode() + crlf.encode() + png
    tail = draw(st.sampled_from([f"{crlf}--{boundary}--{crlf}", f"{crlf}--{boundary}{crlf}", "", f"--{boundary}--",
                                 f"{crlf}--{boundary}--{crlf}garbage", f"{crlf}--other--{crlf}"]))
    body += tail.encode() + draw(st.binary(max_size=64))
    ctype = draw(st.sampled_from([f"multipart/form-data; boundary={boundary}", f'multipart/form-data; boundary="{boundary}"',
                                  "multipart/form-data", "multipart/form-data; boundary=", "Multipart/Form-Data; "
                                  f"BOUNDARY={boundary}", f"multipart/form-data; boundary={boundary}; charset=utf-8"]))
    return body, ctype


@pytest.mark.http
@pytest.mark.slow
def test_odd_multipart_framing_is_200_or_4xx(server):
    import httpx

    statuses: dict[int, int] = {}
    with httpx.Client(timeout=30) as client:
        @FAST
        @given(form=odd_multipart(), chunked=st.booleans())
        def run(form, chunked):
            body, ctype = form
            content = iter([body[i:i + 977] for i in range(0, len(body), 977)]) if chunked else body
            r = client.post(server.url + "/classify", content=content, headers={"Content-Type": ctype})
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, r.text[:300])
            if r.status_code != 200:
                assert r.json()["error"]

        run()
    print(f"\nodd multipart: {sum(statuses.values())} cases, statuses {dict(sorted(statuses.items()))}")
    assert 200 in statuses and any(400 <= s < 500 for s in statuses)
    assert _ready(server.url)

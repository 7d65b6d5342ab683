"""Overload and cancellation against a real `bentoml serve` on 127.0.0.1: 200 or 503 + Retry-After, nothing else;
clients that left are not computed; the server stays ready."""
from __future__ import annotations

import asyncio
import os
import re
import time

import pytest

httpx = pytest.importorskip("httpx")

from steerprune.service.cli import free_port, start_server, stop_server  # noqa: E402

pytestmark = [pytest.mark.http, pytest.mark.slow]


def _env(tmp):
    return dict(os.environ, BENTOML_DO_NOT_TRACK="true", BENTOML_HOME=str(tmp / "bentoml_home"))


@pytest.fixture(scope="module")
def digits():
    from steerprune.training.data import load_data

    return load_data("digits").test


def png_form(image, **fields) -> tuple[bytes, str]:
    """A multipart body (as httpx encodes it) with `image` (uint8 HxWxC) as a PNG file, and its content type."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buf, format="PNG")
    req = httpx.Request("POST", "http://x/classify", files={"image": ("x.png", buf.getvalue(), "image/png")},
                        data=fields)
    return req.read(), req.headers["content-type"]


def metric(text: str, name: str, **labels) -> float:
    """Sum of a Prometheus series over the samples whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        m = re.match(rf"{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if not m:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


def scrape(url) -> str:
    return httpx.get(url + "/metrics", timeout=10).text


def in_progress(url) -> float:
    """/classify requests BentoML counts as in progress in the worker."""
    return metric(scrape(url), "bentoml_service_request_in_progress", endpoint="/classify")


async def _burst(url, bodies, ctype, concurrency):
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(60, pool=None)) as client:
        async def one(body):
            r = await client.post(url + "/classify", content=body, headers={"Content-Type": ctype})
            return r.status_code, r.headers.get("retry-after"), r.json()

        return await asyncio.gather(*(one(b) for b in bodies))


def test_burst_beyond_capacity_gets_200s_and_503s_with_retry_after(tiny_bundle, digits, tmp_path):
    proc = start_server(tiny_bundle, port=free_port(), timeout=120, log_path=tmp_path / "server.log",
                        env=_env(tmp_path), threads=1, max_queue=8, max_wait_ms=10_000, max_batch_size=4, verify=False)
    try:
        body, ctype = png_form(digits.images[0], hint="7")
        before = scrape(proc.url)
        results = asyncio.run(_burst(proc.url, [body] * 400, ctype, 400))
        statuses = [s for s, _, _ in results]
        assert set(statuses) == {200, 503}, sorted(set(statuses))  # an answer or an honest 503, nothing else
        for status, retry, js in results:
            if status == 503:
                assert retry is not None and int(retry) >= 1 and js["retry_after_s"] == int(retry)
                assert js["reason"] in ("queue_full", "queue_work", "deadline") and "overloaded" in js["error"]
                assert js["queued"] >= 0 and js["queued_ms"] >= 0
            else:
                assert js["route"] == "7" and len(js["bundle_id"]) == 16
        n503 = statuses.count(503)
        after = scrape(proc.url)
        assert metric(after, "steerprune_rejected_total", status="503") - \
            metric(before, "steerprune_rejected_total", status="503") == n503
        assert metric(after, "steerprune_overloaded_total") - metric(before, "steerprune_overloaded_total") == n503
        assert metric(after, "steerprune_requests_total") - metric(before, "steerprune_requests_total") == \
            statuses.count(200)
        assert httpx.get(proc.url + "/readyz", timeout=5).status_code == 200
        # once the burst is over the server answers normally again
        r = httpx.post(proc.url + "/classify", content=body, headers={"Content-Type": ctype}, timeout=10)
        assert r.status_code == 200
        listing = httpx.get(proc.url + "/routes", timeout=5).json()
        assert listing["max_queue"] == 8 and listing["max_wait_ms"] == 10_000
        assert set(listing["expected_ms_per_image"]) == set(listing["routes"]) | {"full"}
    finally:
        stop_server(proc)


async def _raw(port, raw: bytes, leave_after_s: float | None = None):
    """One request over its own connection (Connection: close), the bytes sent at once. With leave_after_s the
    client closes that long after sending without reading (it gave up): returns True if an answer had already
    begun to arrive. Otherwise returns the answer's status code."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    try:
        if leave_after_s is not None:
            await asyncio.sleep(leave_after_s)
            try:
                return bool(await asyncio.wait_for(reader.read(1), 0.001))
            except asyncio.TimeoutError:
                return False
        head = await reader.readuntil(b"\r\n")
        await reader.read()
        return int(head.split()[1])
    finally:
        writer.close()


def test_clients_that_left_are_not_computed_and_every_request_is_accounted_for(tiny_bundle, digits, tmp_path):
    port = free_port()
    proc = start_server(tiny_bundle, port=port, timeout=120, log_path=tmp_path / "server.log", env=_env(tmp_path),
                        threads=1, max_queue=5000, max_wait_ms=60_000, verify=False)
    try:
        body, ctype = png_form(digits.images[1])
        raw = (f"POST /classify HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {ctype}\r\n"
               f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
        before = scrape(proc.url)

        async def main():
            # 400 waiting clients build a backlog; once it is there, 100 more send and close at once (gave up)
            kept = asyncio.gather(*(_raw(port, raw) for _ in range(400)))
            loop = asyncio.get_running_loop()
            while not kept.done() and await loop.run_in_executor(None, in_progress, proc.url) < 100:
                await asyncio.sleep(0.01)
            early = await asyncio.gather(*(_raw(port, raw, leave_after_s=0.0) for _ in range(100)))
            return await kept, sum(early)

        results, answered_early = asyncio.run(main())
        assert results == [200] * 400
        time.sleep(1.0)  # let the worker reach the abandoned requests
        after = scrape(proc.url)
        answered = metric(after, "steerprune_requests_total") - metric(before, "steerprune_requests_total")
        skipped = metric(after, "steerprune_skipped_total", reason="disconnected") - \
            metric(before, "steerprune_skipped_total", reason="disconnected")
        overloaded = metric(after, "steerprune_overloaded_total") - metric(before, "steerprune_overloaded_total")
        # every request is answered, refused or skipped exactly once; the abandoned ones that had no answer yet
        # when their client left are not computed (a few may have been in a running batch)
        print(f"\nabandoned: {answered_early} answered before their client left; answered {answered}, "
              f"skipped {skipped}, overloaded {overloaded}")
        assert answered + skipped + overloaded == 500, (answered, skipped, overloaded)
        assert skipped >= 0.9 * (100 - answered_early), (answered_early, skipped)
        assert httpx.get(proc.url + "/readyz", timeout=5).status_code == 200
    finally:
        stop_server(proc)

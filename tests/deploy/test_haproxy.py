"""deploy/kubernetes/components/haproxy/haproxy.cfg: a valid config, and in front of a real `bentoml serve` it refuses /classify past its
limits with 503 + Retry-After and a JSON reason before the worker sees the request; other paths go straight
through. Skipped where haproxy is not installed."""
from __future__ import annotations

import asyncio
import shutil
import subprocess

import pytest

httpx = pytest.importorskip("httpx")

from steerprune.service.cli import HAPROXY_CONFIG, free_port, start_haproxy, start_server, stop_server  # noqa: E402
from tests.service.test_overload import _env, metric, png_form, scrape  # noqa: E402

needs_haproxy = pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy not installed")


@needs_haproxy
def test_config_is_valid():
    r = subprocess.run(["haproxy", "-c", "-f", str(HAPROXY_CONFIG)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


async def _burst(url, body, ctype, n):
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(60, pool=None)) as client:
        async def one():
            r = await client.post(url + "/classify", content=body, headers={"Content-Type": ctype})
            return r.status_code, r.headers.get("retry-after"), r.json()

        return await asyncio.gather(*(one() for _ in range(n)))


@needs_haproxy
@pytest.mark.http
@pytest.mark.slow
def test_haproxy_refuses_in_front_of_the_worker(tiny_bundle, tmp_path):
    from steerprune.training.data import load_data

    image = load_data("digits").test.images[0]
    body, ctype = png_form(image, hint="7")
    proc = start_server(tiny_bundle, port=free_port(), timeout=120, log_path=tmp_path / "server.log",
                        env=_env(tmp_path), threads=1, max_queue=512, max_wait_ms=10_000, verify=False)
    full = queued = None
    try:
        direct = httpx.post(proc.url + "/classify", content=body, headers={"Content-Type": ctype}, timeout=10).json()
        before = scrape(proc.url)
        # one request in the worker at a time, one waiting: a burst of 60 is mostly refused by HAProxy at once
        full = start_haproxy(proc.url, free_port(), maxconn=1, maxqueue=1, queue_ms=10_000)
        results = asyncio.run(_burst(full.url, body, ctype, 60))
        statuses = [s for s, _, _ in results]
        assert set(statuses) == {200, 503}, sorted(set(statuses))
        for status, retry, js in results:
            if status == 503:
                assert retry == "1" and js["retry_after_s"] == 1
                assert js["reason"] == "proxy_queue_full" and "overloaded" in js["error"]
            else:  # what got through is the server's own answer
                assert js["route"] == direct["route"] and js["label"] == direct["label"]
        after = scrape(proc.url)
        # the worker saw only what HAProxy let through, and refused none of it itself
        assert metric(after, "steerprune_overloaded_total") == metric(before, "steerprune_overloaded_total")
        assert metric(after, "steerprune_requests_total") - metric(before, "steerprune_requests_total") == \
            statuses.count(200)
        # other paths bypass the /classify queue
        assert httpx.get(full.url + "/readyz", timeout=5).status_code == 200
        assert "steerprune_requests_total" in httpx.get(full.url + "/metrics", timeout=5).text

        # a queue that may hold requests but only for 1 ms: those that wait get HAProxy's own 503 for the timeout
        queued = start_haproxy(proc.url, free_port(), maxconn=1, maxqueue=1000, queue_ms=1)
        results = asyncio.run(_burst(queued.url, body, ctype, 60))
        timed_out = [(retry, js) for status, retry, js in results if status == 503]
        assert timed_out and {s for s, _, _ in results} <= {200, 503}
        assert all(retry == "1" and js["reason"] == "proxy_queue_timeout" for retry, js in timed_out)
    finally:
        for p in (full, queued):
            if p is not None:
                p.terminate()
                p.wait(10)
        stop_server(proc)

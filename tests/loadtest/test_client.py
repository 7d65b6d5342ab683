"""The aiohttp client against a small aiohttp.web server in a thread: multipart bodies, pacing, errors."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
from aiohttp import web

from steerprune.errors import UserError
from steerprune.loadtest.client import form_body, get, multipart_body, run_open_loop
from steerprune.service.cli import free_port


@pytest.fixture(scope="module")
def stub():
    """POST /classify echoes the form (hint, image size and type); /fail answers 503; GET /slow waits 0.3 s; POST
    /hang never answers."""
    seen: list[float] = []

    async def classify(request):
        seen.append(time.perf_counter())
        form = await request.post()
        image = form["image"]
        return web.json_response({"hint": form.get("hint"), "bytes": len(image.file.read()),
                                  "type": image.content_type, "filename": image.filename})

    async def fail(request):
        await request.read()
        return web.Response(status=503, text="overloaded: try later")

    async def slow(request):
        await asyncio.sleep(0.3)
        return web.Response(text="late")

    async def hang(request):
        await asyncio.sleep(3600)

    app = web.Application()
    app.add_routes([web.post("/classify", classify), web.post("/fail", fail), web.get("/slow", slow),
                    web.post("/hang", hang)])
    port, loop, started = free_port(), asyncio.new_event_loop(), threading.Event()

    async def start():
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, shutdown_timeout=0.5).start()
        started.set()
        return runner

    runner: list = []
    thread = threading.Thread(target=lambda: (runner.append(loop.run_until_complete(start())), loop.run_forever()),
                              daemon=True)
    thread.start()
    assert started.wait(10)
    yield f"http://127.0.0.1:{port}", seen
    asyncio.run_coroutine_threadsafe(runner[0].cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def test_multipart_bodies_are_real_forms(stub):
    url, _ = stub
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
    body, ctype = multipart_body({"hint": "even"}, png)
    assert ctype.startswith("multipart/form-data; boundary=")
    samples, _ = run_open_loop(url + "/classify", lambda i: form_body({"hint": "7"} if i else {}, png), 2, 1, 10)
    answers = sorted((s.planned, s.answer["hint"], s.answer["bytes"], s.answer["type"]) for s in samples)
    assert answers == [(0, None, len(png), "image/png"), (1, "7", len(png), "image/png")]
    assert all(s.status == 200 and 0 < s.latency < 5 for s in samples)


def test_paced_users_keep_the_rate_open_loop(stub):
    url, seen = stub
    body = multipart_body({}, b"x" * 300)

    async def same(i):
        return body

    seen.clear()
    samples, wall = run_open_loop(url + "/classify", same, 10_000, 4, 1.44, rate=40)
    assert all(s.status == 200 for s in samples)
    # users start 25 ms apart and send every 100 ms: 15 + 15 + 14 + 14 slots before 1.44 s, none after the end
    assert 45 <= len(samples) <= 58 and wall < 3
    gaps = [b - a for a, b in zip(seen, seen[1:])]  # arrivals spread over the interval (25 ms), not bursts of 4
    assert sorted(gaps)[len(gaps) // 2] > 0.01
    sent = sorted(s.t for s in samples)
    assert sent[-1] < 1.55 and sent[0] < 0.05  # slots before the end (a loaded machine wakes late)


def test_errors_are_samples_not_exceptions(stub):
    url, _ = stub
    body = multipart_body({}, b"x")

    async def same(i):
        return body

    failed, _ = run_open_loop(url + "/fail", same, 5, 2, 5)
    assert [s.status for s in failed] == [503] * 5 and failed[0].answer == {"error": "overloaded: try later"}
    refused, _ = run_open_loop(f"http://127.0.0.1:{free_port()}/classify", same, 3, 1, 5)
    assert [s.status for s in refused] == [0] * 3 and "Error" in refused[0].answer["error"]
    assert get(url, "/slow") == (200, b"late")
    with pytest.raises(UserError, match="cannot reach"):
        get(url, "/slow", timeout=0.05)


def test_unanswered_requests_fail_after_the_grace_period(stub, monkeypatch):
    from steerprune.loadtest import client

    url, _ = stub
    body = multipart_body({}, b"x")

    async def same(i):
        return body

    monkeypatch.setattr(client, "GRACE_S", 0.5)
    t0 = time.perf_counter()
    samples, wall = run_open_loop(url + "/hang", same, 10, 3, 0.5)
    assert 0.9 < time.perf_counter() - t0 < 5 and wall < 5  # duration + grace, not an hour
    assert len(samples) == 3 and {s.status for s in samples} == {0}  # one in flight per user
    assert all(s.answer == {"error": "no answer before the run ended"} and s.latency > 0.8 for s in samples)

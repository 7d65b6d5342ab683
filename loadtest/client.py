"""The load generator's HTTP client: keep-alive aiohttp connections on one asyncio event loop, open-loop pacing.

One event loop rather than a thread per user: with 16 client threads the generator's own GIL hand-offs showed up
as server latency. Request bodies are multipart forms encoded once by aiohttp and reused, so the timed part of a
request is sending bytes and reading the answer.
"""
from __future__ import annotations

import asyncio
import gc
import json
import time
import urllib.error
import urllib.request
from typing import Awaitable, Callable, NamedTuple, Optional

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from steerprune.errors import UserError

__all__ = ["Sample", "form_body", "multipart_body", "run_open_loop", "get"]

GRACE_S = 30.0  # how long after the run's end an unanswered request may still take
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # local servers: never via a proxy
BodyFn = Callable[[int], Awaitable[tuple[bytes, str]]]


class Sample(NamedTuple):
    t: float  # seconds from the start of the run to when the request was sent
    latency: float  # seconds
    status: int  # HTTP status, 0 for a connection error or timeout
    planned: int  # index into the request plan
    answer: Optional[dict]  # the JSON answer (200) or {"error": text}


async def form_body(fields: dict[str, str], image: bytes, filename: str = "image.png",
                    content_type: str = "image/png") -> tuple[bytes, str]:
    """(body, content-type) of a multipart form with an 'image' file and text fields, encoded by aiohttp."""
    form = aiohttp.FormData()
    form.add_field("image", image, filename=filename, content_type=content_type)
    for k, v in fields.items():
        form.add_field(k, v)
    writer = form()
    return await writer.as_bytes(), writer.content_type


def multipart_body(fields: dict[str, str], image: bytes) -> tuple[bytes, str]:
    """`form_body` for synchronous callers (a fresh event loop per call: not for a timed loop)."""
    return asyncio.run(form_body(fields, image))


async def _user(session: aiohttp.ClientSession, url: URL, body: BodyFn, next_index: Callable[[], Optional[int]],
                deadline: float, interval: float, phase: float, t0: float, out: list) -> None:
    """One user: takes the next planned request until the plan or the time runs out; a paced user sends every
    `interval` seconds from t0 + phase (late sends go at once and keep the schedule: open loop)."""
    next_send = t0 + phase  # paced users are spread over one interval, not released together in bursts
    headers: dict[str, CIMultiDict] = {}  # per content type, built once (as the URL): aiohttp would per request
    while True:
        i = next_index()
        if i is None or time.perf_counter() >= deadline:
            return
        if interval:
            if next_send >= deadline:  # the next slot lies after the end: the run is over for this user
                return
            delay = next_send - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            next_send += interval
        data, ctype = await body(i)
        hdrs = headers.get(ctype) or headers.setdefault(ctype, CIMultiDict({"Content-Type": ctype}))
        ts = time.perf_counter()
        try:
            async with session.post(url, data=data, headers=hdrs) as r:
                raw = await r.read()
                status = r.status
            answer = json.loads(raw) if status == 200 else {"error": raw[:300].decode(errors="replace")}
        except (aiohttp.ClientError, OSError, ValueError) as e:
            status, answer = 0, {"error": f"{type(e).__name__}: {e}"}
        except asyncio.CancelledError:  # still unanswered when the run's grace period ran out
            out.append(Sample(ts - t0, time.perf_counter() - ts, 0, i, {"error": "no answer before the run ended"}))
            raise
        out.append(Sample(ts - t0, time.perf_counter() - ts, status, i, answer))


async def _drive(url: str, body: BodyFn, n: int, users: int, duration: float, rate: float, t0: float,
                 out: list) -> None:
    counter = iter(range(n))

    def next_index():  # one event-loop thread: no lock needed
        return next(counter, None)

    interval = users / rate if rate else 0.0
    # No per-request timeout and no cookie jar: each costs client CPU on every request (together ~90 us, measured
    # against this loop's cost of ~200 us; so do a URL string and a headers dict, hence URL and CIMultiDict). One deadline for the whole run instead: requests still unanswered
    # GRACE_S after the end are cancelled and counted as failed (status 0).
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=users),  # one keep-alive connection per user
                                    timeout=aiohttp.ClientTimeout(), cookie_jar=aiohttp.DummyCookieJar(),
                                    auto_decompress=False)
    async with session:
        users_done = asyncio.gather(*(_user(session, URL(url), body, next_index, t0 + duration, interval,
                                            u * interval / users, t0, out) for u in range(users)))
        try:
            await asyncio.wait_for(users_done, t0 + duration + GRACE_S - time.perf_counter())
        except asyncio.TimeoutError:
            pass


def run_open_loop(url: str, body: BodyFn, n: int, users: int, duration: float, rate: float = 0.0
                  ) -> tuple[list[Sample], float]:
    """POST up to `n` requests (`await body(i)` gives request i's (bytes, content type)) to `url` from `users`
    concurrent keep-alive users for at most `duration` seconds, paced at `rate` requests/s in total (0: each user
    sends as soon as its previous answer arrives: saturation). Returns (samples in completion order, wall seconds).
    A request unanswered GRACE_S after the end is a failed sample; Ctrl-C ends the run early with what was measured."""
    out: list[Sample] = []
    gc.collect()
    gc.freeze()  # the generator's own full collections would otherwise show up as server latency
    t0 = time.perf_counter()
    try:
        asyncio.run(_drive(url, body, n, users, duration, rate, t0, out))
    except KeyboardInterrupt:
        pass
    finally:
        gc.unfreeze()
    return out, time.perf_counter() - t0


def get(base_url: str, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    """GET base_url + path -> (status, body); UserError when the server cannot be reached."""
    try:
        with _OPENER.open(base_url.rstrip("/") + path, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError as e:
        raise UserError(f"cannot reach the server at {base_url}: {e}") from None

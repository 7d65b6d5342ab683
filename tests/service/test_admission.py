"""AdmissionMiddleware without a server: a full worker refuses /classify before the app runs; admitted requests are
counted until their answer is sent; other paths and a worker not yet ready pass through untouched."""
from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

pytest.importorskip("bentoml")

from _bentoml_sdk.service import set_current_service  # noqa: E402

from steerprune.service.batching import GreedyBatcher  # noqa: E402
from steerprune.service.service import AdmissionMiddleware  # noqa: E402


class App:
    """Inner ASGI app: records each call and the batcher's pending count while it runs."""

    def __init__(self, batcher):
        self.batcher, self.calls, self.pending_seen = batcher, [], []

    async def __call__(self, scope, receive, send):
        self.calls.append(scope["path"])
        self.pending_seen.append(self.batcher.pending)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def _call(mw, path="/classify", method="POST"):
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(msg):
        sent.append(msg)

    scope = {"type": "http", "path": path, "method": method, "headers": [], "query_string": b""}
    asyncio.run(mw(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict((k.decode(), v.decode()) for k, v in start["headers"]), body


@pytest.fixture
def service():
    svc = SimpleNamespace(ready=True, batcher=GreedyBatcher(lambda items: items, max_batch_size=4, max_queue=2))
    set_current_service(svc)
    yield svc
    set_current_service(None)


def test_admitted_request_is_counted_while_it_runs_and_released_after(service):
    app = App(service.batcher)
    status, _, body = _call(AdmissionMiddleware(app))
    assert (status, body) == (200, b"ok")
    assert app.pending_seen == [1]
    assert service.batcher.pending == 0


def test_full_worker_refuses_with_503_and_retry_after_without_running_the_app(service):
    app = App(service.batcher)
    service.batcher.pending = 2  # max_queue requests already in the worker
    status, headers, body = _call(AdmissionMiddleware(app))
    assert status == 503
    assert int(headers["retry-after"]) >= 1
    doc = json.loads(body)
    assert doc["reason"] == "queue_full" and doc["retry_after_s"] >= 1 and "overloaded" in doc["error"]
    assert app.calls == []
    assert service.batcher.pending == 2


@pytest.mark.parametrize("path,method", [("/routes", "GET"), ("/metrics", "GET"), ("/classify", "GET")])
def test_other_requests_pass_through_even_when_full(service, path, method):
    app = App(service.batcher)
    service.batcher.pending = 2
    status, _, _ = _call(AdmissionMiddleware(app), path, method)
    assert status == 200 and app.calls == [path]


def test_a_worker_not_ready_leaves_the_answer_to_the_endpoint(service):
    app = App(service.batcher)
    service.ready = False
    service.batcher.pending = 2
    status, _, _ = _call(AdmissionMiddleware(app))
    assert status == 200 and app.calls == ["/classify"]

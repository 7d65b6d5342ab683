"""The BentoML service: `bentoml serve steerprune.service.service:SteerPrune` with STEERPRUNE_BUNDLE set.

Endpoints (plus BentoML's /livez, /readyz and /metrics):
    POST /classify   multipart form: image (file, required), hint (class or group name), top_k (int)
    GET  /routes     hints, their classes, head usage, kept heads and accuracy from the manifest

/classify and /routes are Starlette routes mounted into the service rather than `@bentoml.api` methods: BentoML's
multipart parser answers HTTP 500 when `image` arrives as a text field (it tries to download it as a URL) or when
a non-file field holds binary data, its batchable APIs take a single argument, and its APIs are POST-only. Here
the handler reads the body under a size limit, validates every field and the image itself, and only then queues
the preprocessed image for batched inference (batching.py). Every client mistake is a 4xx JSON `{"error": ...}`;
what the worker cannot serve in time is a 503 with Retry-After and the reason (docs/overload.md), decided before
the body is read where possible; requests whose client left are not computed. The HTTP API: docs/api.md.
"""
from __future__ import annotations

import asyncio
import functools
import gc
import hashlib
import inspect
import json
import logging
import os
import sys
import threading
import time

import bentoml
import numpy as np
from bentoml.exceptions import ServiceUnavailable
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route as HttpRoute

from steerprune.errors import UserError

from .batching import ClientGone, Overloaded, make_batcher
from .config import ENV_PREFIX, ServeConfig
from .api_schema import docs_app
from .engine import FALLBACK_REASONS, FULL, Engine, UnknownHint
from .gc_schedule import GcClock
from .preprocess import BadImage, decode_image, decode_inline

__all__ = ["SteerPrune", "AdmissionMiddleware", "app", "client_gone"]

log = logging.getLogger("steerprune.service")
if not log.handlers:  # BentoML configures only its own loggers; start-up and CUDA problems must be visible
    _h = logging.StreamHandler()
    _h.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] [steerprune] %(message)s"))
    log.addHandler(_h)
    log.setLevel(logging.INFO)
    log.propagate = False

FORM_FIELDS = ("image", "hint", "top_k")

# Prometheus metrics, served on BentoML's /metrics next to its own bentoml_service_* series.
REQUESTS = bentoml.metrics.Counter(
    name="steerprune_requests", documentation="Answered /classify requests by route and the model that answered",
    labelnames=["route", "answered_by"])
FALLBACKS = bentoml.metrics.Counter(
    name="steerprune_fallbacks", documentation="verify mode: routed answers rerun on the full model, by reason",
    labelnames=["route", "reason"])
WRONG_HINTS = bentoml.metrics.Counter(
    name="steerprune_wrong_hints", documentation="Hints the full model contradicts (its answer is outside the hint)",
    labelnames=["route"])
REJECTED = bentoml.metrics.Counter(
    name="steerprune_rejected", documentation="/classify requests answered with a 4xx or an overload 503, by status",
    labelnames=["status"])
OVERLOADED = bentoml.metrics.Counter(
    name="steerprune_overloaded", documentation="/classify requests answered 503 for overload, by reason "
    "(queue_full, queue_work: refused on arrival; deadline: queued past max_wait_ms, not run)", labelnames=["reason"])
SKIPPED = bentoml.metrics.Counter(
    name="steerprune_skipped", documentation="Queued /classify requests dropped without a model run, by reason "
    "(disconnected: the client left; cancelled: the request timed out; deadline: queued past max_wait_ms)",
    labelnames=["reason"])
LATENCY = bentoml.metrics.Histogram(
    name="steerprune_request_duration_seconds", documentation="/classify time in the handler by route",
    labelnames=["route"],
    buckets=(0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
BATCH = bentoml.metrics.Histogram(
    name="steerprune_batch_size", documentation="Images per batch the batcher hands to the engine (split by model inside)", labelnames=[],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))

GC_PAUSES = bentoml.metrics.Histogram(
    name="steerprune_gc_pause_seconds", documentation="Python garbage-collection pauses in the worker by generation",
    labelnames=["generation"],
    buckets=(0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0))


def _record_gc_pauses(pauses: list) -> None:
    for generation, seconds in pauses:
        GC_PAUSES.labels(generation=str(generation)).observe(seconds)


class ApiError(Exception):
    def __init__(self, status: int, message: str, **extra):
        super().__init__(message)
        self.status, self.extra = status, extra


class _TooLarge(Exception):
    pass


@bentoml.service(
    name="steerprune",
    workers=int(os.environ.get(ENV_PREFIX + "WORKERS", "1")),
    traffic={"timeout": float(os.environ.get(ENV_PREFIX + "REQUEST_TIMEOUT_S", "60")),
             "concurrency": int(os.environ.get(ENV_PREFIX + "CONCURRENCY", "8"))},
    # access lines cost ~8% of the server's CPU per request here; STEERPRUNE_ACCESS_LOG=1 turns them on
    logging={"access": {"enabled": os.environ.get(ENV_PREFIX + "ACCESS_LOG", "0") == "1"}},
)
class SteerPrune:
    """Routes each image by its class hint to the pruned ONNX model of that hint."""

    def __init__(self) -> None:
        self.cfg = ServeConfig.from_env()
        self.engine = Engine(self.cfg)
        self.bundle_id = self._bundle_id()
        self.item_ms: dict[str, float] = {}  # route -> expected model ms per image at max_batch_size (warm-up)
        self.batcher = make_batcher(self.cfg.batcher, self._run_batch, self.cfg.max_batch_size,
                                    self.cfg.max_latency_ms, inline=self._inline if self.cfg.inline_ms > 0 else None,
                                    max_queue=self.cfg.max_queue, max_wait_ms=self.cfg.max_wait_ms,
                                    cost=lambda item: self.item_ms.get(item[1], 0.0),
                                    on_skip=lambda reason, n: SKIPPED.labels(reason=reason).inc(n))
        self.listing = dict(self.engine.describe(), bundle_id=self.bundle_id, bundle_path=str(self.engine.bundle))
        self.ready = False
        self.warmup_seconds = None
        self.gc_clock = GcClock(self.cfg.gc_young_ms / 1000.0, self.cfg.gc_full_s, on_pauses=_record_gc_pauses)
        # warm up in the background so /livez answers while /readyz still says 503
        threading.Thread(target=self._warm_up, name="steerprune-warmup", daemon=True).start()

    def _warm_up(self) -> None:
        if self.engine.problems:
            log.error("!!! not ready: %s", "; ".join(self.engine.problems))
            return
        try:
            self.warmup_seconds = self.engine.warm_up(self.cfg.max_batch_size, self.cfg.warmup_rounds)
            if self.cfg.unserve_costlier:
                dropped = self.engine.unserve_costlier()
                if dropped:
                    log.info("routes not served (costlier than the full model by this server's timings): %s",
                             ", ".join(f"{n} {self.engine.measured_cost[n]:.3f}" for n in dropped))
            self.listing = dict(self.listing, **self.engine.describe())  # warm-up timings, priors, graphs
            b = self.cfg.max_batch_size
            self.item_ms = {r: self.engine.expected_ms([r] * b) / b for r in self.engine.routes}
        except Exception:  # noqa: BLE001 - stays unready; the log says why
            log.exception("!!! warm-up failed: not ready")
            return
        # Everything loaded so far (BentoML, Starlette, ONNX Runtime, the bundle) lives as long as the worker: frozen,
        # the collector stops walking it on every full collection under load.
        gc.collect()
        gc.freeze()
        # With CPython's automatic collection (gc_young_ms 0): under load each request leaves ~8 live objects behind
        # for a while (BentoML's TimeoutMiddleware keeps a timer, with the request's context, for the whole traffic
        # timeout), so every full collection walks more of them; at 465 req/s they ran every ~2 s, took 6-190 ms and
        # were the p99 tail. The GC clock (gc_schedule.py) replaces this when it runs.
        g0, g1, _ = gc.get_threshold()
        gc.set_threshold(g0, g1, self.cfg.gc_gen2_threshold)
        sys.setswitchinterval(self.cfg.switch_interval_ms / 1000.0)
        log.info("warm-up done in %.2f s; ready", self.warmup_seconds)
        self.ready = True

    @bentoml.on_startup
    async def _start_gc_clock(self) -> None:  # async: runs on the worker's event loop, where the clock ticks
        self.gc_clock.start(asyncio.get_running_loop())

    @bentoml.on_shutdown
    def _stop_gc_clock(self) -> None:
        self.gc_clock.stop()

    def _bundle_id(self) -> str:
        """First 16 hex digits of sha256(manifest.json) (`sha256sum manifest.json`): the manifest holds every model's
        sha256, which verify checked, so it names the whole bundle. Read again and compared with the manifest the
        engine loaded: a bundle rewritten in place meanwhile is refused rather than served as a mixture."""
        raw = (self.engine.bundle / "manifest.json").read_bytes()
        if json.loads(raw) != self.engine.manifest:
            raise UserError(f"{self.engine.bundle}/manifest.json changed while the bundle was loading: replace a "
                            "bundle by switching a symlink or directory name, never in place")
        return hashlib.sha256(raw).hexdigest()[:16]

    async def __is_ready__(self) -> bool:  # async: BentoML then skips a thread hop per probe
        return self.ready

    def _inline(self, items: list) -> bool:
        return self.engine.expected_ms([it[1] for it in items]) <= self.cfg.inline_ms

    def _run_batch(self, items: list) -> list:
        x = np.stack([it[0] for it in items])  # (N, C, S, S)
        BATCH.observe(len(items))
        return self.engine.run(x, [it[1] for it in items])

    # ------------------------------------------------------------------------------------------ handlers

    async def classify(self, request: Request) -> dict:
        """Answer one /classify request (AdmissionMiddleware has admitted it and counts it until it is answered)."""
        arrived = request.scope.get("state", {}).get("steerprune_arrived") or time.monotonic()
        try:
            image, hint, top_k = await self._read_form(request)
        except ClientDisconnect:  # left while its upload waited to be read
            SKIPPED.labels(reason="disconnected").inc()
            raise ClientGone("the client disconnected before its upload was read") from None
        try:
            route = self.engine.resolve(hint)
        except UnknownHint as e:
            raise ApiError(400, str(e), valid_hints=self.engine.hint_names()) from None
        gone = functools.partial(client_gone, request.receive)
        if gone():  # gave up while its upload waited (decoding is the costly part)
            SKIPPED.labels(reason="disconnected").inc()
            raise ClientGone("the client disconnected before its image was decoded")
        self.batcher.check_deadline(arrived)  # waited max_wait_ms already (a backlogged event loop): not decoded
        try:
            if decode_inline(image):  # few pixels by the header: cheaper than a thread hop
                x = decode_image(image, self.engine.spec, self.cfg.max_pixels)
            else:  # many pixels (whatever the byte size) decode in a thread so the event loop keeps serving
                import anyio
                x = await anyio.to_thread.run_sync(decode_image, image, self.engine.spec, self.cfg.max_pixels)
        except BadImage as e:
            raise ApiError(e.status, str(e)) from None
        res = await self.batcher.submit((x, route), is_gone=gone, arrived=arrived)
        return self._answer(res, top_k, hint)

    def _answer(self, res, top_k: int, hint) -> dict:
        eng = self.engine
        probs = res.probs
        order = np.argsort(-probs, kind="stable")[:top_k]
        idx = res.index  # order[0], except under a route-probability rule: the hint's most probable class
        if res.fallback:
            model_entry = eng.routes[FULL].entry
        elif res.model == eng.shared_model and res.model != eng.routes[res.route].model:
            model_entry = eng.manifest["shared"]  # the batch plan gave it to the shared model
        else:
            model_entry = eng.routes[res.route].entry
        out = {
            "label": eng.classes[idx], "index": idx, "prob": float(probs[idx]),
            "scores": [{"label": eng.classes[int(i)], "index": int(i), "prob": float(probs[i])} for i in order],
            "hint": hint, "route": res.route, "model": res.model,
            "head_usage": model_entry.get("head_usage"), "flops_rel": model_entry.get("flops_rel"),
            "fallback": res.fallback, "fallback_reason": FALLBACK_REASONS.get(res.fallback_reason),
            "wrong_hint": res.wrong_hint, "bundle_id": self.bundle_id,
        }
        if res.routed_probs is not None:
            r = int(res.routed_probs.argmax())
            out["routed"] = {"label": eng.classes[r], "index": r, "prob": float(res.routed_probs[r]),
                             "model": res.routed_model}
        by = ("full" if res.fallback or res.route == FULL else
              "shared" if model_entry is eng.manifest.get("shared") else "route")
        REQUESTS.labels(route=res.route, answered_by=by).inc()
        if res.fallback:
            FALLBACKS.labels(route=res.route, reason=res.fallback_reason).inc()
        if res.wrong_hint:
            WRONG_HINTS.labels(route=res.route).inc()
        return out

    async def _read_form(self, request: Request):
        """Body under the size limit -> (image bytes, hint or None, top_k); every mistake is an ApiError."""
        limit = self.cfg.max_upload_bytes
        if request.query_params:
            raise ApiError(400, f"unknown query parameter(s) {sorted(request.query_params)}: send image, hint "
                                f"and top_k as multipart form fields")
        ctype = request.headers.get("content-type", "")
        if not ctype.lower().startswith("multipart/form-data"):
            raise ApiError(415, "send multipart/form-data with an 'image' file field "
                                f"(e.g. curl -F image=@digit.png), got content-type {ctype or 'none'!r}")
        try:
            declared = int(request.headers.get("content-length", "0"))
        except ValueError:
            raise ApiError(400, "invalid content-length header") from None
        if declared > limit:
            raise ApiError(413, f"request body is {declared} bytes, above the limit of {limit} bytes")

        received = 0
        receive = request.receive

        async def limited_receive():  # enforce the limit on the bytes that really arrive (chunked bodies too)
            nonlocal received
            msg = await receive()
            received += len(msg.get("body", b""))
            if received > limit:
                raise _TooLarge
            return msg

        req = Request(request.scope, limited_receive)
        try:
            form = await req.form(max_files=len(FORM_FIELDS), max_fields=len(FORM_FIELDS), max_part_size=limit)
        except _TooLarge:
            raise ApiError(413, f"request body is larger than the limit of {limit} bytes") from None
        except HTTPException as e:  # starlette's own multipart errors (too many files/fields, bad boundary)
            raise ApiError(400, f"malformed multipart form: {e.detail}") from None
        except ClientDisconnect:
            raise
        except Exception as e:  # noqa: BLE001 - python-multipart parse errors
            raise ApiError(400, f"malformed multipart form: {str(e)[:200] or type(e).__name__}") from None
        try:
            keys = list(form.keys())
            unknown = sorted(set(keys) - set(FORM_FIELDS))
            if unknown:
                raise ApiError(400, f"unknown form field(s) {unknown}: expected image (file), hint, top_k")
            dup = sorted({k for k in keys if len(form.getlist(k)) > 1})
            if dup:
                raise ApiError(400, f"form field(s) {dup} given more than once")
            upload = form.get("image")
            if upload is None:
                raise ApiError(400, "missing the 'image' file field (e.g. curl -F image=@digit.png)")
            if isinstance(upload, str):
                raise ApiError(400, "'image' must be a file upload, not a text field (curl -F image=@file.png)")
            image = await upload.read()
            hint = _text_field(form, "hint")
            top_k = _text_field(form, "top_k")
        finally:
            await form.close()
        n = len(self.engine.classes)
        if top_k is None or top_k == "":
            k = min(self.cfg.top_k, n)
        else:
            try:
                k = int(top_k)
            except ValueError:
                raise ApiError(400, f"top_k must be an integer from 1 to {n}, got {top_k[:40]!r}") from None
            if not 1 <= k <= n:
                raise ApiError(400, f"top_k must be from 1 to {n}, got {k}")
        return image, hint.strip() if hint else None, k


def client_gone(receive) -> bool:
    """True if the ASGI server already reports the client's disconnect; never waits. Once the body is read, a live
    connection has no message for the app, so the `receive()` coroutine is run to its first suspension and closed
    (Starlette's `Request.is_disconnected()` instead cancels a wait, which costs an event-loop iteration per call)."""
    coro = receive()
    if not inspect.iscoroutine(coro):
        return False
    try:
        coro.send(None)
    except StopIteration as done:
        return isinstance(done.value, dict) and done.value.get("type") == "http.disconnect"
    except Exception:  # noqa: BLE001 - a receive that fails says nothing about the client
        return False
    coro.close()
    return False


def _text_field(form, name: str):
    v = form.get(name)
    if v is not None and not isinstance(v, str):
        raise ApiError(400, f"'{name}' must be a text field, not a file")
    if v is not None and len(v) > 256:
        raise ApiError(400, f"'{name}' is longer than 256 characters")
    return v


# ---------------------------------------------------------------------------------------------- HTTP glue

def _error(status: int, message: str, headers=None, **extra) -> JSONResponse:
    REJECTED.labels(status=str(status)).inc()
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


def _overloaded(e: Overloaded) -> JSONResponse:
    OVERLOADED.labels(reason=e.reason).inc()
    return _error(503, str(e), headers={"Retry-After": str(e.retry_after_s)}, reason=e.reason,
                  retry_after_s=e.retry_after_s, queued=e.queued, queued_ms=round(e.queued_ms, 1))


class AdmissionMiddleware:
    """ASGI middleware in front of BentoML's routing: POST /classify is admitted by the batcher (`admit()`, counted
    against `max_queue` until its answer is sent) or refused with 503 + Retry-After before anything else runs.

    A refusal here skips BentoML's router, the mounted app's own middleware stack and the endpoint; it still pays
    for the HTTP parsing and the BentoML middlewares listed before user middlewares (metrics, tracing, timeout).
    """

    def __init__(self, app, path: str = "/classify") -> None:
        self.app, self.path = app, path

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        try:
            svc = bentoml.get_current_service()
        except Exception:  # noqa: BLE001 - before the instance exists: the endpoint answers 'starting'
            return await self.app(scope, receive, send)
        if not svc.ready:  # the endpoint answers 'warming_up'
            return await self.app(scope, receive, send)
        try:
            ticket = svc.batcher.admit()
        except Overloaded as e:
            return await _overloaded(e)(scope, receive, send)
        scope.setdefault("state", {})["steerprune_arrived"] = time.monotonic()
        with ticket:
            await self.app(scope, receive, send)


async def classify_endpoint(request: Request):
    t0 = time.perf_counter()
    try:
        svc = bentoml.get_current_service()
    except Exception:  # noqa: BLE001 - before the instance exists
        return JSONResponse({"error": "service is starting", "reason": "starting"}, status_code=503,
                            headers={"Retry-After": "1"})
    if not svc.ready:
        return JSONResponse({"error": "service is warming up; retry when /readyz answers 200", "reason": "warming_up"},
                            status_code=503, headers={"Retry-After": "1"})
    try:
        out = await svc.classify(request)
    except ApiError as e:
        return _error(e.status, str(e), **e.extra)
    except Overloaded as e:
        return _overloaded(e)
    except ClientGone:  # nobody reads this answer; 499 (nginx's "client closed request") keeps BentoML's count honest
        return Response(status_code=499)
    except ServiceUnavailable as e:  # the bentoml batcher's own queueing limit
        return _error(503, f"overloaded: {e}", headers={"Retry-After": "1"}, reason="max_latency", retry_after_s=1)
    except (ClientDisconnect, asyncio.CancelledError):
        raise
    except UserError as e:
        return _error(400, str(e))
    LATENCY.labels(route=out["route"]).observe(time.perf_counter() - t0)
    return JSONResponse(out)


async def routes_endpoint(request: Request):
    try:
        svc = bentoml.get_current_service()
    except Exception:  # noqa: BLE001
        return JSONResponse({"error": "service is starting"}, status_code=503)
    return JSONResponse(dict(svc.listing, ready=svc.ready, batcher=svc.cfg.batcher,
                             max_batch_size=svc.cfg.max_batch_size, warmup_seconds=svc.warmup_seconds,
                             inline_ms=svc.cfg.inline_ms, warm_run_ms=svc.engine.run_ms, warmup=svc.cfg.warmup,
                             warm_run_ms_estimated=svc.engine.run_ms_estimated,
                             max_queue=svc.cfg.max_queue, max_wait_ms=svc.cfg.max_wait_ms,
                             expected_ms_per_image=svc.item_ms,
                             # the plan as the batch thread last refreshed it (the listing's copy is warm-up's)
                             batch_plan=svc.engine.plan_snapshot or svc.listing.get("batch_plan"),
                             gc_threshold=list(gc.get_threshold()),
                             gc_clock=dict(young_ms=svc.cfg.gc_young_ms,
                                           full_s=svc.cfg.gc_full_s, automatic=gc.isenabled(),
                                           young_collections=svc.gc_clock.young_collections,
                                           full_collections=svc.gc_clock.full_collections)))


app = Starlette(routes=[
    HttpRoute("/classify", classify_endpoint, methods=["POST"]),
    HttpRoute("/routes", routes_endpoint, methods=["GET"]),
])
SteerPrune.add_asgi_middleware(AdmissionMiddleware)
SteerPrune.mount_asgi_app(app, path="/")  # handlers find the instance with bentoml.get_current_service()
# the same two endpoints for /docs.json only (api_schema.py): mounted second, it never receives a request
SteerPrune.mount_asgi_app(docs_app(classify_endpoint, routes_endpoint), path="/", name="openapi")

"""The HTTP API's schema: /classify and /routes as they appear in BentoML's OpenAPI document (`/docs.json`).

BentoML puts the routes of mounted FastAPI apps into its OpenAPI document and ignores plain Starlette routes. The
service answers /classify and /routes with Starlette routes (FastAPI's per-request machinery costs more than a
digits request itself here), so `docs_app` declares the same two endpoints, bound to the same handlers, for the
document only: it is mounted after the Starlette app, whose routes match first (BentoML's mounts only claim the
paths their routes match), so no request reaches it.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Score", "RoutedScore", "ClassifyAnswer", "ErrorBody", "OverloadBody", "RoutesListing", "CLASSIFY_BODY", "docs_app"]


class Score(BaseModel):
    label: str = Field(description="class name")
    index: int = Field(ge=0, description="class index in the bundle's class list")
    prob: float = Field(ge=0, le=1, description="softmax probability")


class RoutedScore(Score):
    """The overruled answer of a fallback."""

    model: str = Field(description="bundle-relative ONNX file whose answer was overruled (the route's model, or "
                                   "the shared model when the batch plan gave the request to it)")


class ClassifyAnswer(BaseModel):
    """POST /classify answer (200)."""

    label: str = Field(description="top-1 class name")
    index: int = Field(ge=0, description="top-1 class index")
    prob: float = Field(ge=0, le=1, description="top-1 probability")
    scores: List[Score] = Field(description="the top_k classes, most probable first")
    hint: Optional[str] = Field(description="the hint as sent (trimmed), null without one")
    route: str = Field(description="route the request was sent to: the hint's route, or 'full'")
    model: str = Field(description="bundle-relative ONNX file that answered (the full model after a fallback)")
    head_usage: Optional[float] = Field(description="share of attention heads the answering model keeps")
    flops_rel: Optional[float] = Field(description="the answering model's FLOPs relative to the full model")
    fallback: bool = Field(description="verify mode: the routed answer was overruled and the full model answered")
    fallback_reason: Optional[str] = Field(description="why it fell back, in words; null without fallback")
    wrong_hint: bool = Field(description="the full model's answer lies outside the hint's classes")
    routed: Optional[RoutedScore] = Field(None, description="after a fallback: the overruled routed model's top-1")
    bundle_id: str = Field(description="first 16 hex digits of sha256(manifest.json) of the bundle that answered")


class ErrorBody(BaseModel):
    """Any 4xx: what was wrong with the request."""

    error: str = Field(description="what was wrong, in words")
    valid_hints: Optional[List[str]] = Field(None, description="unknown hint (400): the hints this bundle knows")


class OverloadBody(BaseModel):
    """503: not served now; retry after the Retry-After header's seconds."""

    error: str = Field(description="why, in words")
    reason: str = Field(description="queue_full | queue_work (refused on arrival) | deadline (queued past "
                                    "max_wait_ms, not run) | max_latency (bentoml batcher) | warming_up | starting")
    retry_after_s: Optional[int] = Field(None, ge=1, description="same as the Retry-After header")
    queued: Optional[int] = Field(None, ge=0, description="requests in the worker when it was refused")
    queued_ms: Optional[float] = Field(None, ge=0, description="expected ms of queued work when it was refused")


class RouteInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    classes: List[str]
    class_indices: List[int]
    model: str
    head_usage: Optional[float] = None
    kept_heads: Optional[Dict[str, List[int]]] = Field(None, description="layer name -> kept head indices")
    flops_rel: Optional[float] = None
    acc: Optional[float] = None
    off_route_acc: Optional[float] = None


class RoutesListing(BaseModel):
    """GET /routes: the bundle's hints and how this worker serves them (more fields than listed may appear)."""

    model_config = ConfigDict(extra="allow")
    routes: Dict[str, RouteInfo] = Field(description="hint name -> its route")
    full: RouteInfo
    classes: List[str]
    groups: dict
    hint_mode: str
    bundle_id: str = Field(description="first 16 hex digits of sha256(manifest.json)")
    bundle_path: str
    ready: bool
    batcher: str
    max_batch_size: int
    max_queue: int
    max_wait_ms: float
    expected_ms_per_image: Dict[str, float] = Field(description="route -> warm-up ms per image at max_batch_size")


CLASSIFY_BODY = {
    "required": True,
    "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["image"], "additionalProperties": False,
        "properties": {
            "image": {"type": "string", "format": "binary",
                      "description": "the image file (PNG, JPEG, WebP, GIF, BMP, TIFF, PPM), at most max_upload_bytes "
                                     "(8 MiB) and max_pixels (4096 x 4096)"},
            "hint": {"type": "string", "maxLength": 256,
                     "description": "a class or group name from GET /routes; empty or absent: the full model"},
            "top_k": {"type": "integer", "minimum": 1,
                      "description": "how many scores to return, 1 to the number of classes (default 3)"},
        }}}},
}

_ERRORS = {
    400: {"model": ErrorBody, "description": "bad form (unknown/duplicate field, bad top_k, unknown hint, corrupt "
                                             "image)"},
    413: {"model": ErrorBody, "description": "body above max_upload_bytes or image above max_pixels"},
    415: {"model": ErrorBody, "description": "not multipart/form-data, or not an image"},
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}


def docs_app(classify: Callable, routes: Callable):
    """A FastAPI app declaring POST /classify and GET /routes for BentoML's OpenAPI document (never routed to)."""
    from fastapi import FastAPI

    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    app.add_api_route(
        "/classify", classify, methods=["POST"], summary="Classify an image, routed by an optional class hint",
        description="multipart/form-data with an `image` file and optional `hint` and `top_k` text fields.",
        openapi_extra={"requestBody": CLASSIFY_BODY}, response_model=None,
        responses={200: {"model": ClassifyAnswer, "description": "the answer"}, **_ERRORS,
                   503: {"model": OverloadBody, "headers": _RETRY_AFTER,
                         "description": "overloaded or warming up: retry after Retry-After seconds"}})
    app.add_api_route(
        "/routes", routes, methods=["GET"], summary="The bundle's hints, models and serving settings",
        response_model=None,
        responses={200: {"model": RoutesListing, "description": "the listing"},
                   503: {"model": ErrorBody, "description": "the service is starting"}})
    return app

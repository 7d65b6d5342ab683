"""Adaptive batching for the /classify handler: requests queue up, one model run answers a whole batch.

BentoML's `batchable=True` APIs take exactly one argument, and /classify needs three (image, hint, top_k) plus
its own upload validation (see service.py), so batching happens below the handler with either
- `GreedyBatcher` (default): while a batch runs, new requests queue; the next run takes all of them (up to
  max_batch_size). No timer and no polling: an idle server answers at once, a busy one batches by itself.
- `CorkBatcher`: BentoML's own `CorkDispatcher`, the adaptive-batching engine behind `batchable=True` (it learns
  a wait window from measured latencies, polls every 1 ms, and answers 503 past max_latency_ms).
Both take `fn(items) -> results` (run in a worker thread: ONNX Runtime releases the GIL) and keep the order.
GreedyBatcher also takes `inline(items) -> bool`: batches it approves run on the event loop itself (a small
model's run is shorter than the thread hop).

GreedyBatcher bounds its queue (`max_queue` requests, `max_wait_ms` of expected work ahead of a new request, from
`cost(item) -> ms`) and raises `Overloaded` (the handler's 503 + Retry-After) for what it cannot serve in time.
`admit()` applies the same bounds when a request arrives, before its body is read, and counts it against
`max_queue` until it is answered: when the event loop (reading and decoding uploads) is the bottleneck rather than
the model, requests pile up in the handler, not in the batch queue.
When a batch is formed it drops, without running them, requests that are already gone: their future was cancelled
(BentoML's traffic timeout), `is_gone()` says their client disconnected, or their deadline (queued + max_wait_ms)
has passed. Every future it accepted is resolved, whatever happens to the batch or to the drain task.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import anyio

__all__ = ["GreedyBatcher", "CorkBatcher", "Overloaded", "ClientGone", "make_batcher"]


class Overloaded(Exception):
    """The request cannot be served in time: answer 503 with `Retry-After: retry_after_s`."""

    def __init__(self, reason: str, message: str, retry_after_s: int, queued: int, queued_ms: float):
        super().__init__(message)
        self.reason = reason  # 'queue_full' | 'queue_work' | 'deadline'
        self.retry_after_s = retry_after_s
        self.queued, self.queued_ms = queued, queued_ms


class ClientGone(Exception):
    """The request's client disconnected before its batch ran; nobody reads the answer."""


class _Job(NamedTuple):
    item: Any
    fut: asyncio.Future
    cost_ms: float  # expected model time of this item (warm-up timings)
    deadline: float  # time.monotonic() after which it is not run
    is_gone: Optional[Callable[[], bool]]  # must not block: asked for every request taken into a batch


class GreedyBatcher:
    def __init__(self, fn: Callable[[Sequence[Any]], Sequence[Any]], max_batch_size: int,
                 inline: Optional[Callable[[Sequence[Any]], bool]] = None, max_queue: Optional[int] = None,
                 max_wait_ms: Optional[float] = None, cost: Optional[Callable[[Any], float]] = None,
                 on_skip: Optional[Callable[[str, int], None]] = None):
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.inline = inline
        self.max_queue = max_queue  # None: unbounded
        self.max_wait_ms = max_wait_ms  # None: no work bound and no deadline
        self.cost = cost
        self.on_skip = on_skip
        self.skipped: collections.Counter = collections.Counter()  # reason -> requests dropped unrun
        self._queue: collections.deque[_Job] = collections.deque()
        self._queued_ms = 0.0  # sum of cost_ms over the queue
        self._batch_ms = 0.0  # expected ms of the running batch
        self._batch_t0 = 0.0
        self._ratio = 1.0  # measured / expected run time, smoothed: the warm-up timings were taken on an idle core
        self._task: Optional[asyncio.Task] = None  # the drain task: asyncio keeps only a weak reference
        self.pending = 0  # admitted requests not yet answered (admit() .. its context exit)

    # ------------------------------------------------------------------------------------------ admission

    def ahead_ms(self) -> float:
        """Expected ms before a request queued now would start: the queue plus what is left of the running batch."""
        running = 0.0
        if self._task is not None and self._batch_ms:
            running = max(0.0, self._batch_ms * self._ratio - (time.monotonic() - self._batch_t0) * 1000.0)
        return self._queued_ms * self._ratio + running

    def admit(self) -> "_Admission":
        """Count a request arriving at the handler until the returned context exits; Overloaded if max_queue
        requests are already in (reading, decoding, queued or running) or the queued work exceeds max_wait_ms."""
        self.check(self.pending)
        return _Admission(self)

    def check(self, count: Optional[int] = None) -> None:
        """Raise Overloaded if a request arriving now could not be queued (`count`: requests ahead, default the
        queue's length)."""
        count = len(self._queue) if count is None else count
        if self.max_queue is not None and count >= self.max_queue:
            self._refuse("queue_full", f"{count} requests are in the worker (max_queue={self.max_queue})")
        if self.max_wait_ms is not None:
            ahead = self.ahead_ms()
            if ahead > self.max_wait_ms:
                self._refuse("queue_work", f"the queued work is expected to take {ahead:.0f} ms, above "
                                           f"max_wait_ms={self.max_wait_ms:g}")

    def _refuse(self, reason: str, message: str):
        ahead = self.ahead_ms()
        raise Overloaded(reason, f"overloaded: {message}; retry later", _retry_after(ahead), len(self._queue), ahead)

    def check_deadline(self, arrived: float) -> None:
        """Raise Overloaded('deadline') if a request that arrived at `arrived` (time.monotonic()) has already waited
        max_wait_ms: called before costly work (decoding) that its batch would never use."""
        if self.max_wait_ms is not None and time.monotonic() - arrived > self.max_wait_ms / 1000.0:
            self._skip_count("deadline")
            ahead = self.ahead_ms()
            raise Overloaded("deadline", f"overloaded: waited {self.max_wait_ms:g} ms (max_wait_ms) before its "
                                         "upload was decoded; retry later", _retry_after(ahead), len(self._queue), ahead)

    async def submit(self, item: Any, is_gone: Optional[Callable[[], bool]] = None,
                     arrived: Optional[float] = None) -> Any:
        """Queue one item and wait for its result. Raises Overloaded (queue bound, or its batch not started by
        `arrived` (time.monotonic(), default now) + max_wait_ms) or ClientGone (`is_gone()` was true when its batch
        was formed)."""
        self.check()
        loop = asyncio.get_running_loop()
        cost = self.cost(item) if self.cost is not None else 0.0
        cost = cost if math.isfinite(cost) else 0.0  # untimed (before warm-up): the deadline still bounds it
        t0 = time.monotonic() if arrived is None else arrived
        deadline = t0 + self.max_wait_ms / 1000.0 if self.max_wait_ms is not None else math.inf
        job = _Job(item, loop.create_future(), cost, deadline, is_gone)
        self._queue.append(job)
        self._queued_ms += cost
        if self._task is None:
            self._task = loop.create_task(self._drain())
        return await job.fut

    # ------------------------------------------------------------------------------------------ draining

    def _pop(self) -> _Job:
        job = self._queue.popleft()
        self._queued_ms = max(0.0, self._queued_ms - job.cost_ms) if self._queue else 0.0
        return job

    def _skip_count(self, reason: str) -> None:
        self.skipped[reason] += 1
        if self.on_skip is not None:
            self.on_skip(reason, 1)

    def _skip(self, job: _Job, reason: str, exc: Optional[BaseException]) -> None:
        self._skip_count(reason)
        if exc is not None and not job.fut.done():
            job.fut.set_exception(exc)

    def _next_batch(self) -> list[_Job]:
        """Up to max_batch_size live jobs from the queue; the gone ones are resolved and counted."""
        jobs: list[_Job] = []
        while self._queue and len(jobs) < self.max_batch_size:
            job = self._pop()
            if job.fut.done():  # cancelled: BentoML's timeout or the handler's task ended
                self._skip(job, "cancelled", None)
            elif time.monotonic() > job.deadline:
                ahead = self.ahead_ms()
                self._skip(job, "deadline", Overloaded(
                    "deadline", f"overloaded: queued {self.max_wait_ms:g} ms (max_wait_ms) without its batch "
                                "starting; retry later", _retry_after(ahead), len(self._queue), ahead))
            elif job.is_gone is not None and job.is_gone():
                self._skip(job, "disconnected", ClientGone("the client disconnected before its batch ran"))
            else:
                jobs.append(job)
        return jobs

    async def _drain(self) -> None:
        jobs: list[_Job] = []
        try:
            while self._queue:
                jobs = self._next_batch()
                if not jobs:
                    continue
                items = [job.item for job in jobs]
                self._batch_ms = sum(job.cost_ms for job in jobs)
                self._batch_t0 = time.monotonic()
                try:
                    if self.inline is not None and self.inline(items):
                        outs = self.fn(items)
                    else:
                        outs = await anyio.to_thread.run_sync(self.fn, items)
                    if len(outs) != len(jobs):
                        raise RuntimeError(f"the model answered {len(outs)} rows for a batch of {len(jobs)}")
                except Exception as e:  # noqa: BLE001 - every waiting request gets the error
                    for job in jobs:
                        if not job.fut.done():
                            job.fut.set_exception(e)
                    jobs = []
                    continue
                self._learn((time.monotonic() - self._batch_t0) * 1000.0)
                for job, out in zip(jobs, outs):
                    if not job.fut.done():  # cancelled while it ran
                        job.fut.set_result(out)
                jobs = []
        except BaseException as e:  # CancelledError (shutdown) is not an Exception: nobody may wait forever
            err = RuntimeError(f"the batcher stopped ({type(e).__name__}) before this request was answered")
            for job in [*jobs, *self._queue]:
                if not job.fut.done():
                    job.fut.set_exception(err)
            self._queue.clear()
            self._queued_ms = 0.0
            raise
        finally:
            self._batch_ms = 0.0
            self._task = None

    def _learn(self, took_ms: float) -> None:
        if self._batch_ms > 0 and math.isfinite(self._batch_ms):
            self._ratio = min(20.0, max(0.1, 0.8 * self._ratio + 0.2 * took_ms / self._batch_ms))


class _Admission:
    __slots__ = ("_b",)

    def __init__(self, batcher: GreedyBatcher):
        self._b = batcher
        batcher.pending += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._b.pending -= 1
        return False


def _retry_after(ahead_ms: float) -> int:
    """Retry-After in whole seconds (RFC 9110): the time the queue ahead should take, at least 1."""
    return max(1, math.ceil(min(ahead_ms, 3_600_000.0) / 1000.0)) if math.isfinite(ahead_ms) else 60


class CorkBatcher:
    def __init__(self, fn: Callable[[Sequence[Any]], Sequence[Any]], max_batch_size: int, max_latency_ms: int):
        from bentoml._internal.marshal.dispatcher import CorkDispatcher
        from bentoml.exceptions import ServiceUnavailable

        def overloaded():
            raise ServiceUnavailable(f"queued longer than max_latency_ms={max_latency_ms}")

        async def callback(items):
            return await anyio.to_thread.run_sync(fn, list(items))

        self._dispatcher = CorkDispatcher(max_latency_in_ms=max_latency_ms, max_batch_size=max_batch_size,
                                          fallback=overloaded, get_batch_size=lambda _: 1)
        self._call = self._dispatcher(callback)
        self.skipped: collections.Counter = collections.Counter()

    def check_deadline(self, arrived: float) -> None:
        pass

    def admit(self):
        return contextlib.nullcontext()  # CorkDispatcher has no bound to check up front; it refuses past max_latency_ms

    async def submit(self, item: Any, is_gone=None, arrived=None) -> Any:
        return await self._call(item)


def make_batcher(kind: str, fn, max_batch_size: int, max_latency_ms: int, inline=None, max_queue=None,
                 max_wait_ms=None, cost=None, on_skip=None):
    if kind == "bentoml":
        return CorkBatcher(fn, max_batch_size, max_latency_ms)
    return GreedyBatcher(fn, max_batch_size, inline, max_queue=max_queue, max_wait_ms=max_wait_ms, cost=cost,
                         on_skip=on_skip)

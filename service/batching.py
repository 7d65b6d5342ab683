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
"""
from __future__ import annotations

import asyncio
import collections
from typing import Any, Callable, Optional, Sequence

import anyio

__all__ = ["GreedyBatcher", "CorkBatcher", "make_batcher"]


class GreedyBatcher:
    def __init__(self, fn: Callable[[Sequence[Any]], Sequence[Any]], max_batch_size: int,
                 inline: Optional[Callable[[Sequence[Any]], bool]] = None):
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.inline = inline
        self._queue: collections.deque = collections.deque()
        self._running = False

    async def submit(self, item: Any) -> Any:
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((item, fut))
        if not self._running:
            self._running = True
            asyncio.get_running_loop().create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        try:
            while self._queue:
                jobs = [self._queue.popleft() for _ in range(min(len(self._queue), self.max_batch_size))]
                items = [item for item, _ in jobs]
                try:
                    if self.inline is not None and self.inline(items):
                        outs = self.fn(items)
                    else:
                        outs = await anyio.to_thread.run_sync(self.fn, items)
                except Exception as e:  # noqa: BLE001 - every waiting request gets the error
                    for _, fut in jobs:
                        if not fut.done():
                            fut.set_exception(e)
                    continue
                for (_, fut), out in zip(jobs, outs):
                    if not fut.done():  # a client that disconnected cancelled its future
                        fut.set_result(out)
        finally:
            self._running = False


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

    async def submit(self, item: Any) -> Any:
        return await self._call(item)


def make_batcher(kind: str, fn, max_batch_size: int, max_latency_ms: int, inline=None):
    if kind == "bentoml":
        return CorkBatcher(fn, max_batch_size, max_latency_ms)
    return GreedyBatcher(fn, max_batch_size, inline)

"""GreedyBatcher without a server: queue bounds, deadlines, gone clients, short answers, cancelled drains."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from steerprune.service.batching import ClientGone, GreedyBatcher, Overloaded


class Gate:
    """fn for the batcher that blocks in its worker thread until released, recording what it ran."""

    def __init__(self):
        self.release = threading.Event()
        self.started = threading.Event()
        self.seen: list = []

    def __call__(self, items):
        self.started.set()
        self.release.wait(10)
        self.seen.extend(items)
        return [i * 10 for i in items]


async def _until(pred, timeout=5.0):
    t = time.monotonic()
    while not pred():
        assert time.monotonic() - t < timeout
        await asyncio.sleep(0.001)


def test_queue_bound_by_count_refuses_with_retry_after():
    gate = Gate()

    async def main():
        b = GreedyBatcher(gate, max_batch_size=2, max_queue=3)
        first = asyncio.ensure_future(b.submit(0))
        await _until(gate.started.is_set)  # batch [0] runs; the queue is empty again
        queued = [asyncio.ensure_future(b.submit(i)) for i in (1, 2, 3)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded) as e:
            await b.submit(4)
        with pytest.raises(Overloaded):
            b.check()  # the cheap up-front check agrees
        gate.release.set()
        return e.value, await first, await asyncio.gather(*queued)

    err, first, rest = asyncio.run(main())
    assert err.reason == "queue_full" and err.retry_after_s >= 1 and err.queued == 3 and "max_queue=3" in str(err)
    assert first == 0 and rest == [10, 20, 30] and 4 not in gate.seen


def test_queue_bound_by_expected_work():
    gate = Gate()

    async def main():
        b = GreedyBatcher(gate, max_batch_size=8, max_wait_ms=250, cost=lambda item: 100.0)
        first = asyncio.ensure_future(b.submit(0))
        await _until(gate.started.is_set)  # batch [0] runs: ~100 ms of expected work left
        ok = [asyncio.ensure_future(b.submit(i)) for i in (1, 2)]  # ~100 and ~200 ms ahead of them
        await asyncio.sleep(0)
        with pytest.raises(Overloaded) as e:  # ~300 ms ahead: over 250
            await b.submit(3)
        gate.release.set()
        return e.value, await first, await asyncio.gather(*ok)

    err, first, rest = asyncio.run(main())
    assert err.reason == "queue_work" and "max_wait_ms=250" in str(err)
    assert 250 < err.queued_ms <= 300 and err.queued == 2 and err.retry_after_s == 1
    assert rest == [10, 20] and gate.seen == [0, 1, 2]


def test_deadline_passed_before_the_batch_ran_is_skipped_unrun():
    gate = Gate()

    async def main():
        b = GreedyBatcher(gate, max_batch_size=4, max_wait_ms=50)
        first = asyncio.ensure_future(b.submit(0))
        await _until(gate.started.is_set)
        late = asyncio.ensure_future(b.submit(1))
        await asyncio.sleep(0.12)  # the running batch outlasts late's 50 ms deadline
        gate.release.set()
        return b, await first, await asyncio.gather(late, return_exceptions=True)

    b, first, (late,) = asyncio.run(main())
    assert first == 0 and isinstance(late, Overloaded) and late.reason == "deadline"
    assert gate.seen == [0] and b.skipped["deadline"] == 1


def test_gone_and_cancelled_requests_are_not_computed():
    gate = Gate()
    skips = []

    async def main():
        b = GreedyBatcher(gate, max_batch_size=8, on_skip=lambda reason, n: skips.append((reason, n)))
        first = asyncio.ensure_future(b.submit(0))
        await _until(gate.started.is_set)

        def gone():
            return True

        def here():
            return False

        left = asyncio.ensure_future(b.submit(1, is_gone=gone))
        stays = asyncio.ensure_future(b.submit(2, is_gone=here))
        timed_out = asyncio.ensure_future(b.submit(3))
        await asyncio.sleep(0)
        timed_out.cancel()  # what BentoML's traffic timeout does to the handler
        gate.release.set()
        return b, await first, await asyncio.gather(left, stays, timed_out, return_exceptions=True)

    b, first, (left, stays, timed_out) = asyncio.run(main())
    assert isinstance(left, ClientGone) and stays == 20 and isinstance(timed_out, asyncio.CancelledError)
    assert gate.seen == [0, 2]  # neither the gone client's image nor the cancelled one reached the model
    assert b.skipped == {"disconnected": 1, "cancelled": 1}
    assert sorted(skips) == [("cancelled", 1), ("disconnected", 1)]


def test_fewer_rows_than_asked_fails_every_request_instead_of_hanging():
    async def main():
        b = GreedyBatcher(lambda items: [0], max_batch_size=4, inline=lambda items: True)
        return await asyncio.wait_for(asyncio.gather(*(b.submit(i) for i in range(3)), return_exceptions=True), 5)

    outs = asyncio.run(main())
    assert len(outs) == 3 and all(isinstance(o, RuntimeError) and "1 rows for a batch of 3" in str(o) for o in outs)


def test_cancelled_drain_resolves_every_future_and_the_batcher_recovers():
    gate = Gate()

    async def main():
        b = GreedyBatcher(gate, max_batch_size=2)
        futs = [asyncio.ensure_future(b.submit(i)) for i in range(5)]
        await _until(gate.started.is_set)
        assert b._task is not None  # the batcher holds its drain task (asyncio keeps only a weak reference)
        b._task.cancel()  # e.g. shutdown; CancelledError is a BaseException
        gate.release.set()
        outs = await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), 5)
        gate.release.set()
        again = await asyncio.wait_for(b.submit(7), 5)  # a new drain starts for the next request
        return outs, again, b

    outs, again, b = asyncio.run(main())
    assert all(isinstance(o, RuntimeError) and "stopped (CancelledError)" in str(o) for o in outs)
    assert again == 70 and b._task is None and b.ahead_ms() == 0.0


def test_unbounded_by_default_and_keeps_order():
    async def main():
        b = GreedyBatcher(lambda items: [i + 1 for i in items], max_batch_size=3)
        return await asyncio.gather(*(b.submit(i) for i in range(1000)))

    assert asyncio.run(main()) == list(range(1, 1001))


def test_measured_run_time_scales_the_work_estimate():
    def slow(items):
        time.sleep(0.02 * len(items))  # twice the 10 ms per item the cost function expects
        return items

    async def main():
        b = GreedyBatcher(slow, max_batch_size=2, cost=lambda item: 10.0)
        for _ in range(6):
            await asyncio.gather(b.submit(1), b.submit(2))
        return b._ratio

    assert 1.5 < asyncio.run(main()) < 3.0


def test_client_gone_polls_receive_without_waiting():
    pytest.importorskip("bentoml")
    from steerprune.service.service import client_gone

    async def main():
        ev = asyncio.Event()
        state = {"disconnected": False}

        async def receive():  # like uvicorn's: waits for a message unless the client is already gone
            if not state["disconnected"]:
                await ev.wait()
            return {"type": "http.disconnect"}

        live = client_gone(receive)
        leaked = len(ev._waiters)  # the abandoned wait must not stay registered
        state["disconnected"] = True
        t = time.perf_counter()
        gone = client_gone(receive)
        return live, leaked, gone, time.perf_counter() - t

    live, leaked, gone, took = asyncio.run(main())
    assert live is False and leaked == 0 and gone is True and took < 0.01


def test_queue_bounds_in_serve_config_env_and_validation():
    from steerprune.errors import UserError
    from steerprune.service.config import ServeConfig

    cfg = ServeConfig.from_env({"STEERPRUNE_BUNDLE": "b", "STEERPRUNE_MAX_QUEUE": "16",
                                "STEERPRUNE_MAX_WAIT_MS": "250"})
    assert (cfg.max_queue, cfg.max_wait_ms) == (16, 250.0) and ServeConfig.from_env(cfg.to_env()) == cfg
    for bad in ({"max_queue": 0}, {"max_wait_ms": 0.5}, {"max_wait_ms": 700_000}):
        with pytest.raises(UserError, match=next(iter(bad))):
            ServeConfig(bundle="b", **bad)
    with pytest.raises(UserError, match="STEERPRUNE_MAX_QUEUE"):
        ServeConfig.from_env({"STEERPRUNE_BUNDLE": "b", "STEERPRUNE_MAX_QUEUE": "lots"})


def test_deadline_checked_before_costly_work():
    b = GreedyBatcher(lambda items: items, max_batch_size=2, max_wait_ms=50)
    b.check_deadline(time.monotonic())  # just arrived: fine
    with pytest.raises(Overloaded) as e:
        b.check_deadline(time.monotonic() - 0.2)
    assert e.value.reason == "deadline" and b.skipped["deadline"] == 1

"""The worker's GC clock: young collections on a timer with CPython's own off, full ones on a slower timer."""
from __future__ import annotations

import asyncio
import gc
import weakref

from steerprune.service.gc_schedule import GcClock


class _Node:
    pass


def _cycle() -> weakref.ref:
    """A reference cycle nobody else holds: only a garbage collection frees it."""
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def _run(clock: GcClock, seconds: float, during=None, until=None):
    """Run the clock on an event loop for `seconds`, or until `until()` holds (then at most `seconds`)."""
    async def main():
        loop = asyncio.get_running_loop()
        clock.start(loop)
        try:
            if during is not None:
                during()
            deadline = loop.time() + seconds
            while loop.time() < deadline and not (until is not None and until()):
                await asyncio.sleep(0.01)
        finally:
            clock.stop()

    was_enabled = gc.isenabled()
    try:
        asyncio.run(main())
    finally:
        if was_enabled:
            gc.enable()


def test_young_clock_takes_over_collection_and_frees_cycles():
    pauses = []
    refs = []
    states = []

    def during():
        states.append(gc.isenabled())
        refs.extend(_cycle() for _ in range(50))

    clock = GcClock(0.01, 3600.0, on_pauses=pauses.extend)
    _run(clock, 0.3, during)
    assert states == [False]  # CPython's automatic collection is off while the clock runs
    assert gc.isenabled()  # and back on once it stops
    assert all(r() is None for r in refs)  # the clock's young collections freed the cycles
    assert 10 <= clock.young_collections <= 40 and clock.full_collections == 0
    assert pauses and {g for g, _ in pauses} <= {1} and all(0 <= s < 1 for _, s in pauses)
    assert len(pauses) <= clock.young_collections  # every pause handed over at most once
    assert clock._on_gc not in gc.callbacks


def test_full_collections_run_on_their_own_clock():
    pauses = []
    clock = GcClock(0.01, 0.05, on_pauses=pauses.extend)
    # a full collection of a test session's heap (torch and all) can take 100+ ms: wait for them, within bounds
    _run(clock, 20.0, until=lambda: clock.full_collections >= 3 and 2 in {g for g, _ in pauses})
    assert clock.full_collections >= 3 and clock.young_collections > 0
    assert 2 in {g for g, _ in pauses}


def test_unscheduled_clock_leaves_collection_to_cpython_and_records_its_pauses():
    pauses = []
    clock = GcClock(0.0, 600.0, on_pauses=pauses.extend)
    _run(clock, 10.0, lambda: (gc.collect(0), gc.collect()), until=lambda: {0, 2} <= {g for g, _ in pauses})
    assert not clock.scheduled and clock.young_collections == clock.full_collections == 0
    assert {0, 2} <= {g for g, _ in pauses}  # CPython's (here: explicit) collections are still measured


def test_clock_keeps_collecting_when_recording_fails():
    def broken(_):
        raise RuntimeError("metrics backend down")

    errors = []

    def during():
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx.get("exception")))
        refs.extend(_cycle() for _ in range(20))

    refs = []
    clock = GcClock(0.01, 3600.0, on_pauses=broken)
    _run(clock, 10.0, during, until=lambda: clock.young_collections >= 5 and len(errors) >= 2)
    assert clock.young_collections >= 5 and all(isinstance(e, RuntimeError) for e in errors) and len(errors) >= 2
    assert all(r() is None for r in refs)  # automatic collection is off, yet the cycles were freed

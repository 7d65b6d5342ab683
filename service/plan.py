"""Which model runs a mixed-hint batch is worth: the batch planner behind `ServeConfig.batch_plan = 'cost'`.

A batch of B requests with H distinct route models costs H + 1 model runs, and a run's time is not proportional to
its rows: a batch-1 run of a route model that keeps 76% of the FLOPs, after other models ran, costs more than one
row of the full model's batch-16 run (CIFAR-100 bundle: 2.0 ms against 1.6 ms). With 100 routes and uniform hints a batch of 16 holds ~15 route
models, and hinted requests then cost more than unhinted ones. The planner answers a group of rows on the full
model's run instead of its own, or on the bundle's shared model (one pruned model for every class, `export
--shared`) with the route's rule for it, whenever that lowers the batch's expected time, counting the reruns on
the full model that the groups' fallback rates predict.

`plan_batch` is a pure function of `ms(model, rows)`, which the engine takes from `RunTimes`: each model's time per
run as a line in its rows, seeded with the warm-up timings and refitted on the runs the engine observes.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

__all__ = ["Group", "Plan", "plan_batch", "RunTimes"]


class Group(NamedTuple):
    """The rows of one batch that would run on one route model."""
    model: str
    rows: int
    fallback: float  # expected share of its rows rerun on the full model (0 in trust mode)
    shared_fallback: Optional[float] = None  # the same on the shared model; None: the shared model does not serve it


class Plan(NamedTuple):
    to_full: frozenset  # route models whose rows the full model's run answers in this batch
    to_shared: frozenset  # route models whose rows the shared model's run answers
    expected_ms: float  # expected time of the chosen plan
    routed_ms: float  # expected time with every group on its own model


def plan_batch(groups: Sequence[Group], full_rows: int, full_model: str, ms: Callable[[str, float], float],
               shared_model: Optional[str] = None, margin: float = 0.05) -> Plan:
    """Choose which groups another run answers, to minimise the batch's expected time

        sum over groups left on their model of ms(g.model, g.rows) + ms(full, full_rows + rows moved to full)
        + ms(shared, rows moved to the shared model) + ms(full, expected reruns)

    where the expected reruns are g.fallback x g.rows of each group left on its model and g.shared_fallback x g.rows of
    each moved to the shared model (ms of a fractional count below 1 is the chance of a run at all times its
    batch-1 time: the caller's `ms` decides). Groups move in order of their cost per row on their own model, most
    expensive first, all to the full model or each to the shared model where it serves them; the best prefix of that
    order and target is kept if it saves at least `margin` of the batch's time with every group on its own model
    (the times are estimates: a move must be worth more than their error; the hint's model is what the user asked
    for)."""
    own = [(ms(g.model, g.rows), g) for g in groups if g.rows > 0]
    own.sort(key=lambda t: t[0] / t[1].rows, reverse=True)
    base_routed = sum(t for t, _ in own)
    base_rerun = sum(g.fallback * g.rows for _, g in own)
    routed_ms = best = base_routed + ms(full_model, full_rows) + ms(full_model, base_rerun)
    choice: tuple[int, bool] = (0, False)  # (groups moved, to the shared model where it serves them)
    for to_shared in ((False, True) if shared_model is not None else (False,)):
        routed, rerun, on_full, on_shared = base_routed, base_rerun, full_rows, 0
        for k, (t, g) in enumerate(own, 1):
            routed -= t
            rerun -= g.fallback * g.rows
            if to_shared and g.shared_fallback is not None:
                on_shared += g.rows
                rerun += g.shared_fallback * g.rows
            else:
                on_full += g.rows
            total = (routed + ms(full_model, on_full) + (ms(shared_model, on_shared) if on_shared else 0.0)
                     + ms(full_model, max(rerun, 0.0)))
            if total < best * (1.0 - 1e-9):
                choice, best = (k, to_shared), total
    if best > routed_ms * (1.0 - margin):
        choice, best = (0, False), routed_ms
    k, to_shared = choice
    moved = [g for _, g in own[:k]]
    shared = frozenset(g.model for g in moved if to_shared and g.shared_fallback is not None)
    return Plan(frozenset(g.model for g in moved) - shared, shared, best, routed_ms)


class RunTimes:
    """Each model's ms per run as a + b x rows (a, b >= 0), fitted by weighted least squares on its warm-up timings
    (`seed`, always counting `prior_weight` runs) and on the runs observed while serving (`observe`), whose weight
    decays by `decay` per batch (`tick`). Warm-up times each model many times in a row on an idle core; while
    serving, a route model in a mixed batch runs with its weights out of the CPU's caches. A model the plan stops
    choosing is no longer observed, and its observations fade: after some hundred batches it is judged by its
    warm-up timings again. An observed run counts as at most `spike` times the time expected of it, so one slow run
    (a preempted thread, a first run at a new size) moves the line by a bounded step instead of shutting the model
    out until it fades, while a model that is really slower gets there in a few runs. A model never seeded stays
    unknown (`ms` is inf)."""

    def __init__(self, decay: float = 0.98, prior_weight: float = 10.0, spike: float = 3.0):
        if not (0 < decay <= 1 and prior_weight > 0 and spike >= 1):
            raise ValueError(f"need 0 < decay <= 1, prior_weight > 0, spike >= 1; got {decay}, {prior_weight}, {spike}")
        self.decay = decay  # weight of the observations per batch: about the last 1 / (1 - decay) batches count
        self.prior_weight = prior_weight  # the warm-up timings count as this many runs
        self.spike = spike  # an observed run counts as at most this many times its expected time
        self.clock = 0  # batches so far
        self._prior: dict[str, list[float]] = {}  # model -> weighted sums of 1, n, n^2, t, n t (warm-up)
        self._obs: dict[str, list[float]] = {}  # the same over observed runs, decayed to `_at`
        self._at: dict[str, int] = {}
        self._lines: dict[str, tuple[int, tuple[float, float]]] = {}  # model -> (clock, line)

    def seed(self, model: str, points: dict) -> None:
        """Start `model` from {rows: ms} (warm-up: at least one size)."""
        if not points:
            return
        w = self.prior_weight / len(points)
        sums = [0.0] * 5
        for n, t in points.items():
            for k, v in enumerate((1.0, n, n * n, t, n * t)):
                sums[k] += w * v
        self._prior[model], self._obs[model], self._at[model] = sums, [0.0] * 5, self.clock
        self._lines.pop(model, None)

    def tick(self) -> None:
        """One more batch: every observation so far weighs `decay` times less."""
        self.clock += 1

    def observe(self, model: str, rows: float, ms: float) -> None:
        """One run of `model` on `rows` images took `ms`; ignored for a model never seeded."""
        if model not in self._prior:
            return
        ms = min(ms, self.spike * self.ms(model, rows))
        obs = self._decayed(model)
        for k, v in enumerate((1.0, rows, rows * rows, ms, rows * ms)):
            obs[k] += v
        self._lines.pop(model, None)

    def _decayed(self, model: str) -> list[float]:
        obs, age = self._obs[model], self.clock - self._at[model]
        if age:
            f = self.decay ** age
            obs[:] = [v * f for v in obs]
            self._at[model] = self.clock
        return obs

    def line(self, model: str) -> Optional[tuple[float, float]]:
        """(ms per run, ms per row) of `model` now, or None."""
        if model not in self._prior:
            return None
        cached = self._lines.get(model)
        if cached is not None and cached[0] == self.clock:
            return cached[1]
        w, wn, wnn, wt, wnt = (p + o for p, o in zip(self._prior[model], self._decayed(model)))
        det = w * wnn - wn * wn
        if det <= 1e-9 * w * w:  # one size only: a time per row, no time per run
            a, b = (0.0, wt / wn) if wn else (wt / w, 0.0)
        else:
            b = (w * wnt - wn * wt) / det
            a = (wt - b * wn) / w
            if b < 0:  # neither a run nor a row costs less than nothing: the best fit within a >= 0, b >= 0
                a, b = wt / w, 0.0
            elif a < 0:
                a, b = 0.0, wnt / wnn
        self._lines[model] = (self.clock, (a, b))
        return a, b

    def ms(self, model: str, rows: float) -> float:
        """Expected ms of one run on `rows` images (0 for none; below 1 row, the chance of a run at all times its
        one-row time); inf for an unknown model. Never below a tenth of the one-row time per row."""
        if rows <= 0:
            return 0.0
        line = self.line(model)
        if line is None:
            return float("inf")
        a, b = line
        one = max(a + b, 1e-6)
        if rows < 1:
            return rows * one
        return max(a + b * rows, 0.1 * one * rows)

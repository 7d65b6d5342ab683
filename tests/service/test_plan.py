"""The batch planner: which route models' rows the full model's run answers instead (service/plan.py)."""
import numpy as np
import pytest

from steerprune.service.plan import Group, plan_batch

# a small model's CPU run: a fixed cost per call plus a cost per row; route models keep 80% of the per-row work
FIXED, ROW = 1.0, 1.0


def ms(model, rows):
    if rows <= 0:
        return 0.0
    if rows < 1:
        return rows * ms(model, 1)
    return FIXED + ROW * rows * (1.0 if model == "full" else 0.8)


def test_scattered_hints_join_the_full_models_run():
    # 16 rows on 16 route models: 16 x 1.2 ms alone, 4 ms on the full model's run
    groups = [Group(f"r{i}", 1, 0.0) for i in range(16)]
    plan = plan_batch(groups, 0, "full", ms)
    assert (plan.to_full | plan.to_shared) == frozenset(f"r{i}" for i in range(16))
    assert plan.expected_ms == pytest.approx(ms("full", 16))
    assert plan.routed_ms == pytest.approx(16 * ms("r", 1))


def test_a_full_batch_for_one_route_stays_on_its_model():
    plan = plan_batch([Group("r0", 16, 0.0)], 0, "full", ms)
    assert (plan.to_full | plan.to_shared) == frozenset()
    assert plan.expected_ms == pytest.approx(ms("r0", 16))
    assert ms("r0", 16) < ms("full", 16)


def test_large_groups_stay_and_singletons_merge():
    groups = [Group("big", 12, 0.0), Group("a", 1, 0.0), Group("b", 1, 0.0)]
    plan = plan_batch(groups, 2, "full", ms)
    assert (plan.to_full | plan.to_shared) == {"a", "b"}
    # what it chose is the cheapest of every subset
    best = min(
        sum(ms(g.model, g.rows) for g in groups if g.model not in m)
        + ms("full", 2 + sum(g.rows for g in groups if g.model in m))
        for m in [set(), {"a"}, {"b"}, {"a", "b"}, {"big"}, {"big", "a"}, {"big", "b"}, {"big", "a", "b"}])
    assert plan.expected_ms == pytest.approx(best)


def test_expected_reruns_count_against_the_route():
    # alone it is cheaper (0.8 x 8 rows + 1 against 8 rows), but if half of its rows rerun on the full model, in a
    # run of their own, it is not
    cheap = plan_batch([Group("r", 8, 0.0)], 8, "full", ms)
    shaky = plan_batch([Group("r", 8, 0.5)], 8, "full", ms)
    assert cheap.to_full == frozenset() and shaky.to_full == {"r"}
    assert shaky.routed_ms == pytest.approx(ms("r", 8) + ms("full", 8) + ms("full", 4))


def test_no_route_rows_no_plan():
    plan = plan_batch([], 5, "full", ms)
    assert (plan.to_full | plan.to_shared) == frozenset() and plan.expected_ms == pytest.approx(ms("full", 5))


def test_untimed_models_are_never_merged_into_a_guess():
    inf = lambda m, n: float("inf") if m == "full" and n > 0 else ms(m, n)  # noqa: E731
    plan = plan_batch([Group("r", 1, 0.0)], 0, "full", inf)
    assert (plan.to_full | plan.to_shared) == frozenset()


def test_merging_is_exact_against_brute_force_on_random_batches():
    # the prefix rule finds the best subset whenever the full model's time is concave in rows (fixed + per row)
    rng = np.random.default_rng(0)
    import itertools

    for _ in range(50):
        k = int(rng.integers(1, 7))
        groups = [Group(f"r{i}", int(rng.integers(1, 6)), float(rng.choice([0.0, 0.1, 0.4]))) for i in range(k)]
        full_rows = int(rng.integers(0, 8))
        plan = plan_batch(groups, full_rows, "full", ms)

        def total(merged):
            stay = [g for g in groups if g.model not in merged]
            return (sum(ms(g.model, g.rows) for g in stay)
                    + ms("full", full_rows + sum(g.rows for g in groups if g.model in merged))
                    + ms("full", sum(g.fallback * g.rows for g in stay)))

        best = min(total({g.model for g in c}) for r in range(k + 1) for c in itertools.combinations(groups, r))
        assert plan.expected_ms == pytest.approx(total(plan.to_full))
        assert plan.expected_ms <= best * 1.25  # a prefix of the per-row order: near the best subset


def test_scattered_hints_go_to_the_shared_model_where_it_serves_them():
    # the shared model keeps 60% of the work: 16 scattered rows cost 1 + 9.6 there against 17 on the full model
    groups = [Group(f"r{i}", 1, 0.0, 0.1 if i % 4 else None) for i in range(16)]  # 4 routes it does not serve
    plan = plan_batch(groups, 0, "full", lambda m, n: ms(m, n) if m != "shared" else (FIXED + 0.6 * n if n else 0),
                      shared_model="shared")
    assert plan.to_shared == {f"r{i}" for i in range(16) if i % 4}
    assert plan.to_full == {"r0", "r4", "r8", "r12"}
    # 12 rows on the shared model, 4 on the full one, 1.2 expected reruns on the full one
    assert plan.expected_ms == pytest.approx(FIXED + 0.6 * 12 + ms("full", 4) + ms("full", 1.2))
    alone = plan_batch(groups, 0, "full", ms)  # no shared model: everything to the full model
    assert alone.to_shared == frozenset() and len(alone.to_full) == 16


def test_run_times_fit_the_warm_up_line_and_follow_what_runs_take():
    from steerprune.service.plan import RunTimes

    t = RunTimes(decay=0.98, prior_weight=10.0)
    assert t.ms("m", 4) == float("inf") and t.line("m") is None
    t.observe("m", 1, 5.0)  # never seeded: ignored
    assert t.line("m") is None
    t.seed("m", {1: 1.5, 2: 2.0, 4: 3.0, 8: 5.0, 16: 9.0})  # 1 ms per run + 0.5 ms per row
    a, b = t.line("m")
    assert (a, b) == pytest.approx((1.0, 0.5))
    assert t.ms("m", 10) == pytest.approx(6.0) and t.ms("m", 0) == 0.0 and t.ms("m", 0.5) == pytest.approx(0.75)
    for _ in range(200):  # serving: every one-row run takes 3 ms (cold caches), bigger ones as warm-up said
        t.tick()
        t.observe("m", 1, 3.0)
        t.observe("m", 16, 9.0)
    # the observations (~100 runs of each) outweigh the warm-up prior (10 runs)
    assert t.ms("m", 1) == pytest.approx(3.0, abs=0.2) and t.ms("m", 16) == pytest.approx(9.0, abs=0.2)
    for _ in range(800):  # no longer run: its observations fade and the warm-up line is back
        t.tick()
    assert t.line("m") == pytest.approx((1.0, 0.5), abs=0.01)
    t.tick()
    t.observe("m", 1, 1000.0)  # one spike (a preempted run) counts as 3x the expected 1.5 ms, not 1000 ms
    assert 1.5 < t.ms("m", 1) < 2.5  # unclipped, the one run would put a single image at ~90 ms
    for _ in range(20):  # a model that is really 10x slower now: the line follows within a few dozen runs
        t.tick()
        t.observe("m", 1, 15.0)
    assert t.ms("m", 1) > 10.0
    t.seed("one", {1: 2.0})  # a single size: a time per row
    assert t.ms("one", 3) == pytest.approx(6.0)
    t.seed("noisy", {1: 1.0, 2: 0.9})  # falling with rows: no slope, the mean per run
    assert t.line("noisy") == pytest.approx((0.95, 0.0))
    t.seed("steep", {1: 0.1, 4: 1.6})  # the line would cross below zero at 1 row: through the origin instead
    a, b = t.line("steep")
    assert a == 0.0 and b > 0 and t.ms("steep", 1) > 0

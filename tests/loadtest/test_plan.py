"""The request plan and the run configuration, without a server."""
from __future__ import annotations

import numpy as np
import pytest

from steerprune.errors import UserError
from steerprune.loadtest.client import Sample
from steerprune.loadtest.plan import DEFAULT_MIX, Planned, encode_png, parse_mix, plan_requests
from steerprune.loadtest.report import route_accuracy_check
from steerprune.loadtest.run import LoadTestConfig


def test_loadtest_is_local_and_bounded():
    for url in ("http://example.com:3000", "http://10.0.0.1:3000", "ftp://127.0.0.1"):
        with pytest.raises(UserError):
            LoadTestConfig(url=url)
    with pytest.raises(UserError, match="duration"):
        LoadTestConfig(url="http://127.0.0.1:3000", duration=3600)
    with pytest.raises(UserError, match="users"):
        LoadTestConfig(url="http://localhost:3000", users=1000)
    with pytest.raises(UserError, match="rounds applies to compare_hints"):
        LoadTestConfig(url="http://127.0.0.1:3000", rounds=3)
    with pytest.raises(UserError, match="warmup"):
        LoadTestConfig(url="http://127.0.0.1:3000", warmup=-1)
    assert LoadTestConfig(url="http://127.0.0.1:3000", compare_hints=True, rounds=3).rounds == 3
    assert parse_mix("right=3,wrong=1") == {"right": 0.75, "wrong": 0.25, "none": 0.0}
    with pytest.raises(UserError):
        parse_mix("rigth=1")


def test_the_default_mix_is_written_once():
    from steerprune.cli import build_parser

    assert LoadTestConfig(url="http://127.0.0.1:1").mix == DEFAULT_MIX
    args = build_parser().parse_args(["loadtest", "http://127.0.0.1:1"])
    assert args.mix == DEFAULT_MIX and parse_mix(DEFAULT_MIX) == {"right": 0.6, "wrong": 0.2, "none": 0.2}


def test_plan_requests_gives_right_and_wrong_hints():
    labels = np.array([0, 1, 7, 2, 3] * 40)
    routes = {"0": [0], "1": [1], "7": [7], "even": [0, 2, 4, 6, 8]}
    plan = plan_requests(2000, labels, routes, parse_mix("right=0.5,wrong=0.3,none=0.2"), seed=0)
    for p in plan:
        c = int(labels[p.image])
        if p.kind == "right":
            assert c in routes[p.hint]
        elif p.kind == "wrong":
            assert c not in routes[p.hint]
        else:
            assert p.hint is None
    kinds = [p.kind for p in plan]
    assert 0.25 < kinds.count("wrong") / len(plan) < 0.35
    assert encode_png(np.zeros((8, 8, 1), np.uint8))[:4] == b"\x89PNG"


def test_plan_requests_sweep_sends_each_image_once():
    labels = np.arange(50) % 5
    routes = {str(c): [c] for c in range(5)}
    plan = plan_requests(10_000, labels, routes, parse_mix("right=1"), seed=3, sweep=True)
    assert sorted(p.image for p in plan) == list(range(50))  # every image once, capped at the image count
    assert [p.image for p in plan] != list(range(50))  # shuffled
    assert all(p.hint == str(labels[p.image]) for p in plan)
    assert len(plan_requests(20, labels, routes, parse_mix("right=1"), seed=3, sweep=True)) == 20


def test_compared_phases_send_the_same_images():
    """compare_hints plans 'none=1' and 'right=1' with one seed: the two phases must see the same images."""
    labels = np.arange(300) % 10
    routes = {str(c): [c] for c in range(10)} | {"even": [0, 2, 4, 6, 8]}
    for sweep in (False, True):
        none = plan_requests(500, labels, routes, parse_mix("none=1"), seed=4, sweep=sweep)
        right = plan_requests(500, labels, routes, parse_mix("right=1"), seed=4, sweep=sweep)
        assert [p.image for p in none] == [p.image for p in right]
        assert all(p.hint is None for p in none) and all(p.kind == "right" for p in right)


def test_route_accuracy_check_weights_routes_by_requests():
    plan = [Planned(0, "right", "a"), Planned(1, "right", "a"), Planned(2, "right", "b"), Planned(3, "none", None)]
    ok = [Sample(0.0, 0.01, 200, i, {}) for i in range(4)]
    check = route_accuracy_check(ok, [True, False, True, False], plan, {"a": {"acc": 0.5}, "b": {"acc": 0.9}})
    assert check["requests"] == 3
    assert check["by_route"]["a"] == {"n": 2, "served_acc": 0.5, "manifest_acc": 0.5}
    assert check["served_acc"] == pytest.approx(2 / 3, abs=1e-4)
    assert check["manifest_acc"] == pytest.approx((0.5 * 2 + 0.9) / 3, abs=1e-4)
    assert check["difference_points"] == pytest.approx(100 * (2 / 3 - 1.9 / 3), abs=0.01)
    assert route_accuracy_check(ok, [True] * 4, plan, {"a": {"acc": None}, "b": {"acc": None}}) is None

"""`steerprune loadtest` against a real `bentoml serve` process on a free 127.0.0.1 port with the tiny digits
bundle: one mixed run, and the hinted-vs-unhinted comparison."""
from __future__ import annotations

import json

import pytest

from steerprune.loadtest import LoadTestConfig, run_loadtest
from steerprune.loadtest.client import get
from steerprune.service.cli import free_port, start_server, stop_server

pytestmark = [pytest.mark.http, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    import os

    tmp = tmp_path_factory.mktemp("serve")
    env = dict(os.environ, BENTOML_DO_NOT_TRACK="true", BENTOML_HOME=str(tmp / "bentoml_home"))
    proc = start_server(tiny_bundle, port=free_port(), timeout=120, log_path=tmp / "server.log", env=env, threads=1)
    yield proc
    stop_server(proc)


def healthy(url) -> bool:
    return get(url, "/livez")[0] == 200 and get(url, "/readyz")[0] == 200


def test_loadtest_report_over_http(server, tiny_bundle, tmp_path):
    out = tmp_path / "lt.json"
    report = run_loadtest(LoadTestConfig(url=server.url, users=4, duration=30, max_requests=120, sweep=True,
                                         mix="right=0.5,wrong=0.25,none=0.25", bundle=str(tiny_bundle),
                                         out=str(out)), log=lambda *_: None)
    assert report["errors"] == 0 and report["requests"] == report["ok"] == 120  # sweep: 120 distinct images
    assert report["inprocess"]["answers_differing_from_offline"] == 0  # served flags taken from the server
    assert report["inprocess"]["answers_differing_from_offline"] == 0  # each checked against the run it got
    listing = json.loads(get(server.url, "/routes")[1])
    # the default batch plan weighs this server's timings per batch, instead of unserving routes by batch-1 timings
    plan = listing["batch_plan"]
    assert plan["mode"] == "cost" and set(plan["run_ms_line"]) == set(listing["sessions"])
    assert all(len(v) == 2 and v[0] >= 0 and v[1] >= 0 and v[0] + v[1] > 0  # ms per run + per row
               for v in plan["run_ms_line"].values())
    assert all(r["acceptance"]["measured_cost"] is None for r in listing["routes"].values())
    assert set(plan["fallback_rate"]) <= set(listing["sessions"])
    assert set(report["latency_by_kind"]) == {"right", "wrong", "none"}
    assert 0 < report["server_share_of_inprocess_throughput"] < 10
    assert report["server_cpu_ms_per_request"] > 0
    assert 50 < report["server_rss_mb"]["start"] <= 4096 and report["server_rss_mb"]["end"] > 50
    handler, batch = report["server_side"]["handler_ms"], report["server_side"]["batch_size"]
    assert handler["count"] == 120 and 0 < handler["mean"] < report["latency"]["mean_ms"]  # this run's requests only
    shares = list(handler["share_above"].values())
    assert all(0 <= b <= a <= 1 for a, b in zip(shares, shares[1:]))  # a survival curve: never rises
    assert 1 <= batch["mean"] <= 4 and batch["sum"] == 120  # 4 users: <= 4 per batch
    pauses = report["server_side"]["gc_pause_ms"]  # the GC clock's collections during the run, from /metrics
    assert pauses["count"] > 0 and 0 < pauses["mean"] < 100
    assert 0 < report["fallback_rate"] < 1  # wrong hints fall back in verify mode
    assert report["fallbacks"] == round(report["fallback_rate"] * 120)
    assert json.loads(out.read_text())["throughput_rps"] == report["throughput_rps"]
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert healthy(server.url)


def test_compare_hints_reports_server_cpu_per_request_for_both_phases(server, tiny_bundle, tmp_path):
    out = tmp_path / "hints.json"
    lines: list[str] = []
    report = run_loadtest(LoadTestConfig(url=server.url, users=4, duration=30, max_requests=60, sweep=True,
                                         compare_hints=True, rounds=2, bundle=str(tiny_bundle), out=str(out)),
                          log=lines.append)
    h = report["hinted_vs_unhinted"]
    assert report["mode"] == "compare_hints" and report["errors"] == 0 and report["hint_mode"] == "verify"
    assert [list(r)[1:3] for r in report["rounds"]] == [["none", "right"], ["right", "none"]]  # ABBA
    assert len(report["phases"]["none"]) == len(report["phases"]["right"]) == 2
    for kind in ("none", "right"):
        assert h[kind]["requests"] == h[kind]["ok"] == 120  # 60 distinct images per phase and round
        cpu = sum(r["server_cpu_s"] for r in report["phases"][kind]) / 120 * 1000
        assert h[kind]["server_cpu_ms_per_request"] == pytest.approx(cpu, abs=2e-3) and cpu > 0
        assert h[kind]["throughput_rps"] > 0
    none0, right0 = report["phases"]["none"][0], report["phases"]["right"][0]
    assert h["none"]["fallback_rate"] == 0.0  # no hint: the full model, nothing to verify
    assert none0["accuracy"] == none0["inprocess"]["full_model_accuracy_same_requests"]
    assert right0["inprocess"]["answers_differing_from_offline"] == 0  # right hints answered as offline
    assert none0["latency_by_kind"]["right"] == {"n": 0} and right0["latency_by_kind"]["wrong"] == {"n": 0}
    # the right-hint phase sends images of a class no route holds (tiny bundle: 5 and 9) without a hint
    assert right0["latency_by_kind"]["right"]["n"] > right0["latency_by_kind"]["none"]["n"]
    assert h["server_cpu_ratio"] == pytest.approx(
        h["right"]["server_cpu_ms_per_request"] / h["none"]["server_cpu_ms_per_request"], abs=1e-3)
    assert h["accuracy_difference_points"] == pytest.approx(100 * (h["right"]["accuracy"] - h["none"]["accuracy"]))
    assert f"ratio {h['server_cpu_ratio']}" in report["headline"] and lines[-1] == report["headline"]
    saved = json.loads(out.read_text())
    assert saved["hinted_vs_unhinted"]["server_cpu_ratio"] == h["server_cpu_ratio"]
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert healthy(server.url)

"""Server probes: /metrics histograms parsed by prometheus_client, process-tree CPU and memory by psutil."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from steerprune.errors import UserError
from steerprune.loadtest import probes


def _page(handler_counts, total_s) -> bytes:  # cumulative buckets of the handler histogram, split over two routes
    lines = ["# HELP steerprune_request_duration_seconds time in the handler",
             "# TYPE steerprune_request_duration_seconds histogram"]
    for route, share in (("0", 0.5), ("full", 0.5)):
        for le, n in zip(("0.001", "0.003", "+Inf"), handler_counts):
            lines.append(f'steerprune_request_duration_seconds_bucket{{le="{le}",route="{route}"}} {n * share}')
        lines.append(f'steerprune_request_duration_seconds_count{{route="{route}"}} {handler_counts[-1] * share}')
        lines.append(f'steerprune_request_duration_seconds_sum{{route="{route}"}} {total_s * share}')
    lines += ["# HELP steerprune_requests_total requests", "# TYPE steerprune_requests_total counter",
              'steerprune_requests_total{route="0"} 5.0']
    return ("\n".join(lines) + "\n").encode()


def test_server_histograms_from_prometheus_text(monkeypatch):
    pages = iter([_page((10, 20, 20), 0.03), _page((100, 180, 200), 0.33)])
    monkeypatch.setattr(probes, "get", lambda base, path: (200, next(pages)))
    before, after = probes.scrape_histograms("http://127.0.0.1:1"), probes.scrape_histograms("http://127.0.0.1:1")
    assert after["steerprune_request_duration_seconds"]["buckets"] == {0.001: 100.0, 0.003: 180.0,
                                                                      float("inf"): 200.0}
    delta = probes.histogram_delta(before["steerprune_request_duration_seconds"],
                                   after["steerprune_request_duration_seconds"], 1000.0)
    # 180 new requests: 90 under 1 ms, 160 under 3 ms; 300 ms between them
    assert delta["count"] == 180 and delta["sum"] == pytest.approx(300.0) and delta["mean"] == pytest.approx(1.6667, abs=1e-4)
    assert delta["share_above"] == {"1": pytest.approx(0.5), "3": pytest.approx(20 / 180, abs=1e-5)}
    assert after["steerprune_batch_size"]["count"] == 0  # absent from the page: empty, not an error
    assert probes.histogram_delta(before["steerprune_batch_size"], after["steerprune_batch_size"], 1.0) == {"count": 0}

    def unreachable(base, path):
        raise UserError("cannot reach the server")

    monkeypatch.setattr(probes, "get", unreachable)
    assert probes.scrape_histograms("http://127.0.0.1:1")["steerprune_batch_size"] == {"buckets": {}, "sum": 0.0,
                                                                                     "count": 0.0}


def test_process_tree_cpu_counts_children():
    """A parent that sleeps with a child that spins: the tree's CPU grows by about the child's busy time."""
    code = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', "
            "'import time\\nt = time.process_time()\\nwhile time.process_time() - t < 5: pass']); time.sleep(30)")
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(1.0)  # the child is running
        c0, r = probes.server_cpu_seconds(parent.pid), probes.server_rss_mb(parent.pid)
        time.sleep(1.0)
        spent = probes.server_cpu_seconds(parent.pid) - c0
        assert 0.2 < spent <= 1.2  # the child's spinning (shared cores: at least a share of the second)
        assert 5 < r < 500
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:  # not this process: the suite may have servers of its own running as its children
            time.sleep(0.3)
            assert probes.idle_cpu_per_s(sleeper.pid, 0.3) < 0.5
        finally:
            sleeper.kill()
            sleeper.wait()
    finally:
        import psutil

        for p in [*psutil.Process(parent.pid).children(recursive=True), parent]:
            p.kill()
        parent.wait()

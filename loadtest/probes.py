"""What the server says about itself during a load test: CPU time and memory of its process tree (psutil) and its
own histograms on /metrics (parsed by prometheus_client)."""
from __future__ import annotations

import time
from typing import Callable, NamedTuple, Optional

from steerprune.errors import UserError

from .client import get

__all__ = ["SERVER_HISTOGRAMS", "find_server_pid", "server_cpu_seconds", "server_rss_mb", "idle_cpu_per_s",
           "scrape_histograms", "histogram_delta", "ServerSnapshot", "snapshot"]

# The server's own histograms (service.py): time inside the /classify handler, images per batch, and GC pauses,
# each with the scale that turns its unit into the report's (seconds -> ms).
SERVER_HISTOGRAMS = {"handler_ms": ("steerprune_request_duration_seconds", 1000.0),
                     "batch_size": ("steerprune_batch_size", 1.0),
                     "gc_pause_ms": ("steerprune_gc_pause_seconds", 1000.0)}


def find_server_pid(port: int) -> Optional[int]:
    """The top-most process listening on `port` (BentoML's arbiter; its workers are its descendants)."""
    import psutil

    try:
        pids = {c.pid for c in psutil.net_connections(kind="tcp")
                if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid}
    except (psutil.AccessDenied, PermissionError):
        return None
    for pid in sorted(pids):
        try:
            parents = {p.pid for p in psutil.Process(pid).parents()}
        except psutil.NoSuchProcess:
            continue
        if not parents & pids:
            return pid
    return None


def _tree_sum(pid: int, measure: Callable) -> float:
    """Sum of `measure(process)` over a process and all its descendants (ones that exit meanwhile count 0)."""
    import psutil

    total = 0.0
    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            total += measure(p)
        except psutil.NoSuchProcess:
            pass
    return total


def server_rss_mb(pid: int) -> float:
    """Resident memory (MiB) of a process and all its descendants."""
    return _tree_sum(pid, lambda p: p.memory_info().rss) / 2**20


def server_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants (children that exited are not counted)."""
    return _tree_sum(pid, lambda p: sum(p.cpu_times()[:2]))


def idle_cpu_per_s(pid: int, seconds: float = 2.0) -> float:
    """CPU seconds per second the process tree uses with no load (BentoML's arbiter and watchers are never idle)."""
    c0, w0 = server_cpu_seconds(pid), time.perf_counter()
    time.sleep(seconds)
    return (server_cpu_seconds(pid) - c0) / (time.perf_counter() - w0)


def scrape_histograms(base_url: str) -> dict[str, dict]:
    """/metrics -> {histogram: {"buckets": {upper bound: cumulative count}, "sum", "count"}} for SERVER_HISTOGRAMS,
    summed over labels. Empty when the server does not answer (the load test still reports what the clients saw)."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {name: {"buckets": {}, "sum": 0.0, "count": 0.0} for name, _ in SERVER_HISTOGRAMS.values()}
    try:
        status, body = get(base_url, "/metrics")
    except UserError:
        return out
    if status != 200:
        return out
    for family in text_string_to_metric_families(body.decode(errors="replace")):
        hist = out.get(family.name)
        if hist is None:
            continue
        for s in family.samples:
            if s.name == family.name + "_bucket":
                bound = float(s.labels["le"])  # "+Inf" parses to inf
                hist["buckets"][bound] = hist["buckets"].get(bound, 0.0) + s.value
            elif s.name in (family.name + "_sum", family.name + "_count"):
                hist[s.name[len(family.name) + 1:]] += s.value
    return out


def histogram_delta(before: dict, after: dict, scale: float) -> dict:
    """What a histogram gained between two scrapes: count, sum, mean, and the share of observations above each
    bound (bounds scaled, e.g. seconds -> ms). Buckets give bounds, not exact percentiles."""
    count = after["count"] - before["count"]
    if count <= 0:
        return {"count": 0}
    above = {}
    for bound in sorted(after["buckets"]):
        if bound != float("inf"):
            below = after["buckets"][bound] - before["buckets"].get(bound, 0.0)
            above[f"{bound * scale:g}"] = round(1.0 - below / count, 5)
    total = (after["sum"] - before["sum"]) * scale
    return {"count": int(count), "sum": round(total, 4), "mean": round(total / count, 4), "share_above": above}


class ServerSnapshot(NamedTuple):
    wall: float  # time.perf_counter() when taken
    cpu_s: Optional[float]  # process-tree CPU seconds (None without a pid)
    rss_mb: Optional[float]
    histograms: dict  # scrape_histograms()


def snapshot(base_url: str, pid: Optional[int], scrape_first: bool) -> ServerSnapshot:
    """The server's CPU, memory and histograms now; two snapshots bracket a run. Scrape /metrics first in the one
    before a run and last in the one after it, so the scrapes' own CPU stays outside the run's."""
    hist = scrape_histograms(base_url) if scrape_first else None
    wall, cpu, rss = time.perf_counter(), server_cpu_seconds(pid) if pid else None, server_rss_mb(pid) if pid else None
    return ServerSnapshot(wall, cpu, rss, hist if scrape_first else scrape_histograms(base_url))

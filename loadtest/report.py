"""The load-test report: latency percentiles, accuracy and fallbacks by hint kind, the server's own view, the
one-screen summary and the PNG plot."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from .client import Sample
from .plan import KINDS, Planned
from .probes import SERVER_HISTOGRAMS, ServerSnapshot, histogram_delta

__all__ = ["percentiles", "route_accuracy_check", "measure_report", "summary", "plot", "write_report"]


def percentiles(lat_s: list[float]) -> dict:
    """Latencies in seconds -> n, p50/p95/p99/mean/max in ms and p99/p50."""
    if not lat_s:
        return {"n": 0}
    a = np.asarray(lat_s) * 1000.0
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {"n": int(a.size), "p50_ms": round(float(p50), 3), "p95_ms": round(float(p95), 3),
            "p99_ms": round(float(p99), 3), "mean_ms": round(float(a.mean()), 3), "max_ms": round(float(a.max()), 3),
            "p99_over_p50": round(float(p99 / p50), 2) if p50 > 0 else None}


def route_accuracy_check(ok: list[Sample], correct: list[bool], plan: list[Planned], listed: dict) -> Optional[dict]:
    """Served accuracy of right-hint requests per route beside the manifest's route accuracy (the steering report's
    test figure): with every test image sent once (sweep) and trust mode they should agree to rounding.
    The difference is weighted by each route's served requests."""
    per: dict = {}
    for s, c in zip(ok, correct):
        p = plan[s.planned]
        if p.kind == "right":
            per.setdefault(p.hint, []).append(c)
    rows = {r: {"n": len(cs), "served_acc": round(float(np.mean(cs)), 4), "manifest_acc": listed[r].get("acc")}
            for r, cs in sorted(per.items()) if r in listed}
    known = {r: v for r, v in rows.items() if v["manifest_acc"] is not None}
    if not known:
        return None
    n = sum(v["n"] for v in known.values())
    served = sum(v["served_acc"] * v["n"] for v in known.values()) / n
    manifest = sum(v["manifest_acc"] * v["n"] for v in known.values()) / n
    return {"requests": n, "served_acc": round(served, 4), "manifest_acc": round(manifest, 4),
            "difference_points": round(100 * (served - manifest), 2), "by_route": rows}


def _count(values) -> dict:
    out: dict = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return out


def _rate(flags: list) -> Optional[float]:
    return round(float(np.mean(flags)), 4) if flags else None


def measure_report(samples: list[Sample], plan: list[Planned], labels: np.ndarray, listing: dict, wall: float,
                   before: ServerSnapshot, after: ServerSnapshot, idle_cpu_per_s: Optional[float]) -> dict:
    """What one run measured: throughput, latency (overall, per route, per hint kind), errors, fallbacks, accuracy,
    the server's histograms, CPU per request and memory between the two snapshots."""
    ok = [s for s in samples if s.status == 200]
    errors = [s for s in samples if s.status != 200]
    report: dict = {
        "wall_s": round(wall, 3), "requests": len(samples), "ok": len(ok), "errors": len(errors),
        "error_statuses": _count(s.status for s in errors), "error_examples": [s.answer for s in errors[:5]],
        "throughput_rps": round(len(ok) / wall, 2) if wall else None,
        "latency": percentiles([s.latency for s in ok]),
        "latency_by_route": {r: percentiles([s.latency for s in ok if s.answer["route"] == r])
                             for r in sorted({s.answer["route"] for s in ok})},
        "latency_by_kind": {k: percentiles([s.latency for s in ok if plan[s.planned].kind == k]) for k in KINDS},
        # the server's view of the same run: handler time (a tail the clients see but the handler does not lies
        # outside it: event loop, HTTP stack, GC), images per batch, and the worker's GC pauses
        "server_side": {key: histogram_delta(before.histograms[name], after.histograms[name], scale)
                        for key, (name, scale) in SERVER_HISTOGRAMS.items()},
    }
    if ok:
        report["fallbacks"] = sum(bool(s.answer["fallback"]) for s in ok)
        report["fallback_rate"] = round(report["fallbacks"] / len(ok), 4)
        report["fallback_rate_by_kind"] = {k: _rate([s.answer["fallback"] for s in ok if plan[s.planned].kind == k])
                                           for k in KINDS}
        correct = [s.answer["index"] == int(labels[plan[s.planned].image]) for s in ok]
        report["correct"] = int(sum(correct))
        report["accuracy"] = round(float(np.mean(correct)), 4)
        report["accuracy_by_kind"] = {k: _rate([c for s, c in zip(ok, correct) if plan[s.planned].kind == k])
                                      for k in KINDS}
        report["right_hint_vs_manifest"] = route_accuracy_check(ok, correct, plan, listing["routes"])
    if before.cpu_s is not None and samples:
        cpu = after.cpu_s - before.cpu_s
        report["server_cpu_s"] = round(cpu, 3)
        report["server_cpu_ms_per_request"] = round(cpu / len(samples) * 1000, 3)
        if idle_cpu_per_s is not None:
            report["server_idle_cpu_ms_per_s"] = round(idle_cpu_per_s * 1000, 2)
            report["server_cpu_ms_per_request_net_of_idle"] = round(
                (cpu - idle_cpu_per_s * (after.wall - before.wall)) / len(samples) * 1000, 3)
        # growth under load is request state still held (BentoML keeps each request's context for its timeout)
        report["server_rss_mb"] = {"start": round(before.rss_mb, 1), "end": round(after.rss_mb, 1)}
    return report


def summary(r: dict) -> str:
    """A few lines for the terminal."""
    lat = r["latency"]
    lines = [f"{r['requests']} requests in {r['wall_s']:.1f} s: {r['throughput_rps']} req/s, {r['errors']} errors",
             f"latency p50 {lat.get('p50_ms')} ms, p95 {lat.get('p95_ms')} ms, p99 {lat.get('p99_ms')} ms"]
    if "accuracy" in r:
        lines.append(f"accuracy {r['accuracy']:.4f} (by hint kind {r['accuracy_by_kind']}), fallback rate "
                     f"{r['fallback_rate']:.3f}")
    if r.get("right_hint_vs_manifest"):
        c = r["right_hint_vs_manifest"]
        lines.append(f"right hints: served accuracy {c['served_acc']:.4f} vs manifest route accuracy "
                     f"{c['manifest_acc']:.4f} ({c['difference_points']:+.2f} points, {c['requests']} requests)")
    if "server_cpu_ms_per_request" in r:
        lines.append(f"server CPU {r['server_cpu_ms_per_request']} ms per request "
                     f"({r.get('server_cpu_ms_per_request_net_of_idle')} net of {r.get('server_idle_cpu_ms_per_s')} "
                     f"ms/s idle)")
    handler, batch = r["server_side"]["handler_ms"], r["server_side"]["batch_size"]
    if handler.get("count"):
        over = {b: v for b, v in handler["share_above"].items() if float(b) in (1, 3, 10)}
        lines.append(f"server side: handler mean {handler['mean']:.3f} ms, share over "
                     + ", ".join(f"{b} ms {100 * v:.2f}%" for b, v in over.items())
                     + (f"; {batch['mean']:.2f} images per batch" if batch.get("count") else ""))
    pauses = r["server_side"].get("gc_pause_ms", {})
    if pauses.get("count"):
        over = pauses["share_above"]
        lines.append(f"server GC: {pauses['count']} collections, {pauses['sum']:.1f} ms in all, over 1 ms "
                     f"{100 * over.get('1', 0):.2f}%, over 10 ms {100 * over.get('10', 0):.2f}%")
    if "server_rss_mb" in r:
        lines.append(f"server memory (RSS) {r['server_rss_mb']['start']} -> {r['server_rss_mb']['end']} MiB")
    if "inprocess" in r:
        ip = r["inprocess"]
        lines.append("in-process ONNX Runtime ms/image (batch 1 / 32): " + ", ".join(
            f"{m.split('/')[-1]} {v['ms_per_image_b1']}/{v['ms_per_image_b32']}" for m, v in ip["models"].items()))
        if r.get("server_share_of_inprocess_throughput") is not None:
            lines.append(f"in-process ONNX Runtime would answer the same requests at {ip['throughput_rps_same_requests']} "
                         f"req/s (each model at its faster batch size, 1 or 32): the server reached "
                         f"{100 * r['server_share_of_inprocess_throughput']:.0f}%")
        lines.append(f"full model accuracy on the same requests {ip['full_model_accuracy_same_requests']}; "
                     f"answers differing from offline ONNX Runtime: {ip['answers_differing_from_offline']}")
    if r.get("plot"):
        lines.append(f"plot: {r['plot']}")
    return "\n".join(lines)


def plot(runs: dict[str, tuple[list[Sample], list[Planned], dict]], path: Path) -> Path:
    """Latency histograms by hint kind and answered requests per second over time, one row per named run
    ({name: (samples, plan, report)})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 2, figsize=(11, 4 * len(runs)), squeeze=False)
    for (name, (samples, plan, report)), (a, b) in zip(runs.items(), axes):
        ok = [s for s in samples if s.status == 200]
        for k in KINDS:
            lat = [s.latency * 1000 for s in ok if plan[s.planned].kind == k]
            if lat:
                a.hist(lat, bins=60, alpha=0.5, label=f"{k} hint (n={len(lat)})")
        a.set_xlabel("latency (ms)")
        a.set_ylabel("requests")
        a.set_yscale("log")
        a.legend()
        a.set_title(f"{name + ': ' if name else ''}p50 {report['latency'].get('p50_ms')} ms, "
                    f"p99 {report['latency'].get('p99_ms')} ms")
        if ok:
            t = np.asarray([s.t + s.latency for s in ok])
            edges = np.arange(0, max(t.max(), 1.0) + 0.5, 0.5)
            counts, _ = np.histogram(t, edges)
            b.plot(edges[1:], counts / 0.5)
        b.set_xlabel("time (s)")
        b.set_ylabel("answered requests / s")
        b.set_title(f"{report['throughput_rps']} req/s, {report['errors']} errors")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _jsonable(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    return str(o)


def write_report(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=_jsonable))

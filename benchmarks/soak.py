"""Soak: hours-like steady load at half of saturation on one server; worker memory, per-minute tail latency, errors.

    python benchmarks/soak.py runs/deploy/cifar10_bundle --images ../shared/data/cifar10/test.npz \
        --minutes 30 --out benchmarks/results/soak_cifar10.json

Starts `steerprune serve` on 127.0.0.1 (a free port), measures saturation with a short unpaced run (or takes
--rate), then drives open-loop paced load at `--load-share` (0.5) of it for `--minutes`, in one-minute windows of
`steerprune.loadtest.client.run_open_loop` (the same request plan cycling: right/wrong/no hints). A sampler thread
records the RSS of every process of the server's tree every `--sample-s` seconds; the worker is the BentoML
process that loaded the models (the largest). Verdict: worker RSS growth after the first `--settle-min` minutes
(median of the last window against the first window after settling) at most 5%, every request answered 200, and
the p99 of each minute within `--p99-band` (2x) of the median minute. JSON + PNG (beside it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

__all__ = ["main"]


def _tree(pid: int) -> list:
    import psutil

    root = psutil.Process(pid)
    return [root] + root.children(recursive=True)


def sample_rss(pid: int, t0: float, out: list, stop: threading.Event, every: float) -> None:
    """Append (t, worker MiB, tree MiB, n processes) every `every` seconds until `stop` is set."""
    import psutil

    while not stop.is_set():
        rss = []
        for p in _tree(pid):
            try:
                rss.append(p.memory_info().rss / 2**20)
            except psutil.Error:  # a process that exited between listing and reading
                pass
        out.append((round(time.perf_counter() - t0, 2), round(max(rss), 2), round(sum(rss), 2), len(rss)))
        stop.wait(every)


def window_stats(samples, wall: float) -> dict:
    lat = np.array([s.latency for s in samples if s.status == 200]) * 1000
    errors = [s.status for s in samples if s.status != 200]
    q = (lambda p: round(float(np.percentile(lat, p)), 3)) if len(lat) else (lambda p: None)
    return {"requests": len(samples), "errors": len(errors),
            "error_statuses": {str(c): errors.count(c) for c in sorted(set(errors))},
            "throughput_rps": round(len(samples) / wall, 1), "p50_ms": q(50), "p99_ms": q(99),
            "max_ms": round(float(lat.max()), 3) if len(lat) else None}


def make_bodies(base_url: str, bundle: str, images: str | None, mix: str, n: int, seed: int
                ) -> list[tuple[bytes, str]]:
    """n planned requests (images + hints by `mix`) as ready multipart bodies; the server's /routes gives the
    data spec (the digits test split is found from it)."""
    from steerprune.export.manifest import load_manifest
    from steerprune.loadtest.client import get, multipart_body
    from steerprune.loadtest.plan import encode_png, load_images, parse_mix, plan_requests

    m = load_manifest(bundle)
    status, listing = get(base_url, "/routes")
    assert status == 200, f"/routes answered {status}"
    x, labels, _ = load_images(images, json.loads(listing).get("data_spec"), list(m["classes"]))
    routes = {name: r["classes"] for name, r in m["routes"].items()}
    plan = plan_requests(n, labels, routes, parse_mix(mix), seed)
    pngs: dict[int, bytes] = {}
    bodies = []
    for p in plan:
        png = pngs.setdefault(p.image, encode_png(x[p.image]))
        bodies.append(multipart_body({"hint": p.hint} if p.hint else {}, png))
    return bodies


def run(args) -> dict:
    from steerprune.loadtest.client import run_open_loop
    from steerprune.service.cli import free_port, start_server, stop_server

    port = free_port()
    log_path = Path(args.out).with_suffix(".server.log") if args.keep_log else None
    t_start = time.perf_counter()
    proc = start_server(args.bundle, port=port, timeout=args.startup_timeout, log_path=log_path,
                        threads=args.threads)
    ready_s = time.perf_counter() - t_start
    url = f"http://127.0.0.1:{port}/classify"
    rss: list = []
    stop = threading.Event()
    try:
        bodies = make_bodies(f"http://127.0.0.1:{port}", args.bundle, args.images, args.mix, args.plan_size, args.seed)

        async def body(i: int):
            return bodies[i % len(bodies)]

        run_open_loop(url, body, 10**9, args.users, args.warmup_s, 0.0)  # warm every route's arena
        if args.rate:
            saturation = None
            rate = args.rate
        else:
            samples, wall = run_open_loop(url, body, 10**9, args.users, args.saturation_s, 0.0)
            saturation = window_stats(samples, wall)
            rate = round(saturation["throughput_rps"] * args.load_share, 1)
        print(f"ready in {ready_s:.1f} s; saturation {saturation and saturation['throughput_rps']} req/s; "
              f"soak at {rate} req/s for {args.minutes} min", flush=True)
        t0 = time.perf_counter()
        sampler = threading.Thread(target=sample_rss, args=(proc.pid, t0, rss, stop, args.sample_s), daemon=True)
        sampler.start()
        windows = []
        n_windows = max(1, round(args.minutes * 60 / args.window_s))
        for w in range(n_windows):
            start = time.perf_counter() - t0
            samples, wall = run_open_loop(url, body, 10**9, args.users, args.window_s, rate)
            windows.append({"window": w, "start_s": round(start, 1), **window_stats(samples, wall)})
            print(json.dumps(windows[-1]), flush=True)
        stop.set()
        sampler.join(args.sample_s + 5)
    finally:
        stop.set()
        stop_server(proc)
    return verdict(args, ready_s, saturation, rate, windows, rss)


def verdict(args, ready_s, saturation, rate, windows, rss) -> dict:
    settle = args.settle_min * 60
    post = [r for r in rss if r[0] >= settle] or rss
    first = [r[1] for r in post if r[0] < post[0][0] + args.window_s]
    last = [r[1] for r in rss if r[0] >= rss[-1][0] - args.window_s]
    growth = (np.median(last) - np.median(first)) / np.median(first)
    p99 = [w["p99_ms"] for w in windows if w["p99_ms"] is not None]
    band = max(p99) / float(np.median(p99)) if p99 else None
    errors = sum(w["errors"] for w in windows)
    checks = {"worker_rss_growth_ok": bool(growth <= 0.05), "no_errors": errors == 0,
              "p99_stable": band is not None and band <= args.p99_band}
    return {
        "config": {k: v for k, v in vars(args).items()},
        "machine": f"x86-64, {os.cpu_count()} cores, no GPU", "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "ready_s": round(ready_s, 2), "saturation": saturation, "rate_rps": rate,
        "requests": sum(w["requests"] for w in windows), "errors": errors,
        "worker_rss_mb": {"first_after_settle": round(float(np.median(first)), 1),
                          "last": round(float(np.median(last)), 1), "growth": round(float(growth), 4),
                          "max": max(r[1] for r in rss)},
        "tree_rss_mb": {"first": rss[0][2], "last": rss[-1][2], "max": max(r[2] for r in rss)},
        "p99_ms": {"median_window": round(float(np.median(p99)), 3), "max_window": max(p99),
                   "max_over_median": round(band, 3) if band else None},
        "checks": checks, "ok": all(checks.values()), "windows": windows,
        "rss_samples": {"columns": ["t_s", "worker_mb", "tree_mb", "processes"], "rows": rss},
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = np.array(report["rss_samples"]["rows"])
    ws = report["windows"]
    mid = [(w["start_s"] + report["config"]["window_s"] / 2) / 60 for w in ws]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    ax[0].plot(rows[:, 0] / 60, rows[:, 1], label="worker")
    ax[0].plot(rows[:, 0] / 60, rows[:, 2], label="process tree")
    ax[0].axvline(report["config"]["settle_min"], color="grey", ls=":", label="settled")
    ax[0].set(xlabel="minutes", ylabel="RSS (MiB)", title=f"RSS (worker growth {report['worker_rss_mb']['growth']:+.1%})")
    ax[0].legend()
    ax[1].plot(mid, [w["p50_ms"] for w in ws], "o-", label="p50")
    ax[1].plot(mid, [w["p99_ms"] for w in ws], "o-", label="p99")
    ax[1].set(xlabel="minutes", ylabel="ms", title="latency per window", ylim=(0, None))
    ax[1].legend()
    ax[2].plot(mid, [w["throughput_rps"] for w in ws], "o-", label="req/s")
    ax[2].set(xlabel="minutes", ylabel="req/s", ylim=(0, None),
              title=f"{report['rate_rps']} req/s paced, {report['errors']} errors")
    fig.suptitle(f"soak: {Path(report['config']['bundle']).name}, {report['requests']} requests, "
                 f"ok={report['ok']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--images", help="NPZ (images uint8 NHWC, labels) or class folders; default: digits test split "
                                     "for a digits bundle")
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--window-s", type=float, default=60.0, help="seconds per measured window (p99 per window)")
    ap.add_argument("--settle-min", type=float, default=5.0, help="minutes before RSS growth is judged")
    ap.add_argument("--rate", type=float, default=0.0, help="requests/s to soak at (default: load-share x saturation)")
    ap.add_argument("--load-share", type=float, default=0.5)
    ap.add_argument("--saturation-s", type=float, default=20.0)
    ap.add_argument("--warmup-s", type=float, default=10.0)
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="the server's ONNX Runtime threads")
    ap.add_argument("--mix", default="right=0.6,wrong=0.2,none=0.2")
    ap.add_argument("--plan-size", type=int, default=4000, help="distinct planned requests, cycled")
    ap.add_argument("--sample-s", type=float, default=5.0)
    ap.add_argument("--p99-band", type=float, default=2.0, help="largest window p99 / median window p99 allowed")
    ap.add_argument("--startup-timeout", type=float, default=180.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep-log", action="store_true", help="keep the server log beside the JSON")
    ap.add_argument("--out", default="benchmarks/results/soak.json")
    args = ap.parse_args(argv)
    if not 0 < args.load_share <= 1 or args.minutes <= 0 or args.settle_min * 60 >= args.minutes * 60:
        ap.error("need 0 < --load-share <= 1 and 0 <= --settle-min < --minutes")
    report = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    plot(report, out.with_suffix(".png"))
    print(json.dumps({k: report[k] for k in ("rate_rps", "requests", "errors", "worker_rss_mb", "p99_ms", "checks",
                                              "ok")}, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

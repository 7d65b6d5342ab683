"""A/B of the service's inline batches (`--inline-ms`): the same bundle served with batches on the event loop
(default, 1 ms) and always in a worker thread (0), in alternating rounds on one machine.

Each server gets core 0 (1 ONNX Runtime thread) and the load generator core 1, as in README's load-test protocol.
First a saturated run of each variant; then `--rounds` pairs of paced runs at half of the inline variant's saturated
throughput (the same load for both). Reports per run: req/s, client p50/p99 and p99/p50, server CPU per request,
and the share of requests over 3 ms inside the handler (the server's own histogram); medians per variant; JSON and
a plot.

    python benchmarks/service_inline_ab.py runs/qs2/bundle --out benchmarks/results/service_inline_ab_digits.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"inline": 1.0, "thread": 0.0}


def _one(bundle: Path, inline_ms: float, rate: float, duration: float, images, cores) -> dict:
    from steerprune.service.cli import free_port, start_server, stop_server
    from steerprune.service.loadtest import LoadTestConfig, run_loadtest

    port = free_port()
    os.sched_setaffinity(0, {cores[0]})  # the server and its workers inherit core 0
    proc = start_server(bundle, port=port, timeout=300, threads=1, inline_ms=inline_ms)
    try:
        os.sched_setaffinity(0, {cores[1]})
        r = run_loadtest(LoadTestConfig(url=f"http://127.0.0.1:{port}", users=16, duration=duration, rate=rate,
                                        images=images, server_pid=proc.pid, out=None), log=lambda *_: None)
    finally:
        stop_server(proc)
    lat, handler = r["latency"], r["server_side"]["handler_ms"]
    return {"inline_ms": inline_ms, "rate": rate, "requests": r["requests"], "errors": r["errors"],
            "throughput_rps": r["throughput_rps"], "p50_ms": lat["p50_ms"], "p99_ms": lat["p99_ms"],
            "p99_over_p50": lat["p99_over_p50"], "server_cpu_ms_per_request": r.get("server_cpu_ms_per_request"),
            "handler_share_over_3ms": handler.get("share_above", {}).get("3"),
            "images_per_batch": r["server_side"]["batch_size"].get("mean")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--images", help="test images for the load test (default: the bundle's digits test split)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds per paced run (saturated runs: 20)")
    ap.add_argument("--out", default="benchmarks/results/service_inline_ab.json")
    args = ap.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        print("needs 2 cores: server and load generator on one each", file=sys.stderr)
        return 2
    bundle = Path(args.bundle).resolve()
    saturated = {name: _one(bundle, ms, 0.0, 20.0, args.images, cores) for name, ms in VARIANTS.items()}
    rate = round(saturated["inline"]["throughput_rps"] / 2)
    runs = []
    for k in range(args.rounds):
        for name, ms in VARIANTS.items():
            runs.append(dict(_one(bundle, ms, rate, args.duration, args.images, cores), variant=name, round=k))
            print(json.dumps(runs[-1]), flush=True)

    def median(name, key):
        vals = [r[key] for r in runs if r["variant"] == name and r[key] is not None]
        return round(float(np.median(vals)), 4) if vals else None

    keys = ("p50_ms", "p99_ms", "p99_over_p50", "server_cpu_ms_per_request", "handler_share_over_3ms")
    report = {"bundle": str(bundle), "machine": f"{os.cpu_count()} cores; server core {cores[0]}, generator core "
              f"{cores[1]}, 1 ONNX Runtime thread", "half_rate": rate, "saturated": saturated, "paced_runs": runs,
              "medians": {name: {key: median(name, key) for key in keys} for name in VARIANTS}}
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, key, title in zip(axes, ("p99_over_p50", "server_cpu_ms_per_request", "handler_share_over_3ms"),
                              ("client p99 / p50", "server CPU ms / request", "share > 3 ms in the handler")):
        for i, name in enumerate(VARIANTS):
            vals = [r[key] for r in runs if r["variant"] == name]
            ax.scatter([i] * len(vals), vals, label=name)
        ax.set_xticks(range(len(VARIANTS)), list(VARIANTS))
        ax.set_title(title)
    axes[0].axhline(3, color="grey", lw=0.8, ls="--")
    fig.suptitle(f"{bundle.name}: {rate} req/s (half of inline's saturation "
                 f"{saturated['inline']['throughput_rps']:.0f}; thread {saturated['thread']['throughput_rps']:.0f})")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=100)
    print(json.dumps(report["medians"], indent=2))
    return 0 if all(r["errors"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())

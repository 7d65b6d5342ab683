"""Same-machine A/B of one serving option: the same bundle served with two values of a `ServeConfig` field, in
alternating rounds.

Each server gets core 0 (1 ONNX Runtime thread) and the load generator core 1, as in README's load-test protocol.
Default protocol (the inline-batch A/B, `--knob inline_ms=1,0`): a saturated run of each variant on its own server,
then `--rounds` pairs of paced runs, each on a fresh server, at half of the first variant's saturated throughput (the
same load for both). With `--steady`, every round starts a fresh server per variant, saturates it for 20 s, then
makes `--paced-runs` paced runs on that same server: a server that has carried load for longer than BentoML's 60 s
request timeout, as one in production has (`--knob gc_young_ms=20,0`). Reports per run: req/s, client p50/p99 and
p99/p50, server CPU per request, the share of requests over 3 and 10 ms inside the handler and the worker's GC pauses
(the server's own histograms); medians per variant; JSON and a plot.

    python benchmarks/service_ab.py runs/qs2/bundle --rounds 3 --out benchmarks/results/service_inline_ab_digits.json
    python benchmarks/service_ab.py runs/qs2/bundle --knob gc_young_ms=20,0 --steady --rounds 2 --paced-runs 2 \\
        --duration 60 --out benchmarks/results/service_gc_ab_digits.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _parse_knob(spec: str) -> tuple[str, dict[str, float]]:
    from steerprune.service.config import ServeConfig

    name, _, values = spec.partition("=")
    kinds = {f.name: type(f.default) for f in fields(ServeConfig)}
    if kinds.get(name) not in (int, float) or len(values.split(",")) != 2:
        sys.exit(f"--knob wants a numeric ServeConfig field and two values, e.g. inline_ms=1,0; got {spec!r}")
    return name, {f"{name}={v}": kinds[name](float(v)) for v in values.split(",")}


def _summary(r: dict, knob: str, value, phase: str) -> dict:
    lat, side = r["latency"], r["server_side"]
    handler, gc_pauses = side["handler_ms"].get("share_above", {}), side.get("gc_pause_ms", {})
    return {knob: value, "phase": phase, "rate": r["config"]["rate"], "requests": r["requests"], "errors": r["errors"],
            "throughput_rps": r["throughput_rps"], "p50_ms": lat.get("p50_ms"), "p99_ms": lat.get("p99_ms"),
            "p99_over_p50": lat.get("p99_over_p50"), "max_ms": lat.get("max_ms"),
            "server_cpu_ms_per_request": r.get("server_cpu_ms_per_request"),
            "handler_share_over_3ms": handler.get("3"), "handler_share_over_10ms": handler.get("10"),
            "gc_pauses": gc_pauses.get("count", 0), "gc_ms": gc_pauses.get("sum", 0.0),
            "gc_share_over_10ms": gc_pauses.get("share_above", {}).get("10"),
            "images_per_batch": side["batch_size"].get("mean")}


def _serve_and_load(bundle: Path, knob: str, value, loads: list[tuple[str, float, float]], images, cores) -> list:
    """One fresh server with knob=value; loads: (phase, rate, seconds) run one after another on it."""
    from steerprune.service.cli import free_port, start_server, stop_server
    from steerprune.loadtest import LoadTestConfig, run_loadtest

    port = free_port()
    os.sched_setaffinity(0, {cores[0]})  # the server and its workers inherit core 0
    proc = start_server(bundle, port=port, timeout=300, threads=1, **{knob: value})
    out = []
    try:
        os.sched_setaffinity(0, {cores[1]})
        for phase, rate, seconds in loads:
            r = run_loadtest(LoadTestConfig(url=f"http://127.0.0.1:{port}", users=16, duration=seconds, rate=rate,
                                            images=images, server_pid=proc.pid, out=None), log=lambda *_: None)
            out.append(_summary(r, knob, value, phase))
    finally:
        stop_server(proc)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--knob", default="inline_ms=1,0", help="ServeConfig field and its two values (first: baseline "
                    "for the rate)")
    ap.add_argument("--images", help="test images for the load test (default: the bundle's digits test split)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds per paced run (saturated runs: 20)")
    ap.add_argument("--steady", action="store_true", help="saturate each server first and pace the same server")
    ap.add_argument("--paced-runs", type=int, default=1, help="with --steady: paced runs per server")
    ap.add_argument("--rate", type=float, help="paced req/s (default: half of the first variant's saturation)")
    ap.add_argument("--out", default="benchmarks/results/service_ab.json")
    args = ap.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        print("needs 2 cores: server and load generator on one each", file=sys.stderr)
        return 2
    if args.rounds < 1 or args.paced_runs < 1:
        print("--rounds and --paced-runs must be at least 1", file=sys.stderr)
        return 2
    knob, variants = _parse_knob(args.knob)
    bundle = Path(args.bundle).resolve()
    first = next(iter(variants))
    saturated, runs, rate = {}, [], args.rate
    for name, value in variants.items():  # the first variant's saturation sets the pace unless --rate does
        if not args.steady or (rate is None and name == first):
            saturated[name] = _serve_and_load(bundle, knob, value, [("saturated", 0.0, 20.0)], args.images, cores)[0]
    rate = rate or round(saturated[first]["throughput_rps"] / 2)
    paced_loads = [("paced", rate, args.duration)] * (args.paced_runs if args.steady else 1)
    for k in range(args.rounds):
        for name, value in variants.items():
            loads = ([("saturated", 0.0, 20.0)] if args.steady else []) + paced_loads
            for r in _serve_and_load(bundle, knob, value, loads, args.images, cores):
                runs.append(dict(r, variant=name, round=k))
                print(json.dumps(runs[-1]), flush=True)

    paced = [r for r in runs if r["phase"] == "paced"]

    def median(name, key):
        vals = [r[key] for r in paced if r["variant"] == name and r[key] is not None]
        return round(float(np.median(vals)), 4) if vals else None

    keys = ("p50_ms", "p99_ms", "p99_over_p50", "max_ms", "server_cpu_ms_per_request", "handler_share_over_3ms",
            "handler_share_over_10ms", "gc_ms", "gc_share_over_10ms")
    report = {"bundle": str(bundle), "knob": knob, "variants": variants, "steady": args.steady,
              "machine": f"{os.cpu_count()} cores; server core {cores[0]}, generator core {cores[1]}, 1 ONNX Runtime "
                         f"thread", "paced_rate": rate, "paced_seconds": args.duration,
              "saturated": saturated, "runs": runs,
              "medians": {name: {key: median(name, key) for key in keys} for name in variants}}
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("p99_over_p50", "client p99 / p50"), ("server_cpu_ms_per_request", "server CPU ms / request"),
              ("handler_share_over_3ms", "share > 3 ms in the handler"), ("gc_ms", "GC pause ms per run"))
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 3.6))
    for ax, (key, title) in zip(axes, panels):
        for i, name in enumerate(variants):
            vals = [r[key] for r in paced if r["variant"] == name]
            ax.scatter([i] * len(vals), vals, label=name)
        ax.set_xticks(range(len(variants)), list(variants))
        ax.set_title(title)
    axes[0].axhline(3, color="grey", lw=0.8, ls="--")
    fig.suptitle(f"{bundle.name}: paced at {rate} req/s, {args.duration:g} s runs"
                 + (" on servers saturated for 20 s first" if args.steady else ", fresh servers"))
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=100)
    print(json.dumps(report["medians"], indent=2))
    return 0 if all(r["errors"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())

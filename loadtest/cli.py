"""`steerprune loadtest` (heavy imports inside the handler: the CLI parser imports every stage)."""
from __future__ import annotations

import argparse

from .plan import DEFAULT_MIX

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser("loadtest", help="bounded load test of a local server (throughput, latency, accuracy, CPU)",
                       description="Load-test a steerprune server on 127.0.0.1/localhost with a mix of right, wrong "
                                   "and missing hints (or, with --compare-hints, no hints against right hints); "
                                   "writes JSON and a PNG plot.")
    q.add_argument("url", help="server URL, e.g. http://127.0.0.1:3000 (local hosts only)")
    q.add_argument("--users", type=int, default=8, help="concurrent clients (1-64)")
    q.add_argument("--duration", type=float, default=20.0, help="seconds per measured run (at most 600)")
    q.add_argument("--max-requests", type=int, default=50_000, help="stop a run after this many requests")
    q.add_argument("--mix", default=DEFAULT_MIX, help=f"hint mix (default {DEFAULT_MIX})")
    q.add_argument("--images", help="test images: an NPZ (images uint8 NHWC, labels) or a folder of class folders "
                                    "(default: the bundle's digits test split when it was trained on digits)")
    q.add_argument("--bundle", help="bundle directory, for the in-process ONNX Runtime baseline and the offline "
                                    "answers every server answer must equal (skipped without it)")
    q.add_argument("--inprocess-threads", type=int, default=0, help="ONNX Runtime threads of the in-process "
                   "baseline (0: its default; match the server's for a fair comparison)")
    q.add_argument("--server-pid", type=int, help="server process for CPU accounting (default: found by port)")
    q.add_argument("--rate", type=float, default=0.0, help="pace all users to this many requests/s in total "
                                                             "(default 0: saturate)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--sweep", action="store_true", help="send every test image once (shuffled) instead of drawing "
                   "with replacement: for the accuracy check against the manifest")
    q.add_argument("--warmup", type=float, default=0.0, help="seconds of unmeasured load (the --mix) first")
    q.add_argument("--compare-hints", action="store_true",
                   help="the headline comparison: a phase with no hints and a phase with right hints against the "
                        "same server (same images); reports server CPU ms/request, throughput, fallback rate and "
                        "accuracy per phase and the hinted/unhinted ratios (--mix is not used)")
    q.add_argument("--rounds", type=int, default=1, help="with --compare-hints: rounds of the two phases, in ABBA "
                   "order (default 1)")
    q.add_argument("--out", default="loadtest.json", help="JSON report path; the plot goes beside it as .png")
    q.set_defaults(func=_loadtest)


def _loadtest(args) -> int:
    from .run import LoadTestConfig, run_loadtest

    cfg = LoadTestConfig(url=args.url, users=args.users, duration=args.duration, max_requests=args.max_requests,
                         mix=args.mix, images=args.images, bundle=args.bundle, server_pid=args.server_pid,
                         inprocess_threads=args.inprocess_threads, rate=args.rate, seed=args.seed, sweep=args.sweep,
                         warmup=args.warmup, compare_hints=args.compare_hints, rounds=args.rounds, out=args.out)
    report = run_loadtest(cfg, log=print)
    return 0 if report["errors"] == 0 else 1

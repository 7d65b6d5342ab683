"""Hinted vs unhinted server CPU per request over HTTP, with the server and the load generator on separate cores.

The server (1 ONNX Runtime thread) is pinned to core 0, `steerprune loadtest --compare-hints` to core 1; one server,
a no-hint and a right-hint phase in ABBA rounds (docs/cost.md).

    python benchmarks/hints_http.py BUNDLE --out X.json [--acceptance route|global] [--images test.npz] \
        [--batch-plan cost|route] [--no-shared-model] [-- extra loadtest flags, e.g. --duration 15 --rounds 2]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from steerprune.service.cli import free_port, start_server, stop_server


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("--out", required=True, help="the load test's JSON report (a .png and .server.log beside it)")
    p.add_argument("--acceptance", choices=["route", "global"], default="route")
    p.add_argument("--images", help="NPZ of test images (default: the bundle's run's test split)")
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--batch-plan", choices=["cost", "route"], default="cost", help="the server's --batch-plan")
    p.add_argument("--shared-model", action=argparse.BooleanOptionalAction, default=True,
                   help="the server's --shared-model (default on)")
    p.add_argument("--run-overhead-ms", type=float, default=0.0, help="the server's --run-overhead-ms")
    argv = list(sys.argv[1:] if argv is None else argv)
    # after --: more `steerprune loadtest` flags (split here: argparse's REMAINDER would also swallow --out)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    a = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    port = free_port()
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {0})  # the server inherits core 0
    proc = start_server(a.bundle, port=port, threads=1, acceptance=a.acceptance, timeout=600,
                        batch_plan=a.batch_plan, shared_model=a.shared_model, run_overhead_ms=a.run_overhead_ms,
                        log_path=a.out.replace(".json", ".server.log"))
    os.sched_setaffinity(0, cores)
    try:
        cmd = ["taskset", "-c", "1", sys.executable, "-m", "steerprune.cli", "loadtest", proc.url, "--compare-hints",
               "--users", str(a.users), "--out", a.out] + (["--images", a.images] if a.images else []) + extra
        print(" ".join(cmd), flush=True)
        return subprocess.call(cmd)
    finally:
        stop_server(proc)


if __name__ == "__main__":
    sys.exit(main())

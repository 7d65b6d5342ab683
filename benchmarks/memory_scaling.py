"""Memory per replica and cost per request against routes and model size, measured on real servers.

    python benchmarks/memory_scaling.py --bundle digits=runs/deploy/bundle \
        --bundle cifar10=runs/deploy/cifar10_bundle --images cifar10=../shared/data/cifar10/test.npz \
        --routes 0,5,all --out benchmarks/results/memory_scaling.json

For each bundle and each route count k (0: the full model only; `all`: the bundle as exported) a bundle holding the
full model and the first k routes is assembled from the exported one (the same model files, hard-linked; the
manifest keeps only those routes and their models, so the server's sha256 + parity check still runs on every
file), served by `steerprune serve` on 127.0.0.1 with 1 ONNX Runtime thread, and measured: seconds to /readyz, RSS
of the worker and of the whole process tree once ready (models loaded and warmed) and after `--load-s` seconds of
unpaced load (right/wrong/no hints: every route's session runs and grows its CPU arena), throughput, and server CPU
milliseconds per request (psutil), for each `--memory` mode (how the sessions hold memory: `private`, `arena`,
`shared`; see docs/serving.md). One server at a time; figures on a shared 2-core VM drift, ratios less so.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["subset_bundle", "measure", "main"]


def subset_bundle(src: Path, dst: Path, k: int | None) -> dict:
    """Write into dst a bundle with src's full model and its first k routes (None: all); returns its manifest."""
    from steerprune.export.manifest import load_manifest

    m = load_manifest(src)
    names = list(m["routes"])[: len(m["routes"]) if k is None else k]
    m["routes"] = {n: m["routes"][n] for n in names}
    keep = {m["full"]["model"]} | {r["model"] for r in m["routes"].values()}
    m["models"] = {rel: {**v, "routes": [r for r in v.get("routes", []) if r in names or r == "full"]}
                   for rel, v in m["models"].items() if rel in keep}
    m["samples"]["logits"] = {rel: key for rel, key in m["samples"]["logits"].items() if rel in keep}
    dst.mkdir(parents=True)
    for rel in list(keep) + [m["samples"]["file"]]:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src / rel, dst / rel)
        except OSError:
            shutil.copy2(src / rel, dst / rel)
    (dst / "manifest.json").write_text(json.dumps(m, indent=1))
    load_manifest(dst)  # the same schema check the server makes
    return m


def _worker_and_tree_mb(pid: int) -> tuple[float, float]:
    import psutil

    root = psutil.Process(pid)
    rss = [p.memory_info().rss / 2**20 for p in [root] + root.children(recursive=True)]
    return max(rss), sum(rss)


# --memory: how the server's sessions hold memory (ServeConfig shared_arena / share_weights)
MEMORY_MODES = {"private": dict(shared_arena=False, share_weights=False),
                "arena": dict(shared_arena=True, share_weights=False),
                "shared": dict(shared_arena=True, share_weights=True)}


def measure(bundle: Path, images: str | None, load_s: float, users: int, seed: int = 0,
            memory: str = "arena") -> dict:
    from steerprune.loadtest.client import get, multipart_body, run_open_loop
    from steerprune.loadtest.plan import encode_png, load_images, parse_mix, plan_requests
    from steerprune.loadtest.probes import server_cpu_seconds
    from steerprune.export.manifest import load_manifest
    from steerprune.service.cli import free_port, start_server, stop_server

    m = load_manifest(bundle)
    port = free_port()
    t0 = time.perf_counter()
    proc = start_server(bundle, port=port, timeout=300, threads=1, **MEMORY_MODES[memory])
    ready_s = time.perf_counter() - t0
    try:
        time.sleep(2)  # let BentoML's start-up allocations settle
        worker_ready, tree_ready = _worker_and_tree_mb(proc.pid)
        base = f"http://127.0.0.1:{port}"
        listing = json.loads(get(base, "/routes")[1])
        x, labels, _ = load_images(images, listing.get("data_spec"), list(m["classes"]))
        routes = {n: r["classes"] for n, r in m["routes"].items()}
        plan = plan_requests(2000, labels, routes, parse_mix("right=0.6,wrong=0.2,none=0.2"), seed)
        pngs: dict[int, bytes] = {}
        bodies = [multipart_body({"hint": p.hint} if p.hint else {}, pngs.setdefault(p.image, encode_png(x[p.image])))
                  for p in plan]

        async def body(i):
            return bodies[i % len(bodies)]

        run_open_loop(base + "/classify", body, 10**9, users, 3.0)  # warm-up, unmeasured
        cpu0 = server_cpu_seconds(proc.pid)
        samples, wall = run_open_loop(base + "/classify", body, 10**9, users, load_s)
        cpu = server_cpu_seconds(proc.pid) - cpu0
        worker_load, tree_load = _worker_and_tree_mb(proc.pid)
    finally:
        stop_server(proc)
    ok = [s for s in samples if s.status == 200]
    lat = np.array([s.latency for s in ok]) * 1000
    model_mb = sum((bundle / rel).stat().st_size for rel in m["models"]) / 2**20
    return {"memory": memory, "routes": len(m["routes"]), "models": len(m["models"]), "model_files_mb": round(model_mb, 2),
            "params_full": m["full"].get("params"), "ready_s": round(ready_s, 2),
            "worker_rss_mb_ready": round(worker_ready, 1), "tree_rss_mb_ready": round(tree_ready, 1),
            "worker_rss_mb_after_load": round(worker_load, 1), "tree_rss_mb_after_load": round(tree_load, 1),
            "requests": len(samples), "errors": len(samples) - len(ok),
            "error_statuses": {str(c): sum(s.status == c for s in samples) for c in {s.status for s in samples} - {200}},
            "error_examples": [s.answer for s in samples if s.status != 200][:3], "throughput_rps": round(len(samples) / wall, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 2) if len(lat) else None,
            "server_cpu_ms_per_request": round(cpu / max(1, len(samples)) * 1000, 3)}


def replicas_needed(target_rps: float, rps_per_replica: float, utilisation: float = 0.5) -> int:
    """Replicas to carry target_rps with each replica at `utilisation` of its saturated rate (the HPA target)."""
    return math.ceil(target_rps / (rps_per_replica * utilisation))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", action="append", required=True, help="NAME=PATH of an exported bundle (repeatable)")
    ap.add_argument("--images", action="append", default=[], help="NAME=NPZ test images for a non-digits bundle")
    ap.add_argument("--routes", default="0,all", help="route counts to measure per bundle: integers and/or 'all'")
    ap.add_argument("--memory", default="arena",
                    help=f"comma-separated server memory modes to measure: {', '.join(MEMORY_MODES)} (private: one "
                         "arena and one copy of the weights per session; arena: one shared CPU arena, the default; "
                         "shared: the arena and one copy of each distinct weight)")
    ap.add_argument("--load-s", type=float, default=15.0)
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--targets", default="1000,10000", help="target request rates for the replica column")
    ap.add_argument("--out", default="benchmarks/results/memory_scaling.json")
    args = ap.parse_args(argv)
    images = dict(s.split("=", 1) for s in args.images)
    modes = args.memory.split(",")
    unknown = sorted(set(modes) - set(MEMORY_MODES))
    if unknown:
        ap.error(f"unknown --memory {', '.join(unknown)}: use {', '.join(MEMORY_MODES)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="memscale-") as tmp:
        for spec in args.bundle:
            name, path = spec.split("=", 1)
            src = Path(path)
            n_routes = len(json.loads((src / "manifest.json").read_text())["routes"])
            counts = sorted({n_routes if c == "all" else min(int(c), n_routes) for c in args.routes.split(",")})
            for k in counts:
                dst = Path(tmp) / f"{name}_{k}"
                subset_bundle(src, dst, k)
                for mode in modes:
                    row = {"bundle": name, **measure(dst, images.get(name), args.load_s, args.users, memory=mode)}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    targets = [float(t) for t in args.targets.split(",")]
    for r in rows:
        r["replicas_at_50pct"] = {str(int(t)): replicas_needed(t, r["throughput_rps"]) for t in targets}
    per_model = {}
    for name, mode in {(r["bundle"], r["memory"]) for r in rows}:
        rs = sorted((r for r in rows if r["bundle"] == name and r["memory"] == mode), key=lambda r: r["models"])
        if len(rs) >= 2 and rs[-1]["models"] > rs[0]["models"]:
            dm = rs[-1]["models"] - rs[0]["models"]
            per_model[f"{name}/{mode}"] = {
                "worker_mb_per_model_ready": round((rs[-1]["worker_rss_mb_ready"] - rs[0]["worker_rss_mb_ready"]) / dm, 2),
                "worker_mb_per_model_after_load":
                    round((rs[-1]["worker_rss_mb_after_load"] - rs[0]["worker_rss_mb_after_load"]) / dm, 2)}
    report = {"machine": f"x86-64 ({os.cpu_count()} CPUs), no GPU; server: 1 worker, 1 ONNX Runtime thread, "
                         "load generator in this process", "config": vars(args), "rows": rows,
              "per_model_slope": per_model}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps(per_model, indent=1))
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

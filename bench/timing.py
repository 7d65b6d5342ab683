"""Timing worker processes: each variant (an ONNX model, a PyTorch run or a timm model) is timed in its own process
per round, one ONNX Runtime session or torch model per process so no two share threads or caches; rounds are
interleaved so machine drift hits every variant alike."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from typing import Sequence

import numpy as np

from steerprune.export.manifest import INPUT_NAME, OUTPUT_NAME
from steerprune.export.runtime import ort_session

__all__ = ["time_variants"]


def _worker(spec: dict) -> dict:
    """Runs in a child process: time one variant at each batch size, return the per-call times in ms."""
    threads, shape, device = spec["threads"], spec["shape"], spec.get("device", "cpu")  # shape (C, S, S)
    gen = np.random.default_rng(0)
    if spec["kind"] == "onnx":  # host in, host out: the copies to and from a GPU are part of every call
        sess = ort_session(spec["path"], threads=threads, device=device)

        def call(x):
            sess.run([OUTPUT_NAME], {INPUT_NAME: x})
    else:
        import torch

        torch.set_num_threads(threads)
        torch.set_num_interop_threads(1)
        if spec["kind"] == "torch-run":
            from steerprune.training.run import load_run

            model = load_run(spec["path"]).vit.eval()
        else:  # torch-timm: random weights, only the speed matters
            import timm

            model = timm.create_model(spec["path"], pretrained=False).eval()
        model.to(device)

        def call(x):  # .cpu() waits for the GPU and copies back, as ONNX Runtime does
            with torch.inference_mode():
                model(torch.from_numpy(x).to(device)).cpu()
    out = {}
    for b in spec["batches"]:
        x = gen.standard_normal((b, *shape)).astype(np.float32)
        t_end = time.perf_counter() + spec["warmup_s"]
        n_warm = 0
        while n_warm < 3 or time.perf_counter() < t_end:
            call(x)
            n_warm += 1
        times = []
        for _ in range(spec["runs"]):
            t0 = time.perf_counter()
            call(x)
            times.append((time.perf_counter() - t0) * 1e3)
        out[str(b)] = times
    return out


def _spawn(spec: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    p = subprocess.run([sys.executable, "-m", "steerprune.bench.timing", "--worker", json.dumps(spec)],
                       capture_output=True, text=True, env=env)
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"benchmark worker for {spec['path']} failed: {tail}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _stats(times: Sequence[float], batch: int) -> dict:
    t = np.asarray(times)
    med = float(np.median(t))
    return {"median_ms": med, "p10_ms": float(np.percentile(t, 10)), "p90_ms": float(np.percentile(t, 90)),
            "ms_per_image": med / batch, "n": int(t.size)}


def time_variants(variants: list[dict], shape: Sequence[int], threads: int = 2, batches: Sequence[int] = (1, 8),
                  runs: int = 50, rounds: int = 3, warmup_s: float = 0.5, device: str = "cpu",
                  log=print) -> list[dict]:
    """Time every variant ({name, kind, path, ...}) in its own process per round, rounds interleaved.

    Each round gives ceil(runs / rounds) calls per variant and batch size; the statistics pool all rounds. The order
    of variants rotates every round so no variant always runs first (cold machine) or last.
    """
    per_round = max(1, math.ceil(runs / rounds))
    times = {v["name"]: {str(b): [] for b in batches} for v in variants}
    for r in range(rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for v in order:
            spec = {"kind": v["kind"], "path": str(v["path"]), "threads": threads, "shape": list(shape),
                    "batches": list(batches), "runs": per_round, "warmup_s": warmup_s, "device": device}
            got = _spawn(spec)
            for b, ts in got.items():
                times[v["name"]][b].extend(ts)
        log(f"round {r + 1}/{rounds} done: " + ", ".join(
            f"{v['name']} {np.median(times[v['name']][str(batches[-1])]):.2f}" for v in variants) + f" ms @ b{batches[-1]}")
    out = []
    for v in variants:
        res = {k: val for k, val in v.items() if k != "path"}
        res["path"] = str(v["path"])
        res["batch"] = {b: _stats(ts, int(b)) for b, ts in times[v["name"]].items()}
        out.append(res)
    full = next((v for v in out if v["role"] == "full"), None)
    for v in out:
        for b, s in v["batch"].items():
            s["speedup_vs_full"] = full["batch"][b]["median_ms"] / s["median_ms"] if full else None
        v["flop_bound_speedup"] = 1.0 / v["flops_rel"] if v.get("flops_rel") else None
    return out


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(_worker(json.loads(sys.argv[2]))))
    else:
        sys.exit("usage: python -m steerprune.bench.timing --worker SPEC (use `steerprune bench` instead)")

"""`steerprune bench`: offline latency of a bundle's models against their FLOP bound, with honest peers.

Variants timed in the same run, each in its own process (one ONNX Runtime session or one torch model per process,
so no two share threads or caches), with the rounds interleaved so machine drift hits every variant alike:

    full                   models/full.onnx (ONNX Runtime)
    removed:<file>         each distinct pruned model of the bundle (heads physically removed)
    masked:<file>          the gated model with the same constant mask, exported to ONNX (AdaViT-style masking,
                           heads zeroed but still computed): needs torch and the run directory
    torch-eager:full       the full timm model in PyTorch eager mode: needs torch and the run directory

Per variant and batch size: warm-up, then >= `runs` timed calls; median, p10, p90 (ms per batch and per image).
Speedup is full median / variant median at the same batch size, reported next to the FLOP bound 1 / flops_rel.
`--synthetic deit_small` does the same on a random-weight DeiT-S (224 px, 12 x 6 heads) with fixed masks.
`--device cuda` times on ONNX Runtime's CUDA provider (and PyTorch on the GPU), host arrays in and out per call.
"""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from steerprune.errors import UserError

from .manifest import (CUDA_PROVIDER, INPUT_NAME, OUTPUT_NAME, gpu_visible, load_manifest, model_paths, ort_providers,
                       ort_session)

__all__ = ["run_bench", "run_synthetic", "time_variants", "plot_bench", "SYNTHETIC"]

# Synthetic models: timm name -> (masks as heads kept per layer, applied to every layer). Random weights.
SYNTHETIC = {"deit_small": ("deit_small_patch16_224", (4, 2, 0)),
             "deit_tiny": ("deit_tiny_patch16_224", (2, 1, 0))}


# ---------------------------------------------------------------------------------------------- worker process

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
    p = subprocess.run([sys.executable, "-m", "steerprune.export.bench", "--worker", json.dumps(spec)],
                       capture_output=True, text=True, env=env)
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"benchmark worker for {spec['path']} failed: {tail}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- timing

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


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _summary(results: list[dict], batch: str) -> dict:
    removed = [v for v in results if v["role"] == "removed"]
    masked = [v for v in results if v["role"] == "masked"]
    return {
        "batch": int(batch),
        "removed_meet_flop_bound": {v["name"]: v["batch"][batch]["speedup_vs_full"] >= v["flop_bound_speedup"]
                                    for v in removed},
        "all_removed_meet_flop_bound": all(v["batch"][batch]["speedup_vs_full"] >= v["flop_bound_speedup"]
                                           for v in removed) if removed else None,
        "masked_speedups": {v["name"]: v["batch"][batch]["speedup_vs_full"] for v in masked},
    }


def _machine(threads: int, device: str = "cpu") -> dict:
    import onnxruntime as ort

    provider = "CPUExecutionProvider" if device == "cpu" else f"{CUDA_PROVIDER[0]} {json.dumps(CUDA_PROVIDER[1])}"
    out = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count(), "threads": threads, "onnxruntime": ort.__version__, "provider": provider,
           "python": platform.python_version(),
           "load_avg_1m_start": _loadavg()}  # other work on the machine while measuring: see load_avg_1m_end
    if device == "cuda":
        out["gpu"] = _gpu_name()
    return out


def _gpu_name() -> str | None:
    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        return p.stdout.strip().splitlines()[0] if p.returncode == 0 and p.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def _check_device(device: str) -> None:
    """Refuse a device this machine cannot time on, before anything is exported or spawned."""
    ort_providers(device)  # UserError for an unknown device or an onnxruntime without CUDA
    if device == "cuda" and not gpu_visible():
        raise UserError("--device cuda: no NVIDIA GPU is visible on this machine")


def plot_bench(result: dict, path: Path) -> Path:
    """Bars: measured speedup vs full per variant at each batch size; black ticks: the FLOP bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vs = [v for v in result["variants"] if v["role"] != "full"]
    batches = list(result["batches"])
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(vs) + 2), 4))
    w = 0.8 / len(batches)
    colors = {"removed": "tab:green", "masked": "tab:red", "torch": "tab:gray"}
    for j, b in enumerate(batches):
        xs = np.arange(len(vs)) + (j - (len(batches) - 1) / 2) * w
        ys = [v["batch"][str(b)]["speedup_vs_full"] for v in vs]
        ax.bar(xs, ys, w * 0.95, color=[colors.get(v["role"], "tab:blue") for v in vs], alpha=0.5 + 0.5 * j / max(1, len(batches) - 1),
               label=f"batch {b}")
        for x, y in zip(xs, ys):
            ax.text(x, y, f"{y:.2f}", ha="center", va="bottom", fontsize=7)
    for i, v in enumerate(vs):
        if v.get("flop_bound_speedup"):
            ax.plot([i - 0.45, i + 0.45], [v["flop_bound_speedup"]] * 2, color="black", lw=1.5)
    ax.axhline(1.0, color="gray", ls="--", lw=0.8)
    ax.set_xticks(range(len(vs)))
    ax.set_xticklabels([v["label"] for v in vs], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("speedup vs full ONNX model (median)")
    where = (f"CUDA, {result['machine'].get('gpu') or 'GPU'}" if result["machine"]["provider"].startswith("CUDA")
             else f"CPU, {result['machine']['threads']} threads")
    ax.set_title(f"{result['title']}: ONNX Runtime {where}\n"
                 f"black: FLOP bound; green removed, red masked, gray PyTorch eager", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _finish(result: dict, out_path: Path, log) -> dict:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    result["machine"]["load_avg_1m_end"] = _loadavg()
    result["summary"] = {b: _summary(result["variants"], str(b)) for b in result["batches"]}
    try:
        result["plot"] = str(plot_bench(result, out_path.with_suffix(".png")))
    except ImportError:
        result["notes"].append("matplotlib not installed: no plot")
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    log(format_table(result))
    log(f"wrote {out_path}" + (f" and {result['plot']}" if result.get("plot") else ""))
    return result


def format_table(result: dict) -> str:
    lines = [f"{'variant':34s} {'FLOP bound':>10s} " + " ".join(
        f"{'b' + str(b) + ' ms/img':>11s} {'p10-p90':>13s} {'speedup':>8s}" for b in result["batches"])]
    for v in result["variants"]:
        row = f"{v['label'][:34]:34s} {v['flop_bound_speedup'] or float('nan'):10.2f} "
        for b in result["batches"]:
            s = v["batch"][str(b)]
            row += (f"{s['ms_per_image']:11.3f} {s['p10_ms'] / b:6.3f}-{s['p90_ms'] / b:<6.3f} "
                    f"{s['speedup_vs_full']:7.2f}x ")
        lines.append(row.rstrip())
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- entry points

def _export_masked_peers(run_dir: Path, masks: dict[str, list], tmp: Path, chans_size) -> dict[str, Path]:
    """The gated model with each constant mask, exported to ONNX (heads zeroed, not removed)."""
    from steerprune.training.run import load_run

    from .onnx_export import MaskedLogits, export_onnx

    from steerprune.training.model import GatedViT

    run = load_run(run_dir)
    gated = GatedViT(run.vit).eval()
    return {rel: export_onnx(MaskedLogits(gated, mask), tmp / f"masked_{Path(rel).stem}.onnx", *chans_size)
            for rel, mask in masks.items()}


def run_bench(bundle_dir, out_path=None, threads: int = 2, batches: Sequence[int] = (1, 8), runs: int = 50,
              rounds: int = 3, torch_peers: bool = True, masked_peers: bool = True, warmup_s: float = 0.5,
              device: str = "cpu", log=print) -> dict:
    """Benchmark a bundle's models (and peers) on `device` and write JSON + PNG; returns the result dict."""
    _check_device(device)
    bundle_dir = Path(bundle_dir).expanduser()
    m = load_manifest(bundle_dir)
    out_path = Path(out_path) if out_path else bundle_dir / "bench" / "bench.json"
    if threads < 1 or runs < 1 or rounds < 1:
        raise UserError("threads, runs and rounds must be at least 1")
    shape = (m["input"]["channels"], m["input"]["img_size"], m["input"]["img_size"])
    notes = []
    variants = []
    for rel in model_paths(m):
        e = m["models"][rel]
        full = rel == m["full"]["model"]
        variants.append({"name": "full" if full else f"removed:{Path(rel).stem}", "kind": "onnx",
                         "path": bundle_dir / rel, "role": "full" if full else "removed", "model": rel,
                         "routes": e["routes"], "flops_rel": e["flops_rel"], "head_usage": e["head_usage"],
                         "label": "full (ONNX)" if full else f"removed {_label(e)}"})
    run_dir = Path(m["run"].get("path", "")) if isinstance(m.get("run"), dict) else None
    torch_ok = _has_torch()
    run_ok = run_dir is not None and (run_dir / "backbone.json").is_file()
    with tempfile.TemporaryDirectory(prefix="steerprune-bench-") as tmp:
        if (masked_peers or torch_peers) and not (torch_ok and run_ok):
            notes.append("torch peers skipped: " + ("torch is not installed" if not torch_ok else
                                                    f"the run directory {run_dir} is not available"))
        else:
            if masked_peers:
                pruned = {v["model"]: m["models"][v["model"]]["mask"] for v in variants if v["role"] == "removed"}
                for rel, path in _export_masked_peers(run_dir, pruned, Path(tmp), (shape[0], shape[1])).items():
                    e = m["models"][rel]
                    variants.append({"name": f"masked:{Path(rel).stem}", "kind": "onnx", "path": path, "role": "masked",
                                     "model": None, "mask_of": rel, "routes": e["routes"], "flops_rel": None,
                                     "head_usage": e["head_usage"], "label": f"masked {_label(e)}"})
            if torch_peers:
                variants.append({"name": "torch-eager:full", "kind": "torch-run", "path": run_dir, "role": "torch",
                                 "model": None, "routes": [], "flops_rel": 1.0, "head_usage": 1.0,
                                 "label": "full (PyTorch eager)"})
        log(f"benchmarking {len(variants)} variants on {device}, batches {list(batches)}, {threads} threads, "
            f">= {runs} runs each over {rounds} interleaved rounds, one process per variant per round")
        results = time_variants(variants, shape, threads, batches, runs, rounds, warmup_s, device=device, log=log)
    result = {"title": f"bundle {bundle_dir.name}", "bundle": str(bundle_dir), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "machine": _machine(threads, device), "batches": list(batches), "runs": runs, "rounds": rounds,
              "method": "one process per variant per round, rounds interleaved with rotating order; warm-up "
                        f"{warmup_s}s then timed calls; median/p10/p90 over all rounds",
              "variants": results, "notes": notes}
    return _finish(result, out_path, log)


def run_synthetic(name: str, out_path, threads: int = 2, batches: Sequence[int] = (1, 8), runs: int = 50,
                  rounds: int = 2, warmup_s: float = 0.5, device: str = "cpu", log=print) -> dict:
    """Random-weight timm model (e.g. DeiT-S) with the same kept-head count in every layer: removed vs masked."""
    if name not in SYNTHETIC:
        raise UserError(f"unknown synthetic model {name!r}: use one of {', '.join(SYNTHETIC)}")
    _check_device(device)
    import timm
    import torch

    from steerprune.training.model import GatedViT, head_flops

    from .onnx_export import MaskedLogits, check_onnx, export_onnx
    from .prune import manual_attention, prune_vit

    timm_name, keeps = SYNTHETIC[name]
    torch.manual_seed(0)
    vit = timm.create_model(timm_name, pretrained=False).eval()
    depth, H = len(vit.blocks), vit.blocks[0].attn.num_heads
    shape = (3, vit.patch_embed.img_size[0], vit.patch_embed.img_size[1])
    gated = GatedViT(vit).eval()
    variants, notes = [], [f"random weights ({timm_name}, pretrained=False); masks keep heads 0..k-1 in every layer"]
    with tempfile.TemporaryDirectory(prefix="steerprune-synth-") as tmp:
        tmp = Path(tmp)
        full = export_onnx(manual_attention(vit), tmp / "full.onnx", 3, shape[1])
        variants.append({"name": "full", "kind": "onnx", "path": full, "role": "full", "flops_rel": 1.0,
                         "head_usage": 1.0, "label": f"full {H}/{H} (ONNX)"})
        for k in keeps:
            mask = [[1] * k + [0] * (H - k) for _ in range(depth)]
            path = export_onnx(prune_vit(vit, mask), tmp / f"keep{k}.onnx", 3, shape[1])
            parity = check_onnx(path, MaskedLogits(gated, mask), 3, shape[1], batches=(2,))
            log(f"{timm_name} keep {k}/{H}: ONNX vs gated torch max |diff| {parity.max_abs['2']:.1e}")
            variants.append({"name": f"removed:keep{k}", "kind": "onnx", "path": path, "role": "removed",
                             "flops_rel": head_flops(vit, mask)["rel"], "head_usage": k / H, "parity": parity.max_abs,
                             "label": f"removed {k}/{H} heads"})
        k = sorted(keeps)[len(keeps) // 2]
        mask = [[1] * k + [0] * (H - k) for _ in range(depth)]
        variants.append({"name": f"masked:keep{k}", "kind": "onnx", "role": "masked", "flops_rel": None,
                         "path": export_onnx(MaskedLogits(gated, mask), tmp / f"masked{k}.onnx", 3, shape[1]),
                         "head_usage": k / H, "label": f"masked {k}/{H} heads"})
        variants.append({"name": "torch-eager:full", "kind": "torch-timm", "path": timm_name, "role": "torch",
                         "flops_rel": 1.0, "head_usage": 1.0, "label": "full (PyTorch eager)"})
        log(f"benchmarking {len(variants)} variants of {timm_name} on {device}, batches {list(batches)}, "
            f"{threads} threads")
        results = time_variants(variants, shape, threads, batches, runs, rounds, warmup_s, device=device, log=log)
    result = {"title": f"synthetic {timm_name}", "synthetic": timm_name, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "machine": _machine(threads, device), "batches": list(batches), "runs": runs, "rounds": rounds,
              "method": "one process per variant per round, rounds interleaved with rotating order",
              "variants": results, "notes": notes}
    return _finish(result, Path(out_path), log)


def _label(entry: dict) -> str:
    kept = sum(map(sum, entry["mask"]))
    total = sum(len(r) for r in entry["mask"])
    routes = ",".join(entry["routes"][:3]) + ("..." if len(entry["routes"]) > 3 else "")
    return f"{kept}/{total} [{routes}]"


def _has_torch() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(_worker(json.loads(sys.argv[2]))))
    else:
        sys.exit("usage: python -m steerprune.export.bench --worker SPEC (use `steerprune bench` instead)")

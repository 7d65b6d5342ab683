"""The benchmark's record: the machine it ran on, the FLOP-bound summary, the table, the plot and the JSON file."""
from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

import numpy as np

from steerprune.export.runtime import CUDA_PROVIDER

__all__ = ["machine", "plot_bench", "format_table", "finish"]


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


def machine(threads: int, device: str = "cpu") -> dict:
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


def finish(result: dict, out_path: Path, log) -> dict:
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

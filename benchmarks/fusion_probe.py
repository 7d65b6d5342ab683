"""Does fusing a bundle's graphs with ONNX Runtime's transformer optimizer cut the per-node cost that keeps tiny
models under their FLOP bound? Times the full model and chosen routes' models as exported and as fused
(`onnxruntime.transformers.optimizer.optimize_model(model_type="vit")`), 1 intra-op thread, one batch size,
interleaved rounds, medians; checks the fused logits against the exported ones. JSON and a plot.

    python benchmarks/fusion_probe.py runs/qs2/bundle --routes 0,2,5 --out benchmarks/results/fusion_probe_digits.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = threads, 1, 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _times_ms(sess, x: np.ndarray, runs: int) -> list[float]:
    feed = {sess.get_inputs()[0].name: x}
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t) * 1000.0)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--routes", default="0,2", help="comma-separated route names whose models to time beside full")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=100, help="timed runs per model and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/fusion_probe.json")
    args = ap.parse_args()

    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    bundle = Path(args.bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    names = ["full"] + [r for r in args.routes.split(",") if r]
    paths = {"full": bundle / manifest["full"]["model"]}
    for r in names[1:]:
        if r not in manifest["routes"]:
            print(f"unknown route {r!r}; routes: {', '.join(manifest['routes'])}", file=sys.stderr)
            return 2
        paths[r] = bundle / manifest["routes"][r]["model"]
    spec = manifest["input"]
    chans = 1 if spec.get("color_mode") == "L" else 3
    x = np.random.default_rng(0).standard_normal((args.batch, chans, spec["img_size"], spec["img_size"])).astype(np.float32)

    rows, sessions = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in paths.items():
            # num_heads=0/hidden_size=0: detected from the graph (pruned layers hold different head counts)
            fused = optimize_model(str(path), model_type="vit", num_heads=0, hidden_size=0, opt_level=1)
            fused_path = Path(tmp) / f"{name}.onnx"
            fused.save_model_to_file(str(fused_path))
            plain_s, fused_s = _session(path, args.threads), _session(fused_path, args.threads)
            feed = {plain_s.get_inputs()[0].name: x}
            diff = float(np.abs(plain_s.run(None, feed)[0] - fused_s.run(None, feed)[0]).max())
            nodes = (len(onnx.load(str(path)).graph.node), len(onnx.load(str(fused_path)).graph.node))
            sessions[name] = (plain_s, fused_s)
            entry = manifest["full"] if name == "full" else manifest["routes"][name]
            rows[name] = {"model": str(path.relative_to(bundle)), "flops_rel": entry.get("flops_rel", 1.0),
                          "nodes": nodes[0], "nodes_fused": nodes[1], "max_abs_logit_diff": diff,
                          "times_ms": [], "times_fused_ms": []}
        for _ in range(args.rounds):  # interleaved, so drift hits every model alike
            for name, (plain_s, fused_s) in sessions.items():
                rows[name]["times_ms"] += _times_ms(plain_s, x, args.runs)
                rows[name]["times_fused_ms"] += _times_ms(fused_s, x, args.runs)
    for name, row in rows.items():
        row["median_ms"] = round(float(np.median(row.pop("times_ms"))), 4)
        row["median_fused_ms"] = round(float(np.median(row.pop("times_fused_ms"))), 4)
    for name, row in rows.items():
        row["speedup_vs_full"] = round(rows["full"]["median_ms"] / row["median_ms"], 3)
        row["speedup_vs_full_fused"] = round(rows["full"]["median_fused_ms"] / row["median_fused_ms"], 3)
        fr = row["flops_rel"] or 1.0
        row["flop_bound_speedup"] = round(1.0 / fr, 3)

    import onnxruntime

    report = {"bundle": str(bundle), "batch": args.batch, "threads": args.threads, "runs": args.runs * args.rounds,
              "onnxruntime": onnxruntime.__version__, "models": rows}
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    idx = np.arange(len(rows))
    ax.bar(idx - 0.2, [r["median_ms"] for r in rows.values()], 0.4, label="as exported")
    ax.bar(idx + 0.2, [r["median_fused_ms"] for r in rows.values()], 0.4, label="fused (transformer optimizer)")
    ax.set_xticks(idx, list(rows))
    ax.set_ylabel(f"ms per batch of {args.batch}")
    ax.legend()
    ax.set_title(f"{bundle.name}: {args.threads} thread(s), median of {args.runs * args.rounds}")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=100)
    for name, row in rows.items():
        print(f"{name}: {row['median_ms']} ms -> fused {row['median_fused_ms']} ms; speedup {row['speedup_vs_full']} -> "
              f"{row['speedup_vs_full_fused']} (bound {row['flop_bound_speedup']}); nodes {row['nodes']} -> "
              f"{row['nodes_fused']}; max diff {row['max_abs_logit_diff']:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

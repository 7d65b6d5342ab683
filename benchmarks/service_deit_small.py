"""Service vs in-process throughput on a DeiT-S-sized bundle: the service issue's "≥ 80% of in-process throughput
for DeiT-S-sized models".

    python benchmarks/service_deit_small.py --out benchmarks/results/loadtest_deit_small.json

In --work (default runs/deit_small_service) it builds a 10-class image folder (CIFAR-10 test images when
--cifar10 exists, random images otherwise), a timm `deit_small_patch16_224` backbone at 224 px with untrained
weights (`steerprune train --stage backbone --epochs 0`: speed does not depend on the weights), two route masks
(classes 0-4 keep 2 of 6 heads in every block, classes 5-9 keep 4), exports the bundle, serves it in trust mode
(an untrained model is never confident, so verify mode would rerun every request on the full model) and
load-tests it with right hints and no hints. The report (JSON + plot) is `steerprune loadtest`'s, whose
`server_share_of_inprocess_throughput` is the figure: served requests/s over the requests/s ONNX Runtime reaches
in-process on the same requests (each model at its faster batch size).

Hinted against unhinted throughput (the cost issue's "hinted throughput >= 1.4x unhinted" on a compute-bound model):

    python benchmarks/service_deit_small.py --mlp-keep 0.5 --compare-hints --rounds 3 \
        --out benchmarks/results/hints_deit_small.json

`--mlp-keep F` also removes all but the first F of every block's MLP hidden units from the route models (which
units does not matter for speed with untrained weights; F = 0.5 puts the routes at FLOPs 0.44 and 0.57 of the full
model, about where the CIFAR-10 routes cut for cost are, 0.55 on average); `--compare-hints` runs `steerprune
loadtest --compare-hints` (a phase with no hints and one with right hints, `--rounds` times in ABBA order) instead of
the mixed run.

With two or more cores (Linux), the README's protocol: the server runs on core 0 with 1 ONNX Runtime thread, the load
generator and the in-process baseline on core 1 with 1 thread, so the two sides neither share nor steal CPU and the
baseline gets exactly what the server has. `--no-pin` leaves both on every core with ONNX Runtime's default threads.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _steerprune(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "steerprune.cli", *args], check=True, cwd=ROOT)


def _image_folder(root: Path, cifar10: Path, per_class_train: int, per_class_test: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    if (cifar10 / "test.npz").is_file():
        with np.load(cifar10 / "test.npz") as z:
            images, labels = z["images"], z["labels"]
    else:
        labels = np.repeat(np.arange(10), per_class_train + per_class_test)
        images = rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8)
    for c in range(10):
        idx = np.flatnonzero(labels == c)[:per_class_train + per_class_test]
        for split, part in (("train", idx[:per_class_train]), ("test", idx[per_class_train:])):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in part:
                Image.fromarray(images[i]).save(d / f"{i}.png")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="runs/deit_small_service")
    ap.add_argument("--cifar10", default="../shared/data/cifar10")
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--duration", type=float, default=40.0)
    ap.add_argument("--out", default="benchmarks/results/loadtest_deit_small.json")
    ap.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin server and generator to cores")
    ap.add_argument("--mlp-keep", type=float, default=1.0,
                    help="share of every block's MLP hidden units the route models keep (default 1: heads only)")
    ap.add_argument("--compare-hints", action="store_true", help="no hints against right hints instead of the mix")
    ap.add_argument("--rounds", type=int, default=3, help="with --compare-hints: ABBA rounds")
    args = ap.parse_args()
    if not 0 < args.mlp_keep <= 1:
        ap.error(f"--mlp-keep must be in (0, 1], got {args.mlp_keep}")
    pin = args.pin and hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2
    cores = sorted(os.sched_getaffinity(0)) if pin else []

    from steerprune.service.cli import free_port, start_server, stop_server
    from steerprune.loadtest import LoadTestConfig, run_loadtest

    work = (ROOT / args.work).resolve()
    folder, run = work / "images", work / "run"
    bundle = work / ("bundle" if args.mlp_keep == 1 else f"bundle_mlp{round(100 * args.mlp_keep)}")
    if not (folder / "test").is_dir():
        _image_folder(folder, (ROOT / args.cifar10).resolve(), per_class_train=10, per_class_test=20)
    if not (run / "backbone.safetensors").is_file():
        _steerprune("train", str(run), "--data", f"imagefolder:{folder}", "--preset", "custom", "--model",
                    "deit_small_patch16_224", "--img-size", "224", "--epochs", "0", "--stage", "backbone")
    depth, heads, hidden = 12, 6, 1536
    keep = lambda n: [[1] * n + [0] * (heads - n) for _ in range(depth)]  # noqa: E731
    masks = {f"class{c}": {"classes": [c], "mask": keep(2 if c < 5 else 4)} for c in range(10)}
    (work / "masks.json").write_text(json.dumps(masks))
    units = []
    if args.mlp_keep < 1:
        kept = [list(range(max(1, round(args.mlp_keep * hidden))))] * depth
        (bundle.parent / f"{bundle.name}_units.json").write_text(json.dumps(
            {"routes": [{"name": n, "mask": m["mask"], "mlp_units": kept} for n, m in masks.items()]}))
        units = ["--units", str(bundle.parent / f"{bundle.name}_units.json")]
    if not (bundle / "manifest.json").is_file():
        _steerprune("export", str(run), "--out", str(bundle), "--masks", str(work / "masks.json"), *units)

    port = free_port()
    if pin:
        os.sched_setaffinity(0, {cores[0]})  # the server and its workers inherit core 0
    proc = start_server(bundle, port=port, hint_mode="trust", timeout=300, **({"threads": 1} if pin else {}))
    try:
        if pin:
            os.sched_setaffinity(0, {cores[1]})  # generator and in-process baseline: core 1
        hints = {"compare_hints": True, "rounds": args.rounds} if args.compare_hints else {"mix": "right=0.8,none=0.2"}
        report = run_loadtest(LoadTestConfig(url=f"http://127.0.0.1:{port}", users=args.users, duration=args.duration,
                                             images=str(folder / "test"), bundle=str(bundle), server_pid=proc.pid,
                                             inprocess_threads=1 if pin else 0, out=str(ROOT / args.out), **hints))
    finally:
        stop_server(proc)
    out = ROOT / args.out  # record the core placement beside the figures
    saved = json.loads(out.read_text())
    saved["pinning"] = {"server_core": cores[0], "generator_core": cores[1], "threads": 1} if pin else None
    saved["mlp_keep"] = args.mlp_keep
    out.write_text(json.dumps(saved, indent=2))
    return 0 if report["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

"""`steerprune quickstart`: train -> steer -> export -> serve, end to end, on the embedded digits data."""
from __future__ import annotations

import argparse
import json
import urllib.request
from pathlib import Path

__all__ = ["register", "run_quickstart"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="train -> steer -> export -> serve on the embedded digits data",
                       description="Train, steer, export and serve on scikit-learn's digits; ends with the service "
                                   "running and a ready-to-paste curl command (Ctrl-C stops it).")
    p.add_argument("--out", default="runs/quickstart", help="output folder (default: runs/quickstart)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3000)
    p.add_argument("--no-serve", action="store_true", help="stop after writing the bundle")
    p.set_defaults(func=_quickstart)


def run_quickstart(out: Path, log=print) -> tuple[Path, Path]:
    """Train, steer and export into `out`; returns (run_dir, bundle_dir)."""
    from steerprune.export.bundle import export_bundle
    from steerprune.steering.pipeline import steer_run
    from steerprune.training.pipeline import run_training, summary_table
    from steerprune.training.config import TrainConfig

    run_dir, bundle_dir = out / "run", out / "bundle"
    log("== 1/4 train (backbone, head policy, SAEs) ==")
    metrics = run_training(run_dir, "digits", TrainConfig.for_preset("digits"), log=log)
    log(summary_table(metrics))
    log("== 2/4 steer (per-class SAE steering -> static head masks) ==")
    steer_run(run_dir, log=log)
    log("== 3/4 export (pruned ONNX models + manifest) ==")
    export_bundle(run_dir, bundle_dir, log=log)
    log(f"bundle: {bundle_dir}")
    return run_dir, bundle_dir


def _write_sample_image(run_dir: Path, path: Path) -> tuple[str, str]:
    """A real digits test image as PNG, to paste into the curl example. Returns (path, true label)."""
    from PIL import Image

    from steerprune.training.run import load_run

    data = load_run(run_dir).load_data()
    img, label = data.test.images[0], data.class_names[int(data.test.labels[0])]
    Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(path)
    return str(path), label


def _post_image(url: str, image: Path, hint: str) -> dict:
    from steerprune.loadtest.client import multipart_body

    body, content_type = multipart_body({"hint": hint}, image.read_bytes())
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _quickstart(args) -> int:
    from steerprune.service.cli import start_server, stop_server

    out = Path(args.out)
    run_dir, bundle_dir = run_quickstart(out)
    if args.no_serve:
        return 0
    print("== 4/4 serve (BentoML + ONNX Runtime) ==")
    image, label = _write_sample_image(run_dir, out / "digit.png")
    proc = start_server(bundle_dir, host=args.host, port=args.port)
    try:
        answer = _post_image(f"{proc.url}/classify", Path(image), hint=label)
        print(f"test request (true label {label}, hint {label}): {json.dumps(answer)}")
        print("\nthe service is running; try it:\n"
              f"  curl -s -F image=@{image} -F hint={label} -F top_k=3 {proc.url}/classify\n"
              f"  curl -s {proc.url}/routes\n(Ctrl-C stops the server)", flush=True)
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop_server(proc)
    return 0

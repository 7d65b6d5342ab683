"""The bundle manifest: schema checks and `verify_bundle`, torch-free (json, hashlib, numpy, onnxruntime only).

The service imports this module to load a bundle, so it must never import torch. Every failure is a `BundleError`
(a `UserError`) with a one-line message naming the file or key that is wrong.

    BUNDLE/manifest.json      schema_version 1 (see context.md); model paths relative to BUNDLE
    BUNDLE/models/*.onnx      one file per distinct head mask, plus models/full.onnx
    BUNDLE/samples.npz        preprocessed sample inputs + the PyTorch logits each model must reproduce
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from steerprune.errors import UserError

__all__ = [
    "SCHEMA_VERSION", "INPUT_NAME", "OUTPUT_NAME", "MANIFEST", "SAMPLES_FILE", "VERIFY_TOL", "BundleError",
    "sha256_file", "CUDA_PROVIDER", "gpu_visible", "ort_providers", "preload_cuda_libs", "ort_session", "max_abs_diff",
    "load_manifest", "validate_manifest", "verify_bundle", "model_paths",
]

SCHEMA_VERSION = 1
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
MANIFEST = "manifest.json"
SAMPLES_FILE = "samples.npz"
VERIFY_TOL = 1e-4

_INPUT_KEYS = ("img_size", "channels", "color_mode", "mean", "std", "layout", "dtype", "scale", "resize",
               "input_name", "output_name")
_ENTRY_KEYS = ("model", "sha256", "mask", "kept_heads", "head_usage", "flops_rel", "params")
_FULL_KEYS = _ENTRY_KEYS + ("acc",)
_ROUTE_KEYS = ("classes",) + _ENTRY_KEYS + ("acc", "off_route_acc")
_MODEL_KEYS = ("sha256", "mask", "head_usage", "flops_rel", "params", "parity", "routes")
_TOP_KEYS = ("schema_version", "created", "versions", "run", "input", "classes", "groups", "full", "routes", "models",
             "samples")


class BundleError(UserError):
    """The bundle is incomplete, corrupt or inconsistent with its manifest."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# use_tf32 0: CUDA's default TF32 matmuls moved logits by 2e-3 on an H200 (20x the bundle's parity tolerance); the
# bundle's accuracies were measured in float32, so the GPU must compute what was verified.
# cudnn_conv_algo_search HEURISTIC: the default (EXHAUSTIVE) benchmarks every cuDNN algorithm for the patch-embedding
# Conv at each new input shape, and a batching server sees a new batch size per model all the time
# (microsoft/onnxruntime#709, #19838). Not yet measured here: see README, "GPU".
CUDA_PROVIDER = ("CUDAExecutionProvider", {"use_tf32": "0", "cudnn_conv_algo_search": "HEURISTIC"})


def gpu_visible() -> bool:
    """An NVIDIA GPU this process could use (onnxruntime-gpu lists CUDA even without one, so ask the system)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return Path("/dev/nvidiactl").exists() or Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi") is not None


def ort_providers(device: str = "cpu") -> list[str]:
    """Execution providers for `device` ('cpu' | 'cuda'). For CUDA, first preload CUDA/cuDNN from pip wheels
    (nvidia-*) when onnxruntime can, and say plainly when this onnxruntime has no CUDA provider at all."""
    import onnxruntime as ort

    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device != "cuda":
        raise UserError(f"unknown device {device!r}: use cpu or cuda")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise UserError(f"onnxruntime {ort.__version__} has no CUDA provider: install onnxruntime-gpu "
                        "(and not onnxruntime beside it)")
    preload_cuda_libs()
    return [CUDA_PROVIDER, "CPUExecutionProvider"]


def preload_cuda_libs(log=None) -> None:
    """Let onnxruntime-gpu find CUDA/cuDNN installed as pip wheels (nvidia-*, e.g. beside a CUDA torch).
    Failure is only logged: whoever asked for CUDA checks which provider each session really got."""
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception as e:  # noqa: BLE001
            if log:
                log(f"onnxruntime.preload_dlls failed: {e}")


def ort_session(path: Path, threads: int | None = None, providers: list[str] | None = None,
                device: str | None = None):
    """An ONNX Runtime session; `threads` fixes intra-op threads (inter-op 1) so timings say what they used.

    With `device='cuda'` the session must really run on CUDA: onnxruntime-gpu logs an error and silently falls
    back to the CPU when CUDA cannot start, so that is refused here with the reason.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if device:
        providers = ort_providers(device)
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers or ["CPUExecutionProvider"])
    if device == "cuda" and sess.get_providers()[0] != "CUDAExecutionProvider":
        raise UserError(f"CUDA was requested but {Path(path).name} runs on {sess.get_providers()}: "
                        "check the GPU driver, CUDA 13 and cuDNN 9")
    return sess


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return math.inf
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0


def _fail(msg: str):
    raise BundleError(msg)


def _need(obj: Any, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(obj, dict):
        _fail(f"manifest {where} must be an object")
    missing = [k for k in keys if k not in obj]
    if missing:
        _fail(f"manifest {where} lacks {', '.join(missing)}")


def _check_rel_path(p: Any, where: str) -> None:
    if not isinstance(p, str) or not p:
        _fail(f"manifest {where}.model must be a path string")
    pp = PurePosixPath(p)
    if pp.is_absolute() or ".." in pp.parts or "\\" in p:
        _fail(f"manifest {where}.model must be a path inside the bundle, got {p!r}")


def _check_mask(mask: Any, shape: tuple[int, int] | None, where: str) -> tuple[int, int]:
    ok = isinstance(mask, list) and mask and all(isinstance(r, list) and r for r in mask)
    ok = ok and all(v in (0, 1) for r in mask for v in r) and len({len(r) for r in mask}) == 1
    if not ok:
        _fail(f"manifest {where}.mask must be a depth x heads list of 0/1")
    s = (len(mask), len(mask[0]))
    if shape is not None and s != shape:
        _fail(f"manifest {where}.mask is {s[0]} x {s[1]}, the full model's is {shape[0]} x {shape[1]}")
    return s


def validate_manifest(m: Any) -> dict:
    """Check the manifest's structure and internal consistency; returns it unchanged or raises BundleError."""
    _need(m, _TOP_KEYS, "(top level)")
    if m["schema_version"] != SCHEMA_VERSION:
        _fail(f"manifest schema_version {m['schema_version']!r} is not supported (expected {SCHEMA_VERSION})")
    _need(m["input"], _INPUT_KEYS, "input")
    classes = m["classes"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        _fail("manifest classes must be a non-empty list of names")
    models = m["models"]
    if not isinstance(models, dict) or not models:
        _fail("manifest models must be a non-empty object")
    for path, entry in models.items():
        _check_rel_path(path, f"models[{path!r}]")
        _need(entry, _MODEL_KEYS, f"models[{path!r}]")
    _need(m["full"], _FULL_KEYS, "full")
    shape = _check_mask(m["full"]["mask"], None, "full")
    entries = [("full", m["full"])]
    if not isinstance(m["routes"], dict):
        _fail("manifest routes must be an object keyed by hint name")
    for name, r in m["routes"].items():
        _need(r, _ROUTE_KEYS, f"routes[{name!r}]")
        if not isinstance(r["classes"], list) or not all(
                isinstance(c, int) and 0 <= c < len(classes) for c in r["classes"]):
            _fail(f"manifest routes[{name!r}].classes must be class indices below {len(classes)}")
        entries.append((f"routes[{name!r}]", r))
    for where, e in entries:
        _check_rel_path(e["model"], where)
        _check_mask(e["mask"], shape, where)
        if e["model"] not in models:
            _fail(f"manifest {where}.model {e['model']!r} is not listed under models")
        if e["sha256"] != models[e["model"]]["sha256"]:
            _fail(f"manifest {where}.sha256 differs from models[{e['model']!r}].sha256")
        if e["mask"] != models[e["model"]]["mask"]:
            _fail(f"manifest {where}.mask differs from the mask of {e['model']}")
        if not isinstance(e["flops_rel"], (int, float)) or not 0 < e["flops_rel"] <= 1 + 1e-9:
            _fail(f"manifest {where}.flops_rel must be in (0, 1]")
    _need(m["samples"], ("file", "inputs", "logits"), "samples")
    return m


def load_manifest(bundle_dir: str | Path) -> dict:
    """Read and validate BUNDLE/manifest.json (no model file is opened)."""
    bundle_dir = Path(bundle_dir).expanduser()
    path = bundle_dir / MANIFEST
    if not path.is_file():
        _fail(f"{bundle_dir} is not a bundle: {MANIFEST} not found")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        _fail(f"{path} is not valid JSON: {e}")
    return validate_manifest(m)


def model_paths(manifest: dict) -> list[str]:
    """Distinct model files, full model first."""
    return [manifest["full"]["model"]] + [p for p in manifest["models"] if p != manifest["full"]["model"]]


def verify_bundle(bundle_dir: str | Path, tol: float = VERIFY_TOL, log=None) -> dict:
    """Re-check every file's sha256, load every model in ONNX Runtime and re-run parity on the stored samples.

    Returns {"models": {path: {"max_abs": float, "outputs": int}}, "ok": True}; raises BundleError on any mismatch.
    """
    bundle_dir = Path(bundle_dir).expanduser()
    m = load_manifest(bundle_dir)
    samples_path = bundle_dir / m["samples"]["file"]
    if not samples_path.is_file():
        _fail(f"manifest points to a missing samples file: {m['samples']['file']}")
    if "sha256" in m["samples"] and sha256_file(samples_path) != m["samples"]["sha256"]:
        _fail(f"{m['samples']['file']}: sha256 mismatch (file changed or corrupt)")
    try:
        with np.load(samples_path, allow_pickle=False) as z:
            samples = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - any unreadable npz is a corrupt bundle
        _fail(f"cannot read {m['samples']['file']}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    if m["samples"]["inputs"] not in samples:
        _fail(f"{m['samples']['file']} lacks the inputs array {m['samples']['inputs']!r}")
    x = samples[m["samples"]["inputs"]]
    name_in, name_out = m["input"]["input_name"], m["input"]["output_name"]
    report = {}
    for rel in model_paths(m):
        path = bundle_dir / rel
        if not path.is_file():
            _fail(f"manifest points to a missing model file: {rel}")
        digest = sha256_file(path)
        if digest != m["models"][rel]["sha256"]:
            _fail(f"{rel}: sha256 mismatch (file changed or corrupt): expected {m['models'][rel]['sha256'][:12]}..., "
                  f"found {digest[:12]}...")
        half = m["models"][rel].get("fp16")
        if half:  # optional float16 copy: its checksum is checked, its parity was measured at export
            _check_rel_path(half.get("model"), f"models[{rel!r}].fp16")
            hp = bundle_dir / half["model"]
            if not hp.is_file():
                _fail(f"manifest points to a missing model file: {half['model']}")
            if sha256_file(hp) != half["sha256"]:
                _fail(f"{half['model']}: sha256 mismatch (file changed or corrupt)")
        try:
            sess = ort_session(path, threads=1)
        except Exception as e:  # noqa: BLE001 - ORT raises several types for bad models
            _fail(f"{rel}: ONNX Runtime cannot load it: {str(e).splitlines()[0][:200]}")
        if [i.name for i in sess.get_inputs()] != [name_in] or name_out not in [o.name for o in sess.get_outputs()]:
            _fail(f"{rel}: expected input {name_in!r} and output {name_out!r}")
        key = m["samples"]["logits"].get(rel)
        if key is None or key not in samples:
            _fail(f"{m['samples']['file']} has no expected logits for {rel}")
        got = sess.run([name_out], {name_in: x})[0]
        diff = max_abs_diff(got, samples[key])
        if got.shape[-1] != len(m["classes"]):
            _fail(f"{rel}: outputs {got.shape[-1]} logits but the manifest lists {len(m['classes'])} classes")
        if not diff <= tol:
            _fail(f"{rel}: logits differ from the stored samples by {diff:.3g} (> {tol:g})")
        report[rel] = {"max_abs": diff, "outputs": int(got.shape[-1])}
        if log:
            log(f"ok  {rel}  sha256 {digest[:12]}  max |diff| {diff:.2e} on {len(x)} samples")
    return {"models": report, "ok": True}

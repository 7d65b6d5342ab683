"""The bundle manifest: schema checks and `verify_bundle`, torch-free (json, hashlib, numpy, onnxruntime only).

The service imports this module to load a bundle, so it must never import torch. Every failure is a `BundleError`
(a `UserError`) with a one-line message naming the file or key that is wrong.

Schema 2 adds each route's acceptance rule, chosen at export on the validation split (export/acceptance.py):
`routes[name].acceptance` = {served, reason, kind, rule: {min_prob, min_margin, top1_in_route[, min_route_prob]}, val: {n, acc,
full_acc, fallback, off_route, cost}}, and a top-level `acceptance` = {split, eps, n}. A schema-1 bundle has
neither: the service applies one global rule to every route of it.

    BUNDLE/manifest.json      schema_version 2 (1 still loads); model paths relative to BUNDLE
    BUNDLE/models/*.onnx      one file per distinct head mask, plus models/full.onnx
    BUNDLE/samples.npz        preprocessed sample inputs + the PyTorch logits each model must reproduce
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from steerprune.errors import UserError

from .runtime import ort_session

__all__ = [
    "SCHEMA_VERSION", "INPUT_NAME", "OUTPUT_NAME", "MANIFEST", "SAMPLES_FILE", "VERIFY_TOL", "BundleError",
    "SUPPORTED_SCHEMAS", "sha256_file", "max_abs_diff", "load_manifest", "validate_manifest", "verify_bundle",
    "verify_files", "check_parity", "open_session", "parity_line",
    "model_paths",
]

SCHEMA_VERSION = 2
SUPPORTED_SCHEMAS = (1, 2)  # 1: no per-route acceptance rules (the service's global min_prob applies)
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


def _number(v: Any, lo: float, hi: float) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v <= hi


def _check_acceptance(a: Any, where: str) -> None:
    _need(a, ("served", "reason", "kind", "rule", "val"), where)
    if not isinstance(a["served"], bool):
        _fail(f"manifest {where}.served must be true or false")
    if not a["served"] and not (isinstance(a["reason"], str) and a["reason"]):
        _fail(f"manifest {where}.reason must say why the route is not served")
    _need(a["rule"], ("min_prob", "min_margin"), f"{where}.rule")
    for k in ("min_prob", "min_margin", "min_route_prob"):
        if k in a["rule"] and not _number(a["rule"][k], 0.0, 1.0 + 1e-6):  # just above 1: a rule accepting nothing
            _fail(f"manifest {where}.rule.{k} must be a number in [0, 1]")
    if a["rule"].get("top1_in_route", True) is not ("min_route_prob" not in a["rule"]):
        _fail(f"manifest {where}.rule: top1_in_route must be false exactly when min_route_prob is given")
    _need(a["val"], ("n", "acc", "full_acc", "fallback", "cost"), f"{where}.val")
    for k in ("acc", "full_acc", "fallback"):
        if not _number(a["val"][k], 0.0, 1.0):
            _fail(f"manifest {where}.val.{k} must be a number in [0, 1]")
    if not _number(a["val"]["cost"], 0.0, 2.0 + 1e-9):
        _fail(f"manifest {where}.val.cost must be a number in [0, 2]")


def validate_manifest(m: Any) -> dict:
    """Check the manifest's structure and internal consistency; returns it unchanged or raises BundleError."""
    _need(m, _TOP_KEYS, "(top level)")
    if m["schema_version"] not in SUPPORTED_SCHEMAS:
        _fail(f"manifest schema_version {m['schema_version']!r} is not supported (expected one of "
              f"{', '.join(map(str, SUPPORTED_SCHEMAS))})")
    if m["schema_version"] >= 2:
        _need(m, ("acceptance",), "(top level)")
        _need(m["acceptance"], ("split", "eps", "n"), "acceptance")
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
        if m["schema_version"] >= 2:
            _check_acceptance(r.get("acceptance"), f"routes[{name!r}].acceptance")
        entries.append((f"routes[{name!r}]", r))
    if m.get("shared") is not None:  # optional: the shared model and its rule per route (export --shared)
        sh = m["shared"]
        _need(sh, ("model", "sha256", "mask", "flops_rel", "routes"), "shared")
        if not isinstance(sh["routes"], dict) or set(sh["routes"]) - set(m["routes"]):
            _fail("manifest shared.routes must be an object keyed by route names of the manifest")
        for name, a in sh["routes"].items():
            _check_acceptance(a, f"shared.routes[{name!r}]")
        entries.append(("shared", sh))
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


def verify_files(bundle_dir: str | Path) -> tuple[dict, dict[str, np.ndarray], dict[str, str]]:
    """Re-check the sha256 of the samples file and of every model file (and its fp16 copy) against the manifest.

    Returns (manifest, samples {array name: array}, {model path: sha256}); raises BundleError on any mismatch.
    Opens no model in ONNX Runtime: `check_parity` does that on sessions the caller chooses.
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
    digests = {}
    for rel in model_paths(m):
        path = bundle_dir / rel
        if not path.is_file():
            _fail(f"manifest points to a missing model file: {rel}")
        digests[rel] = digest = sha256_file(path)
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
    return m, samples, digests


def check_parity(manifest: dict, samples: dict[str, np.ndarray], rel: str, sess, tol: float = VERIFY_TOL) -> dict:
    """Run one loaded session on the stored sample inputs and compare with the logits export stored for `rel`.

    Returns {"max_abs": float, "outputs": int}; raises BundleError on wrong input/output names, a wrong number of
    classes or logits further than `tol` from the stored ones.
    """
    m = manifest
    name_in, name_out = m["input"]["input_name"], m["input"]["output_name"]
    if [i.name for i in sess.get_inputs()] != [name_in] or name_out not in [o.name for o in sess.get_outputs()]:
        _fail(f"{rel}: expected input {name_in!r} and output {name_out!r}")
    key = m["samples"]["logits"].get(rel)
    if key is None or key not in samples:
        _fail(f"{m['samples']['file']} has no expected logits for {rel}")
    got = sess.run([name_out], {name_in: samples[m["samples"]["inputs"]]})[0]
    if got.shape[-1] != len(m["classes"]):
        _fail(f"{rel}: outputs {got.shape[-1]} logits but the manifest lists {len(m['classes'])} classes")
    diff = max_abs_diff(got, samples[key])
    if not diff <= tol:
        _fail(f"{rel}: logits differ from the stored samples by {diff:.3g} (> {tol:g})")
    return {"max_abs": diff, "outputs": int(got.shape[-1])}


def open_session(bundle_dir: str | Path, rel: str, **kwargs):
    """ort_session for one of the bundle's models; a model ONNX Runtime cannot load is a BundleError."""
    try:
        return ort_session(Path(bundle_dir).expanduser() / rel, **kwargs)
    except Exception as e:  # noqa: BLE001 - ORT raises several types for bad models
        _fail(f"{rel}: ONNX Runtime cannot load it: {str(e).splitlines()[0][:200]}")


def parity_line(rel: str, digest: str, parity: dict, n: int) -> str:
    """The log line of one model that passed: its checksum prefix and its parity on the n stored samples."""
    return f"ok  {rel}  sha256 {digest[:12]}  max |diff| {parity['max_abs']:.2e} on {n} samples"


def verify_bundle(bundle_dir: str | Path, tol: float = VERIFY_TOL, log=None) -> dict:
    """Re-check every file's sha256, load every model in ONNX Runtime and re-run parity on the stored samples.

    Returns {"models": {path: {"max_abs": float, "outputs": int}}, "ok": True}; raises BundleError on any mismatch.
    """
    m, samples, digests = verify_files(bundle_dir)
    n = len(samples[m["samples"]["inputs"]])
    report = {}
    for rel in model_paths(m):
        report[rel] = check_parity(m, samples, rel, open_session(bundle_dir, rel, threads=1), tol)
        if log:
            log(parity_line(rel, digests[rel], report[rel], n))
    return {"models": report, "ok": True}

"""`steerprune export`: per-route pruned ViTs as verified single-file ONNX models in a self-describing bundle.

Routes come from the steering report (RUN/steering/report.json) or a user masks file. Routes with identical masks
share one model; a route whose mask keeps every head points to the full model. Every model is checked three ways
before it is listed: the pruned PyTorch model equals the gated model with that mask (1e-5), `onnx.checker` with
full_check passes, and ONNX Runtime matches the gated PyTorch model at batch 1, 3 and 8 (1e-4). The bundle stores
sample inputs and the expected logits so `steerprune bundle verify` can repeat the check without torch.
"""
from __future__ import annotations

import copy
import datetime as _dt
import json
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from steerprune.errors import UserError

from .acceptance import EPS, WRONG_EPS, choose_rule
from .manifest import (INPUT_NAME, MANIFEST, OUTPUT_NAME, SAMPLES_FILE, SCHEMA_VERSION, max_abs_diff, sha256_file,
                       validate_manifest, verify_bundle)
from .runtime import ort_session
from .onnx_export import PARITY_TOL, MaskedLogits, check_onnx, export_onnx, torch_logits
from .prune import (check_mask, check_units, count_params, kept_heads, manual_attention, mask_key, mask_mlp_units,
                    mlp_kept, prune_vit)

__all__ = ["ExportRoute", "PRUNE_TOL", "N_SAMPLES", "SHARED_AUTO_ROUTES", "SHARED_CHOICES", "read_routes", "shared_mask",
           "export_bundle", "write_triton_layout"]

PRUNE_TOL = 1e-5  # pruned PyTorch model vs gated model with the same mask
N_SAMPLES = 8  # test images stored in samples.npz for `bundle verify`
N_WRONG = 1000  # most validation images of other classes a route's rule is checked on with its hint (seeded draw)
FULL_FILE = "models/full.onnx"
# --shared auto adds the shared model from this many routes on: a server batch then spans about as many route models
# as it has requests, and runs of one request each cost more than rows of one batch (docs/cost.md)
SHARED_AUTO_ROUTES = 20
SHARED_CHOICES = ("auto", "global", "units", "none")


class ExportRoute(dict):
    """One hint name's route as export reads it: name, classes, mask (depth x H), acc, off_route_acc (None when not
    known)."""


def _routes_from_report(path: Path) -> list[ExportRoute]:
    from steerprune.training.run import read_json

    rep = read_json(path)
    if not isinstance(rep, dict) or not isinstance(rep.get("routes"), list):
        raise UserError(f"{path} has no 'routes' list (expected the steering report schema)")
    out = []
    for i, r in enumerate(rep["routes"]):
        if not isinstance(r, dict) or not {"name", "classes", "mask"} <= set(r):
            raise UserError(f"{path}: routes[{i}] needs name, classes and mask")
        out.append(ExportRoute(name=str(r["name"]), classes=r["classes"], mask=r["mask"], acc=r.get("acc"),
                         off_route_acc=r.get("off_route_acc")))
    return out


def _routes_from_masks(path: Path) -> list[ExportRoute]:
    from steerprune.training.run import read_json

    d = read_json(path)
    if not isinstance(d, dict) or not d:
        raise UserError(f"{path} must be a JSON object {{route name: {{\"classes\": [...], \"mask\": [[0/1...]]}}}}")
    out = []
    for name, r in d.items():
        if not isinstance(r, dict) or not {"classes", "mask"} <= set(r):
            raise UserError(f"{path}: route {name!r} needs 'classes' and 'mask'")
        out.append(ExportRoute(name=str(name), classes=r["classes"], mask=r["mask"], acc=None, off_route_acc=None))
    return out


def shared_mask(source: str, n_routes: int, shared: str, depth: int, H: int, units_path=None,
                vit=None) -> Optional[tuple[list, Optional[list], dict]]:
    """The shared model for `export --shared` as (head mask, MLP units or None, where it came from), or None.

    'global' (and 'auto' when the report has one and there are at least SHARED_AUTO_ROUTES routes): the steering
    report's global mask (one static mask for every class at the steered routes' mean head usage, chosen on val),
    heads only. 'units': the single global model of the `--units` file (`steerprune units` without --no-global): its
    head mask and the unit cut whose FLOPs are closest to the routes' mean (`global.matched_heads_mlp`), so the
    model that answers scattered hints is pruned as deeply as the routes are."""
    from steerprune.training.run import read_json

    if shared not in SHARED_CHOICES:
        raise UserError(f"--shared must be one of {', '.join(SHARED_CHOICES)}, got {shared!r}")
    if shared == "none" or (shared == "auto" and n_routes < SHARED_AUTO_ROUTES):
        return None
    if shared == "units":
        if units_path is None:
            raise UserError("--shared units needs --units FILE (a `steerprune units` file with its global model)")
        g = read_json(Path(units_path)).get("global")
        if not isinstance(g, dict) or not isinstance(g.get("matched_heads_mlp"), dict) or "mask" not in g:
            raise UserError(f"--shared units: {units_path} has no global model (run `steerprune units` without "
                            f"--no-global, or `steerprune units RUN --merge DIR` on its folder)")
        m = g["matched_heads_mlp"]
        try:
            mask, units = check_mask(g["mask"], depth, H), check_units(m.get("mlp_units"), vit)
        except UserError as e:
            raise UserError(f"--shared units: {units_path}: global model: {e}") from None
        return mask, units, {"from": f"units:{units_path} global model (matched_heads_mlp)",
                             "ranking": f"{m.get('scheme')} cut {m.get('cut')}", "val_acc": m.get("val_acc")}
    kind, _, path = source.partition(":")
    sets = (read_json(Path(path)).get("global_mask") or {}).get("route_sets") or {} if kind == "report" else {}
    chosen = sets.get("steered") or next(iter(sets.values()), None)
    if not chosen or not chosen.get("global_masks"):
        if shared == "global":
            raise UserError(f"--shared global needs a steering report with a global mask (`steerprune steer RUN "
                            f"--baseline-only` adds one); {source} has none")
        return None
    g = chosen["global_masks"][0]  # the kept-head count rounded up from the routes' mean usage
    mask = check_mask(g["mask"], depth, H)
    return mask, None, {"from": f"{source} global_mask ({'steered' if 'steered' in sets else next(iter(sets))} routes)",
                        "ranking": g.get("ranking"), "val_acc": g.get("val_acc")}


def read_routes(run, report_path: Optional[Path] = None, masks_path: Optional[Path] = None) -> tuple[list[ExportRoute], str]:
    """The routes to export and where they came from; masks are checked against the run's backbone."""
    if report_path is not None and masks_path is not None:
        raise UserError("give either --report or --masks, not both")
    if masks_path is not None:
        routes, source = _routes_from_masks(Path(masks_path)), f"masks:{masks_path}"
    else:
        report_path = Path(report_path) if report_path is not None else run.path / "steering" / "report.json"
        if not report_path.is_file():
            raise UserError(f"no steering report at {report_path}: run the steering stage first or pass --masks FILE")
        routes, source = _routes_from_report(report_path), f"report:{report_path}"
    if not routes:
        raise UserError(f"{source.split(':', 1)[1]} lists no routes")
    depth, H, C = len(run.vit.blocks), run.vit.blocks[0].attn.num_heads, run.backbone.num_classes
    seen = set()
    for r in routes:
        if r["name"] in seen:
            raise UserError(f"route name {r['name']!r} appears twice")
        seen.add(r["name"])
        try:
            r["mask"] = check_mask(r["mask"], depth, H)
        except UserError as e:
            raise UserError(f"route {r['name']!r}: {e}") from None
        if not isinstance(r["classes"], list) or not all(isinstance(c, int) and 0 <= c < C for c in r["classes"]):
            raise UserError(f"route {r['name']!r}: classes must be a list of class indices below {C}")
    return routes, source


def _ort_predict(sess, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    out = [sess.run([OUTPUT_NAME], {INPUT_NAME: x[i:i + batch_size].numpy()})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def write_triton_layout(out_dir: Path, manifest: dict) -> Path:
    """A Triton-style repository: triton/<model>/config.pbtxt + triton/<model>/1/model.onnx (a copy)."""
    root = out_dir / "triton"
    inp = manifest["input"]
    for rel in manifest["models"]:
        name = Path(rel).stem
        (root / name / "1").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out_dir / rel, root / name / "1" / "model.onnx")
        (root / name / "config.pbtxt").write_text(
            f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 64\n'
            f'input [\n  {{\n    name: "{inp["input_name"]}"\n    data_type: TYPE_FP32\n'
            f'    dims: [ {inp["channels"]}, {inp["img_size"]}, {inp["img_size"]} ]\n  }}\n]\n'
            f'output [\n  {{\n    name: "{inp["output_name"]}"\n    data_type: TYPE_FP32\n'
            f'    dims: [ {len(manifest["classes"])} ]\n  }}\n]\n'
            'dynamic_batching { }\n')
    return root


def _prepare_out(out_dir: Path) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (out_dir / MANIFEST).is_file():
            raise UserError(f"{out_dir} exists and is not a bundle: choose an empty or new --out directory")
        for sub in ("models", "triton"):  # a re-export replaces the previous bundle's files
            shutil.rmtree(out_dir / sub, ignore_errors=True)
        for f in (MANIFEST, SAMPLES_FILE):
            (out_dir / f).unlink(missing_ok=True)
    (out_dir / "models").mkdir(parents=True, exist_ok=True)


FP16_TOL = 5e-2  # float16 logits vs the float32 PyTorch reference


def _export_fp16(model: torch.nn.Module, ref: torch.nn.Module, path: Path, bcfg) -> dict:
    """A .half() copy of `model` (float32 in/out, float16 inside) for GPU serving, checked against the float32
    reference with ONNX Runtime (its CPU provider runs these graphs; GPU numbers are for whoever serves them)."""
    half = copy.deepcopy(model).half()
    export_onnx(_Fp16Wrapper(half), path, bcfg.in_chans, bcfg.img_size)
    parity = check_onnx(path, ref, bcfg.in_chans, bcfg.img_size, tol=FP16_TOL)
    if not parity.ok:
        raise RuntimeError(f"{path.name}: float16 logits differ by {max(parity.max_abs.values()):.3g} (> {FP16_TOL})")
    return {"model": path.relative_to(path.parents[1]).as_posix(), "sha256": sha256_file(path), "dtype": "float16",
            "parity": parity.max_abs, "parity_tol": FP16_TOL}


class _Fp16Wrapper(torch.nn.Module):
    """float32 images in, float32 logits out, float16 inside: the bundle's input contract stays the same."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.half()).float()


def export_bundle(run_dir, out_dir, report_path=None, masks_path=None, fp16: bool = False, layout: Optional[str] = None,
                  log=print, eps: float = EPS, cost_batch: Optional[int] = 16, units_path=None,
                  wrong_eps: float = WRONG_EPS, shared: str = "auto", recover=None) -> dict:
    """Export the full model and one pruned model per distinct route mask into out_dir; returns the manifest.

    Each route's acceptance rule is chosen on the run's validation split (`eps`: allowed accuracy loss against the
    full model on the route's images, `wrong_eps` on images of other classes sent with its hint; fractions); with `cost_batch`, the offline cost per hinted request is then timed on the test split
    at that batch size and recorded under "cost" (None: not timed). `units_path`: a `steerprune units` file whose
    MLP hidden units are removed too from the routes it lists (None: heads only). `shared` (auto | global | none,
    see `shared_mask`): also export one pruned model for every class, with an acceptance rule per route chosen on
    validation exactly as the route's own, which the service's batch plan answers scattered hints with.
    `recover` (a `RecoverConfig`, export/recover.py; epochs 0: off; None: as the `units_path` file's cuts were
    chosen, else off): after the slicing check, each pruned model is trained briefly on train images of its routes'
    classes against the full model, and exported, checked for parity and given its acceptance rules as recovered.
    """
    from steerprune.steering.masks import head_usage
    from steerprune.steering.units import apply_units
    from steerprune.training.model import GatedViT, head_flops
    from steerprune.training.run import load_run, read_json, versions, write_json
    from steerprune.training.tensors import ImageTensors

    if layout not in (None, "triton"):
        raise UserError(f"unknown layout {layout!r}: use 'triton' or leave it out")
    run = load_run(run_dir, need=("backbone",))
    routes, source = read_routes(run, report_path, masks_path)
    units_source = apply_units(run, routes, units_path, log)  # sets r["mlp_units"] (None: heads only)
    recover, recover_from = _recovery_setting(units_path, recover, log)
    bcfg, vit = run.backbone, run.vit.eval()
    gated = GatedViT(vit).eval()  # static masks only: the policy plays no part in a route's model
    gated_layers = list(run.policy.cfg.gated_layers) if run.policy is not None else []
    depth, H = len(vit.blocks), vit.blocks[0].attn.num_heads
    picked = shared_mask(source, len(routes), shared, depth, H, units_path, vit)  # refused before any work
    out_dir = Path(out_dir).expanduser()
    _prepare_out(out_dir)
    torch.manual_seed(0)

    data = run.load_data()
    test_x = ImageTensors(data.test.images, bcfg)  # (N, C, S, S) as the server feeds it, converted when indexed
    pick = np.linspace(0, len(test_x) - 1, num=min(N_SAMPLES, len(test_x))).round().astype(int)
    samples = {"inputs": test_x[pick].numpy().astype(np.float32)}
    sample_keys = {}

    # one entry per distinct mask, full model first (a route keeping every head shares the full model)
    full_mask = [[1] * H for _ in range(depth)]
    distinct: dict[str, dict] = {mask_key(full_mask): {"mask": full_mask, "file": FULL_FILE, "routes": []}}
    for r in routes:
        key = mask_key(r["mask"], r["mlp_units"])
        name = f"heads_{key}" if r["mlp_units"] is None else f"heads_mlp_{key}"  # the key covers heads and units
        distinct.setdefault(key, {"mask": r["mask"], "units": r["mlp_units"], "file": f"models/{name}.onnx", "routes": []})
        distinct[key]["routes"].append(r["name"])
    shared_file, shared_from = None, None
    if picked is not None:
        key = mask_key(picked[0], picked[1])
        name = f"heads_{key}" if picked[1] is None else f"heads_mlp_{key}"
        distinct.setdefault(key, {"mask": picked[0], "units": picked[1], "file": f"models/{name}.onnx", "routes": []})
        if distinct[key]["file"] != FULL_FILE:  # a global mask keeping every head would only be the full model again
            shared_file, shared_from = distinct[key]["file"], picked[2]

    models, sessions = {}, {}
    for i, (key, d) in enumerate(distinct.items()):
        mask, rel, units = d["mask"], d["file"], d.get("units")
        is_full = rel == FULL_FILE
        ref_gated = gated if units is None else GatedViT(mask_mlp_units(vit, units)).eval()  # units zeroed, not removed
        ref = manual_attention(copy.deepcopy(vit)).eval() if is_full else MaskedLogits(ref_gated, mask).eval()
        model = ref if is_full else manual_attention(prune_vit(vit, mask, units))
        # slicing check on real and random inputs before anything is written
        probe = torch.cat([test_x[pick], torch.randn(3, *test_x.shape[1:])])
        with torch.no_grad():
            diff = max_abs_diff(model(probe).numpy(), ref_gated(probe, head_mask=torch.tensor(mask, dtype=torch.float32)).logits.numpy())
        if diff > PRUNE_TOL:
            raise RuntimeError(f"pruned model for mask {key} differs from the gated model by {diff:.3g} (> {PRUNE_TOL})")
        recovery = None
        if recover is not None and recover.epochs and not is_full:
            recovery = _recover(model, vit, data, bcfg, routes, d, recover, every_class=rel == shared_file)
            ref = model  # what ONNX must now reproduce is the recovered model
            log(f"{rel}: recovered on {recovery['images']} train images ({recovery['own']} of its classes), "
                f"loss {recovery['loss_before']:.3f} -> {recovery['loss_after']:.3f}, {recovery['seconds']:.0f} s")
        path = export_onnx(model, out_dir / rel, bcfg.in_chans, bcfg.img_size)
        parity = check_onnx(path, ref, bcfg.in_chans, bcfg.img_size)
        if not parity.ok:
            raise RuntimeError(f"{rel}: ONNX Runtime differs from PyTorch by {max(parity.max_abs.values()):.3g} "
                               f"(> {PARITY_TOL}) at batch sizes {parity.max_abs}")
        sample_keys[rel] = f"logits_{i}"
        samples[f"logits_{i}"] = torch_logits(ref, samples["inputs"])
        flops = head_flops(vit, mask, units)
        models[rel] = {
            "sha256": sha256_file(path), "mask": mask, "kept_heads": kept_heads(mask),
            "head_usage": 1.0 if is_full else head_usage(mask, gated_layers or list(range(depth))), "flops_rel": flops["rel"],
            "macs": flops["macs"], "params": count_params(model),
            "parity": parity.max_abs, "prune_max_abs": diff, "routes": d["routes"], "bytes": path.stat().st_size,
            "mlp_kept": mlp_kept(vit, units), "mlp_units": units, "recovery": recovery,
        }
        if fp16:
            models[rel]["fp16"] = _export_fp16(model, ref, out_dir / rel.replace(".onnx", ".fp16.onnx"), bcfg)
        sessions[rel] = ort_session(path)
        log(f"{rel}: {sum(map(sum, mask))}/{depth * H} heads, FLOPs {flops['rel']:.3f} of full, "
            f"parity {max(parity.max_abs.values()):.1e}, routes "
            f"{d['routes'] or ['(shared)' if rel == shared_file else '(full)']}")

    # accuracy with ONNX Runtime on the run's test split: the full model everywhere, each route on its classes
    labels = data.test.labels
    preds = {}
    for rel, sess in sessions.items():  # a pruned model only on its routes' classes: all that route_entry reads
        own = np.ones(len(labels), bool) if rel == FULL_FILE else np.isin(labels, sorted(
            {c for r in routes if distinct[mask_key(r["mask"], r["mlp_units"])]["file"] == rel for c in r["classes"]}))
        preds[rel] = np.full(len(labels), -1)
        if own.any():
            preds[rel][own] = _ort_predict(sess, test_x[np.flatnonzero(own)]).argmax(1)
    full_acc = float((preds[FULL_FILE] == labels).mean())
    val_x = ImageTensors(data.val.images, bcfg)
    val_full_pred = _ort_predict(sessions[FULL_FILE], val_x).argmax(1)  # one full-model pass for both searches
    choices = _choose_acceptance(routes, distinct, models, sessions, val_x, data.val.labels, val_full_pred, eps,
                                 wrong_eps, log)
    shared_entry = None
    if shared_file is not None:  # every route's rule again, for the shared model's answers to its hints
        twins = [ExportRoute({**r, "mask": picked[0], "mlp_units": picked[1]}) for r in routes]
        sm = models[shared_file]
        shared_entry = {
            "model": shared_file, "sha256": sm["sha256"], "mask": sm["mask"], "kept_heads": sm["kept_heads"],
            "head_usage": sm["head_usage"], "flops_rel": sm["flops_rel"], "mlp_kept": sm["mlp_kept"],
            "source": shared_from,
            "routes": _choose_acceptance(twins, distinct, models, sessions, val_x, data.val.labels, val_full_pred,
                                         eps, wrong_eps, lambda line: log("shared model, " + line))}
        log(f"shared model {shared_file}: FLOPs {sm['flops_rel']:.3f} of full, served for "
            f"{sum(a['served'] for a in shared_entry['routes'].values())} of {len(routes)} routes")

    def route_entry(r: ExportRoute) -> dict:
        rel = distinct[mask_key(r["mask"], r["mlp_units"])]["file"]
        m = models[rel]
        on = np.isin(labels, r["classes"])
        return {
            "classes": r["classes"], "model": rel, "sha256": m["sha256"], "mask": m["mask"],
            "kept_heads": m["kept_heads"], "head_usage": m["head_usage"], "flops_rel": m["flops_rel"],
            "mlp_kept": m["mlp_kept"],
            "params": m["params"], "acc": r["acc"], "off_route_acc": r["off_route_acc"],
            # measured here with ONNX Runtime on the route's classes of the test split, for the record
            "onnx_acc": float((preds[rel][on] == labels[on]).mean()) if on.any() else None,
            "full_onnx_acc": float((preds[FULL_FILE][on] == labels[on]).mean()) if on.any() else None,
            "n_test": int(on.sum()),
            "acceptance": choices[r["name"]],
        }

    fm = models[FULL_FILE]
    np.savez(out_dir / SAMPLES_FILE, **samples)
    policy_cfg = read_json(run.path / "policy.json") if (run.path / "policy.json").is_file() else None
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "run": {"path": str(run.path.resolve()), "backbone": read_json(run.path / "backbone.json"),
                "policy": policy_cfg, "data_spec": bcfg.data_spec, "routes_source": source,
                "units_source": units_source},
        "input": {**bcfg.preprocessing(), "input_name": INPUT_NAME, "output_name": OUTPUT_NAME},
        "classes": list(bcfg.class_names), "groups": dict(bcfg.groups),
        "full": {"model": FULL_FILE, "sha256": fm["sha256"], "mask": fm["mask"], "kept_heads": fm["kept_heads"],
                 "head_usage": 1.0, "flops_rel": 1.0, "params": fm["params"], "acc": full_acc,
                 "n_test": int(len(labels))},
        "routes": {r["name"]: route_entry(r) for r in routes},
        **({"shared": shared_entry} if shared_entry is not None else {}),
        "acceptance": {"split": "val", "eps": float(eps), "wrong_eps": float(wrong_eps), "n": int(len(data.val.labels)),
                       "n_wrong_max": N_WRONG, "cost": "flops_rel + fallback rate (relative to the full model)"},
        "models": models,
        "samples": {"file": SAMPLES_FILE, "inputs": "inputs", "logits": sample_keys, "n": int(len(pick)),
                    "sha256": sha256_file(out_dir / SAMPLES_FILE)},
        "export": {"exporter": "torch.onnx TorchScript (dynamo=False)", "opset": 17, "attention": "manual (fused_attn=False)",
                   "parity_tol": PARITY_TOL, "prune_tol": PRUNE_TOL, "fp16": bool(fp16), "layout": layout,
                   "recover": recover.to_json() if recover is not None and recover.epochs else None,
                   "recover_from": recover_from},
    }
    validate_manifest(json.loads(json.dumps(manifest, default=float)))
    write_json(out_dir / MANIFEST, manifest)
    if layout == "triton":
        write_triton_layout(out_dir, manifest)
    verify_bundle(out_dir)
    log(f"wrote {out_dir}/{MANIFEST}: {len(routes)} routes -> {len(models) - 1} pruned models + full "
        f"(full ONNX test acc {full_acc:.4f}); bundle verified")
    if cost_batch:
        from .cost import cost_lines, offline_cost

        manifest["cost"] = offline_cost(out_dir, test_x, labels, batch_size=cost_batch, log=log)
        write_json(out_dir / MANIFEST, manifest)
        for line in cost_lines(manifest["cost"]):
            log(line)
    return manifest


def _recovery_setting(units_path, recover, log):
    """(the RecoverConfig to use or None, where it came from: 'units' | 'export' | None). Units chosen with recovery
    in the loop were scored as recovered models: unless export is told otherwise it recovers them the same way."""
    from steerprune.steering.units import units_recover_config
    from steerprune.training.run import read_json

    chosen = units_recover_config(read_json(Path(units_path)).get("config") or {}) if units_path else None
    if recover is None:
        if chosen is not None:
            log(f"recovering every pruned model as {units_path} was chosen: {chosen.epochs} epochs, lr {chosen.lr:g}")
        return chosen, "units" if chosen is not None else None
    if chosen is not None and (recover.epochs, recover.lr) != (chosen.epochs, chosen.lr):
        log(f"note: {units_path} chose its cuts for models recovered {chosen.epochs} epochs at lr {chosen.lr:g}; "
            f"exporting with {recover.epochs} epochs at lr {recover.lr:g} as asked")
    return (recover, "export") if recover.epochs else (None, None)


def _recover(model, vit, data, bcfg, routes, d: dict, cfg, every_class: bool = False) -> dict:
    """Recover one pruned model (export/recover.py) on train images of the classes of the routes it serves (every
    class for the shared model, which answers every route's hints, and for a model no route names); returns the
    manifest's record of it."""
    from steerprune.training.tensors import to_tensor

    from .recover import recover_model, recovery_sample

    names = set(d["routes"])
    classes = [] if every_class else sorted({c for r in routes if r["name"] in names for c in r["classes"]})
    classes = classes or list(range(len(bcfg.class_names)))
    labels = data.train.labels
    idx, own = recovery_sample(labels, classes, cfg)
    x = to_tensor(data.train.images[idx], bcfg)  # (N, C, S, S), at most a few thousand images
    y = torch.from_numpy(np.asarray(labels[idx])).long()
    stats = recover_model(model, vit, x, y, cfg, hflip=data.hflip, own=own)
    return {**stats._asdict(), "classes": len(classes)}


def _choose_acceptance(routes, distinct, models, sessions, val_x, val_labels: np.ndarray, full_pred: np.ndarray,
                       eps: float, wrong_eps: float, log) -> dict:
    """Each route's acceptance rule (export/acceptance.py) from ONNX Runtime outputs of its model and the full model
    on the validation images of its classes (right hints) and on up to N_WRONG others (wrong hints); `full_pred`:
    the full model's top-1 on every validation image. Returns {route name: manifest acceptance entry}."""
    from .acceptance import softmax

    rng = np.random.default_rng(0)
    out = {}
    for r in routes:
        rel = distinct[mask_key(r["mask"], r["mlp_units"])]["file"]
        on = np.isin(val_labels, r["classes"])
        right, others = np.flatnonzero(on), np.flatnonzero(~on)
        wrong = np.sort(rng.choice(others, size=min(N_WRONG, len(others)), replace=False))
        idx = np.concatenate([right, wrong])
        probs = softmax(_ort_predict(sessions[rel], val_x[idx])) if len(idx) else np.zeros((0, 1), np.float32)
        pr, pw = probs[:len(right)], probs[len(right):]
        c = choose_rule(pr, full_pred[right], val_labels[right], r["classes"], models[rel]["flops_rel"], eps,
                        wrong=(pw, full_pred[wrong], val_labels[wrong]) if len(wrong) else None, wrong_eps=wrong_eps)
        out[r["name"]] = {"served": c.served, "reason": c.reason, "kind": c.kind, "rule": c.rule.to_json(),
                          "val": {"n": c.n, "acc": c.score.acc, "full_acc": c.full_acc, "fallback": c.score.fallback,
                                  "off_route": c.off_route, "cost": c.score.cost},
                          "val_wrong_hints": None if c.wrong is None else c.wrong._asdict()}
        wr = "" if c.wrong is None else f"; wrong hints acc {c.wrong.acc:.4f} (full {c.wrong.full_acc:.4f})"
        what = (f"accept top-1 in route, p >= {c.rule.min_prob:.3f}, margin >= {c.rule.min_margin:.3f}"
                if c.rule.top1_in_route else f"accept the route's classes at total p >= {c.rule.min_route_prob:.3f}")
        log(f"route {r['name']!r}: " + (
            f"{what}: val acc "
            f"{c.score.acc:.4f} (full {c.full_acc:.4f}), fallback {c.score.fallback:.3f}, expected cost "
            f"{c.score.cost:.3f}{wr}" if c.served else f"NOT SERVED (its hint goes to the full model): {c.reason}"))
    return out

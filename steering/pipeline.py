"""`steerprune steer RUN`: plan routes on val, evaluate them on test, write RUN/steering/{report.json, report.md,
config.json, kept_heads.png, usage_vs_acc.png}; `--baseline-only` adds global_baseline.{json,md} to an existing
report without changing it."""
from __future__ import annotations

import hashlib
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np

from steerprune.errors import UserError
from steerprune.training.run import load_run, read_json, versions, write_json

from .evaluate import evaluate_plans, forwards_on_test
from .spotlight import spotlight
from .global_mask import GlobalMaskConfig, RouteMask, global_baseline, summary_row
from .masks import ValData
from .plan import SteerConfig, load_groups, make_routes, plan_routes
from .render import write_baseline_markdown, write_markdown, write_plots
from .self_reference import self_reference
from .summary import summarize

__all__ = ["steer_run", "baseline_for_report"]

BASELINE_FILE = "global_baseline.json"


def steer_run(run_dir: str | Path, strategy: str = "per-class", groups_path: Optional[str | Path] = None, log=print,
              out_dir: Optional[str | Path] = None, use_groups: bool = False, **options) -> dict:
    """Steer the run's head policy per route and write the report; returns it.

    groups_path: JSON {group: [class names or indices]}; use_groups: route by the dataset's own groups (CIFAR-100
    coarse classes). options: any SteerConfig field (layers, ks, alphas, tau, aggregate, eps, rank, ...)."""
    t0 = time.time()
    run_dir = Path(run_dir).expanduser()
    cfg = SteerConfig(strategy=strategy, **options)
    run = load_run(run_dir, need=("backbone", "policy", "sae"))
    data = run.load_data()
    groups = None
    if groups_path is not None:
        groups = load_groups(groups_path, data.class_names)
    elif use_groups:
        if not data.groups:
            raise UserError(f"{data.spec} defines no class groups: pass --groups FILE")
        groups = data.groups
    routes = make_routes(data.class_names, groups)
    gated = run.policy.cfg.gated_layers
    layers = sorted(cfg.layers) if cfg.layers is not None else sorted(l for l in run.saes if l in gated)
    log(f"steering {run_dir} ({strategy}, {len(routes)} routes, layers {layers}): "
        f"{len(data.val)} val images choose, {len(data.test)} test images report")

    val = ValData(data.val.images, data.val.labels)
    train = ValData(data.train.images, data.train.labels)  # ranks latents (importance); never chooses
    shared: dict = {}  # strategy-independent forwards, computed once for both plannings
    pools = groups if groups is not None else data.groups  # who shares (k, alpha) under choose 'group'
    if cfg.choose == "group" and not pools:
        raise UserError(f"--choose group needs class groups: {data.spec} has none of its own; pass --groups FILE")
    plans = plan_routes(run, val, routes, cfg, log=log, shared=shared, rank_data=train, pools=pools)
    forwards = forwards_on_test(run, data.test)  # kept apart from `shared`: the planner never sees test data
    rows = evaluate_plans(run, plans, data.test, cfg, log=log, forwards=forwards)
    label_free = None
    if cfg.compare_label_free and strategy == "per-class":
        lf_plans = plan_routes(run, val, routes, cfg, strategy="zero-shot", log=log, shared=shared,
                               rank_data=train, pools=pools)
        label_free = evaluate_plans(run, lf_plans, data.test, cfg, log=log, forwards=forwards)
    zero_shot = self_reference(run, data.val, data.test, data.class_names, layers, cfg.ref_ks,
                               val_forward=shared["base"], test_forward=forwards["dynamic"])
    baseline = global_baseline(
        run, val, data.test,
        {"steered": [RouteMask(p.route.name, p.route.classes, p.mask) for p in plans],
         "unsteered": [RouteMask(p.route.name, p.route.classes, p.baseline_mask) for p in plans]},
        GlobalMaskConfig(seed=cfg.seed), log=log, decisions=shared["decisions"], val_eval=shared["evals"])
    summary = summarize(rows, label_free, {k: summary_row(baseline, k) for k in baseline["route_sets"]})
    summary["zero_shot"] = {k: zero_shot[k] for k in ("precision_at_k", "random_precision", "jaccard_at_k",
                                                      "zero_shot_classifier_acc", "reported_layer")}
    config = {**asdict(cfg), "layers_steered": layers, "groups": groups, "groups_path": str(groups_path) if groups_path else None,
              "run": str(run_dir), "selection": "val", "evaluation": "test", "val_images": len(data.val),
              "test_images": len(data.test), "versions": versions()}
    report = {"run": str(run_dir), "strategy": strategy, "gated_layers": gated, "class_names": data.class_names,
              "routes": rows, "summary": summary, "global_mask": baseline, "zero_shot": zero_shot, "config": config}
    if label_free is not None:
        report["label_free_routes"] = [{k: r[k] for k in ("name", "classes", "mask", "head_usage", "acc", "off_route_acc",
                                                          "alpha", "k", "latents", "gated_kept_heads",
                                                          "flops_rel")}
                                       for r in label_free]
    report["spotlight"] = [sp for sp in (spotlight(report, n) for n in cfg.spotlight) if sp is not None]
    report["seconds"] = round(time.time() - t0, 1)

    out = Path(out_dir).expanduser() if out_dir else run_dir / "steering"
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", config)
    write_json(out / "report.json", report)
    write_markdown(out / "report.md", report)
    write_plots(out, report)
    log(f"usage {summary['mean_usage_before']:.3f} -> {summary['mean_usage_after']:.3f} "
        f"({100 * summary['usage_reduction_rel']:.1f}% less), route acc {100 * summary['mean_acc_before']:.1f}% -> "
        f"{100 * summary['mean_acc_after']:.1f}%; wrote {out}/report.md ({report['seconds']:.0f} s)")
    return report


def baseline_for_report(run_dir: str | Path, report_path: Optional[str | Path] = None,
                        out_dir: Optional[str | Path] = None, log=print,
                        route_sets: tuple[str, ...] = ("steered", "unsteered"), **options) -> dict:
    """The global-mask baseline for an existing steering report, written as global_baseline.{json,md} beside it
    (or in out_dir); the report is read, never written. route_sets: compare the global mask with the report's
    steered routes, its unsteered (alpha = 1) routes, or both; options: any GlobalMaskConfig field."""
    t0 = time.time()
    run_dir = Path(run_dir).expanduser()
    report_path = Path(report_path).expanduser() if report_path else run_dir / "steering" / "report.json"
    report = read_json(report_path)
    if not isinstance(report.get("routes"), list) or not report["routes"]:
        raise UserError(f"{report_path} has no 'routes' list (expected a steering report)")
    run = load_run(run_dir, need=("backbone", "policy"))
    data = run.load_data()
    if report.get("class_names") not in (None, data.class_names):
        raise UserError(f"{report_path} was made for classes {report['class_names'][:3]}..., not this run's data")
    if report.get("gated_layers") not in (None, run.policy.cfg.gated_layers):
        raise UserError(f"{report_path} has gated layers {report['gated_layers']}, the run "
                        f"{run.policy.cfg.gated_layers}")
    try:
        cfg = GlobalMaskConfig(**{"seed": report.get("config", {}).get("seed", 0), **options})
    except ValueError as e:
        raise UserError(str(e)) from None
    if not route_sets or any(s not in ("steered", "unsteered") for s in route_sets):
        raise UserError(f"route sets must be among steered, unsteered, got {list(route_sets)}")
    try:
        sets = {"steered": [RouteMask(r["name"], list(r["classes"]), np.asarray(r["mask"])) for r in report["routes"]],
                "unsteered": [RouteMask(r["name"], list(r["classes"]), np.asarray(r["baseline"]["mask"]))
                              for r in report["routes"]]}
        sets = {k: v for k, v in sets.items() if k in route_sets}
    except (KeyError, TypeError) as e:
        raise UserError(f"{report_path}: a route lacks {e} (expected name, classes, mask and baseline.mask)") from None
    log(f"global-mask baseline for {report_path}: {len(report['routes'])} routes, {len(data.val)} val images choose, "
        f"{len(data.test)} test images report")
    baseline = global_baseline(run, ValData(data.val.images, data.val.labels), data.test, sets, cfg, log=log)
    # the same route masks on the same test images: the report's route accuracies must come out again
    diffs = []
    for name, rs in baseline["route_sets"].items():
        per_route = {p["name"]: p["route_acc"] for p in rs["global_masks"][0]["test"]["per_route"]}
        diffs += [abs(per_route[r["name"]] - (r if name == "steered" else r["baseline"])["acc"])
                  for r in report["routes"] if r["name"] in per_route]
    baseline.update({
        "report": str(report_path), "report_sha256": hashlib.sha256(report_path.read_bytes()).hexdigest(),
        "run": str(run_dir), "route_acc_max_abs_diff_vs_report": max(diffs) if diffs else None,
        "summary": {k: summary_row(baseline, k) for k in baseline["route_sets"]},
        "versions": versions(), "seconds": round(time.time() - t0, 1)})
    out = Path(out_dir).expanduser() if out_dir else report_path.parent
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / BASELINE_FILE, baseline)
    write_baseline_markdown(out / "global_baseline.md", baseline, str(report_path))
    log(f"wrote {out / BASELINE_FILE} ({baseline['seconds']:.0f} s)")
    return baseline

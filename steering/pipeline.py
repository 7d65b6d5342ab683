"""`steerprune steer RUN`: plan routes on val, evaluate them on test, write RUN/steering/{report.json, report.md,
config.json, kept_heads.png, usage_vs_acc.png}."""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from steerprune.errors import UserError
from steerprune.training.run import load_run, versions, write_json

from .masks import ValData
from .plan import SteerConfig, load_groups, make_routes, plan_routes
from .report import evaluate_plans, self_reference, forwards_on_test, summarize, targets, write_markdown, write_plots

__all__ = ["steer_run"]


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
    plans = plan_routes(run, val, routes, cfg, log=log, shared=shared, rank_data=train)
    forwards = forwards_on_test(run, data.test)  # kept apart from `shared`: the planner never sees test data
    rows = evaluate_plans(run, plans, data.test, cfg, log=log, forwards=forwards)
    label_free = None
    if cfg.compare_label_free and strategy == "per-class":
        lf_plans = plan_routes(run, val, routes, cfg, strategy="zero-shot", log=log, shared=shared,
                               rank_data=train)
        label_free = evaluate_plans(run, lf_plans, data.test, cfg, log=log, forwards=forwards)
    zero_shot = self_reference(run, data.val, data.test, data.class_names, layers, cfg.ref_ks,
                               val_forward=shared["base"], test_forward=forwards["dynamic"])
    summary = summarize(rows, label_free)
    summary["zero_shot"] = {k: zero_shot[k] for k in ("precision_at_k", "random_precision", "jaccard_at_k",
                                                      "zero_shot_classifier_acc", "reported_layer")}
    config = {**asdict(cfg), "layers_steered": layers, "groups": groups, "groups_path": str(groups_path) if groups_path else None,
              "run": str(run_dir), "selection": "val", "evaluation": "test", "val_images": len(data.val),
              "test_images": len(data.test), "versions": versions()}
    report = {"run": str(run_dir), "strategy": strategy, "gated_layers": gated, "class_names": data.class_names,
              "routes": rows, "summary": summary, "zero_shot": zero_shot, "config": config}
    if label_free is not None:
        report["label_free_routes"] = [{k: r[k] for k in ("name", "classes", "mask", "head_usage", "acc", "off_route_acc",
                                                          "alpha", "k", "latents", "kept_heads", "flops_rel")}
                                       for r in label_free]
    report["targets"] = targets(summary, zero_shot)
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

"""Evaluation of planned routes on the test split: per route, the steered mask beside the full model, the dynamic
policy, the unsteered static mask and the random and threshold controls.

Every figure here is measured on test; nothing here chooses anything (the plans arrive fixed from val).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from steerprune.training.data import Split
from steerprune.training.metrics import accuracy, binomial_ci, mcnemar_p
from steerprune.training.model import head_flops
from steerprune.training.forward import run_model

from .masks import MaskEval, gated_kept_heads, head_usage
from .plan import RoutePlan, SteerConfig

__all__ = ["forwards_on_test", "evaluate_plans"]


def _row(ev: MaskEval, mask: np.ndarray, on: np.ndarray, off: np.ndarray, gated: list[int], vit) -> dict:
    correct = int((ev.preds(mask)[on] == ev.labels[on]).sum())
    lo, hi = binomial_ci(correct, len(on))
    return {"mask": np.asarray(mask).astype(int).tolist(), "head_usage": head_usage(mask, gated),
            "acc": correct / len(on), "acc_ci95": [lo, hi], "off_route_acc": ev.acc(mask, off),
            "flops_rel": head_flops(vit, np.asarray(mask))["rel"], "gated_kept_heads": gated_kept_heads(mask, gated)}


def forwards_on_test(run, test: Split) -> dict:
    """The plan-independent test forwards: full-model predictions and the unsteered dynamic policy (with the
    residuals it read, for the self-reference section). Computed once per report, shared by its evaluations."""
    depth, H = run.model.depth, run.model.num_heads
    return {"full_pred": run_model(run.model, test.images, run.backbone, head_mask=torch.ones(depth, H)).logits.argmax(-1),
            "dynamic": run_model(run.model, test.images, run.backbone, keep_inputs=True)}


def evaluate_plans(run, plans: list[RoutePlan], test: Split, cfg: SteerConfig, log=print,
                   forwards: Optional[dict] = None) -> list[dict]:
    """Per route on test: full model, dynamic policy, unsteered static mask, steered mask, random and threshold
    controls; route accuracy (route's classes), off-route accuracy (every other class), usage, kept heads, FLOPs.
    forwards: `forwards_on_test(run, test)`, when the caller already has them."""
    gated = run.policy.cfg.gated_layers
    forwards = forwards or forwards_on_test(run, test)
    full, dyn = forwards["full_pred"], forwards["dynamic"]
    dyn_pred = dyn.logits.argmax(-1)
    rng = np.random.default_rng(cfg.seed)
    rows = []
    for p in plans:
        on_all = np.flatnonzero(np.isin(test.labels, p.route.classes))
        off_all = np.flatnonzero(~np.isin(test.labels, p.route.classes))
        if len(off_all) > cfg.max_off_route:
            off_all = np.sort(rng.choice(off_all, cfg.max_off_route, replace=False))
        keep = np.concatenate([on_all, off_all])
        ev = MaskEval(run.model, test.images[keep], test.labels[keep], run.backbone)
        on, off = np.arange(len(on_all)), np.arange(len(on_all), len(keep))
        steered = _row(ev, p.mask, on, off, gated, run.vit)
        base = _row(ev, p.baseline_mask, on, off, gated, run.vit)
        pred_s, pred_b, y = ev.preds(p.mask)[on], ev.preds(p.baseline_mask)[on], ev.labels[on]
        fixed, broken = int(((pred_s == y) & (pred_b != y)).sum()), int(((pred_s != y) & (pred_b == y)).sum())
        rows.append({
            "name": p.route.name, "classes": list(p.route.classes), "n": int(len(on)), "n_off_route": int(len(off)),
            **steered, "alpha": p.steering.alpha, "k": p.k, "latents": p.steering.to_json()["latents"],
            "baseline": base,
            "threshold_control": {**_row(ev, p.threshold_mask, on, off, gated, run.vit), **p.threshold_setting},
            "random_control": {**_row(ev, p.random_mask, on, off, gated, run.vit),
                               "latents": p.random_steering.to_json()["latents"]},
            "full": {"acc": accuracy(full[on_all], test.labels[on_all]),
                     "off_route_acc": accuracy(full[off_all], test.labels[off_all]), "head_usage": 1.0},
            "dynamic": {"acc": accuracy(dyn_pred[on_all], test.labels[on_all]),
                        "off_route_acc": accuracy(dyn_pred[off_all], test.labels[off_all]),
                        "head_usage": float(dyn.masks[on_all][:, gated].mean())},
            "paired_vs_baseline": {"fixed": fixed, "broken": broken, "mcnemar_p": mcnemar_p(fixed, broken)},
            "val": p.val,
            # each choice rule's pick for this route, its route accuracy on the same test images
            "choice_rules": {rule: {"k": c.k, "alpha": c.alpha, "head_usage": c.usage, "val_acc": c.val_acc,
                                    "acc": ev.acc(c.mask, on)}
                             for rule, c in p.alternatives.items()},
        })
    return rows

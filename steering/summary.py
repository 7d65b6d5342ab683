"""The report's summary: means over routes of every row (full, dynamic, unsteered, steered, controls, global mask)
and the counts of routes that moved, with their paired tests."""
from __future__ import annotations

from typing import Optional

import numpy as np

__all__ = ["summarize", "val_test_agreement", "choice_rule_summary"]


def summarize(rows: list[dict], label_free: Optional[list[dict]] = None, global_mask: Optional[dict] = None) -> dict:
    """rows: `evaluate_plans` output; label_free: the zero-shot plans' rows; global_mask: `global_mask.summary_row`
    of the steered routes (and, under "unsteered", of the unsteered ones)."""
    mean = lambda key, sub=None: float(np.mean([(r[sub] if sub else r)[key] for r in rows]))  # noqa: E731
    u0, u1 = mean("head_usage", "baseline"), mean("head_usage")
    a0, a1 = mean("acc", "baseline"), mean("acc")
    matched = [r for r in rows if abs(r["threshold_control"]["head_usage"] - r["head_usage"]) < 1e-9]
    up_down = [r for r in rows if r["acc"] > r["baseline"]["acc"] and r["head_usage"] < r["baseline"]["head_usage"]]
    s = {
        "routes": len(rows),
        "mean_usage_before": u0, "mean_usage_after": u1, "usage_reduction_rel": (u0 - u1) / u0 if u0 else 0.0,
        "mean_acc_before": a0, "mean_acc_after": a1, "acc_change": a1 - a0,
        "mean_off_route_acc_before": mean("off_route_acc", "baseline"), "mean_off_route_acc_after": mean("off_route_acc"),
        "mean_flops_rel_before": mean("flops_rel", "baseline"), "mean_flops_rel_after": mean("flops_rel"),
        "full": {"mean_acc": mean("acc", "full")},
        "dynamic": {"mean_acc": mean("acc", "dynamic"), "mean_usage": mean("head_usage", "dynamic")},
        "random_control": {"mean_usage": mean("head_usage", "random_control"), "mean_acc": mean("acc", "random_control"),
                           "usage_reduction_rel": (u0 - mean("head_usage", "random_control")) / u0 if u0 else 0.0},
        "threshold_control": {"mean_usage": mean("head_usage", "threshold_control"),
                              "mean_acc": mean("acc", "threshold_control"),
                              "routes_matched_usage": len(matched),
                              "steered_better": sum(r["acc"] > r["threshold_control"]["acc"] for r in matched),
                              "steered_equal": sum(r["acc"] == r["threshold_control"]["acc"] for r in matched),
                              "steered_worse": sum(r["acc"] < r["threshold_control"]["acc"] for r in matched),
                              "mean_acc_diff_matched": float(np.mean([r["acc"] - r["threshold_control"]["acc"]
                                                                      for r in matched])) if matched else None},
        "routes_steered": sum(r["alpha"] != 1.0 for r in rows),
        "routes_usage_down": sum(r["head_usage"] < r["baseline"]["head_usage"] for r in rows),
        "routes_acc_down": sum(r["acc"] < r["baseline"]["acc"] for r in rows),
        "routes_acc_up_usage_down": len(up_down),
        "routes_acc_up_usage_down_p05": sum(r["paired_vs_baseline"]["mcnemar_p"] < 0.05 for r in up_down),
        "routes_acc_down_p05": sum(r["acc"] < r["baseline"]["acc"] and r["paired_vs_baseline"]["mcnemar_p"] < 0.05
                                   for r in rows),
    }
    s["val_vs_test"] = val_test_agreement(rows)
    s["choice_rules"] = {rule: choice_rule_summary(rows, rule) for rule in (rows[0].get("choice_rules") or {})}
    if label_free is not None:
        lf_u = float(np.mean([r["head_usage"] for r in label_free]))
        s["label_free"] = {"mean_usage_after": lf_u, "mean_acc_after": float(np.mean([r["acc"] for r in label_free])),
                           "usage_reduction_rel": (u0 - lf_u) / u0 if u0 else 0.0,
                           "recovery": (u0 - lf_u) / (u0 - u1) if u0 > u1 else None}
    if global_mask is not None:
        s["global_mask"] = global_mask
    return s


def choice_rule_summary(rows: list[dict], rule: str) -> dict:
    """One choice rule's picks over every route (row["choice_rules"][rule]): mean usage, mean route accuracy on val
    and on test, and how its val gains held on test (`val_test_agreement`)."""
    picks = [r["choice_rules"][rule] for r in rows]
    as_rows = [{"alpha": c["alpha"], "acc": c["acc"], "baseline": {"acc": r["baseline"]["acc"]},
                "val": {"acc": c["val_acc"], "baseline_acc": r["val"]["baseline_acc"]}} for r, c in zip(rows, picks)]
    return {"mean_usage": float(np.mean([c["head_usage"] for c in picks])),
            "mean_val_acc": float(np.mean([c["val_acc"] for c in picks])),
            "mean_acc": float(np.mean([c["acc"] for c in picks])),
            "distinct_k_alpha": len({(c["k"], c["alpha"]) for c in picks}),
            **val_test_agreement(as_rows)}


def val_test_agreement(rows: list[dict]) -> dict:
    """How well the choices made on val hold on test, over the routes that chose alpha != 1: per route the steered
    minus unsteered accuracy on its val images (where k and alpha were chosen) against the same difference on its
    test images. The usage a mask gives is the same on both splits (static masks), so only accuracy can disagree.

    optimism: mean val gain - mean test gain (what choosing the best of many candidates on few images adds);
    sign_agreement: fraction of steered routes whose test gain has the sign of their val gain (0 counts as a sign);
    spearman: rank correlation of val and test gains across steered routes (None with fewer than 3 or no spread)."""
    from scipy.stats import spearmanr

    st = [r for r in rows if r["alpha"] != 1.0]
    dv = np.array([r["val"]["acc"] - r["val"]["baseline_acc"] for r in st], dtype=np.float64)
    dt = np.array([r["acc"] - r["baseline"]["acc"] for r in st], dtype=np.float64)
    out = {"routes_steered": len(st), "mean_val_gain": float(dv.mean()) if len(st) else None,
           "mean_test_gain": float(dt.mean()) if len(st) else None,
           "optimism": float(dv.mean() - dt.mean()) if len(st) else None,
           "sign_agreement": float(np.mean(np.sign(dv) == np.sign(dt))) if len(st) else None,
           "test_gain_negative": int((dt < 0).sum()), "val_gain_negative": int((dv < 0).sum()),
           "spearman": None, "spearman_p": None}
    if len(st) >= 3 and np.ptp(dv) > 0 and np.ptp(dt) > 0:
        res = spearmanr(dv, dt)
        out["spearman"], out["spearman_p"] = float(res.statistic), float(res.pvalue)
    return out

"""The report's summary: means over routes of every row (full, dynamic, unsteered, steered, controls, global mask)
and the counts of routes that moved, with their paired tests."""
from __future__ import annotations

from typing import Optional

import numpy as np

__all__ = ["summarize"]


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
    if label_free is not None:
        lf_u = float(np.mean([r["head_usage"] for r in label_free]))
        s["label_free"] = {"mean_usage_after": lf_u, "mean_acc_after": float(np.mean([r["acc"] for r in label_free])),
                           "usage_reduction_rel": (u0 - lf_u) / u0 if u0 else 0.0,
                           "recovery": (u0 - lf_u) / (u0 - u1) if u0 > u1 else None}
    if global_mask is not None:
        s["global_mask"] = global_mask
    return s



"""The steering issue's targets, checked against a steering report (the targets are the issue's, not the product's).

    python benchmarks/steering_targets.py examples/cifar10/steering/report.json
    python benchmarks/steering_targets.py RUN/steering/report.json --baseline RUN/steering/global_baseline.json \
        --out benchmarks/results/steering_targets_cifar10.json

Each target prints with its measured value and met / missed. The global-mask target (per-class routing ahead of one
global static mask at matched usage, with McNemar p < 0.05) reads the report's own `global_mask` section, or the
separate file `steerprune steer RUN --baseline-only` writes for reports made before the section existed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional


def targets(summary: dict, zero_shot: dict, global_mask: Optional[dict] = None) -> dict:
    """{target: {"value": ..., "met": bool}} from a report's summary and zero_shot sections (and a global-mask
    summary row: `steering.global_mask.summary_row`)."""
    t = {}
    red = summary["usage_reduction_rel"]
    t["usage_reduction_ge_25pct"] = {"value": red, "met": red >= 0.25}
    t["acc_drop_le_1pt"] = {"value": summary["acc_change"], "met": summary["acc_change"] >= -0.01}
    rc = summary["random_control"]
    t["beats_random_control"] = {"value": {"steered_reduction": red, "random_reduction": rc["usage_reduction_rel"]},
                                 "met": red > rc["usage_reduction_rel"]}
    th = summary["threshold_control"]
    t["beats_threshold_control_matched_usage"] = {
        "value": {k: th[k] for k in ("routes_matched_usage", "steered_better", "steered_equal", "steered_worse",
                                     "mean_acc_diff_matched")},
        # better on more matched routes than worse, and better on average: one lucky route is not enough
        "met": bool(th["mean_acc_diff_matched"] is not None and th["mean_acc_diff_matched"] > 0
                    and th["steered_better"] > th["steered_worse"])}
    p1, r1 = zero_shot["precision_at_k"], zero_shot["random_precision"]
    ratio = {k: p1[k] / r1[k] for k in p1}
    t["label_free_precision_ge_5x_random"] = {"value": ratio, "met": all(v >= 5 for v in ratio.values())}
    if "label_free" in summary:
        rec = summary["label_free"]["recovery"]
        t["label_free_recovers_ge_70pct"] = {"value": rec, "met": rec is not None and rec >= 0.7}
    if global_mask is not None:
        t["routes_beat_one_global_mask"] = {
            "value": {k: global_mask[k] for k in ("acc_diff", "acc_diff_ci95", "mcnemar_p", "head_usage",
                                                  "routes_mean_usage")},
            "met": bool(global_mask["acc_diff"] > 0 and global_mask["mcnemar_p"] < 0.05)}
    return t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", help="RUN/steering/report.json")
    ap.add_argument("--baseline", help="global_baseline.json from `steerprune steer RUN --baseline-only` (default: "
                                       "the report's own global_mask section, else global_baseline.json beside it)")
    ap.add_argument("--out", help="write the targets as JSON here")
    args = ap.parse_args()
    path = Path(args.report)
    report = json.loads(path.read_text())
    gm = report["summary"].get("global_mask", {}).get("steered")
    bpath = Path(args.baseline) if args.baseline else path.parent / "global_baseline.json"
    if args.baseline or (gm is None and bpath.is_file()):
        gm = json.loads(bpath.read_text())["summary"]["steered"]
    t = targets(report["summary"], report["zero_shot"], gm)
    for name, v in t.items():
        print(f"{name:40s} {'met' if v['met'] else 'MISSED':7s} {json.dumps(v['value'], default=float)}")
    if args.out:
        Path(args.out).write_text(json.dumps({"report": str(path), "targets": t}, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Choose the steering selection settings (largest k, eps) on the validation split alone.

    python benchmarks/steering_val_grid.py runs/cifar10 --out benchmarks/results/steering_val_grid_cifar10.json
    python benchmarks/steering_val_grid.py runs/cifar10 --rank importance \
        --out benchmarks/results/steering_val_grid_cifar10_importance.json

Plans every route once, label-based and label-free, with the widest grid (`--ks`, default 1,2,4,8,16), then re-applies
the selection rule (lowest head usage whose route val accuracy is at most eps below the unsteered static mask's)
for each largest k and eps, and prints the mean val usage cut, the mean val accuracy change and the share of the
label-based cut that label-free steering recovers. Test images are never loaded: `plan_routes` sees val, and with
`--rank importance` train images, on which it measures how much each head matters (they rank; val chooses).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def _pick(cands: list, base_acc: float, eps: float, k_max: int) -> list:
    # the rule of steering.masks.select_candidate on the stored [k, alpha, usage, acc] rows (rounded to 1e-4)
    ok = [c for c in cands if c[0] <= k_max and c[3] >= base_acc - eps - 1e-4]
    return min(ok, key=lambda c: (round(c[2], 9), -c[3]))


def grid(plans: dict, k_maxes: list[int], epses: list[float]) -> list[dict]:
    rows = []
    for k_max in k_maxes:
        for eps in epses:
            row = {"k_max": k_max, "eps": eps}
            for strategy, routes in plans.items():
                chosen = [(v, _pick(v["candidates"], v["baseline_acc"], eps, k_max)) for v in routes.values()]
                before = np.mean([v["baseline_usage"] for v, _ in chosen])
                row[strategy] = {"usage_cut": float(1 - np.mean([c[2] for _, c in chosen]) / before),
                                 "acc_change_points": float(100 * np.mean([c[3] - v["baseline_acc"] for v, c in chosen]))}
            lb, lf = row.get("per-class", {}).get("usage_cut"), row.get("zero-shot", {}).get("usage_cut")
            row["label_free_recovery"] = float(lf / lb) if lb and lf is not None else None
            rows.append(row)
    return rows


def main() -> int:
    from steerprune.steering.masks import ValData
    from steerprune.steering.plan import SteerConfig, make_routes, plan_routes
    from steerprune.training.run import load_run

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--ks", default="1,2,4,8,16")
    ap.add_argument("--zero-shot-pool", type=int, default=32)
    ap.add_argument("--rank", default="effect", choices=["contrast", "effect", "importance"],
                    help="label-based latent ranking, as `steerprune steer --rank` (default: its default, effect)")
    ap.add_argument("--eps", default="0,0.005,0.01,0.015,0.02")
    ap.add_argument("--out", required=True)
    ap.add_argument("--plans", help="re-apply the grid to the plans stored in an earlier --out file (no planning)")
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    run = load_run(args.run, need=("backbone", "policy", "sae"))
    data = run.load_data()
    val = ValData(data.val.images, data.val.labels)
    train = ValData(data.train.images, data.train.labels)  # the importance ranking's images, as `steerprune steer`
    if args.plans:
        stored = json.loads(Path(args.plans).read_text())
        plans, seconds = stored.get("plans", stored), stored.get("seconds")
    else:
        cfg = SteerConfig(ks=ks, zero_shot_pool=args.zero_shot_pool, rank=args.rank)
        shared: dict = {}
        plans, seconds = {}, {}
        for strategy in ("per-class", "zero-shot"):
            t0 = time.time()
            got = plan_routes(run, val, make_routes(data.class_names, None), cfg, strategy=strategy, shared=shared,
                              log=lambda *_: None, rank_data=train)
            plans[strategy] = {p.route.name: p.val for p in got}
            seconds[strategy] = round(time.time() - t0, 1)
    rows = grid(plans, sorted({k for k in ks if k >= 4} | {max(ks)}), [float(e) for e in args.eps.split(",")])
    for r in rows:
        print(f"k <= {r['k_max']:2d}, eps {r['eps']:.3f}: label-based cut {100 * r['per-class']['usage_cut']:.1f}% "
              f"({r['per-class']['acc_change_points']:+.2f} points), label-free cut "
              f"{100 * r['zero-shot']['usage_cut']:.1f}% ({r['zero-shot']['acc_change_points']:+.2f}), "
              f"recovery {100 * r['label_free_recovery']:.0f}%")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"run": args.run, "split": "val", "val_images": len(val.labels), "ks": ks,
                               "zero_shot_pool": args.zero_shot_pool, "rank": args.rank, "seconds": seconds, "grid": rows,
                               "plans": plans}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())

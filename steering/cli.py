"""`steerprune steer` (light at import: torch is imported only when the command runs)."""
from __future__ import annotations

import argparse

from steerprune.errors import UserError

__all__ = ["register"]


def _ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _floats(s: str) -> list[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("steer", help="steer SAE latents to derive compact per-class head masks for RUN",
                       description="Amplify or attenuate SAE latents of the residual the head policy reads, derive one "
                                   "static head mask per class (or group) on val, and report them on test against "
                                   "random-latent and threshold controls. Writes RUN/steering/.")
    p.add_argument("run", help="run directory from `steerprune train`")
    p.add_argument("--strategy", default="per-class", choices=["per-class", "zero-shot", "global", "random"])
    p.add_argument("--rank", default=None, choices=["contrast", "effect", "importance"],
                   help="label-based latent ranking: effect on the policy's keep logits (default), that effect "
                        "weighted by how little the route needs each head (importance), or class contrast")
    p.add_argument("--rank-images", type=int, help="train images per route for the importance ranking (default 512)")
    p.add_argument("--groups", dest="groups_path", metavar="FILE",
                   help="JSON {group: [class names or indices]}: one route per group, mask from the union")
    p.add_argument("--data-groups", action="store_true", help="route by the dataset's groups (CIFAR-100 coarse classes)")
    p.add_argument("--layers", type=_ints, help="gated layers to steer (default: every layer with an SAE)")
    p.add_argument("--ks", type=_ints, help="latents per layer to try (default 1,2,4,8)")
    p.add_argument("--alphas", type=_floats, help="scales to try (default 0,0.5,2,4,8,16)")
    p.add_argument("--tau", type=float, help="fraction of a route's val images that must keep a head (default 0.5)")
    p.add_argument("--aggregate", choices=["vote", "prob"], help="static mask from votes (default) or mean keep-prob")
    p.add_argument("--eps", type=float, help="allowed route val accuracy drop when choosing alpha (default 0)")
    p.add_argument("--choose", choices=["route", "group", "all"],
                   help="who shares one (k, alpha): each route alone on its own val images (default), the routes of "
                        "one class group on their pooled val statistics (the dataset's groups, e.g. CIFAR-100 "
                        "superclasses, or --groups), or all routes")
    p.add_argument("--zero-shot-pool", type=int, help="label-free: order the N latents most aligned with the class "
                   "direction by their effect on the policy over the images the model predicts as the class (0: cosine "
                   "alone)")
    p.add_argument("--no-label-free", action="store_true", help="skip the label-free comparison run")
    p.add_argument("--max-off-route", type=int, help="test images of other classes per route for its off-route "
                   "accuracy (seeded subsample; default 2000): with many routes the off-route forwards dominate")
    p.add_argument("--spotlight", type=lambda s: [x for x in s.split(",") if x],
                   help="routes the report shows in detail beside the paper's figures (default bowl; names that are "
                        "not routes are skipped)")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="output folder (default RUN/steering)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--baseline-only", action="store_true",
                   help="do not steer: compute the global-mask baseline (one static mask for every class at the "
                        "routes' mean usage, chosen on val) for an existing report and write global_baseline.json "
                        "and .md beside it (or in --out); the report is left as it is")
    p.add_argument("--report", help="with --baseline-only: the steering report (default RUN/steering/report.json)")
    p.add_argument("--route-sets", type=lambda s: [x for x in s.split(",") if x], default=["steered", "unsteered"],
                   help="with --baseline-only: compare with the report's steered routes, unsteered ones or both "
                        "(default steered,unsteered)")
    p.add_argument("--global-rankings", type=lambda s: [x for x in s.split(",") if x],
                   help="with --baseline-only: head rankings the global mask may use, among vote,prob,routes "
                        "(default all; each candidate costs one val forward)")
    p.add_argument("--global-thresholds", type=_floats,
                   help="with --baseline-only: keep thresholds of the vote rankings (default 0.5,0.9)")
    p.add_argument("--round-up-only", action="store_true",
                   help="with --baseline-only: test only the global mask whose head count is rounded up from the "
                        "routes' mean usage (saves a test pass)")
    p.set_defaults(func=_steer)


def _steer(args) -> int:
    import torch

    from .pipeline import baseline_for_report, steer_run

    if args.threads:
        torch.set_num_threads(args.threads)
    if (args.report or args.global_rankings or args.global_thresholds or args.round_up_only) and not args.baseline_only:
        raise UserError("--report, --global-rankings, --global-thresholds and --round-up-only are read only with "
                        "--baseline-only")
    if args.baseline_only:
        opts = {k: v for k, v in (("rankings", args.global_rankings), ("keep_thresholds", args.global_thresholds))
                if v is not None}
        if args.round_up_only:
            opts["round_down_too"] = False
        b = baseline_for_report(args.run, args.report, out_dir=args.out, route_sets=tuple(args.route_sets), **opts)
        for name, g in b["summary"].items():
            print(f"{name} routes: acc {100 * g['routes_acc']:.1f}% at usage {g['routes_mean_usage']:.3f}; global mask "
                  f"{100 * g['acc']:.1f}% at usage {g['head_usage']:.3f}: routes {100 * g['acc_diff']:+.1f} points "
                  f"[{100 * g['acc_diff_ci95'][0]:+.1f}, {100 * g['acc_diff_ci95'][1]:+.1f}], McNemar p "
                  f"{g['mcnemar_p']:.2g}")
        return 0
    if args.tau is not None and not 0 < args.tau <= 1:
        raise UserError(f"--tau must be in (0, 1], got {args.tau}")
    if args.max_off_route is not None and args.max_off_route < 1:
        raise UserError(f"--max-off-route must be >= 1, got {args.max_off_route}")
    opts = {k: getattr(args, k) for k in ("rank", "rank_images", "layers", "ks", "alphas", "tau", "aggregate", "eps",
                                          "seed", "zero_shot_pool", "spotlight", "choose",
                                          "max_off_route")
            if getattr(args, k) is not None}
    if args.no_label_free:
        opts["compare_label_free"] = False
    report = steer_run(args.run, args.strategy, args.groups_path, out_dir=args.out, use_groups=args.data_groups, **opts)
    s = report["summary"]
    print(f"{s['routes']} routes: head usage {s['mean_usage_before']:.3f} -> {s['mean_usage_after']:.3f}, "
          f"route acc {100 * s['mean_acc_before']:.1f}% -> {100 * s['mean_acc_after']:.1f}%")
    return 0

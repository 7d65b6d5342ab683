"""`steerprune units` (light at import: torch is imported only when the command runs)."""
from __future__ import annotations

import argparse

from .cli import _floats

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("units", help="choose per-route MLP hidden units to prune on top of the steering report",
                       description="Rank every MLP hidden unit on each route's train images (with the route's head "
                                   "mask), choose the largest cut whose route val accuracy stays within eps (or, with "
                                   "--select cost, the cut of lowest expected cost per hinted request), build the "
                                   "single global model as the baseline, and write RUN/steering/units.json for "
                                   "`steerprune export --units`. The steering report is read, never changed.")
    p.add_argument("run", help="run directory with a steering report")
    p.add_argument("--report", help="steering report (default: RUN/steering/report.json)")
    p.add_argument("--out", help="output folder (default: the report's folder)")
    p.add_argument("--eps", type=float, help="allowed route val accuracy drop (default 0.003 = 0.3 points)")
    p.add_argument("--reference", choices=["route", "unsteered", "full"],
                   help="what eps is measured from (default route: the heads-only route)")
    p.add_argument("--importance", choices=["taylor", "activation"], help="unit importance (default taylor)")
    p.add_argument("--images", type=int, help="train images per route for the importance (default 512)")
    p.add_argument("--fractions", type=_floats, help="cut fractions to try (default 0.2,0.35,0.5,0.6,0.7,0.8,0.9)")
    p.add_argument("--schemes", type=lambda v: [x for x in v.split(",") if x], help="uniform,global (default both)")
    p.add_argument("--off-images", type=int, help="other classes' val images per route for the claim rate (default 500)")
    p.add_argument("--claim-eps", type=float, help="allowed claim-rate increase over the heads-only route (default 0.01)")
    p.add_argument("--global-images", type=int, help="train images for the global model's importance (default 2048)")
    p.add_argument("--global-val", type=int, help="val images scoring the global model's candidates (default 1000)")
    p.add_argument("--batch-size", type=int, help="images per importance forward/backward (default 128)")
    p.add_argument("--search", choices=["all", "cheapest-first"],
                   help="score every candidate (default all) or cheapest first until one passes (same choice, faster)")
    p.add_argument("--select", choices=["accuracy", "cost"],
                   help="accuracy (default): fewest FLOPs within --eps and --claim-eps; cost: lowest expected cost "
                        "per right-hint request under the acceptance rule export would choose (--accept-eps, "
                        "--accept-wrong-eps)")
    p.add_argument("--accept-eps", type=float, help="with --select cost: export's --eps as a fraction (default 0.005)")
    p.add_argument("--accept-wrong-eps", type=float,
                   help="with --select cost: export's --wrong-eps as a fraction (default 0.05)")
    p.add_argument("--recover-epochs", type=int,
                   help="recover every candidate's pruned model this many epochs before scoring it, as `export "
                        "--recover-epochs` will (default 0: score the plain cut; docs/recovery.md)")
    p.add_argument("--recover-lr", type=float, help="that recovery's peak learning rate (default 3e-4)")
    p.add_argument("--no-global", action="store_true", help="skip the single-global-model baseline")
    p.add_argument("--routes", type=lambda v: [x for x in v.split(",") if x],
                   help="only these routes (a part: run parts in parallel with their own --out, then --merge)")
    p.add_argument("--merge", nargs="+", metavar="DIR", help="merge the parts' units.json from these folders")
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.set_defaults(func=_units)


def _units(args) -> int:
    import torch

    from .units import UnitsConfig, units_run

    if args.threads:
        torch.set_num_threads(args.threads)
    opts = {k: getattr(args, k) for k in ("eps", "reference", "importance", "images", "fractions", "seed", "schemes",
                                          "off_images", "claim_eps", "global_images", "global_val", "batch_size", "search",
                                          "select", "accept_eps", "accept_wrong_eps", "recover_epochs", "recover_lr")
            if getattr(args, k) is not None}
    if args.no_global:
        opts["global_model"] = False
    units_run(args.run, UnitsConfig(**opts), report_path=args.report, out_dir=args.out, routes=args.routes,
              parts=args.merge)
    return 0

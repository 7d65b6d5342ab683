"""`steerprune export`, `steerprune bundle verify`, `steerprune bundle cost` (heavy imports inside the handlers)."""
from __future__ import annotations

import argparse

from steerprune.errors import UserError

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export per-route pruned ViTs as verified ONNX models into a bundle",
                       description="Build one ViT per distinct route mask with the pruned heads physically removed, "
                                   "export each (and the full model) to ONNX, check parity, write BUNDLE/manifest.json.")
    p.add_argument("run", help="run directory (from `steerprune train`)")
    p.add_argument("--out", required=True, help="bundle directory to write")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--report", help="steering report (default: RUN/steering/report.json)")
    src.add_argument("--masks", help='JSON {route name: {"classes": [...], "mask": depth x H 0/1}} instead of a report')
    p.add_argument("--fp16", action="store_true", help="also export a float16 copy of every model (for GPU serving)")
    p.add_argument("--layout", choices=["triton"], help="also write a Triton-style model repository under BUNDLE/triton")
    p.add_argument("--eps", type=float, default=0.5,
                   help="accuracy points a route's acceptance rule may lose against the full model on the route's "
                        "validation images (default 0.5)")
    p.add_argument("--wrong-eps", type=float, default=5.0,
                   help="accuracy points the rule may lose against the full model on validation images of other "
                        "classes sent with the route's hint (default 5: 1 point of a 20%%-wrong-hint mix)")
    p.add_argument("--cost-batch", type=int, default=16,
                   help="batch size of the offline cost timing on the test split (default 16; 0: skip it)")
    p.add_argument("--units", help="`steerprune units` file (e.g. RUN/steering/units.json): also remove the MLP hidden "
                                   "units it chose for each route (default: heads only; never picked up implicitly)")
    p.add_argument("--shared", choices=["auto", "global", "units", "none"], default="auto",  # bundle.SHARED_CHOICES
                   help="also export one shared pruned model with a rule per route, for hints too scattered to batch "
                        "on their own models: global = the steering report's global mask (heads only), units = the "
                        "--units file's global model (heads + MLP units at the routes' mean FLOPs); default auto: "
                        "global with at least 20 routes (docs/cost.md)")
    p.add_argument("--recover-epochs", type=int,
                   help="train each pruned model this many passes over train images of its routes' classes (and as "
                        "many of other classes) against the full model before export (default: as the --units file "
                        "was chosen, else 0: off; docs/recovery.md)")
    p.add_argument("--recover-lr", type=float, help="recovery's peak learning rate (default 3e-4; with --recover-epochs)")
    p.set_defaults(func=_export)

    b = sub.add_parser("bundle", help="inspect a bundle", description="Bundle tools.")
    bsub = b.add_subparsers(dest="bundle_command", metavar="ACTION", required=True)
    v = bsub.add_parser("verify", help="re-check sha256, load every model, re-run parity on the stored samples")
    v.add_argument("bundle", help="bundle directory")
    v.add_argument("--tol", type=float, default=1e-4, help="max |logit difference| allowed (default 1e-4)")
    v.set_defaults(func=_verify)
    c = bsub.add_parser("cost", help="time right-hint requests vs unhinted ones in-process (ONNX Runtime, the "
                                     "service's engine, fallbacks included)")
    c.add_argument("bundle", help="bundle directory")
    c.add_argument("--images", required=True, help="NPZ with 'images' (uint8 N,S,S,C at the model's size), 'labels'")
    c.add_argument("--batch", type=int, default=16, help="requests per engine batch (default 16; 1: no batching)")
    c.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    c.add_argument("--rounds", type=int, default=3, help="timings per batch, median kept (default 3)")
    c.add_argument("--max-images", type=int, default=2000, help="seeded draw of at most this many (0: all)")
    c.add_argument("--acceptance", choices=["route", "global"], default="route",
                   help="route: each route's rule from the manifest; global: top-1 >= --min-prob for every route")
    c.add_argument("--min-prob", type=float, default=0.7, help="the global rule's threshold (default 0.7)")
    c.add_argument("--no-per-route", action="store_true", help="skip the per-route timings")
    c.add_argument("--batch-plan", choices=["cost", "route"], default="cost",
                   help="the engine's batch plan, as `steerprune serve --batch-plan` (default cost)")
    c.add_argument("--shared-model", action=argparse.BooleanOptionalAction, default=True,
                   help="let the batch plan use the bundle's shared model, as `steerprune serve --shared-model`")
    c.add_argument("--out", help="write the result as JSON here")
    c.set_defaults(func=_cost)


def _export(args) -> int:
    from .bundle import export_bundle

    if not 0 <= args.eps < 100:
        raise UserError(f"--eps must be in [0, 100) accuracy points, got {args.eps}")
    if not 0 <= args.wrong_eps <= 100:
        raise UserError(f"--wrong-eps must be in [0, 100] accuracy points, got {args.wrong_eps}")
    if args.cost_batch < 0:
        raise UserError(f"--cost-batch must be >= 0, got {args.cost_batch}")
    recover = None  # not given: export_bundle follows the --units file's choice
    if args.recover_epochs is not None or args.recover_lr is not None:
        from .recover import RecoverConfig

        if args.recover_epochs is None:
            raise UserError("--recover-lr needs --recover-epochs")
        if not 0 <= args.recover_epochs <= 100:
            raise UserError(f"--recover-epochs must be from 0 to 100, got {args.recover_epochs}")
        lr = 3e-4 if args.recover_lr is None else args.recover_lr
        if not 0 < lr < 1:
            raise UserError(f"--recover-lr must be in (0, 1), got {lr}")
        recover = RecoverConfig(epochs=args.recover_epochs, lr=lr)
    export_bundle(args.run, args.out, report_path=args.report, masks_path=args.masks, fp16=args.fp16,
                  layout=args.layout, eps=args.eps / 100.0, wrong_eps=args.wrong_eps / 100.0,
                  cost_batch=args.cost_batch or None, units_path=args.units, shared=args.shared, recover=recover)
    return 0


def _verify(args) -> int:
    from .cost import cost_lines
    from .manifest import load_manifest, verify_bundle

    res = verify_bundle(args.bundle, tol=args.tol, log=print)
    print(f"bundle {args.bundle}: OK ({len(res['models'])} models)")
    for line in cost_lines(load_manifest(args.bundle).get("cost")):
        print(line)
    return 0


def _cost(args) -> int:
    import json
    from pathlib import Path

    from .cost import cost_lines, cost_of_npz

    if args.batch < 1 or args.rounds < 1 or args.threads < 0 or args.max_images < 0:
        raise UserError("--batch and --rounds must be >= 1, --threads and --max-images >= 0")
    if not 0 <= args.min_prob <= 1:
        raise UserError(f"--min-prob must be in [0, 1], got {args.min_prob}")
    res = cost_of_npz(args.bundle, args.images, batch_size=args.batch, threads=args.threads, rounds=args.rounds,
                      acceptance=args.acceptance, min_prob=args.min_prob, per_route=not args.no_per_route,
                      max_images=args.max_images or None, batch_plan=args.batch_plan,
                      shared_model=args.shared_model)
    for line in cost_lines(res):
        print(line)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return 0

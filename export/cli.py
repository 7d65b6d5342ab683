"""`steerprune export`, `steerprune bundle verify` (heavy imports inside the handlers)."""
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
    p.set_defaults(func=_export)

    b = sub.add_parser("bundle", help="inspect a bundle", description="Bundle tools.")
    bsub = b.add_subparsers(dest="bundle_command", metavar="ACTION", required=True)
    v = bsub.add_parser("verify", help="re-check sha256, load every model, re-run parity on the stored samples")
    v.add_argument("bundle", help="bundle directory")
    v.add_argument("--tol", type=float, default=1e-4, help="max |logit difference| allowed (default 1e-4)")
    v.set_defaults(func=_verify)


def _export(args) -> int:
    from .bundle import export_bundle

    export_bundle(args.run, args.out, report_path=args.report, masks_path=args.masks, fp16=args.fp16,
                  layout=args.layout)
    return 0


def _verify(args) -> int:
    from .manifest import verify_bundle

    res = verify_bundle(args.bundle, tol=args.tol, log=print)
    print(f"bundle {args.bundle}: OK ({len(res['models'])} models)")
    return 0


"""`steerprune bench` (heavy imports inside the handler: the CLI parser imports every stage)."""
from __future__ import annotations

import argparse
from pathlib import Path

from steerprune.errors import UserError

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser("bench", help="offline latency of a bundle's models vs the full model and FLOP bound",
                       description="Time every distinct model of BUNDLE, the full model, the masked-not-removed peers "
                                   "and PyTorch eager with ONNX Runtime on the CPU (or CUDA); write JSON and a PNG plot.")
    q.add_argument("bundle", nargs="?", help="bundle directory (omit with --synthetic)")
    q.add_argument("--out", help="result JSON (default: BUNDLE/bench/bench.json; the plot goes beside it as .png)")
    q.add_argument("--threads", type=int, default=2, help="intra-op threads per model (default 2)")
    q.add_argument("--runs", type=int, default=50, help="timed calls per variant and batch size (default 50)")
    q.add_argument("--rounds", type=int, default=None, help="interleaved rounds the runs are split over (default 3, synthetic 2)")
    q.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    q.add_argument("--no-torch", action="store_true", help="skip the PyTorch peers (masked-not-removed, eager)")
    q.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: ONNX Runtime's CUDA provider (onnxruntime-gpu) and PyTorch on the GPU (default cpu)")
    q.add_argument("--synthetic", choices=["deit_small", "deit_tiny"],
                   help="benchmark a random-weight timm model with fixed masks instead of a bundle")
    q.set_defaults(func=_bench)


def _bench(args) -> int:
    from .run import run_bench, run_synthetic

    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        raise UserError(f"--batches must be comma-separated integers, got {args.batches!r}") from None
    if args.synthetic:
        out = args.out or f"bench_{args.synthetic}.json"
        run_synthetic(args.synthetic, out, threads=args.threads, batches=batches, runs=args.runs,
                      rounds=args.rounds or 2, device=args.device)
        return 0
    if not args.bundle:
        raise UserError("give a BUNDLE directory or --synthetic MODEL")
    if not Path(args.bundle).is_dir():
        raise UserError(f"bundle directory not found: {args.bundle}")
    run_bench(args.bundle, args.out, threads=args.threads, batches=batches, runs=args.runs, rounds=args.rounds or 3,
              torch_peers=not args.no_torch, masked_peers=not args.no_torch, device=args.device)
    return 0

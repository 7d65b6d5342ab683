"""`steerprune quickstart`: every stage that exists, end to end, on the embedded digits data."""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="run every stage end to end on the embedded digits data")
    p.add_argument("--out", default="runs/quickstart", help="output folder (default: runs/quickstart)")
    p.set_defaults(func=_quickstart)


def _quickstart(args) -> int:
    from steerprune.training.pipeline import run_training, summary_table
    from steerprune.training.train import TrainConfig

    out = Path(args.out)
    run_dir = out / "run"
    metrics = run_training(run_dir, "digits", TrainConfig.for_preset("digits"))
    print(summary_table(metrics))
    print(f"trained run: {run_dir}")
    return 0

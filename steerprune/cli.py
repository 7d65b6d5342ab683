"""`steerprune` console entry point. Each stage registers its own subcommands; heavy imports happen only when a
subcommand runs, so the torch-free serving install still has `steerprune serve`."""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import UserError

__all__ = ["main", "build_parser"]

# Stage modules with `register(subparsers)`; each subparser sets `func(args) -> int`.
STAGE_CLIS = ("steerprune.training.cli", "steerprune.steering.cli", "steerprune.steering.units_cli", "steerprune.export.cli",
              "steerprune.service.cli", "steerprune.loadtest.cli", "steerprune.bench.cli", "steerprune.quickstart")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steerprune", description="Per-class attention-head pruning for ViTs, steered through a sparse autoencoder.")
    parser.add_argument("--version", action="version", version=f"steerprune {__import__('steerprune').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in STAGE_CLIS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError:
            continue  # a stage not present in this install
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    if hasattr(sys.stdout, "reconfigure"):  # progress lines reach a log file or `docker logs` as they happen
        sys.stdout.reconfigure(line_buffering=True)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"steerprune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        print(f"steerprune {args.command}: error: {e.name} is not installed; install the matching extra "
              f"(pip install 'steerprune[train]' or 'steerprune[serve]')", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""Masks and units files that give every route the single global model of a units.json (the baseline routing has to
beat), for `steerprune export RUN --masks MASKS --units UNITS`: export then chooses each hint's acceptance rule on
that one model exactly as it does for per-class routes.

    steerprune units RUN --merge RUN/steering --out G          # adds "global" to a units stage run with --no-global
    python benchmarks/global_bundle.py G/units.json --masks M.json --units U.json
    steerprune export RUN --masks M.json --units U.json --out BUNDLE

The global model taken is `global.matched_heads_mlp`: the unit cut whose FLOPs are closest to the routes' mean.
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("units_json", help="a `steerprune units` units.json with a 'global' section")
    ap.add_argument("--masks", required=True, help="masks JSON to write")
    ap.add_argument("--units", required=True, help="units JSON to write")
    a = ap.parse_args(argv)
    u = json.load(open(a.units_json))
    if "global" not in u:
        sys.exit(f"{a.units_json} has no 'global' section: run `steerprune units RUN --merge ...` without --no-global")
    g, mask = u["global"]["matched_heads_mlp"], u["global"]["mask"]
    routes = [{"name": r["name"], "classes": r["classes"], "mask": mask, "mlp_units": g["mlp_units"]}
              for r in u["routes"]]
    with open(a.masks, "w") as f:
        json.dump({r["name"]: {"classes": r["classes"], "mask": mask} for r in routes}, f)
    with open(a.units, "w") as f:
        json.dump({"run": u["run"], "report": u["report"], "config": u["config"], "routes": routes,
                   "global_source": a.units_json, "flops_rel": g["flops_rel"], "cut": g["cut"], "scheme": g["scheme"]},
                  f)
    print(f"global model: {g['scheme']} cut {g['cut']:g}, FLOPs {g['flops_rel']:.3f}, mean test route accuracy "
          f"{g['mean_test_acc']:.4f}; wrote {a.masks} and {a.units}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

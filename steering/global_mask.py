"""The no-routing baseline: one static head mask for every class, at the routes' mean head usage, chosen on val.

This is what a user would do instead of routing: prune once, serve one model, need no hint. The mask keeps the
n gated heads that rank highest under one of a few val-only rankings, with n the routes' mean usage times the
number of gated heads (rounded up, so the global mask never has fewer heads than the routes on average; the
rounded-down n is reported too). The ranking is the one with the best accuracy on every val image:

- ``vote@t``: the fraction of val images in which the unsteered policy keeps the head at keep threshold t (ties:
  mean keep probability),
- ``prob``: the mean keep probability over val images (ties: vote@0.5),
- ``routes``: the number of route masks (themselves chosen on val) that keep the head (ties: vote@0.5, prob).

On test, every route's images are answered by the route's mask (a right hint) and by the global mask; the two are
compared on the same images (`compare_on_test`): accuracies with Wilson intervals, the paired difference with a
bootstrap interval, and the exact McNemar test on the discordant images.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import NamedTuple, Optional

import numpy as np

from steerprune.training.data import Split
from steerprune.training.metrics import binomial_ci, mcnemar_p, paired_diff_ci
from steerprune.training.model import head_flops

from .masks import MaskEval, ValData, gated_kept_heads, head_usage, threshold_candidates

__all__ = ["RANKINGS", "GlobalMaskConfig", "RouteMask", "GlobalChoice", "head_rankings", "top_heads_mask", "head_counts",
           "choose_global_mask", "compare_on_test", "global_baseline", "summary_row"]


RANKINGS = ("vote", "prob", "routes")


@dataclass
class GlobalMaskConfig:
    rankings: list[str] = field(default_factory=lambda: list(RANKINGS))
    """Head rankings to try on val: 'vote' (one `vote@t` per keep threshold), 'prob', 'routes'. Each candidate
    costs one val forward to score."""
    keep_thresholds: list[float] = field(default_factory=lambda: [0.5, 0.9])
    """Keep thresholds of the `vote@t` rankings (0.5 is always included: 'prob' and the tie-breaks read it); each
    needs one unsteered val forward unless the planner's are reused."""
    round_down_too: bool = True
    """Besides the kept-head count rounded up from the routes' mean usage, also choose and test the one rounded down
    (one more test pass when the counts differ)."""
    bootstrap_resamples: int = 9999
    """Resamples of the paired bootstrap interval on the test accuracy difference."""
    confidence: float = 0.95
    """Level of every interval."""
    seed: int = 0
    """Seed of the bootstrap."""

    def __post_init__(self):
        if not self.rankings or any(r not in RANKINGS for r in self.rankings):
            raise ValueError(f"rankings must be among {', '.join(RANKINGS)}, got {self.rankings}")
        if not self.keep_thresholds or any(not 0.0 < t < 1.0 for t in self.keep_thresholds):
            raise ValueError(f"keep_thresholds must be in (0, 1), got {self.keep_thresholds}")
        if self.bootstrap_resamples < 100:
            raise ValueError(f"bootstrap_resamples must be >= 100, got {self.bootstrap_resamples}")
        if not 0.5 <= self.confidence < 1.0:
            raise ValueError(f"confidence must be in [0.5, 1), got {self.confidence}")
        self.keep_thresholds = sorted({float(t) for t in self.keep_thresholds} | {0.5})


class RouteMask(NamedTuple):
    """A route as the baseline compares it: its classes and its static mask."""

    name: str
    classes: list[int]
    mask: np.ndarray  # (depth, H) 0/1


class GlobalChoice(NamedTuple):
    """One global mask chosen on val at a given number of kept gated heads."""

    mask: np.ndarray  # (depth, H) 0/1, ungated layers all 1
    ranking: str  # the ranking that chose it
    n_heads: int  # kept gated heads
    val_acc: Optional[float]  # accuracy on every val image (None when a single ranking was given)
    candidates: list[dict]  # every ranking tried at this n: ranking, val_acc


# ---------------------------------------------------------------------------------------------- val choice

def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def head_rankings(decisions: dict[float, tuple[np.ndarray, np.ndarray]], gated: list[int],
                  route_masks: list[np.ndarray], which: tuple[str, ...] = RANKINGS) -> dict[str, list[np.ndarray]]:
    """{ranking name: [primary key, tie-break keys...]}, each key (G, H), higher = keep first.

    decisions: keep threshold -> (masks (N, depth, H), keep_logits (N, G, H)) of the unsteered policy on val (0.5
    among them); which: the rankings to build ('vote' gives one per threshold)."""
    vote = {t: m[:, gated].mean(0) for t, (m, _) in decisions.items()}  # (G, H) fraction of images keeping
    prob = {t: _sigmoid(lg).mean(0) for t, (_, lg) in decisions.items()}  # (G, H) mean keep probability
    out = {f"vote@{t:g}": [vote[t], prob[t]] for t in sorted(decisions)} if "vote" in which else {}
    if "prob" in which:
        out["prob"] = [prob[0.5], vote[0.5]]
    if "routes" in which and route_masks:
        out["routes"] = [np.mean([np.asarray(m)[gated] for m in route_masks], axis=0), vote[0.5], prob[0.5]]
    return out


def top_heads_mask(keys: list[np.ndarray], n: int, depth: int, gated: list[int]) -> np.ndarray:
    """(depth, H) mask keeping the n gated heads first in the lexicographic order of keys (each (G, H), higher
    first; remaining ties by position, so the result is reproducible); ungated layers keep every head."""
    G, H = keys[0].shape
    if not 0 <= n <= G * H:
        raise ValueError(f"cannot keep {n} of {G * H} gated heads")
    flat = [np.asarray(k, dtype=np.float64).ravel() for k in keys]
    order = np.lexsort([np.arange(G * H)] + [-k for k in reversed(flat)])  # last key is the primary in lexsort
    keep = np.zeros(G * H, dtype=np.int64)
    keep[order[:n]] = 1
    out = np.ones((depth, H), dtype=np.int64)
    out[gated] = keep.reshape(G, H)
    return out


def head_counts(target_usage: float, n_gated_heads: int) -> list[int]:
    """Kept-head counts that bracket a target usage: [ceil] or [ceil, floor] of target × heads (ceil first)."""
    exact = target_usage * n_gated_heads
    hi, lo = math.ceil(exact - 1e-9), math.floor(exact + 1e-9)
    return [hi] if hi == lo else [hi, lo]


def choose_global_mask(evals: MaskEval, rankings: dict[str, list[np.ndarray]], n: int, depth: int,
                       gated: list[int]) -> GlobalChoice:
    """The ranking whose top-n mask is most accurate on every val image (`evals` holds the val split); ties go to
    the ranking listed first. A single ranking is not scored (nothing to choose; its val_acc is None)."""
    if len(rankings) == 1:
        (name, keys), = rankings.items()
        return GlobalChoice(top_heads_mask(keys, n, depth, gated), name, n, None, [{"ranking": name, "val_acc": None}])
    tried, best = [], None
    for name, keys in rankings.items():
        mask = top_heads_mask(keys, n, depth, gated)
        acc = evals.acc(mask)
        tried.append({"ranking": name, "val_acc": acc})
        if best is None or acc > best[2] + 1e-12:
            best = (mask, name, acc)
    return GlobalChoice(best[0], best[1], n, best[2], tried)


# ---------------------------------------------------------------------------------------------- test comparison

def compare_on_test(test_eval: MaskEval, routes: list[RouteMask], global_mask: np.ndarray,
                    cfg: GlobalMaskConfig) -> dict:
    """Routes (each on its own classes' test images) vs the global mask on the same images, paired.

    routes_acc / global_acc are over (route, image) pairs (an image in two routes counts twice); mean_route_acc is
    the mean over routes of the route accuracy (the steering summary's convention)."""
    labels = test_eval.labels
    route_ok, global_ok, per_route = [], [], []
    g_pred = test_eval.preds(global_mask)  # (N,) every test image
    for r in routes:
        idx = np.flatnonzero(np.isin(labels, r.classes))
        if len(idx) == 0:
            continue
        ok_r = test_eval.preds(r.mask, idx) == labels[idx]
        ok_g = g_pred[idx] == labels[idx]
        route_ok.append(ok_r)
        global_ok.append(ok_g)
        per_route.append({"name": r.name, "n": int(len(idx)), "route_acc": float(ok_r.mean()),
                          "global_acc": float(ok_g.mean())})
    if not route_ok:
        raise ValueError("no route has test images")
    a, b = np.concatenate(route_ok), np.concatenate(global_ok)
    n = len(a)
    only_route, only_global = int((a & ~b).sum()), int((~a & b).sum())
    return {
        "n": n,
        "routes_acc": float(a.mean()), "routes_acc_ci95": list(binomial_ci(int(a.sum()), n, cfg.confidence)),
        "global_acc": float(b.mean()), "global_acc_ci95": list(binomial_ci(int(b.sum()), n, cfg.confidence)),
        "mean_route_acc": float(np.mean([p["route_acc"] for p in per_route])),
        "mean_route_global_acc": float(np.mean([p["global_acc"] for p in per_route])),
        "acc_diff": float(a.mean() - b.mean()),
        "acc_diff_ci95": list(paired_diff_ci(a, b, cfg.confidence, cfg.bootstrap_resamples, cfg.seed)),
        "only_routes_right": only_route, "only_global_right": only_global,
        "mcnemar_p": mcnemar_p(only_route, only_global),
        "per_route": per_route,
    }


def _mask_record(vit, mask: np.ndarray, gated: list[int]) -> dict:
    return {"mask": np.asarray(mask).astype(int).tolist(), "head_usage": head_usage(mask, gated),
            "flops_rel": head_flops(vit, np.asarray(mask))["rel"], "gated_kept_heads": gated_kept_heads(mask, gated)}


def global_baseline(run, val: ValData, test: Split, route_sets: dict[str, list[RouteMask]],
                    cfg: Optional[GlobalMaskConfig] = None, log=print,
                    decisions: Optional[dict[float, tuple[np.ndarray, np.ndarray]]] = None,
                    val_eval: Optional[MaskEval] = None, test_eval: Optional[MaskEval] = None) -> dict:
    """For each named set of routes (e.g. {"steered": ..., "unsteered": ...}): the global masks at the set's mean
    usage (ceil and floor head counts), chosen on val, and their paired test comparison with the routes.

    decisions / val_eval / test_eval: the planner's unsteered val decisions (keep threshold -> (masks, logits)) and
    MaskEvals of val and test, when the caller has them (they only save forwards)."""
    cfg = cfg or GlobalMaskConfig()
    gated = run.policy.cfg.gated_layers
    depth, H = run.model.depth, run.model.num_heads
    decisions = dict(decisions or {})
    if "vote" not in cfg.rankings:
        cfg.keep_thresholds = [0.5]  # what prob and the tie-breaks read
    missing = [t for t in cfg.keep_thresholds if t not in decisions]
    if missing:
        decisions.update(threshold_candidates(run.model, val, run.backbone, missing))
    decisions = {t: decisions[t] for t in cfg.keep_thresholds}
    val_eval = val_eval or MaskEval(run.model, val.images, val.labels, run.backbone)
    test_eval = test_eval or MaskEval(run.model, test.images, test.labels, run.backbone)
    out = {}
    for set_name, routes in route_sets.items():
        rankings = head_rankings(decisions, gated, [r.mask for r in routes], tuple(cfg.rankings))
        usage = float(np.mean([head_usage(r.mask, gated) for r in routes]))
        flops = float(np.mean([head_flops(run.vit, np.asarray(r.mask))["rel"] for r in routes]))
        masks = []
        for n in head_counts(usage, len(gated) * H)[:None if cfg.round_down_too else 1]:
            choice = choose_global_mask(val_eval, rankings, n, depth, gated)
            test_cmp = compare_on_test(test_eval, routes, choice.mask, cfg)
            masks.append({**_mask_record(run.vit, choice.mask, gated), "n_heads": n, "ranking": choice.ranking,
                          "val_acc": choice.val_acc, "val_candidates": choice.candidates, "test": test_cmp})
            log(f"  global mask vs {set_name} routes: {n} heads (usage {masks[-1]['head_usage']:.3f} vs "
                f"{usage:.3f}), {choice.ranking}; test acc {100 * test_cmp['global_acc']:.1f}% vs routes "
                f"{100 * test_cmp['routes_acc']:.1f}% (diff {100 * test_cmp['acc_diff']:+.1f} points, "
                f"McNemar p {test_cmp['mcnemar_p']:.2g})")
        out[set_name] = {"routes": len(routes), "routes_mean_usage": usage, "routes_mean_flops_rel": flops,
                         "global_masks": masks}
    return {"what": "one static head mask for every class at the routes' mean head usage (kept-head count "
                    "rounded up first, then down), the best of a few val-only head rankings on every val image; "
                    "compared on test with the routes on the same images (each route on its own classes)",
            "selection": "val", "evaluation": "test", "config": asdict(cfg), "route_sets": out}


def summary_row(baseline: dict, set_name: str = "steered") -> dict:
    """The figures a summary table needs for one route set: its primary global mask (at or above the usage)."""
    s = baseline["route_sets"][set_name]
    g = s["global_masks"][0]
    t = g["test"]
    return {"head_usage": g["head_usage"], "flops_rel": g["flops_rel"], "n_heads": g["n_heads"],
            "ranking": g["ranking"], "acc": t["global_acc"], "acc_ci95": t["global_acc_ci95"],
            "routes_acc": t["routes_acc"], "routes_mean_usage": s["routes_mean_usage"],
            "routes_mean_flops_rel": s["routes_mean_flops_rel"], "acc_diff": t["acc_diff"],
            "acc_diff_ci95": t["acc_diff_ci95"], "mcnemar_p": t["mcnemar_p"],
            "only_routes_right": t["only_routes_right"], "only_global_right": t["only_global_right"]}

"""One route of a steering report in detail, beside a published figure: the paper's CIFAR-100 "bowl".

`spotlight(report, name)` reads a finished report (routes, label-free routes, self-reference) and returns the
route's unsteered and steered static masks (head usage, test accuracy with its Wilson interval, kept heads), the
latents steering used, the label-free route and how far its latents agree with the label-based ones, and the paired
McNemar test against the unsteered mask. `steering.render.spotlight_lines` renders it as markdown.
"""
from __future__ import annotations

from typing import Optional

from steerprune.training.metrics import binomial_ci

__all__ = ["PAPER_FIGURES", "spotlight"]

# S1 (Lee & Har, AAAI-26 student abstract; ../shared/docs/papers.md): the one per-class result it publishes
PAPER_FIGURES = {
    "bowl": {"source": "Lee & Har, AAAI-26 (S1), CIFAR-100, a 6-head ViT", "usage_before": 0.72, "usage_after": 0.33,
             "acc_before": 0.76, "acc_after": 0.82, "kept_heads": "h2 and h5 (of 6)"},
}


def _heads(entry: dict) -> dict:
    return entry.get("gated_kept_heads") or entry.get("kept_heads") or {}


def _ci(acc: float, n: int) -> list[float]:
    return list(binomial_ci(round(acc * n), n))


def spotlight(report: dict, name: str) -> Optional[dict]:
    """The route called `name` in detail, or None when the report has no such route."""
    route = next((r for r in report["routes"] if r["name"] == name), None)
    if route is None:
        return None
    n = int(route["n"])
    base = route["baseline"]
    out = {
        "name": name, "classes": route["classes"], "test_images": n,
        "unsteered": {"head_usage": base["head_usage"], "acc": base["acc"],
                      "acc_ci95": base.get("acc_ci95") or _ci(base["acc"], n), "kept_heads": _heads(base),
                      "flops_rel": base.get("flops_rel")},
        "steered": {"head_usage": route["head_usage"], "acc": route["acc"],
                    "acc_ci95": route.get("acc_ci95") or _ci(route["acc"], n), "kept_heads": _heads(route),
                    "flops_rel": route.get("flops_rel"), "k": route["k"], "alpha": route["alpha"],
                    "latents": route["latents"]},
        "paired_vs_unsteered": route["paired_vs_baseline"],
        "shows_paper_phenomenon": route["acc"] > base["acc"] and route["head_usage"] < base["head_usage"],
        "full_model_acc": (route.get("full") or {}).get("acc"),
        "paper": PAPER_FIGURES.get(name),
    }
    lf = next((r for r in report.get("label_free_routes", []) if r["name"] == name), None)
    if lf is not None:
        shared = {}
        for layer, ids in route["latents"].items():
            other = set(lf["latents"].get(layer, []))
            shared[layer] = sorted(set(ids) & other)
        out["label_free"] = {"head_usage": lf["head_usage"], "acc": lf["acc"], "acc_ci95": _ci(lf["acc"], n),
                             "kept_heads": _heads(lf), "k": lf["k"], "alpha": lf["alpha"], "latents": lf["latents"],
                             "latents_in_common": shared, "same_mask": lf["mask"] == route["mask"]}
    ref = {}
    for layer, info in (report.get("zero_shot", {}).get("layers") or {}).items():
        per = (info.get("per_class") or {}).get(name)
        if per:
            ref[layer] = {"precision_at_k": per["precision_at_k"],
                          "cos_class_mean_direction": per.get("cos_class_mean_direction")}
    if ref:
        out["self_reference"] = ref
    return out

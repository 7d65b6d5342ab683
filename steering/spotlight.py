"""One route of a steering report in detail, beside a published figure: the paper's CIFAR-100 "bowl".

`spotlight(report, name)` reads a finished report (routes, label-free routes, self-reference) and returns the
route's unsteered and steered static masks (head usage, test accuracy with its Wilson interval, kept heads), the
latents steering used, the label-free route and how far its latents agree with the label-based ones, and the paired
McNemar test against the unsteered mask. `spotlight_lines` renders it as markdown.
"""
from __future__ import annotations

import math
from typing import Optional

from steerprune.training.metrics import binomial_ci

__all__ = ["PAPER_FIGURES", "spotlight", "spotlight_lines"]

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


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _heads_text(heads: dict) -> str:
    return " ".join(f"{layer}:{','.join(f'h{h}' for h in hs) or '-'}" for layer, hs in heads.items())


def spotlight_lines(sp: dict) -> list[str]:
    u, s = sp["unsteered"], sp["steered"]
    ci = lambda e: f"[{_pct(e['acc_ci95'][0])}, {_pct(e['acc_ci95'][1])}]"  # noqa: E731
    L = [f"## Spotlight: {sp['name']} (test, {sp['test_images']} images)", "",
         "| | head usage | accuracy [95% Wilson] | kept heads per gated layer |", "|---|---|---|---|"]
    p = sp.get("paper")
    if p:
        L.append(f"| paper ({p['source']}): before -> after | {p['usage_before']:.2f} -> {p['usage_after']:.2f} | "
                 f"{_pct(p['acc_before'])} -> {_pct(p['acc_after'])} | {p['kept_heads']} |")
    if sp.get("full_model_acc") is not None:
        L.append(f"| full model | 1.000 | {_pct(sp['full_model_acc'])} | every head |")
    L += [f"| unsteered static mask (alpha = 1) | {u['head_usage']:.3f} | {_pct(u['acc'])} {ci(u)} | "
          f"{_heads_text(u['kept_heads'])} |",
          f"| steered (label-based, k {s['k']}, alpha {s['alpha']:g}) | {s['head_usage']:.3f} | {_pct(s['acc'])} "
          f"{ci(s)} | {_heads_text(s['kept_heads'])} |"]
    lf = sp.get("label_free")
    if lf:
        L.append(f"| steered (label-free, k {lf['k']}, alpha {lf['alpha']:g}) | {lf['head_usage']:.3f} | "
                 f"{_pct(lf['acc'])} {ci(lf)} | {_heads_text(lf['kept_heads'])} |")
    pv = sp["paired_vs_unsteered"]
    L += ["", f"Steered against unsteered on the same images: {pv['fixed']} fixed, {pv['broken']} broken, "
              f"McNemar p = {pv['mcnemar_p']:.3g}. "
              + ("Accuracy up and usage down: the paper's phenomenon." if sp["shows_paper_phenomenon"]
                 else "Not the paper's phenomenon (it needs accuracy up and usage down).")]
    L += ["", "Latents steered (label-based): "
          + "; ".join(f"{layer}: {', '.join(map(str, ids))}" for layer, ids in s["latents"].items()) + "."]
    if lf:
        common = {k: v for k, v in lf["latents_in_common"].items() if v}
        L += [f"Label-free latents in common with them: "
              + ("; ".join(f"{layer}: {', '.join(map(str, ids))}" for layer, ids in common.items()) if common else "none")
              + f"; same static mask: {'yes' if lf['same_mask'] else 'no'}."]
    ref = sp.get("self_reference")
    if ref:
        L += ["Self-reference for this class (label-free top latents vs label-based top latents, precision@k): "
              + "; ".join(f"{layer}: " + ", ".join(f"@{k} {v:.2f}" for k, v in r["precision_at_k"].items())
                          for layer, r in ref.items()) + "."]
    return L + [""]

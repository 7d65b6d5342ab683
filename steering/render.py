"""Rendering of a steering report: report.md (summary, global-mask comparison, spotlight, routes, self-reference)
and the two plots, and the markdown of a stand-alone global-mask baseline file."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np

from .masks import gated_kept_heads_text, kept_heads_text

__all__ = ["write_markdown", "write_plots", "global_mask_lines", "spotlight_lines", "write_baseline_markdown"]


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def write_markdown(path: Path, report: dict) -> None:
    s, cfg, zs = report["summary"], report["config"], report["zero_shot"]
    gated = report["gated_layers"]
    L = [f"# Steering report: {report['run']}", "",
         f"Strategy **{cfg['strategy']}** (ranking {cfg['rank']}), steered layers {cfg['layers_steered']}, "
         f"aggregate {cfg['aggregate']} tau {cfg['tau']}, k in {cfg['ks']}, alpha in {cfg['alphas']}, eps {cfg['eps']}. "
         "Latents, k, alpha and every static mask (including both controls') were chosen on the validation split; "
         "every figure below is on the test split.", "",
         "## Summary (test)", "",
         "| | mean head usage | mean route acc | mean off-route acc | mean FLOPs rel |", "|---|---|---|---|---|",
         f"| full model | 1.000 | {_pct(s['full']['mean_acc'])} | | 1.000 |",
         f"| dynamic policy (per image) | {s['dynamic']['mean_usage']:.3f} | {_pct(s['dynamic']['mean_acc'])} | | |",
         f"| unsteered static masks (alpha = 1) | {s['mean_usage_before']:.3f} | {_pct(s['mean_acc_before'])} | "
         f"{_pct(s['mean_off_route_acc_before'])} | {s['mean_flops_rel_before']:.3f} |",
         f"| **steered static masks** | **{s['mean_usage_after']:.3f}** | **{_pct(s['mean_acc_after'])}** | "
         f"{_pct(s['mean_off_route_acc_after'])} | {s['mean_flops_rel_after']:.3f} |",
         f"| random-latent control (same k, alpha) | {s['random_control']['mean_usage']:.3f} | "
         f"{_pct(s['random_control']['mean_acc'])} | | |",
         f"| no-SAE threshold control (matched usage) | {s['threshold_control']['mean_usage']:.3f} | "
         f"{_pct(s['threshold_control']['mean_acc'])} | | |"]
    if "global_mask" in s:
        g = s["global_mask"]["steered"]
        L.append(f"| one global static mask (all classes, no routing; usage >= steered) | {g['head_usage']:.3f} | "
                 f"{_pct(g['acc'])} | | {g['flops_rel']:.3f} |")
    L.append("")
    if "label_free" in s:
        lf = s["label_free"]
        L += [f"Label-free (zero-shot) steering: mean usage {lf['mean_usage_after']:.3f}, mean route acc "
              f"{_pct(lf['mean_acc_after'])}, usage reduction {_pct(lf['usage_reduction_rel'])} "
              f"(recovers {_pct(lf['recovery'])} of the label-based reduction).", ""]
    th = s["threshold_control"]
    L += [f"Head usage falls by {_pct(s['usage_reduction_rel'])} relative to the unsteered static masks; mean route "
          f"accuracy changes by {100 * s['acc_change']:+.1f} points. {s['routes_steered']} of {s['routes']} routes chose "
          f"alpha != 1; usage fell on {s['routes_usage_down']}, accuracy fell on {s['routes_acc_down']} "
          f"({s['routes_acc_down_p05']} with McNemar p < 0.05).",
          f"Accuracy up AND usage down (the paper's phenomenon): {s['routes_acc_up_usage_down']} of {s['routes']} routes, "
          f"{s['routes_acc_up_usage_down_p05']} of them with McNemar p < 0.05 against the unsteered mask on the same images.",
          f"Against the no-SAE threshold control at exactly matched usage ({th['routes_matched_usage']} routes matched): "
          f"steering better on {th['steered_better']}, equal on {th['steered_equal']}, worse on {th['steered_worse']}"
          + (f" (mean difference {100 * th['mean_acc_diff_matched']:+.1f} points)." if th["mean_acc_diff_matched"] is not None else "."),
          ""]
    vt = s.get("val_vs_test")
    rule_used = "all" if cfg["strategy"] == "global" else cfg.get("choose", "route")  # global always pools all
    if vt and vt["routes_steered"]:
        rho = f"Spearman {vt['spearman']:+.2f} (p {vt['spearman_p']:.2g})" if vt["spearman"] is not None else "no rank correlation (too few routes or no spread)"
        L += [f"Val vs test (choice rule `{rule_used}`, {vt['routes_steered']} steered routes): mean "
              f"accuracy gain over the unsteered mask {100 * vt['mean_val_gain']:+.1f} points on val, "
              f"{100 * vt['mean_test_gain']:+.1f} on test (optimism {100 * vt['optimism']:.1f} points); the test gain "
              f"has the val gain's sign on {_pct(vt['sign_agreement'])} of them and is negative on "
              f"{vt['test_gain_negative']}; {rho}.", ""]
    rules = s.get("choice_rules") or {}
    if len(rules) > 1:
        L += ["Every choice rule on the same candidates (route: each route alone on its val images; group: one (k, "
              "alpha) per class group on pooled val statistics; all: one for every route):", "",
              "| choice rule | distinct (k, alpha) | mean usage | mean route acc, val | mean route acc, test | "
              "val gain | test gain | sign agreement |", "|---|---|---|---|---|---|---|---|"]
        for rule, c in rules.items():
            gain = lambda x: f"{100 * x:+.1f}" if x is not None else ""  # noqa: E731
            L.append(f"| {'**' + rule + '**' if rule == rule_used else rule} | {c['distinct_k_alpha']} | "
                     f"{c['mean_usage']:.3f} | {_pct(c['mean_val_acc'])} | {_pct(c['mean_acc'])} | "
                     f"{gain(c['mean_val_gain'])} | {gain(c['mean_test_gain'])} | {_pct(c['sign_agreement'])} |")
        L.append("")
    if "global_mask" in report:
        L += global_mask_lines(report["global_mask"]) + [""]
    for sp in report.get("spotlight", []):
        L += [""] + spotlight_lines(sp)
    L += ["", "## Routes (test; acc with 95% Wilson interval)", "",
          "| route | n | alpha | k | usage before -> after | route acc before -> after | off-route acc after | "
          "FLOPs rel | kept heads | random ctrl usage / acc | threshold ctrl usage / acc | fixed / broken (p) |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["routes"]:
        b, rc, tc, pv = r["baseline"], r["random_control"], r["threshold_control"], r["paired_vs_baseline"]
        L.append(f"| {r['name']} | {r['n']} | {r['alpha']:g} | {r['k']} | {b['head_usage']:.3f} -> {r['head_usage']:.3f} | "
                 f"{_pct(b['acc'])} -> {_pct(r['acc'])} [{_pct(r['acc_ci95'][0])}, {_pct(r['acc_ci95'][1])}] | "
                 f"{_pct(r['off_route_acc'])} | {r['flops_rel']:.3f} | "
                 f"{gated_kept_heads_text(np.asarray(r['mask']), gated)} | {rc['head_usage']:.3f} / {_pct(rc['acc'])} | "
                 f"{tc['head_usage']:.3f} / {_pct(tc['acc'])} | {pv['fixed']} / {pv['broken']} ({pv['mcnemar_p']:.2f}) |")
    L += ["", "## Self-reference: label-free vs label-based latents", "",
          "Label-free: latents whose decoder row has the highest cosine with the class direction "
          "(classifier row through the final LayerNorm, mean removed). Label-based: latents that fire most on the "
          "class's val images relative to the other classes. The final norm reads the last block's output; earlier "
          "layers' SAEs see an earlier residual in the same basis.", "",
          "| layer | " + " | ".join(f"precision@{k} (random)" for k in zs["layers"][zs["reported_layer"]]["precision_at_k"])
          + " | " + " | ".join(f"Jaccard@{k}" for k in zs["layers"][zs["reported_layer"]]["jaccard_at_k"])
          + " | mean cos(class mean - mean, direction) | zero-shot classifier acc (chance) |",
          "|---" * (3 + 2 * len(zs["layers"][zs["reported_layer"]]["precision_at_k"])) + "|"]
    for name, z in zs["layers"].items():
        L.append(f"| {name} | " + " | ".join(f"{z['precision_at_k'][k]:.2f} ({z['random_precision'][k]:.3f})"
                                            for k in z["precision_at_k"])
                 + " | " + " | ".join(f"{v:.2f}" for v in z["jaccard_at_k"].values())
                 + f" | {z['mean_cos_class_mean_direction']:.2f} | {_pct(z['zero_shot_classifier_acc'])} "
                   f"({_pct(z['chance_acc'])}) |")
    L += ["", "Plots: `kept_heads.png` (kept heads per route), `usage_vs_acc.png` (before/after steering).", ""]
    Path(path).write_text("\n".join(L))


def write_plots(out_dir: Path, report: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gated, routes = report["gated_layers"], report["routes"]
    H = len(routes[0]["mask"][0])
    grid = np.array([[np.asarray(r["mask"])[l] for l in gated] for r in routes]).reshape(len(routes), -1)
    base = np.array([[np.asarray(r["baseline"]["mask"])[l] for l in gated] for r in routes]).reshape(len(routes), -1)
    # 2 = kept by both, 1 = kept only before steering, 0 = dropped by both, 3 = kept only after
    state = np.where(grid == 1, np.where(base == 1, 2, 3), np.where(base == 1, 1, 0))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * grid.shape[1] + 2), max(2.5, 0.3 * len(routes) + 1.5)))
    cmap = matplotlib.colors.ListedColormap(["#f0f0f0", "#f4a582", "#2166ac", "#92c5de"])
    ax.imshow(state, cmap=cmap, vmin=-0.5, vmax=3.5, aspect="auto")
    ax.set_yticks(range(len(routes)), [r["name"] for r in routes], fontsize=7)
    ax.set_xticks(range(grid.shape[1]), [f"L{l}h{h}" for l in gated for h in range(H)], rotation=90, fontsize=6)
    for j in range(1, len(gated)):
        ax.axvline(j * H - 0.5, color="k", lw=0.8)
    handles = [matplotlib.patches.Patch(color=c, label=t) for c, t in zip(
        cmap.colors, ["dropped", "dropped by steering", "kept", "added by steering"])]
    ax.legend(handles=handles, fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_title("kept heads per route (steered static masks)", fontsize=9)
    fig.tight_layout()
    p1 = out_dir / "kept_heads.png"
    fig.savefig(p1, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for r in routes:
        b = r["baseline"]
        ax.annotate("", xy=(r["head_usage"], r["acc"]), xytext=(b["head_usage"], b["acc"]),
                    arrowprops=dict(arrowstyle="->", color="0.6", lw=0.7))
    ax.scatter([r["baseline"]["head_usage"] for r in routes], [r["baseline"]["acc"] for r in routes],
               label="unsteered static mask", color="#f4a582", zorder=3)
    ax.scatter([r["head_usage"] for r in routes], [r["acc"] for r in routes], label="steered", color="#2166ac", zorder=3)
    ax.scatter([r["threshold_control"]["head_usage"] for r in routes], [r["threshold_control"]["acc"] for r in routes],
               label="threshold control", marker="x", color="k", zorder=3)
    ax.set_xlabel("head usage (gated layers)")
    ax.set_ylabel("route accuracy (test)")
    ax.legend(fontsize=7)
    ax.set_title("head usage vs route accuracy", fontsize=9)
    fig.tight_layout()
    p2 = out_dir / "usage_vs_acc.png"
    fig.savefig(p2, dpi=120)
    plt.close(fig)
    return [p1, p2]


# ---------------------------------------------------------------------------------------------- global mask

def _ci(lo_hi) -> str:
    return f"[{_pct(lo_hi[0])}, {_pct(lo_hi[1])}]"


def _pts(lo_hi) -> str:
    return f"[{100 * lo_hi[0]:+.1f}, {100 * lo_hi[1]:+.1f}]"


def global_mask_lines(baseline: dict) -> list[str]:
    """The 'routing vs one global mask' section: per route set, each global mask beside the routes, paired."""
    L = ["## Routing vs one global static mask (test, paired on the same images)", "",
         "One static head mask for every class, at the routes' mean head usage (kept-head count rounded up, then "
         "down), chosen on val as the best of a few head rankings (" + ", ".join(
             c["ranking"] for c in next(iter(baseline["route_sets"].values()))["global_masks"][0]["val_candidates"])
         + "). Routes answer each test image of their classes (a right hint); the global mask answers the same "
           "images. Intervals: Wilson (accuracies), paired percentile bootstrap over images (difference); p: exact "
           "McNemar test on the images only one of the two gets right.", "",
         "| routes | routes' mean usage / FLOPs | global mask: heads, usage, FLOPs, ranking | routes acc | "
         "global acc | routes - global (95% CI) | only routes right / only global right | McNemar p |",
         "|---|---|---|---|---|---|---|---|"]
    for name, rs in baseline["route_sets"].items():
        for g in rs["global_masks"]:
            t = g["test"]
            L.append(f"| {name} ({rs['routes']}) | {rs['routes_mean_usage']:.3f} / {rs['routes_mean_flops_rel']:.3f} | "
                     f"{g['n_heads']}, {g['head_usage']:.3f}, {g['flops_rel']:.3f}, {g['ranking']} | "
                     f"{_pct(t['routes_acc'])} {_ci(t['routes_acc_ci95'])} | {_pct(t['global_acc'])} "
                     f"{_ci(t['global_acc_ci95'])} | {100 * t['acc_diff']:+.1f} points {_pts(t['acc_diff_ci95'])} | "
                     f"{t['only_routes_right']} / {t['only_global_right']} | {t['mcnemar_p']:.2g} |")
    for name, rs in baseline["route_sets"].items():
        g = rs["global_masks"][0]
        t = g["test"]
        verdict = ("a difference McNemar's test finds significant at 0.05" if t["mcnemar_p"] < 0.05
                   else "not significant at 0.05 (McNemar)")
        L += ["", f"{name.capitalize()} routes vs one global mask with at least their usage ({g['head_usage']:.3f} "
                  f"against {rs['routes_mean_usage']:.3f}; FLOPs {g['flops_rel']:.3f} against "
                  f"{rs['routes_mean_flops_rel']:.3f}): routing is {100 * t['acc_diff']:+.1f} points "
                  f"{_pts(t['acc_diff_ci95'])} on the same {t['n']} test images, {verdict}, p = {t['mcnemar_p']:.2g}."]
    return L


def write_baseline_markdown(path: Path, baseline: dict, report_path: str) -> None:
    """global_baseline.md: the section above for an existing report, with per-route figures."""
    L = [f"# Global-mask baseline for {report_path}", "",
         "Computed after the report by `steerprune steer RUN --baseline-only`; the report itself is unchanged.", ""]
    L += global_mask_lines(baseline)
    for name, rs in baseline["route_sets"].items():
        g = rs["global_masks"][0]
        L += ["", f"### {name} routes vs the global mask with {g['n_heads']} heads, per route (test)", "",
              "| route | n | route acc | global acc |", "|---|---|---|---|"]
        L += [f"| {p['name']} | {p['n']} | {_pct(p['route_acc'])} | {_pct(p['global_acc'])} |"
              for p in g["test"]["per_route"]]
    Path(path).write_text("\n".join(L) + "\n")


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
          f"{kept_heads_text(u['kept_heads'])} |",
          f"| steered (label-based, k {s['k']}, alpha {s['alpha']:g}) | {s['head_usage']:.3f} | {_pct(s['acc'])} "
          f"{ci(s)} | {kept_heads_text(s['kept_heads'])} |"]
    lf = sp.get("label_free")
    if lf:
        L.append(f"| steered (label-free, k {lf['k']}, alpha {lf['alpha']:g}) | {lf['head_usage']:.3f} | "
                 f"{_pct(lf['acc'])} {ci(lf)} | {kept_heads_text(lf['kept_heads'])} |")
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

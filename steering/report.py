"""Evaluation of planned routes on the test split, the self-reference (label-free) section, and report.json/md/plots.

Every figure here is measured on test; nothing here chooses anything (the plans arrive fixed from val).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from steerprune.training.data import Split
from steerprune.training.metrics import accuracy, binomial_ci
from steerprune.training.model import head_flops
from steerprune.training.train import run_model

from .masks import MaskEval, head_usage, kept_heads, kept_heads_text
from .plan import RoutePlan, SteerConfig
from .steer import class_directions, encode_layers, rank_contrast, rank_zero_shot, top_k

__all__ = ["mcnemar_p", "forwards_on_test", "evaluate_plans", "self_reference", "summarize", "targets", "write_markdown", "write_plots"]


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value for b images fixed and c images broken (paired, same images)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def _row(ev: MaskEval, mask: np.ndarray, on: np.ndarray, off: np.ndarray, gated: list[int], vit) -> dict:
    correct = int((ev.preds(mask)[on] == ev.labels[on]).sum())
    lo, hi = binomial_ci(correct, len(on))
    return {"mask": np.asarray(mask).astype(int).tolist(), "head_usage": head_usage(mask, gated),
            "acc": correct / len(on), "acc_ci95": [lo, hi], "off_route_acc": ev.acc(mask, off),
            "flops_rel": head_flops(vit, np.asarray(mask))["rel"], "kept_heads": kept_heads(mask, gated)}


def forwards_on_test(run, test: Split) -> dict:
    """The plan-independent test forwards: full-model predictions and the unsteered dynamic policy (with the
    residuals it read, for the self-reference section). Computed once per report, shared by its evaluations."""
    depth, H = run.model.depth, run.model.num_heads
    return {"full_pred": run_model(run.model, test.images, run.backbone, head_mask=torch.ones(depth, H)).logits.argmax(-1),
            "dynamic": run_model(run.model, test.images, run.backbone, keep_inputs=True)}


def evaluate_plans(run, plans: list[RoutePlan], test: Split, cfg: SteerConfig, log=print,
                   forwards: Optional[dict] = None) -> list[dict]:
    """Per route on test: full model, dynamic policy, unsteered static mask, steered mask, random and threshold
    controls; route accuracy (route's classes), off-route accuracy (every other class), usage, kept heads, FLOPs.
    forwards: `forwards_on_test(run, test)`, when the caller already has them."""
    gated = run.policy.cfg.gated_layers
    forwards = forwards or forwards_on_test(run, test)
    full, dyn = forwards["full_pred"], forwards["dynamic"]
    dyn_pred = dyn.logits.argmax(-1)
    rng = np.random.default_rng(cfg.seed)
    rows = []
    for p in plans:
        on_all = np.flatnonzero(np.isin(test.labels, p.route.classes))
        off_all = np.flatnonzero(~np.isin(test.labels, p.route.classes))
        if len(off_all) > cfg.max_off_route:
            off_all = np.sort(rng.choice(off_all, cfg.max_off_route, replace=False))
        keep = np.concatenate([on_all, off_all])
        ev = MaskEval(run.model, test.images[keep], test.labels[keep], run.backbone)
        on, off = np.arange(len(on_all)), np.arange(len(on_all), len(keep))
        steered = _row(ev, p.mask, on, off, gated, run.vit)
        base = _row(ev, p.baseline_mask, on, off, gated, run.vit)
        pred_s, pred_b, y = ev.preds(p.mask)[on], ev.preds(p.baseline_mask)[on], ev.labels[on]
        fixed, broken = int(((pred_s == y) & (pred_b != y)).sum()), int(((pred_s != y) & (pred_b == y)).sum())
        rows.append({
            "name": p.route.name, "classes": list(p.route.classes), "n": int(len(on)), "n_off_route": int(len(off)),
            **steered, "alpha": p.steering.alpha, "k": p.k, "latents": p.steering.to_json()["latents"],
            "baseline": base,
            "threshold_control": {**_row(ev, p.threshold_mask, on, off, gated, run.vit), **p.threshold_setting},
            "random_control": {**_row(ev, p.random_mask, on, off, gated, run.vit),
                               "latents": p.random_steering.to_json()["latents"]},
            "full": {"acc": accuracy(full[on_all], test.labels[on_all]),
                     "off_route_acc": accuracy(full[off_all], test.labels[off_all]), "head_usage": 1.0},
            "dynamic": {"acc": accuracy(dyn_pred[on_all], test.labels[on_all]),
                        "off_route_acc": accuracy(dyn_pred[off_all], test.labels[off_all]),
                        "head_usage": float(dyn.masks[on_all][:, gated].mean())},
            "paired_vs_baseline": {"fixed": fixed, "broken": broken, "mcnemar_p": mcnemar_p(fixed, broken)},
            "val": p.val,
        })
    return rows


# ---------------------------------------------------------------------------------------------- self-reference

def self_reference(run, val: Split, test: Split, class_names: list[str], layers: list[int], ks: list[int],
                   val_forward=None, test_forward=None) -> dict:
    """Label-free vs label-based latent sets per layer and class, class-direction alignment, zero-shot classifier.

    The label-free set of class c: latents whose decoder row is most aligned with c's direction (no labels).
    The label-based set: latents that fire most on c's val images relative to other classes.
    val_forward / test_forward: the unsteered forwards with their policy inputs (keep_inputs=True), if computed."""
    gated = run.policy.cfg.gated_layers
    D = class_directions(run.vit)  # (C, D)
    Dn = D / np.linalg.norm(D, axis=1, keepdims=True).clip(1e-12)
    fv = val_forward if val_forward is not None else run_model(run.model, val.images, run.backbone, keep_inputs=True)
    ft = test_forward if test_forward is not None else run_model(run.model, test.images, run.backbone, keep_inputs=True)
    sv = encode_layers(run.saes, fv.policy_inputs, gated, layers)
    st = encode_layers(run.saes, ft.policy_inputs, gated, layers)
    out = {}
    for l in layers:
        W = run.saes[l].W_dec.detach().float().numpy()
        m = W.shape[0]
        prec = {k: [] for k in ks}
        jac = {k: [] for k in ks}
        per_class = {}
        x_test = st.inputs[l]
        centre = x_test.mean(0)  # unlabelled mean: the zero-shot classifier uses no labels
        for c, name in enumerate(class_names):
            lb = rank_contrast(sv.latents[l], val.labels, [c])
            lf = rank_zero_shot(W, D[c])
            for k in ks:
                a, b = set(top_k(lb, k)), set(top_k(lf, k))
                prec[k].append(len(a & b) / k)
                jac[k].append(len(a & b) / len(a | b))
            sel = test.labels == c
            delta = x_test[sel].mean(0) - centre if sel.any() else np.zeros_like(centre)
            per_class[name] = {
                "cos_class_mean_direction": float(delta @ Dn[c] / max(np.linalg.norm(delta), 1e-12)),
                "label_free_top": top_k(lf, max(ks)), "label_based_top": top_k(lb, max(ks)),
                "precision_at_k": {str(k): prec[k][-1] for k in ks}}
        xc = x_test - centre
        zs_pred = (xc @ Dn.T).argmax(1)  # nearest class direction by cosine (the row norm of xc is common)
        out[f"L{l}"] = {
            "num_latents": m,
            "precision_at_k": {str(k): float(np.mean(v)) for k, v in prec.items()},
            "jaccard_at_k": {str(k): float(np.mean(v)) for k, v in jac.items()},
            "random_precision": {str(k): k / m for k in ks},
            "random_jaccard": {str(k): (k * k / m) / (2 * k - k * k / m) for k in ks},
            "mean_cos_class_mean_direction": float(np.mean([v["cos_class_mean_direction"] for v in per_class.values()])),
            "zero_shot_classifier_acc": accuracy(zs_pred, test.labels),
            "chance_acc": 1.0 / len(class_names),
            "per_class": per_class,
        }
    last = f"L{max(layers)}"
    return {"layers": out, "reported_layer": last, "precision_at_k": out[last]["precision_at_k"],
            "random_precision": out[last]["random_precision"], "jaccard_at_k": out[last]["jaccard_at_k"],
            "zero_shot_classifier_acc": out[last]["zero_shot_classifier_acc"]}


# ---------------------------------------------------------------------------------------------- summary

def summarize(rows: list[dict], label_free: Optional[list[dict]] = None) -> dict:
    mean = lambda key, sub=None: float(np.mean([(r[sub] if sub else r)[key] for r in rows]))  # noqa: E731
    u0, u1 = mean("head_usage", "baseline"), mean("head_usage")
    a0, a1 = mean("acc", "baseline"), mean("acc")
    matched = [r for r in rows if abs(r["threshold_control"]["head_usage"] - r["head_usage"]) < 1e-9]
    up_down = [r for r in rows if r["acc"] > r["baseline"]["acc"] and r["head_usage"] < r["baseline"]["head_usage"]]
    s = {
        "routes": len(rows),
        "mean_usage_before": u0, "mean_usage_after": u1, "usage_reduction_rel": (u0 - u1) / u0 if u0 else 0.0,
        "mean_acc_before": a0, "mean_acc_after": a1, "acc_change": a1 - a0,
        "mean_off_route_acc_before": mean("off_route_acc", "baseline"), "mean_off_route_acc_after": mean("off_route_acc"),
        "mean_flops_rel_before": mean("flops_rel", "baseline"), "mean_flops_rel_after": mean("flops_rel"),
        "full": {"mean_acc": mean("acc", "full")},
        "dynamic": {"mean_acc": mean("acc", "dynamic"), "mean_usage": mean("head_usage", "dynamic")},
        "random_control": {"mean_usage": mean("head_usage", "random_control"), "mean_acc": mean("acc", "random_control"),
                           "usage_reduction_rel": (u0 - mean("head_usage", "random_control")) / u0 if u0 else 0.0},
        "threshold_control": {"mean_usage": mean("head_usage", "threshold_control"),
                              "mean_acc": mean("acc", "threshold_control"),
                              "routes_matched_usage": len(matched),
                              "steered_better": sum(r["acc"] > r["threshold_control"]["acc"] for r in matched),
                              "steered_equal": sum(r["acc"] == r["threshold_control"]["acc"] for r in matched),
                              "steered_worse": sum(r["acc"] < r["threshold_control"]["acc"] for r in matched),
                              "mean_acc_diff_matched": float(np.mean([r["acc"] - r["threshold_control"]["acc"]
                                                                      for r in matched])) if matched else None},
        "routes_steered": sum(r["alpha"] != 1.0 for r in rows),
        "routes_usage_down": sum(r["head_usage"] < r["baseline"]["head_usage"] for r in rows),
        "routes_acc_down": sum(r["acc"] < r["baseline"]["acc"] for r in rows),
        "routes_acc_up_usage_down": len(up_down),
        "routes_acc_up_usage_down_p05": sum(r["paired_vs_baseline"]["mcnemar_p"] < 0.05 for r in up_down),
        "routes_acc_down_p05": sum(r["acc"] < r["baseline"]["acc"] and r["paired_vs_baseline"]["mcnemar_p"] < 0.05
                                   for r in rows),
    }
    if label_free is not None:
        lf_u = float(np.mean([r["head_usage"] for r in label_free]))
        s["label_free"] = {"mean_usage_after": lf_u, "mean_acc_after": float(np.mean([r["acc"] for r in label_free])),
                           "usage_reduction_rel": (u0 - lf_u) / u0 if u0 else 0.0,
                           "recovery": (u0 - lf_u) / (u0 - u1) if u0 > u1 else None}
    return s


def targets(summary: dict, zero_shot: dict) -> dict:
    """The issue's targets, each with the measured value and met/missed."""
    t = {}
    red = summary["usage_reduction_rel"]
    t["usage_reduction_ge_25pct"] = {"value": red, "met": red >= 0.25}
    t["acc_drop_le_1pt"] = {"value": summary["acc_change"], "met": summary["acc_change"] >= -0.01}
    rc = summary["random_control"]
    t["beats_random_control"] = {"value": {"steered_reduction": red, "random_reduction": rc["usage_reduction_rel"]},
                                 "met": red > rc["usage_reduction_rel"]}
    th = summary["threshold_control"]
    t["beats_threshold_control_matched_usage"] = {
        "value": {k: th[k] for k in ("routes_matched_usage", "steered_better", "steered_equal", "steered_worse",
                                     "mean_acc_diff_matched")},
        # better on more matched routes than worse, and better on average: one lucky route is not enough
        "met": bool(th["mean_acc_diff_matched"] is not None and th["mean_acc_diff_matched"] > 0
                    and th["steered_better"] > th["steered_worse"])}
    p1, r1 = zero_shot["precision_at_k"], zero_shot["random_precision"]
    ratio = {k: p1[k] / r1[k] for k in p1}
    t["label_free_precision_ge_5x_random"] = {"value": ratio, "met": all(v >= 5 for v in ratio.values())}
    if "label_free" in summary:
        rec = summary["label_free"]["recovery"]
        t["label_free_recovers_ge_70pct"] = {"value": rec, "met": rec is not None and rec >= 0.7}
    return t


# ---------------------------------------------------------------------------------------------- writers

def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def write_markdown(path: Path, report: dict) -> None:
    s, cfg, zs, tg = report["summary"], report["config"], report["zero_shot"], report["targets"]
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
         f"{_pct(s['threshold_control']['mean_acc'])} | | |", ""]
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
          "", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for name, v in tg.items():
        val = v["value"]
        txt = (", ".join(f"{k}: {x:.3g}" if isinstance(x, float) else f"{k}: {x}" for k, x in val.items())
               if isinstance(val, dict) else ("n/a" if val is None else f"{val:.3f}"))
        L.append(f"| {name} | {txt} | {'met' if v['met'] else '**missed**'} |")
    L += ["", "## Routes (test; acc with 95% Wilson interval)", "",
          "| route | n | alpha | k | usage before -> after | route acc before -> after | off-route acc after | "
          "FLOPs rel | kept heads | random ctrl usage / acc | threshold ctrl usage / acc | fixed / broken (p) |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["routes"]:
        b, rc, tc, pv = r["baseline"], r["random_control"], r["threshold_control"], r["paired_vs_baseline"]
        L.append(f"| {r['name']} | {r['n']} | {r['alpha']:g} | {r['k']} | {b['head_usage']:.3f} -> {r['head_usage']:.3f} | "
                 f"{_pct(b['acc'])} -> {_pct(r['acc'])} [{_pct(r['acc_ci95'][0])}, {_pct(r['acc_ci95'][1])}] | "
                 f"{_pct(r['off_route_acc'])} | {r['flops_rel']:.3f} | "
                 f"{kept_heads_text(np.asarray(r['mask']), gated)} | {rc['head_usage']:.3f} / {_pct(rc['acc'])} | "
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

"""The self-reference (label-free) analysis on test: do the latents chosen without labels (decoder rows aligned
with the classifier's class directions) agree with those chosen from labels, and how well do the class directions
alone classify the residual?"""
from __future__ import annotations

import numpy as np

from steerprune.training.data import Split
from steerprune.training.metrics import accuracy
from steerprune.training.forward import run_model

from .steer import class_directions, encode_layers, rank_contrast, rank_zero_shot, top_k

__all__ = ["self_reference"]


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

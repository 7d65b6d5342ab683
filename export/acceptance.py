"""Acceptance of routed answers: the rule a route's answer must pass in verify mode, chosen per route on validation.

A routed answer is accepted when its top-1 class is one of the route's classes (always required: it is what catches
a wrong hint) and the rule's thresholds hold: top-1 probability >= `min_prob` and top-1 minus top-2 probability
>= `min_margin`. Anything else is rerun on the full model. The expected cost of a request with the right hint is

    cost = flops_rel(route) + fallback_rate * 1        (relative to the full model's FLOPs)

and `choose_rule` picks, on the route's validation images, the rule of lowest cost whose accuracy with fallbacks
stays within `eps` of the full model's on the same images and, given wrong-hint images (validation images of other
classes sent with this route's hint), within `wrong_eps` of the full model's on those. Candidates are exact: every value at which the accepted
set changes, for a confidence-only and a margin-only rule. Pure numpy, torch-free: the service applies the rule
with `accepted`, the export chooses it with `choose_rule`.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import numpy as np

__all__ = ["EPS", "WRONG_EPS", "AcceptRule", "RuleScore", "WrongHints", "Choice", "softmax", "top2", "accepted", "score_rule",
           "choose_rule"]

EPS = 0.005  # default allowed accuracy loss against the full model on the route's validation images (0.5 point)
# default allowed loss on wrong-hint images: 5 points there is 1 point of the load test's default mix (20% wrong hints)
WRONG_EPS = 0.05


class AcceptRule(NamedTuple):
    """Thresholds on the routed model's softmax; top-1 inside the route's classes is required on top of them."""
    min_prob: float = 0.0  # top-1 probability must be >= this
    min_margin: float = 0.0  # top-1 minus top-2 probability must be >= this

    def to_json(self) -> dict:
        return {"min_prob": float(self.min_prob), "min_margin": float(self.min_margin), "top1_in_route": True}

    @classmethod
    def from_json(cls, d: dict) -> "AcceptRule":
        return cls(float(d.get("min_prob", 0.0)), float(d.get("min_margin", 0.0)))


class RuleScore(NamedTuple):
    acc: float  # accuracy with fallbacks on the route's images
    fallback: float  # share of them rerun on the full model
    cost: float  # flops_rel + fallback (relative to the full model)


class WrongHints(NamedTuple):
    acc: float  # accuracy with fallbacks on validation images of other classes sent with this route's hint
    full_acc: float  # the full model's on them
    n: int


class Choice(NamedTuple):
    rule: AcceptRule
    kind: str  # 'confidence' | 'margin': which threshold the search moved
    score: RuleScore
    full_acc: float  # the full model's accuracy on the same images
    off_route: float  # share whose routed top-1 lies outside the route (a fallback under every rule)
    n: int  # validation images of the route's classes
    served: bool  # False when even the best rule costs at least the full model
    reason: Optional[str]  # why not served
    wrong: Optional["WrongHints"] = None  # the rule on wrong-hint images, when they were given


def softmax(logits: np.ndarray) -> np.ndarray:
    """(N, C) logits -> (N, C) float32 probabilities."""
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def top2(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """probs (N, C) -> top-1 index (N,), top-1 probability (N,), top-1 minus top-2 probability (N,)."""
    if probs.shape[1] < 2:
        return np.zeros(len(probs), np.int64), probs[:, 0].copy(), probs[:, 0].copy()
    part = np.partition(probs, probs.shape[1] - 2, axis=1)[:, -2:]  # (N, 2): second largest, largest
    return probs.argmax(1), part[:, 1], part[:, 1] - part[:, 0]


def accepted(probs: np.ndarray, classes: Sequence[int] | np.ndarray, rule: AcceptRule) -> np.ndarray:
    """probs (N, C) softmax of the routed model -> (N,) bool: the routed answer stands (no rerun on the full model)."""
    top, p1, margin = top2(probs)
    return np.isin(top, np.asarray(list(classes))) & (p1 >= rule.min_prob) & (margin >= rule.min_margin)


def score_rule(routed_probs: np.ndarray, full_pred: np.ndarray, labels: np.ndarray, classes, rule: AcceptRule,
               flops_rel: float) -> RuleScore:
    """Accuracy, fallback rate and expected cost of `rule` on these images (right hints: labels in `classes`)."""
    ok = accepted(routed_probs, classes, rule)
    pred = np.where(ok, routed_probs.argmax(1), full_pred)
    fb = float(1.0 - ok.mean()) if len(ok) else 0.0
    return RuleScore(float((pred == labels).mean()) if len(labels) else 0.0, fb, float(flops_rel) + fb)


def _sum_at_or_above(values: np.ndarray, weights: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each candidate t: (sum of weights over values >= t, count of values >= t)."""
    order = np.argsort(-values, kind="stable")
    k = np.searchsorted(-values[order], -cand, side="right")  # values sorted descending: how many are >= t
    return np.concatenate([[0.0], np.cumsum(weights[order])])[k], k


def _best_threshold(values: np.ndarray, in_route: np.ndarray, routed_ok: np.ndarray, full_ok: np.ndarray,
                    need: float, wrong: Optional[tuple] = None) -> tuple[float, float, float, Optional[float]]:
    """Exact 1-D search: the lowest-fallback threshold t on `values` (accept = in_route & values >= t) whose accuracy
    with fallbacks is >= need (and, with `wrong` = (values, in_route, full_ok, need) of wrong-hint images, whose
    accuracy there is >= that need too). Returns (t, fallback, acc, wrong acc); ties in fallback go to the higher
    accuracy."""
    n = len(values)
    pool = [[0.0], values[in_route]] + ([wrong[0][wrong[1]]] if wrong is not None else [])
    # candidates: 0 (accept every in-route answer), each value (accepts exactly the values >= it), and just above
    # the largest (accepts nothing)
    cand = np.unique(np.concatenate(pool))
    cand = np.append(cand, np.nextafter(cand[-1], np.inf))
    r_acc, k = _sum_at_or_above(values[in_route], routed_ok[in_route].astype(float), cand)
    f_acc, _ = _sum_at_or_above(values[in_route], full_ok[in_route].astype(float), cand)
    # accepted: routed answer; rejected in-route and every off-route answer: the full model's
    acc = (full_ok.sum() - f_acc + r_acc) / n
    fb = 1.0 - k / n
    feasible = acc >= need - 1e-12
    w_acc = None
    if wrong is not None:
        wv, w_in, w_full_ok, w_need = wrong
        # an accepted wrong-hint answer lies in the route, the label outside it: always wrong
        w_lost, _ = _sum_at_or_above(wv[w_in], w_full_ok[w_in].astype(float), cand)
        w_acc = (w_full_ok.sum() - w_lost) / max(len(wv), 1)
        feasible &= w_acc >= w_need - 1e-12
    best = np.lexsort((-acc, fb, ~feasible))[0]  # feasible first, then lowest fallback, then highest accuracy
    return float(cand[best]), float(fb[best]), float(acc[best]), None if w_acc is None else float(w_acc[best])


def choose_rule(routed_probs: np.ndarray, full_pred: np.ndarray, labels: np.ndarray, classes: Sequence[int],
                flops_rel: float, eps: float = EPS, wrong: Optional[tuple] = None,
                wrong_eps: float = WRONG_EPS) -> Choice:
    """The cheapest rule whose accuracy with fallbacks is >= the full model's - eps on these images.

    routed_probs (N, C): the route's model's softmax on validation images of the route's classes; full_pred (N,):
    the full model's top-1 on them; labels (N,). With `wrong` = (routed_probs, full_pred, labels) of validation
    images of other classes sent with this route's hint, the rule must also keep their accuracy (all from the full
    model: an accepted answer there is wrong) >= the full model's - wrong_eps. The rule accepting nothing always
    meets both constraints (it answers exactly like the full model), so a choice always exists; it is
    `served=False` when its cost is >= 1.
    """
    if not 0 <= eps < 1 or not 0 <= wrong_eps <= 1:
        raise ValueError(f"eps must be in [0, 1) and wrong_eps in [0, 1], got {eps}, {wrong_eps}")
    labels = np.asarray(labels)
    n = len(labels)
    if n == 0:
        return Choice(AcceptRule(1.0, 0.0), "confidence", RuleScore(0.0, 1.0, float(flops_rel) + 1.0), 0.0, 1.0, 0,
                      False, "no validation images of its classes", None)
    cls = np.asarray(list(classes))
    top, p1, margin = top2(routed_probs)
    in_route = np.isin(top, cls)
    routed_ok, full_ok = top == labels, np.asarray(full_pred) == labels
    full_acc = float(full_ok.mean())
    w = None
    if wrong is not None and len(wrong[2]):
        w_top, w_p1, w_margin = top2(wrong[0])
        w_full_ok = np.asarray(wrong[1]) == np.asarray(wrong[2])
        w = (np.isin(w_top, cls), w_full_ok, float(w_full_ok.mean()) - wrong_eps, (w_p1, w_margin))
    picks = []
    for j, (kind, values) in enumerate((("confidence", p1), ("margin", margin))):
        wt = None if w is None else (w[3][j].astype(np.float64), w[0], w[1], w[2])
        t, fb, acc, w_acc = _best_threshold(values.astype(np.float64), in_route, routed_ok, full_ok, full_acc - eps, wt)
        rule = AcceptRule(t, 0.0) if kind == "confidence" else AcceptRule(0.0, t)
        picks.append((fb, -acc, j, kind, rule, w_acc))
    fb, neg_acc, _, kind, rule, w_acc = min(picks)
    score = RuleScore(-neg_acc, fb, float(flops_rel) + fb)
    served = score.cost < 1.0
    reason = None if served else (
        f"expected cost {score.cost:.3f} of the full model at its best rule (FLOPs {flops_rel:.3f} + fallback "
        f"{fb:.3f}): the full model is cheaper")
    wrong_rec = None if w is None else WrongHints(w_acc, float(w[1].mean()), int(len(w[1])))
    return Choice(rule, kind, score, full_acc, float(1.0 - in_route.mean()), n, served, reason, wrong_rec)

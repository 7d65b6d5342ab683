"""Acceptance of routed answers: the rule a route's answer must pass in verify mode, chosen per route on validation.

Two families of rules. A top-1 rule accepts a routed answer when its top-1 class is one of the route's classes and
its thresholds hold: top-1 probability >= `min_prob` and top-1 minus top-2 probability >= `min_margin`. A
route-probability rule accepts when the route's classes together hold at least `min_route_prob` of the routed
model's probability, whether or not one of them is its top-1, and answers with the most probable of them: it
weighs the hint as evidence, so it only stands when the wrong-hint bound below holds with it (a wrong hint it
accepts is answered wrongly). Anything not accepted is rerun on the full model. The expected cost of a request with
the right hint is

    cost = flops_rel(route) + fallback_rate * 1        (relative to the full model's FLOPs)

and `choose_rule` picks, on the route's validation images, the rule of lowest cost whose accuracy with fallbacks
stays within `eps` of the full model's on the same images and, given wrong-hint images (validation images of other
classes sent with this route's hint), within `wrong_eps` of the full model's on those. Candidates are exact: every
value at which the accepted set changes, for a confidence-only, a margin-only and (given wrong-hint images) a
route-probability rule. Pure numpy, torch-free: the service applies the rule with `accepted` and `answer_index`,
the export chooses it with `choose_rule`.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import numpy as np

__all__ = ["EPS", "WRONG_EPS", "AcceptRule", "RuleScore", "WrongHints", "Choice", "softmax", "top2", "accepted",
           "answer_index", "accepted_rows", "answer_rows", "score_rule", "choose_rule"]

EPS = 0.005  # default allowed accuracy loss against the full model on the route's validation images (0.5 point)
# default allowed loss on wrong-hint images: 5 points there is 1 point of the load test's default mix (20% wrong hints)
WRONG_EPS = 0.05


class AcceptRule(NamedTuple):
    """Thresholds on the routed model's softmax. Without `min_route_prob`: top-1 inside the route's classes is
    required on top of `min_prob` and `min_margin`. With it: the route's classes must hold that much probability
    together, and top-1 may lie anywhere."""
    min_prob: float = 0.0  # top-1 probability must be >= this
    min_margin: float = 0.0  # top-1 minus top-2 probability must be >= this
    min_route_prob: Optional[float] = None  # the route's classes' total probability must be >= this

    @property
    def top1_in_route(self) -> bool:
        return self.min_route_prob is None

    def to_json(self) -> dict:
        out = {"min_prob": float(self.min_prob), "min_margin": float(self.min_margin), "top1_in_route": self.top1_in_route}
        if self.min_route_prob is not None:
            out["min_route_prob"] = float(self.min_route_prob)
        return out

    @classmethod
    def from_json(cls, d: dict) -> "AcceptRule":
        mrp = d.get("min_route_prob")
        return cls(float(d.get("min_prob", 0.0)), float(d.get("min_margin", 0.0)), None if mrp is None else float(mrp))


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
    kind: str  # 'confidence' | 'margin' | 'route_prob': which threshold the search moved
    score: RuleScore
    full_acc: float  # the full model's accuracy on the same images
    off_route: float  # share whose routed top-1 lies outside the route (a fallback under every top-1 rule)
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


def route_prob(probs: np.ndarray, classes) -> np.ndarray:
    """(N, C) softmax -> (N,) total probability of the route's classes."""
    return probs[:, np.asarray(list(classes))].sum(1)


def accepted(probs: np.ndarray, classes: Sequence[int] | np.ndarray, rule: AcceptRule) -> np.ndarray:
    """probs (N, C) softmax of the routed model -> (N,) bool: the routed answer stands (no rerun on the full model)."""
    top, p1, margin = top2(probs)
    ok = (p1 >= rule.min_prob) & (margin >= rule.min_margin)
    if rule.min_route_prob is not None:
        return ok & (route_prob(probs, classes) >= rule.min_route_prob)
    return ok & np.isin(top, np.asarray(list(classes)))


def answer_index(probs: np.ndarray, classes, rule: AcceptRule) -> np.ndarray:
    """(N, C) softmax of the routed model -> (N,) the class an accepted routed answer gives: its top-1 under a top-1
    rule (which lies in the route), the most probable of the route's classes under a route-probability rule."""
    if rule.min_route_prob is None:
        return probs.argmax(1)
    cls = np.asarray(sorted(classes))
    return cls[probs[:, cls].argmax(1)]


def accepted_rows(probs: np.ndarray, in_route: np.ndarray, min_prob: np.ndarray, min_margin: np.ndarray,
                  min_route_prob: np.ndarray) -> np.ndarray:
    """`accepted` for a batch whose rows have routes of their own, in one pass: probs (N, C), in_route (N, C) bool
    (row i's route classes), thresholds (N,) each, min_route_prob NaN for a top-1 rule -> (N,) bool."""
    top, p1, margin = top2(probs)
    ok = (p1 >= min_prob) & (margin >= min_margin)
    by_route = ~np.isnan(min_route_prob)
    route_ok = np.where(in_route, probs, 0.0).sum(1) >= np.nan_to_num(min_route_prob)
    return ok & np.where(by_route, route_ok, in_route[np.arange(len(probs)), top])


def answer_rows(probs: np.ndarray, in_route: np.ndarray, by_route_prob: np.ndarray) -> np.ndarray:
    """`answer_index` row by row: the most probable of row i's route classes where it has a route-probability rule
    (by_route_prob (N,) bool), its top-1 elsewhere."""
    return np.where(by_route_prob, np.where(in_route, probs, -1.0).argmax(1), probs.argmax(1))


def score_rule(routed_probs: np.ndarray, full_pred: np.ndarray, labels: np.ndarray, classes, rule: AcceptRule,
               flops_rel: float) -> RuleScore:
    """Accuracy, fallback rate and expected cost of `rule` on these images (right hints: labels in `classes`)."""
    ok = accepted(routed_probs, classes, rule)
    pred = np.where(ok, answer_index(routed_probs, classes, rule), full_pred)
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
    `served=False` when its cost is >= 1. The route-probability family is searched only when `wrong` is given.
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
    kinds = [("confidence", p1, in_route, routed_ok), ("margin", margin, in_route, routed_ok)]
    if wrong is not None and len(wrong[2]):
        w_top, w_p1, w_margin = top2(wrong[0])
        w_full_ok = np.asarray(wrong[1]) == np.asarray(wrong[2])
        w = (np.isin(w_top, cls), w_full_ok, float(w_full_ok.mean()) - wrong_eps,
             (w_p1, w_margin, route_prob(wrong[0], cls)))
        # the route-probability rule needs the wrong-hint bound: without it, accepting everything would look free
        everywhere = np.ones(n, bool)
        kinds.append(("route_prob", route_prob(routed_probs, cls), everywhere,
                      answer_index(routed_probs, cls, AcceptRule(min_route_prob=0.0)) == labels))
    picks = []
    for j, (kind, values, kind_in, kind_ok) in enumerate(kinds):
        wt = None
        if w is not None:
            w_in = w[0] if kind != "route_prob" else np.ones(len(w[1]), bool)
            wt = (w[3][j].astype(np.float64), w_in, w[1], w[2])
        t, fb, acc, w_acc = _best_threshold(values.astype(np.float64), kind_in, kind_ok, full_ok, full_acc - eps, wt)
        rule = {"confidence": AcceptRule(t, 0.0), "margin": AcceptRule(0.0, t),
                "route_prob": AcceptRule(0.0, 0.0, t)}[kind]
        picks.append((fb, -acc, j, kind, rule, w_acc))
    fb, neg_acc, _, kind, rule, w_acc = min(picks)
    score = RuleScore(-neg_acc, fb, float(flops_rel) + fb)
    served = score.cost < 1.0
    reason = None if served else (
        f"expected cost {score.cost:.3f} of the full model at its best rule (FLOPs {flops_rel:.3f} + fallback "
        f"{fb:.3f}): the full model is cheaper")
    wrong_rec = None if w is None else WrongHints(w_acc, float(w[1].mean()), int(len(w[1])))
    return Choice(rule, kind, score, full_acc, float(1.0 - in_route.mean()), n, served, reason, wrong_rec)

"""Per-route acceptance rules (export/acceptance.py) on hand-made and random arrays."""
from __future__ import annotations

import numpy as np
import pytest

from steerprune.export.acceptance import (AcceptRule, accepted, answer_index, choose_rule, route_prob, score_rule,
                                          softmax, top2)


def _probs(top: list[int], p1: list[float], c: int = 3) -> np.ndarray:
    """(N, c) softmax rows with the given top-1 class and probability; the rest split evenly (margin grows with p1)."""
    out = np.zeros((len(top), c))
    for i, (t, p) in enumerate(zip(top, p1)):
        out[i] = (1 - p) / (c - 1)
        out[i, t] = p
    return out


# route classes {0, 1} of 3; 10 validation images, all of the route's classes (right hints):
#   6 routed right (p 0.9 .. 0.65), 2 routed to the wrong in-route class (p 0.6, 0.55), 2 routed off the route
LABELS = np.array([0, 1, 0, 1, 0, 1, 0, 1, 0, 1])
ROUTED = _probs([0, 1, 0, 1, 0, 1, 1, 0, 2, 2], [0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.5])
# the full model: wrong on image 5 and on off-route image 9, right elsewhere -> accuracy 0.8
FULL = np.array([0, 1, 0, 1, 0, 0, 0, 1, 0, 2])


def test_hand_made_case_cheapest_rule_within_eps():
    c = choose_rule(ROUTED, FULL, LABELS, [0, 1], flops_rel=0.5, eps=0.005)
    # accept-all-in-route keeps 2 wrong answers (acc 0.7 < 0.795); p >= 0.6 keeps one wrong but the full model wins
    # image 7 back (acc 0.8, fallback 0.3); p >= 0.65 is more accurate (0.9) but falls back more (0.4)
    assert c.kind == "confidence" and c.rule == AcceptRule(pytest.approx(0.6), 0.0)
    assert c.score.acc == pytest.approx(0.8) and c.score.fallback == pytest.approx(0.3)
    assert c.score.cost == pytest.approx(0.8) and c.full_acc == pytest.approx(0.8)
    assert c.off_route == pytest.approx(0.2) and c.n == 10 and c.served and c.reason is None
    # the recorded score is what the rule really does
    assert score_rule(ROUTED, FULL, LABELS, [0, 1], c.rule, 0.5) == pytest.approx(tuple(c.score))
    # a looser eps admits accepting every in-route answer: only the off-route pair falls back
    loose = choose_rule(ROUTED, FULL, LABELS, [0, 1], flops_rel=0.5, eps=0.15)
    assert loose.rule == AcceptRule(0.0, 0.0) and loose.score.fallback == pytest.approx(0.2)
    assert loose.score.acc == pytest.approx(0.7)
    # eps 0 with this case: the same 0.6 rule (accuracy 0.8 equals the full model's)
    assert choose_rule(ROUTED, FULL, LABELS, [0, 1], 0.5, eps=0.0).rule.min_prob == pytest.approx(0.6)


def test_wrong_hint_guard_raises_the_threshold():
    # 4 images of class 2 sent with this route's hint: two routed into the route (p 0.95, 0.62), two off it; the full
    # model gets all 4 right. With wrong_eps 0.3 at most one may be accepted (an accepted one is always wrong)
    w_probs, w_full, w_labels = _probs([0, 1, 2, 2], [0.95, 0.62, 0.8, 0.7]), np.array([2, 2, 2, 2]), np.full(4, 2)
    c = choose_rule(ROUTED, FULL, LABELS, [0, 1], 0.5, eps=0.005, wrong=(w_probs, w_full, w_labels), wrong_eps=0.3)
    # right hints alone would take p >= 0.6 (it accepts the 0.62 wrong-hint answer too); the next threshold is 0.65
    assert c.rule == AcceptRule(pytest.approx(0.65), 0.0) and c.score.fallback == pytest.approx(0.4)
    assert c.score.acc == pytest.approx(0.9)
    assert c.wrong.acc == pytest.approx(0.75) and c.wrong.full_acc == 1.0 and c.wrong.n == 4
    loose = choose_rule(ROUTED, FULL, LABELS, [0, 1], 0.5, eps=0.005, wrong=(w_probs, w_full, w_labels), wrong_eps=0.5)
    assert loose.rule.min_prob == pytest.approx(0.6) and loose.wrong.acc == pytest.approx(0.5)


def test_margin_rule_when_it_separates_better():
    # same top-1 probability 0.5, but the wrong answers have a close runner-up: only the margin tells them apart
    routed = np.array([[0.5, 0.1, 0.4], [0.5, 0.45, 0.05], [0.05, 0.5, 0.45], [0.1, 0.5, 0.4]])
    labels = np.array([0, 1, 0, 1])  # rows 1 and 2 are routed to the wrong in-route class with margin 0.05
    full = labels.copy()  # the full model is right everywhere
    c = choose_rule(routed, full, labels, [0, 1], flops_rel=0.4, eps=0.0)
    assert c.kind == "margin" and c.rule.min_prob == 0.0 and c.rule.min_margin == pytest.approx(0.1)
    assert c.score.acc == pytest.approx(1.0) and c.score.fallback == pytest.approx(0.5)
    assert c.score.cost == pytest.approx(0.9) and c.served


def test_route_no_cheaper_than_full_is_not_served():
    c = choose_rule(ROUTED, FULL, LABELS, [0, 1], flops_rel=0.75, eps=0.005)
    assert c.score.cost == pytest.approx(1.05) and not c.served and "full model is cheaper" in c.reason
    empty = choose_rule(np.zeros((0, 3)), np.zeros(0, int), np.zeros(0, int), [0], 0.5)
    assert not empty.served and "no validation images" in empty.reason


@pytest.mark.parametrize("seed", range(6))
def test_choice_equals_brute_force_and_meets_eps(seed):
    rng = np.random.default_rng(seed)
    n, c, classes = 300, 6, [1, 4]
    labels = rng.choice(classes, n)
    logits = rng.normal(size=(n, c)) + 2.5 * np.eye(c)[labels] * rng.uniform(0, 1.5, (n, 1))
    routed = softmax(logits.astype(np.float32))
    full = np.where(rng.uniform(size=n) < 0.8, labels, rng.integers(0, c, n))
    eps = 0.005 * (seed % 3)
    # wrong hints (even seeds): images of other classes with a logit bump on a route class now and then
    w_labels = rng.choice([0, 2, 3, 5], n)
    w_logits = rng.normal(size=(n, c)) + 2.5 * np.eye(c)[w_labels] + 2.0 * np.eye(c)[rng.choice(classes, n)]
    w_routed, w_full = softmax(w_logits.astype(np.float32)), np.where(rng.uniform(size=n) < 0.8, w_labels, 1)
    wrong, w_eps = ((w_routed, w_full, w_labels), 0.03) if seed % 2 == 0 else (None, 0.0)
    got = choose_rule(routed, full, labels, classes, flops_rel=0.6, eps=eps, wrong=wrong, wrong_eps=w_eps)
    full_acc = float((full == labels).mean())
    assert got.score.acc >= full_acc - eps - 1e-12  # the constraint holds

    def feasible(rule):
        if score_rule(routed, full, labels, classes, rule, 0.6).acc < full_acc - eps - 1e-12:
            return False
        return wrong is None or score_rule(w_routed, w_full, w_labels, classes, rule, 0.6).acc >= (
            (w_full == w_labels).mean() - w_eps - 1e-12)

    _, p1, margin = top2(routed)
    _, w_p1, w_margin = top2(w_routed)
    best = min(score_rule(routed, full, labels, classes, AcceptRule(t, 0.0), 0.6).fallback
               for t in np.concatenate([[0.0], p1, w_p1, [1.01]]) if feasible(AcceptRule(t, 0.0)))
    best_m = min(score_rule(routed, full, labels, classes, AcceptRule(0.0, t), 0.6).fallback
                 for t in np.concatenate([[0.0], margin, w_margin, [1.01]]) if feasible(AcceptRule(0.0, t)))
    best_r = 1.0
    if wrong is not None:  # the route-probability family is searched only with the wrong-hint bound
        best_r = min(score_rule(routed, full, labels, classes, AcceptRule(0.0, 0.0, t), 0.6).fallback
                     for t in np.concatenate([[0.0], route_prob(routed, classes), route_prob(w_routed, classes),
                                              [1.01]]) if feasible(AcceptRule(0.0, 0.0, t)))
    else:
        assert got.kind != "route_prob"
    assert got.score.fallback == pytest.approx(min(best, best_m, best_r))  # and nothing in any family is cheaper
    assert feasible(got.rule)
    if wrong is not None:
        assert got.wrong.acc == pytest.approx(score_rule(w_routed, w_full, w_labels, classes, got.rule, 0.6).acc)
    assert got.score == pytest.approx(tuple(score_rule(routed, full, labels, classes, got.rule, 0.6)))


def test_accepted_requires_top1_in_route():
    probs = np.array([[0.9, 0.05, 0.05], [0.05, 0.05, 0.9], [0.4, 0.35, 0.25]])
    assert accepted(probs, [0], AcceptRule()).tolist() == [True, False, True]
    assert accepted(probs, [0], AcceptRule(0.5, 0.0)).tolist() == [True, False, False]
    assert accepted(probs, [0, 1], AcceptRule(0.0, 0.1)).tolist() == [True, False, False]
    assert AcceptRule.from_json(AcceptRule(0.25, 0.1).to_json()) == AcceptRule(0.25, 0.1)
    with pytest.raises(ValueError, match="eps"):
        choose_rule(ROUTED, FULL, LABELS, [0, 1], 0.5, eps=1.5)


def test_route_probability_rule_accepts_the_hint_without_top1_and_answers_inside_the_route():
    probs = np.array([[0.30, 0.25, 0.45], [0.05, 0.05, 0.90], [0.50, 0.40, 0.10]])
    rule = AcceptRule(min_route_prob=0.5)
    assert not rule.top1_in_route
    assert accepted(probs, [0, 1], rule).tolist() == [True, False, True]  # 0.55, 0.10, 0.90 in the route
    assert answer_index(probs, [0, 1], rule).tolist() == [0, 0, 0]
    assert answer_index(probs, [1], rule).tolist() == [1, 1, 1]
    assert answer_index(probs, [0, 1], AcceptRule()).tolist() == [2, 2, 0]  # top-1 rules answer their top-1
    assert AcceptRule.from_json(rule.to_json()) == rule and rule.to_json()["top1_in_route"] is False
    assert "min_route_prob" not in AcceptRule(0.2).to_json()


def test_route_probability_rule_is_held_by_the_wrong_hint_bound():
    # one-class route {0}: right-hint images often put the route class second; wrong-hint images rarely give it much
    rng = np.random.default_rng(0)
    n, c = 400, 4
    labels = np.zeros(n, int)
    logits = rng.normal(size=(n, c)) + np.eye(c)[labels] * 1.2
    routed = softmax(logits.astype(np.float32))
    full = np.where(rng.uniform(size=n) < 0.7, labels, 1)
    w_labels = rng.integers(1, c, n)
    w_routed = softmax((rng.normal(size=(n, c)) + 2.0 * np.eye(c)[w_labels]).astype(np.float32))
    w_full = np.where(rng.uniform(size=n) < 0.75, w_labels, 0)
    top1 = choose_rule(routed, full, labels, [0], 0.5)
    both = choose_rule(routed, full, labels, [0], 0.5, wrong=(w_routed, w_full, w_labels), wrong_eps=0.05)
    assert both.kind == "route_prob" and both.score.cost < top1.score.cost
    w_acc = score_rule(w_routed, w_full, w_labels, [0], both.rule, 0.5).acc
    assert w_acc >= (w_full == w_labels).mean() - 0.05 - 1e-12 and both.wrong.acc == pytest.approx(w_acc)
    strict = choose_rule(routed, full, labels, [0], 0.5, wrong=(w_routed, w_full, w_labels), wrong_eps=0.0)
    assert strict.score.fallback >= both.score.fallback  # a tighter bound accepts no more


def test_row_wise_rules_equal_the_per_route_rules():
    """accepted_rows / answer_rows (the service's one-pass form) agree with accepted / answer_index route by route."""
    from steerprune.export.acceptance import accepted_rows, answer_index, answer_rows

    rng = np.random.default_rng(3)
    probs = softmax(rng.normal(size=(200, 12)) * 3)
    routes = [({1, 4}, AcceptRule(0.3, 0.0)), ({0}, AcceptRule(0.0, 0.2)), ({2, 3, 5}, AcceptRule(0.0, 0.0, 0.4)),
              ({7}, AcceptRule(0.1, 0.05, 0.02))]
    which = rng.integers(len(routes), size=len(probs))
    in_route = np.zeros(probs.shape, bool)
    thr = np.zeros((len(probs), 3))
    for i, w in enumerate(which):
        cls, rule = routes[w]
        in_route[i, sorted(cls)] = True
        thr[i] = (rule.min_prob, rule.min_margin, np.nan if rule.min_route_prob is None else rule.min_route_prob)
    ok = accepted_rows(probs, in_route, thr[:, 0], thr[:, 1], thr[:, 2])
    ans = answer_rows(probs, in_route, ~np.isnan(thr[:, 2]))
    for w, (cls, rule) in enumerate(routes):
        idx = np.flatnonzero(which == w)
        np.testing.assert_array_equal(ok[idx], accepted(probs[idx], sorted(cls), rule))
        np.testing.assert_array_equal(ans[idx], answer_index(probs[idx], cls, rule))
    assert 0 < ok.mean() < 1

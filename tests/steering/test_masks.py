"""Static-mask aggregation, the alpha/k selection rule, the threshold control's matching, groups files."""
from __future__ import annotations

import inspect
import json

import numpy as np
import pytest

pytest.importorskip("torch")

from steerprune.errors import UserError  # noqa: E402
from steerprune.steering.masks import (Candidate, ValData, aggregate, gated_kept_heads, gated_kept_heads_text,  # noqa: E402
                                       head_usage, match_usage, select_candidate)
from steerprune.steering.plan import load_groups, make_routes, plan_routes  # noqa: E402

GATED = [1, 2]


def _masks(rows):
    """rows: per image, a (2 gated x 3 heads) list -> (N, depth 3, H 3) with layer 0 all ones."""
    m = np.ones((len(rows), 3, 3))
    m[:, 1:] = np.asarray(rows, dtype=float)
    return m


def test_vote_aggregation_keeps_heads_kept_by_at_least_tau():
    m = _masks([[[1, 0, 1], [0, 0, 1]],
                [[1, 0, 0], [0, 1, 1]],
                [[1, 1, 0], [0, 0, 1]],
                [[0, 0, 0], [0, 1, 1]]])  # head fractions: L1 .75 .25 .25; L2 0 .5 1
    out = aggregate(m, None, GATED, tau=0.5, how="vote")
    np.testing.assert_array_equal(out, [[1, 1, 1], [1, 0, 0], [0, 1, 1]])
    np.testing.assert_array_equal(aggregate(m, None, GATED, tau=0.75), [[1, 1, 1], [1, 0, 0], [0, 0, 1]])
    np.testing.assert_array_equal(aggregate(m, None, GATED, tau=0.25), [[1, 1, 1], [1, 1, 1], [0, 1, 1]])
    assert head_usage(out, GATED) == pytest.approx(3 / 6)
    assert gated_kept_heads(out, GATED) == {"L1": [0], "L2": [1, 2]}
    assert gated_kept_heads_text(np.array([[1, 1, 1], [0, 0, 0], [0, 1, 1]]), GATED) == "L1: -; L2: h1,h2"


def test_prob_aggregation_uses_mean_keep_probability():
    m = _masks([[[1, 1, 0], [0, 0, 0]]] * 2)
    logits = np.array([[[4.0, 0.1, -4.0], [-0.2, 0.0, 3.0]],
                       [[4.0, -0.3, -4.0], [-0.2, 0.0, -3.0]]])  # mean probs: ~.98 ~.45 ~.02; .45 .5 .5
    np.testing.assert_array_equal(aggregate(m, logits, GATED, 0.5, "prob"), [[1, 1, 1], [1, 0, 0], [0, 1, 1]])
    with pytest.raises(ValueError):
        aggregate(m, logits, GATED, 0.5, "median")


def _cand(k, alpha, usage, acc):
    return Candidate(k, alpha, {}, np.zeros((3, 3)), usage, acc)


def test_selection_rule_lowest_usage_within_eps():
    base = _cand(0, 1.0, 0.6, 0.90)
    cands = [base, _cand(1, 4.0, 0.3, 0.85), _cand(2, 2.0, 0.4, 0.90), _cand(4, 0.5, 0.4, 0.95), _cand(1, 8.0, 0.5, 0.92)]
    assert select_candidate(cands, 0.90, eps=0.0)[:2] == (4, 0.5)  # 0.4 ties -> higher val acc
    assert select_candidate(cands, 0.90, eps=0.05)[:2] == (1, 4.0)
    assert select_candidate([base, _cand(1, 4.0, 0.3, 0.5)], 0.90, 0.0) is base  # falls back to alpha = 1
    tie = [base, _cand(2, 4.0, 0.4, 0.9), _cand(1, 2.0, 0.4, 0.9), _cand(1, 0.0, 0.4, 0.9)]
    assert select_candidate(tie, 0.9, 0.0)[:2] == (1, 2.0)  # same usage and acc -> alpha closest to 1, then small k
    with pytest.raises(ValueError):
        select_candidate([_cand(1, 4.0, 0.3, 0.1)], 0.9, 0.0)


def test_match_usage_picks_the_closest_usage_then_the_best_score():
    # at threshold .5 every head is kept by all images; at .9 only L1h0 and L2h0,h1 (usage 3/6)
    full = _masks([[[1, 1, 1], [1, 1, 1]]] * 2)
    few = _masks([[[1, 0, 0], [1, 1, 0]]] * 2)
    zeros = np.zeros((2, 2, 3))
    decisions = {0.5: (full, zeros), 0.9: (few, zeros)}
    mask, setting = match_usage(decisions, np.arange(2), GATED, [0.5, 1.0], "vote", target=0.45, score=lambda m: 0.0)
    assert head_usage(mask, GATED) == pytest.approx(0.5) and setting["keep_threshold"] == 0.9
    mask, _ = match_usage(decisions, np.arange(2), GATED, [0.5], "vote", target=0.9, score=lambda m: 0.0)
    assert head_usage(mask, GATED) == 1.0


def test_choices_receive_only_val_data():
    """Structural: the planner's data arguments are ValData (images + labels): the val split, which chooses, and
    rank_data, the train split, on which the importance ranking measures heads. No test split, no whole dataset."""
    params = inspect.signature(plan_routes).parameters
    assert [p for p in params if p in ("val", "test", "data", "bundle", "rank_data")] == ["val", "rank_data"]
    assert params["val"].annotation in (ValData, "ValData")
    assert "ValData" in str(params["rank_data"].annotation)
    assert set(ValData.__dataclass_fields__) == {"images", "labels"}


def test_groups_file_names_and_indices(tmp_path):
    names = [str(i) for i in range(10)]
    f = tmp_path / "g.json"
    f.write_text(json.dumps({"small": ["0", "1", 2], "odd": [9, 7, "7"]}))
    groups = load_groups(f, names)
    assert groups == {"small": [0, 1, 2], "odd": [7, 9]}
    assert make_routes(names, groups)[1] == ("odd", [7, 9])
    assert make_routes(names, None)[3] == ("3", [3])
    for bad in ({"x": ["eleven"]}, {"x": [10]}, {"x": []}, ["0"], {"x": [1.5]}):
        f.write_text(json.dumps(bad))
        with pytest.raises(UserError):
            load_groups(f, names)
    with pytest.raises(UserError):
        load_groups(tmp_path / "missing.json", names)

"""The global-mask baseline's pieces: head counts at a usage, top-n masks from rankings, the val choice, and the
paired test comparison on a real tiny run."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from steerprune.steering.global_mask import (GlobalMaskConfig, RouteMask, choose_global_mask,  # noqa: E402
                                             compare_on_test, head_counts, head_rankings, top_heads_mask)
from steerprune.steering.masks import MaskEval  # noqa: E402
from steerprune.training.metrics import mcnemar_p  # noqa: E402
from steerprune.training.run import load_run  # noqa: E402
from steerprune.training.forward import run_model  # noqa: E402


def test_head_counts_bracket_the_target_usage():
    assert head_counts(0.45666666666666667, 30) == [14, 13]  # the CIFAR-10 routes' 13.7 heads
    assert head_counts(0.5, 30) == [15]
    assert head_counts(7 / 18, 18) == [7]  # float noise must not split an exact count
    assert head_counts(0.0, 18) == [0] and head_counts(1.0, 18) == [18]


def test_top_heads_mask_keeps_the_n_best_by_key_then_tie_breaks():
    gated, depth = [1, 2], 3
    primary = np.array([[0.9, 0.1, 0.5], [0.5, 0.5, 0.0]])
    tie = np.array([[0.0, 0.0, 0.1], [0.3, 0.2, 0.0]])
    m = top_heads_mask([primary, tie], 3, depth, gated)
    # 0.9 first, then the three 0.5s ordered by the tie key: (2,0) 0.3, (2,1) 0.2, (1,2) 0.1
    np.testing.assert_array_equal(m, [[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    np.testing.assert_array_equal(top_heads_mask([primary, tie], 4, depth, gated), [[1, 1, 1], [1, 0, 1], [1, 1, 0]])
    # without a tie key, remaining ties go by position: (1, 2) before (2, 0)
    np.testing.assert_array_equal(top_heads_mask([primary], 2, depth, gated), [[1, 1, 1], [1, 0, 1], [0, 0, 0]])
    assert top_heads_mask([primary], 0, depth, gated)[gated].sum() == 0
    assert top_heads_mask([primary], 6, depth, gated).min() == 1
    with pytest.raises(ValueError, match="cannot keep 7"):
        top_heads_mask([primary], 7, depth, gated)


def test_head_rankings_from_decisions_and_route_masks():
    gated = [1]
    masks = np.ones((4, 2, 3))
    masks[:, 1] = [[1, 0, 0], [1, 1, 0], [1, 0, 0], [0, 0, 1]]  # votes .75 .25 .25
    logits = np.array([[[2.0, 0.0, -1.0]]] * 4)  # mean probs .88 .5 .27
    route_masks = [np.array([[1, 1, 1], [0, 0, 1]]), np.array([[1, 1, 1], [0, 1, 1]])]
    r = head_rankings({0.5: (masks, logits)}, gated, route_masks)
    assert list(r) == ["vote@0.5", "prob", "routes"]
    np.testing.assert_allclose(r["vote@0.5"][0], [[0.75, 0.25, 0.25]])
    np.testing.assert_allclose(r["routes"][0], [[0.0, 0.5, 1.0]])
    # vote ties between heads 1 and 2 go to head 1 (higher keep probability)
    np.testing.assert_array_equal(top_heads_mask(r["vote@0.5"], 2, 2, gated)[1], [1, 1, 0])
    np.testing.assert_array_equal(top_heads_mask(r["routes"], 1, 2, gated)[1], [0, 0, 1])


@pytest.fixture(scope="module")
def run(tiny_run):
    return load_run(tiny_run, need=("backbone", "policy", "sae"))


def test_choose_picks_the_most_accurate_ranking_on_val(run):
    data = run.load_data()
    gated = run.policy.cfg.gated_layers
    f = run_model(run.model, data.val.images, run.backbone)
    rankings = head_rankings({0.5: (f.masks, f.keep_logits)}, gated, [])
    rng = np.random.default_rng(0)
    rankings["random"] = [rng.random((len(gated), run.model.num_heads))]
    evals = MaskEval(run.model, data.val.images, data.val.labels, run.backbone)
    n = 8
    c = choose_global_mask(evals, rankings, n, run.model.depth, gated)
    accs = {t["ranking"]: t["val_acc"] for t in c.candidates}
    assert set(accs) == set(rankings) and c.val_acc == max(accs.values()) and accs[c.ranking] == c.val_acc
    assert int(c.mask[gated].sum()) == n
    for name, keys in rankings.items():
        assert accs[name] == evals.acc(top_heads_mask(keys, n, run.model.depth, gated))


def test_compare_on_test_pairs_each_route_with_the_global_mask_on_its_images(run):
    data = run.load_data()
    test = data.test
    gated = run.policy.cfg.gated_layers
    depth, H = run.model.depth, run.model.num_heads
    ev = MaskEval(run.model, test.images, test.labels, run.backbone)
    full = np.ones((depth, H), np.int64)
    sparse = full.copy()
    sparse[gated[-1]] = 0
    sparse[gated[0], :3] = 0
    routes = [RouteMask("a", [0, 1], sparse), RouteMask("b", [2], full), RouteMask("c", [2, 3], sparse)]
    cfg = GlobalMaskConfig(bootstrap_resamples=999)
    t = compare_on_test(ev, routes, full, cfg)
    y = test.labels
    pf, ps = ev.preds(full), ev.preds(sparse)
    idx = [np.flatnonzero(np.isin(y, r.classes)) for r in routes]
    a = np.concatenate([(ps if r.mask is sparse else pf)[i] == y[i] for r, i in zip(routes, idx)])
    b = np.concatenate([pf[i] == y[i] for i in idx])
    assert t["n"] == sum(len(i) for i in idx)  # class 2 sits in two routes: its images count twice
    assert t["routes_acc"] == pytest.approx(a.mean()) and t["global_acc"] == pytest.approx(b.mean())
    assert (t["only_routes_right"], t["only_global_right"]) == (int((a & ~b).sum()), int((~a & b).sum()))
    assert t["only_routes_right"] + t["only_global_right"] > 0  # the masks really differ on some images
    assert t["mcnemar_p"] == mcnemar_p(t["only_routes_right"], t["only_global_right"])
    assert t["acc_diff"] == pytest.approx(a.mean() - b.mean())  # routes minus global, paired images
    assert t["acc_diff_ci95"][0] <= t["acc_diff"] <= t["acc_diff_ci95"][1]
    assert t["per_route"][1] == {"name": "b", "n": len(idx[1]), "route_acc": float(b[len(idx[0]):][:len(idx[1])].mean()),
                                 "global_acc": float(b[len(idx[0]):][:len(idx[1])].mean())}
    same = compare_on_test(ev, [RouteMask("all", list(range(10)), full)], full, cfg)
    assert same["acc_diff"] == 0 and same["acc_diff_ci95"] == [0.0, 0.0] and same["mcnemar_p"] == 1.0


def test_a_single_ranking_is_taken_without_scoring_and_configs_are_checked():
    keys = [np.array([[0.2, 0.9, 0.5]])]
    c = choose_global_mask(None, {"vote@0.5": keys}, 2, 2, [1])  # no val forward: nothing to choose between
    np.testing.assert_array_equal(c.mask, [[1, 1, 1], [0, 1, 1]])
    assert (c.ranking, c.n_heads, c.val_acc) == ("vote@0.5", 2, None)
    assert GlobalMaskConfig(keep_thresholds=[0.9]).keep_thresholds == [0.5, 0.9]  # 0.5 feeds prob and tie-breaks
    with pytest.raises(ValueError, match="rankings"):
        GlobalMaskConfig(rankings=["votes"])
    with pytest.raises(ValueError, match="keep_thresholds"):
        GlobalMaskConfig(keep_thresholds=[1.0])

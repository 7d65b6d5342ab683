"""`steer_run` end to end on the tiny run: report schema, files, plots, test-split independence of every choice, CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")

from steerprune.steering.pipeline import steer_run  # noqa: E402
from steerprune.training.data import Split  # noqa: E402
from steerprune.training.run import Run  # noqa: E402

# small grids keep a run to a few seconds on 2 cores
FAST = dict(ks=[1, 4], alphas=[0.0, 8.0], thresholds=[0.5, 0.7, 0.9, 0.97], control_taus=[0.5, 0.8])


@pytest.fixture(scope="module")
def report(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("steer")
    rep = steer_run(tiny_run, "per-class", out_dir=out, log=lambda *_: None, **FAST)
    return out, rep


def test_report_schema_and_files(report, tiny_run):
    out, rep = report
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["routes"] == json.loads(json.dumps(rep["routes"], default=float))
    assert isinstance(on_disk["routes"], list) and len(on_disk["routes"]) == 10
    gated = on_disk["gated_layers"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["strategy"] == "per-class" and cfg["ks"] == [1, 4] and cfg["selection"] == "val"
    for r in on_disk["routes"]:
        assert r["name"] == on_disk["class_names"][r["classes"][0]] and len(r["classes"]) == 1
        for key in ("mask", "head_usage", "acc", "off_route_acc", "baseline", "threshold_control", "random_control",
                    "alpha", "latents", "flops_rel", "gated_kept_heads", "acc_ci95"):
            assert key in r, key
        mask = np.asarray(r["mask"])
        assert mask.shape == (4, 6) and set(np.unique(mask)) <= {0, 1}
        ungated = [l for l in range(4) if l not in gated]
        assert (mask[ungated] == 1).all()
        assert r["head_usage"] == pytest.approx(mask[gated].mean())
        assert r["gated_kept_heads"] == {f"L{l}": np.flatnonzero(mask[l]).tolist() for l in gated}
        for ctrl in ("baseline", "threshold_control", "random_control"):
            assert {"head_usage", "acc", "mask"} <= set(r[ctrl])
            assert 0 <= r[ctrl]["acc"] <= 1
        assert r["acc_ci95"][0] <= r["acc"] <= r["acc_ci95"][1]
        assert 0 < r["flops_rel"] <= 1
        if r["alpha"] == 1.0:
            assert r["mask"] == r["baseline"]["mask"]
    s = on_disk["summary"]
    assert s["mean_usage_after"] == pytest.approx(np.mean([r["head_usage"] for r in on_disk["routes"]]))
    assert s["mean_usage_before"] == pytest.approx(np.mean([r["baseline"]["head_usage"] for r in on_disk["routes"]]))
    assert s["mean_usage_after"] <= s["mean_usage_before"]  # alpha = 1 is always a candidate
    vt, st = s["val_vs_test"], [r for r in on_disk["routes"] if r["alpha"] != 1.0]
    assert vt["routes_steered"] == s["routes_steered"] == len(st)
    if st:
        gains = [(r["val"]["acc"] - r["val"]["baseline_acc"], r["acc"] - r["baseline"]["acc"]) for r in st]
        assert vt["mean_val_gain"] == pytest.approx(np.mean([v for v, _ in gains]))
        assert vt["optimism"] == pytest.approx(vt["mean_val_gain"] - np.mean([t for _, t in gains]))
        assert vt["sign_agreement"] == pytest.approx(np.mean([np.sign(v) == np.sign(t) for v, t in gains]))
        assert "Val vs test (choice rule `route`" in (out / "report.md").read_text()
    # every choice rule's pick is reported; the configured rule's pick is the route's own row
    assert set(s["choice_rules"]) == {"route", "all"}  # digits has no class groups
    for r in on_disk["routes"]:
        own = r["choice_rules"]["route"]
        assert (own["k"], own["alpha"], own["acc"]) == (r["k"], r["alpha"], r["acc"])
        assert own["head_usage"] == pytest.approx(r["head_usage"])
    assert len({(r["choice_rules"]["all"]["k"], r["choice_rules"]["all"]["alpha"]) for r in on_disk["routes"]}) == 1
    assert s["choice_rules"]["route"]["mean_acc"] == pytest.approx(s["mean_acc_after"])
    assert s["choice_rules"]["all"]["distinct_k_alpha"] == 1
    assert "| **route** |" in (out / "report.md").read_text()
    zs = s["zero_shot"]
    assert set(zs["precision_at_k"]) == set(zs["random_precision"]) == {"1", "5", "10"}
    assert on_disk["zero_shot"]["random_precision"]["1"] == pytest.approx(1 / 384)
    assert "label_free" in s and "targets" not in on_disk  # an issue's targets live in benchmarks/, not here
    md = (out / "report.md").read_text()
    assert "threshold control" in md and "| 0 |" in md and "precision@1" in md
    assert "one global static mask" in md and "Routing vs one global static mask" in md and "Targets" not in md


def test_global_mask_row_matches_the_routes_usage_and_pairs_on_the_same_images(report):
    out, rep = report
    gm = json.loads((out / "report.json").read_text())["global_mask"]
    gated, H = rep["gated_layers"], 6
    routes = rep["routes"]
    for name, masks_of in (("steered", lambda r: r["mask"]), ("unsteered", lambda r: r["baseline"]["mask"])):
        rs = gm["route_sets"][name]
        usage = np.mean([np.asarray(masks_of(r))[gated].mean() for r in routes])
        assert rs["routes_mean_usage"] == pytest.approx(usage)
        counts = [g["n_heads"] for g in rs["global_masks"]]
        exact = usage * len(gated) * H
        assert counts[0] == int(np.ceil(exact - 1e-9)) and counts[-1] == int(np.floor(exact + 1e-9))
        for g in rs["global_masks"]:
            m = np.asarray(g["mask"])
            assert int(m[gated].sum()) == g["n_heads"] and (np.delete(m, gated, axis=0) == 1).all()
            assert g["head_usage"] == pytest.approx(g["n_heads"] / (len(gated) * H))
            assert g["val_acc"] == max(c["val_acc"] for c in g["val_candidates"]) and len(g["val_candidates"]) == 4
            t = g["test"]
            assert t["n"] == sum(r["n"] for r in routes)  # every route's test images, each answered both ways
            assert t["acc_diff"] == pytest.approx(t["routes_acc"] - t["global_acc"])
            assert t["acc_diff"] == pytest.approx((t["only_routes_right"] - t["only_global_right"]) / t["n"])
            assert t["acc_diff_ci95"][0] <= t["acc_diff"] <= t["acc_diff_ci95"][1]
            assert t["global_acc_ci95"][0] <= t["global_acc"] <= t["global_acc_ci95"][1]
            assert 0 < t["mcnemar_p"] <= 1
        # the routes' accuracies are the report's own, recomputed on the same images
        per_route = {p["name"]: p["route_acc"] for p in rs["global_masks"][0]["test"]["per_route"]}
        for r in routes:
            assert per_route[r["name"]] == pytest.approx((r if name == "steered" else r["baseline"])["acc"])
    s = rep["summary"]["global_mask"]["steered"]
    assert s["acc"] == gm["route_sets"]["steered"]["global_masks"][0]["test"]["global_acc"]
    assert s["head_usage"] >= s["routes_mean_usage"] - 1e-9


def test_baseline_only_reproduces_the_report_row_and_leaves_the_report_alone(report, tiny_run, tmp_path, capsys):
    from steerprune.cli import main

    out, rep = report
    before = (out / "report.json").read_bytes()
    rc = main(["steer", str(tiny_run), "--baseline-only", "--report", str(out / "report.json"),
               "--out", str(tmp_path / "b")])
    assert rc == 0
    assert (out / "report.json").read_bytes() == before
    b = json.loads((tmp_path / "b" / "global_baseline.json").read_text())
    assert b["route_acc_max_abs_diff_vs_report"] == 0.0
    for name in ("steered", "unsteered"):
        # the same val-only choice whether computed inside the steering run or afterwards from its report
        assert [g["mask"] for g in b["route_sets"][name]["global_masks"]] == \
            [g["mask"] for g in rep["global_mask"]["route_sets"][name]["global_masks"]]
        assert b["summary"][name]["acc"] == pytest.approx(rep["summary"]["global_mask"][name]["acc"])
    assert "global mask" in capsys.readouterr().out
    assert "Routing vs one global static mask" in (tmp_path / "b" / "global_baseline.md").read_text()
    # the cheap form: one ranking (no val scoring), one route set, the rounded-up count only
    rc = main(["steer", str(tiny_run), "--baseline-only", "--report", str(out / "report.json"), "--out",
               str(tmp_path / "c"), "--route-sets", "unsteered", "--global-rankings", "vote", "--global-thresholds",
               "0.5", "--round-up-only"])
    assert rc == 0
    c = json.loads((tmp_path / "c" / "global_baseline.json").read_text())
    (g,) = c["route_sets"]["unsteered"]["global_masks"]
    assert list(c["route_sets"]) == ["unsteered"] and g["ranking"] == "vote@0.5" and g["val_acc"] is None
    assert g["n_heads"] == b["route_sets"]["unsteered"]["global_masks"][0]["n_heads"]
    assert c["route_acc_max_abs_diff_vs_report"] == 0.0
    assert main(["steer", str(tiny_run), "--baseline-only", "--report", str(out / "report.json"),
                 "--global-rankings", "nope"]) == 2
    assert main(["steer", str(tiny_run), "--baseline-only", "--report", str(tmp_path / "none.json")]) == 2
    assert main(["steer", str(tiny_run), "--report", str(out / "report.json")]) == 2
    assert "missing" in capsys.readouterr().err


def test_plots_are_written(report):
    out, _ = report
    for name in ("kept_heads.png", "usage_vs_acc.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_choices_do_not_depend_on_the_test_split(report, tiny_run, tmp_path, monkeypatch):
    """Replace the test split with noise: every choice (latents, alpha, masks, controls) must stay the same."""
    _, rep = report
    original = Run.load_data

    def noisy(self):
        data = original(self)
        rng = np.random.default_rng(1)
        data.test = Split(rng.integers(0, 256, data.test.images.shape, dtype=np.uint8), rng.permutation(data.test.labels))
        return data

    monkeypatch.setattr(Run, "load_data", noisy)
    rep2 = steer_run(tiny_run, "per-class", out_dir=tmp_path, log=lambda *_: None, compare_label_free=False, **FAST)
    for a, b in zip(rep["routes"], rep2["routes"]):
        for key in ("mask", "alpha", "k", "latents"):
            assert a[key] == b[key], (a["name"], key)
        for ctrl in ("baseline", "threshold_control", "random_control"):
            assert a[ctrl]["mask"] == b[ctrl]["mask"]
    for name, rs in rep["global_mask"]["route_sets"].items():  # the global baseline is chosen on val too
        assert [g["mask"] for g in rs["global_masks"]] == \
            [g["mask"] for g in rep2["global_mask"]["route_sets"][name]["global_masks"]]
    assert [r["acc"] for r in rep["routes"]] != [r["acc"] for r in rep2["routes"]]  # test figures did change


def test_cli_groups_and_errors(tiny_run, tmp_path, capsys):
    from steerprune.cli import main

    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({"round": ["0", "6", "8", "9"], "straight": [1, 4, 7]}))
    out = tmp_path / "g"
    rc = main(["steer", str(tiny_run), "--groups", str(groups), "--ks", "2", "--alphas", "0,4", "--layers", "3",
               "--no-label-free", "--max-off-route", "40", "--out", str(out)])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in rep["routes"]] == ["round", "straight"]
    assert rep["routes"][0]["classes"] == [0, 6, 8, 9]
    assert rep["config"]["layers_steered"] == [3]
    assert all(set(r["latents"]) <= {"L3"} for r in rep["routes"])
    assert rep["routes"][0]["n"] == sum(r["n"] for r in rep["routes"][:1])
    assert [r["n_off_route"] for r in rep["routes"]] == [40, 40] and rep["config"]["max_off_route"] == 40
    assert main(["steer", str(tiny_run), "--groups", str(tmp_path / "nope.json")]) == 2
    assert main(["steer", str(tiny_run), "--layers", "0", "--out", str(tmp_path / "x")]) == 2
    assert main(["steer", str(tmp_path / "no_run")]) == 2
    assert main(["steer", str(tiny_run), "--max-off-route", "0", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "groups file not found" in err and "cannot steer layers" in err and "--max-off-route must be >= 1" in err


def test_choice_pools_group_routes_that_share_k_and_alpha():
    from steerprune.steering.plan import RouteSpec, choice_pools

    routes = [RouteSpec(str(c), [c]) for c in range(5)] + [RouteSpec("pair", [0, 3])]
    groups = {"a": [0, 1], "b": [2, 3, 4], "c": [4]}
    assert choice_pools(routes, "route") == [[r.name] for r in routes]
    assert choice_pools(routes, "all") == [[r.name for r in routes]]
    # '4' lies in two groups and 'pair' spans two: each of them chooses alone
    assert choice_pools(routes, "group", groups) == [["0", "1"], ["2", "3"], ["4"], ["pair"]]
    from steerprune.errors import UserError
    with pytest.raises(UserError, match="needs class groups"):
        choice_pools(routes, "group", {})


def test_pooled_choice_takes_one_k_and_alpha_by_the_pooled_val_rule(tiny_run, tmp_path):
    from steerprune.errors import UserError

    rep = steer_run(tiny_run, "per-class", out_dir=tmp_path, log=lambda *_: None, compare_label_free=False,
                    choose="all", **FAST)
    assert rep["config"]["choose"] == "all"
    chosen = {(r["k"], r["alpha"]) for r in rep["routes"]}
    assert len(chosen) == 1
    # the pooled rule on the val candidates each route recorded (rounded to 4 digits, hence the 1e-3 slack): mean
    # val accuracy >= the mean unsteered one, and no candidate that clearly meets it has a clearly lower mean usage
    cands = [r["val"]["candidates"] for r in rep["routes"]]
    base = np.mean([r["val"]["baseline_acc"] for r in rep["routes"]])
    pooled = {(c[0], c[1]): (np.mean([cs[i][2] for cs in cands]), np.mean([cs[i][3] for cs in cands]))
              for i, c in enumerate(cands[0])}
    usage, acc = pooled[next(iter(chosen))]
    assert acc >= base - 1e-3
    assert not any(u < usage - 1e-3 and a >= base + 1e-3 for u, a in pooled.values())
    assert all(r["choice_rules"]["all"]["acc"] == r["acc"] for r in rep["routes"])
    with pytest.raises(UserError, match="needs class groups"):  # digits has no groups of its own
        steer_run(tiny_run, "per-class", out_dir=tmp_path / "g", log=lambda *_: None, choose="group", **FAST)


def test_choose_pools_candidates_by_mean_usage_under_the_mean_accuracy_rule():
    from steerprune.steering.masks import Candidate
    from steerprune.steering.plan import _choose

    def cands(*rows):  # (k, alpha, usage, val_acc) per candidate, the unsteered one first
        return [Candidate(k, a, {}, np.full((1, 1), i), u, acc) for i, (k, a, u, acc) in enumerate(rows)]

    grid = [(0, 1.0), (1, 4.0), (2, 4.0)]
    c = {"x": cands(*[(k, a, u, v) for (k, a), u, v in zip(grid, (0.6, 0.4, 0.3), (0.80, 0.82, 0.70))]),
         "y": cands(*[(k, a, u, v) for (k, a), u, v in zip(grid, (0.6, 0.5, 0.2), (0.60, 0.50, 0.66))])}
    base = {"x": 0.80, "y": 0.60}
    alone = _choose(c, base, [["x"], ["y"]], 0.0)
    assert (alone["x"].k, alone["y"].k) == (1, 2)  # each route: lowest usage within its own accuracy
    pooled = _choose(c, base, [["x", "y"]], 0.0)
    # pooled means: (0.60, 0.70), (0.45, 0.66), (0.25, 0.68) against 0.70: only the unsteered one qualifies
    assert pooled["x"].k == pooled["y"].k == 0 and pooled["x"] is c["x"][0] and pooled["y"] is c["y"][0]
    assert _choose(c, base, [["x", "y"]], 0.02)["x"].k == 2  # within eps 0.02 the lowest mean usage wins


def test_global_strategy_reports_the_pooled_rule_it_used(tiny_run, tmp_path):
    rep = steer_run(tiny_run, "global", out_dir=tmp_path, log=lambda *_: None, compare_label_free=False, **FAST)
    assert len({(r["k"], r["alpha"]) for r in rep["routes"]}) == 1
    assert all((r["choice_rules"]["all"]["k"], r["choice_rules"]["all"]["alpha"]) == (r["k"], r["alpha"])
               for r in rep["routes"])
    md = (tmp_path / "report.md").read_text()
    assert "| **all** |" in md and "| **route** |" not in md
    if rep["summary"]["val_vs_test"]["routes_steered"]:
        assert "Val vs test (choice rule `all`" in md

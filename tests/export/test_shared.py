"""`export --shared`: one pruned model for every class, with each route's rule for it, answering scattered hints."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import TINY_ROUTES

from steerprune.errors import UserError

GLOBAL_MASK = [[1] * 6, [1, 1, 0, 1, 1, 0], [0, 1, 1, 1, 0, 1], [1, 0, 1, 0, 0, 1]]  # 13 of 18 gated heads


@pytest.fixture(scope="module")
def shared_bundle(tiny_run, tmp_path_factory):
    from steerprune.export.bundle import export_bundle

    tmp = tmp_path_factory.mktemp("shared")
    report = tmp / "report.json"
    report.write_text(json.dumps({"routes": TINY_ROUTES, "summary": {}, "zero_shot": {}, "config": {},
                                  "global_mask": {"route_sets": {"steered": {"global_masks": [
                                      {"mask": GLOBAL_MASK, "ranking": "vote@0.5", "val_acc": 0.9}]}}}}))
    manifest = export_bundle(tiny_run, tmp / "bundle", report_path=report, log=lambda *_: None, cost_batch=None,
                             shared="global")
    return tmp / "bundle", manifest, report


def test_the_shared_model_is_exported_with_a_rule_per_route(shared_bundle):
    from steerprune.export.manifest import load_manifest, validate_manifest, verify_bundle

    bundle, manifest, _ = shared_bundle
    sh = manifest["shared"]
    assert sh["mask"] == GLOBAL_MASK and sh["model"] in manifest["models"]
    assert sh["model"] not in {r["model"] for r in manifest["routes"].values()}  # a mask no route has: its own file
    assert manifest["models"][sh["model"]]["routes"] == []
    assert 0 < sh["flops_rel"] < 1 and set(sh["routes"]) == {r["name"] for r in TINY_ROUTES}
    for name, a in sh["routes"].items():  # chosen on val like the route's own rule, on the shared model's outputs
        assert a["val"]["n"] == manifest["routes"][name]["acceptance"]["val"]["n"]
        assert a["served"] == (a["val"]["cost"] < 1.0)
    validate_manifest(load_manifest(bundle))
    assert len(verify_bundle(bundle)["models"]) == len(manifest["models"])


def test_shared_is_refused_without_a_global_mask_and_skipped_by_auto_for_few_routes(tiny_run, tmp_path):
    from steerprune.export.bundle import shared_mask

    report = tmp_path / "r.json"
    report.write_text(json.dumps({"routes": TINY_ROUTES}))
    with pytest.raises(UserError, match="global mask"):
        shared_mask(f"report:{report}", 5, "global", 4, 6)
    assert shared_mask(f"report:{report}", 100, "auto", 4, 6) is None  # auto: nothing to use, nothing added
    assert shared_mask("masks:m.json", 100, "auto", 4, 6) is None


def test_engine_answers_moved_rows_with_the_shared_model_under_the_routes_rule(shared_bundle, tiny_run):
    from steerprune.export.acceptance import accepted, answer_index, softmax
    from steerprune.service.config import ServeConfig
    from steerprune.service.engine import Engine
    from steerprune.service.preprocess import normalize
    from steerprune.training.data import load_data

    bundle, manifest, _ = shared_bundle
    eng = Engine(ServeConfig(bundle=str(bundle), verify=False))
    assert eng.shared_model == manifest["shared"]["model"]
    served = sorted(eng.shared_rules)
    assert served, "the shared model serves no route on this run"
    test = load_data("digits").test
    x = normalize(test.images[:40], eng.spec)
    hints = [served[i % len(served)] for i in range(40)]
    res = eng.run(x, hints, merge="shared")
    shared_probs = softmax(eng.logits(eng.shared_model, x))
    full_probs = softmax(eng.logits(eng.full_model, x))
    for i, (o, h) in enumerate(zip(res, hints)):
        rule, classes = eng.shared_rules[h], sorted(eng.routes[h].classes)
        ok = bool(accepted(shared_probs[i:i + 1], classes, rule)[0])
        if ok:
            assert o.model == eng.shared_model and not o.fallback
            assert o.index == int(answer_index(shared_probs[i:i + 1], classes, rule)[0])
            np.testing.assert_allclose(o.probs, shared_probs[i], atol=1e-6)
        else:
            assert o.fallback and o.model == eng.full_model and o.routed_model == eng.shared_model
            np.testing.assert_allclose(o.probs, full_probs[i], atol=1e-6)
    listing = eng.describe()
    assert listing["shared"]["model"] == eng.shared_model and listing["shared"]["routes"] == served
    # with timings, the plan sends scattered hints to the shared model when that is cheapest
    eng.run_ms = {m: {b: 1.0 + b * (1.0 if m == eng.full_model else 0.6 if m == eng.shared_model else 0.9)
                      for b in eng.warm_sizes} for m in eng.sessions}
    for m, table in eng.run_ms.items():  # as warm_up seeds them
        eng.times.seed(m, table)
    eng.fallback_rate = {("shared", h): 0.0 for h in served}
    models = {eng.routes[h].model for h in served}
    one_each = [next(h for h in served if eng.routes[h].model == m) for m in models]
    if len(one_each) >= 2:
        p = eng.plan(one_each, [eng.model_for(h) for h in one_each])
        assert p.to_shared == models and not p.to_full
    off = Engine(ServeConfig(bundle=str(bundle), verify=False, shared_model=False))
    assert off.shared_model is None and off.describe()["shared"] is None

"""The exported bundle: manifest schema, dedup, parity at batch 1/3/8 and accuracy, re-measured here."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from steerprune.cli import main  # noqa: E402
from steerprune.export.manifest import (BundleError, load_manifest, sha256_file, validate_manifest,  # noqa: E402
                                       verify_bundle)


@pytest.fixture(scope="module")
def manifest(tiny_bundle):
    return load_manifest(tiny_bundle)


def test_manifest_schema(tiny_bundle, manifest):
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    assert validate_manifest(m) is m
    assert m["schema_version"] == 2
    assert m["classes"] == [str(i) for i in range(10)]
    inp = m["input"]
    assert (inp["img_size"], inp["channels"], inp["color_mode"], inp["layout"]) == (8, 1, "L", "NCHW")
    assert (inp["input_name"], inp["output_name"], inp["dtype"]) == ("images", "logits", "float32")
    assert inp["scale"] == pytest.approx(1 / 255)
    assert set(m["routes"]) == {"0", "1", "7", "even", "3"}
    assert m["full"]["model"] == "models/full.onnx" and m["full"]["flops_rel"] == 1.0 and m["full"]["head_usage"] == 1.0
    assert 0.5 < m["full"]["acc"] <= 1.0
    for name, r in m["routes"].items():
        assert (tiny_bundle / r["model"]).is_file()
        assert r["sha256"] == sha256_file(tiny_bundle / r["model"])
        assert r["sha256"] == m["models"][r["model"]]["sha256"]
        assert name in m["models"][r["model"]]["routes"]
    # acc / off_route_acc are copied from the (hand-made) steering report
    assert (m["routes"]["7"]["acc"], m["routes"]["7"]["off_route_acc"]) == (0.92, 0.30)
    assert m["run"]["path"] and m["run"]["backbone"]["model_name"] == "vit_tiny_patch16_224"


def test_dedup_and_masks(manifest):
    routes, models = manifest["routes"], manifest["models"]
    assert routes["0"]["model"] == routes["1"]["model"]  # same mask, one file
    assert routes["3"]["model"] == "models/full.onnx"  # every head kept: the full model itself
    assert len({r["model"] for r in routes.values()}) == 4 and len(models) == 4
    assert sorted(models[routes["0"]["model"]]["routes"]) == ["0", "1"]
    assert routes["7"]["kept_heads"]["L3"] == [] and routes["7"]["kept_heads"]["L1"] == [0, 2, 3, 5]
    # head usage over gated layers 1-3; FLOPs strictly between the all-removed bound and the full model
    assert routes["7"]["head_usage"] == pytest.approx((4 + 2 + 0) / 18)
    assert routes["0"]["head_usage"] == pytest.approx((3 + 3 + 2) / 18)
    assert 0 < routes["7"]["flops_rel"] < routes["0"]["flops_rel"] < routes["even"]["flops_rel"] < 1
    assert routes["7"]["params"] < routes["0"]["params"] < routes["even"]["params"] < manifest["full"]["params"]


def test_parity_recorded(manifest):
    for rel, e in manifest["models"].items():
        assert set(e["parity"]) == {"1", "3", "8"}
        assert all(0 <= v <= 1e-4 for v in e["parity"].values()), (rel, e["parity"])


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_onnx_equals_gated_torch(tiny_run, tiny_bundle, manifest, batch):
    """Re-measure: each ONNX model vs the gated PyTorch model with its mask, on real test images."""
    from steerprune.training.run import load_run
    from steerprune.training.tensors import to_tensor

    run = load_run(tiny_run)
    x = to_tensor(run.load_data().test.images[:batch], run.backbone)
    for rel, e in manifest["models"].items():
        sess = ort.InferenceSession(str(tiny_bundle / rel), providers=["CPUExecutionProvider"])
        got = sess.run(["logits"], {"images": x.numpy()})[0]
        with torch.no_grad():
            want = run.model(x, head_mask=torch.tensor(e["mask"], dtype=torch.float32)).logits.numpy()
        assert got.shape == (batch, 10)
        assert np.abs(got - want).max() <= 1e-4, rel


def test_full_acc_matches_torch(tiny_run, manifest):
    from steerprune.training.run import load_run
    from steerprune.training.forward import run_model

    run = load_run(tiny_run)
    test = run.load_data().test
    acc = float((run_model(run.model, test.images, run.backbone, head_mask=torch.ones(4, 6)).logits.argmax(1)
                 == test.labels).mean())
    assert manifest["full"]["acc"] == pytest.approx(acc, abs=1.5 / len(test.labels))
    assert manifest["full"]["n_test"] == len(test.labels)


def test_acceptance_rules_chosen_on_val(tiny_run, tiny_bundle, manifest):
    """Re-measure each route's recorded rule on the run's validation split with ONNX Runtime: the recorded accuracy,
    fallback and cost are what the rule does, the accuracy stays within eps of the full model's, and a route is
    served exactly when its expected cost is below the full model's."""
    from steerprune.export.acceptance import EPS, WRONG_EPS, AcceptRule, score_rule, softmax
    from steerprune.training.run import load_run
    from steerprune.training.tensors import to_tensor

    run = load_run(tiny_run)
    val = run.load_data().val
    x = to_tensor(val.images, run.backbone).numpy()
    assert manifest["acceptance"]["split"] == "val" and manifest["acceptance"]["eps"] == EPS
    assert manifest["acceptance"]["n"] == len(val.labels)

    def logits(rel):
        return ort.InferenceSession(str(tiny_bundle / rel), providers=["CPUExecutionProvider"]).run(
            ["logits"], {"images": x})[0]

    full_pred = logits(manifest["full"]["model"]).argmax(1)
    for name, r in manifest["routes"].items():
        a, on = r["acceptance"], np.isin(val.labels, r["classes"])
        got = score_rule(softmax(logits(r["model"])[on]), full_pred[on], val.labels[on], r["classes"],
                         AcceptRule.from_json(a["rule"]), r["flops_rel"])
        assert (a["val"]["acc"], a["val"]["fallback"], a["val"]["cost"]) == pytest.approx(tuple(got)), name
        assert a["val"]["full_acc"] == pytest.approx(float((full_pred[on] == val.labels[on]).mean()))
        assert a["val"]["n"] == int(on.sum()) and a["val"]["acc"] >= a["val"]["full_acc"] - EPS - 1e-9
        assert a["served"] == (got.cost < 1.0) and (a["reason"] is None) == a["served"]
        assert a["kind"] in ("confidence", "margin", "route_prob")
        assert a["rule"]["top1_in_route"] is (a["kind"] != "route_prob")
        w = a["val_wrong_hints"]  # images of other classes with this hint (a seeded draw of at most 1000)
        assert w["n"] == min(1000, int((~on).sum())) and w["acc"] >= w["full_acc"] - WRONG_EPS - 1e-9
    assert manifest["routes"]["3"]["acceptance"]["served"] is False  # keeps every head: never cheaper


def test_offline_cost_recorded(manifest):
    c = manifest["cost"]
    assert c["batch_size"] == 16 and c["threads"] == 1 and c["acceptance"] == "route"
    assert c["n"] == manifest["full"]["n_test"] == c["overall"]["n"]
    o = c["overall"]
    assert 0 < o["cost_rel"] < 3 and o["hinted_ms"] > 0 and o["full_ms"] > 0 and o["cost_rel_wall"] > 0
    assert o["full_acc"] == pytest.approx(manifest["full"]["acc"], abs=1e-9)
    assert 0 <= o["fallback"] <= 1 and 0 < o["flops_cost"] <= 2
    assert set(c["routes"]) == set(manifest["routes"]) and c["routes"]["3"]["served"] is False
    assert c["routes"]["3"]["flops_cost"] == 1.0 and c["routes"]["3"]["fallback"] == 1.0  # all to the full model
    for name, r in c["routes"].items():
        assert r["n"] == manifest["routes"][name]["n_test"]
        assert r["full_acc"] == pytest.approx(manifest["routes"][name]["full_onnx_acc"])
    assert 0 < c["mix"]["acc"] <= 1 and c["mix"]["full_acc"] == pytest.approx(manifest["full"]["acc"])


def test_v2_manifest_needs_acceptance(manifest):
    import copy

    bad = copy.deepcopy(manifest)
    del bad["routes"]["7"]["acceptance"]
    with pytest.raises(BundleError, match=r"routes\['7'\].acceptance"):
        validate_manifest(bad)
    bad = copy.deepcopy(manifest)
    bad["routes"]["7"]["acceptance"].update(served=False, reason=None)
    with pytest.raises(BundleError, match="reason must say why"):
        validate_manifest(bad)
    bad = copy.deepcopy(manifest)
    bad["routes"]["7"]["acceptance"]["rule"]["min_prob"] = 1.5
    with pytest.raises(BundleError, match="min_prob must be a number"):
        validate_manifest(bad)
    old = copy.deepcopy(manifest)  # schema 1: no acceptance anywhere, still valid
    old["schema_version"] = 1
    del old["acceptance"]
    for r in old["routes"].values():
        del r["acceptance"]
    assert validate_manifest(old) is old
    old["schema_version"] = 3
    with pytest.raises(BundleError, match="schema_version 3 is not supported"):
        validate_manifest(old)


def test_masks_file_export(tiny_run, tmp_path, capsys):
    """--masks instead of a report: acc fields are null, masks are validated, fp16 copies and triton layout; a route
    keeping every head is reported as not served; --eps and --cost-batch 0 reach the manifest."""
    masks = {"zero": {"classes": [0], "mask": [[1] * 6, [1, 0, 0, 0, 0, 0], [0] * 6, [0, 1, 0, 0, 0, 0]]},
             "one": {"classes": [1], "mask": [[1] * 6, [1, 0, 0, 0, 0, 0], [0] * 6, [0, 1, 0, 0, 0, 0]]},
             "two": {"classes": [2], "mask": [[1] * 6] * 4}}
    (tmp_path / "masks.json").write_text(json.dumps(masks))
    out = tmp_path / "b"
    assert main(["export", str(tiny_run), "--out", str(out), "--masks", str(tmp_path / "masks.json"),
                 "--layout", "triton", "--fp16", "--eps", "1", "--cost-batch", "0"]) == 0
    assert "route 'two': NOT SERVED (its hint goes to the full model)" in capsys.readouterr().out
    m = load_manifest(out)
    assert m["acceptance"]["eps"] == pytest.approx(0.01) and "cost" not in m
    assert m["routes"]["two"]["model"] == m["full"]["model"]
    assert m["routes"]["zero"]["acc"] is None and m["routes"]["zero"]["off_route_acc"] is None
    assert m["routes"]["zero"]["model"] == m["routes"]["one"]["model"] and len(m["models"]) == 2
    stem = m["routes"]["zero"]["model"].split("/")[-1][:-5]
    assert (out / "triton" / stem / "1" / "model.onnx").read_bytes() == (out / m["routes"]["zero"]["model"]).read_bytes()
    assert 'name: "images"' in (out / "triton" / stem / "config.pbtxt").read_text()
    for e in m["models"].values():
        half = e["fp16"]
        assert (out / half["model"]).stat().st_size < 0.7 * (out / half["model"].replace(".fp16", "")).stat().st_size
        assert set(half["parity"]) == {"1", "3", "8"} and max(half["parity"].values()) <= 5e-2
    verify_bundle(out)
    (out / half["model"]).write_bytes(b"x")
    with pytest.raises(BundleError, match="fp16.onnx: sha256 mismatch"):
        verify_bundle(out)
    # bad masks: one line, exit 2
    (tmp_path / "bad.json").write_text(json.dumps({"x": {"classes": [0], "mask": [[1] * 6] * 3}}))
    assert main(["export", str(tiny_run), "--out", str(tmp_path / "c"), "--masks", str(tmp_path / "bad.json")]) == 2
    (tmp_path / "bad2.json").write_text(json.dumps({"x": {"classes": [12], "mask": [[1] * 6] * 4}}))
    assert main(["export", str(tiny_run), "--out", str(tmp_path / "c"), "--masks", str(tmp_path / "bad2.json")]) == 2
    assert main(["export", str(tiny_run), "--out", str(tmp_path / "d")]) == 2  # no steering report in tiny_run

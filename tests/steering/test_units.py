"""Per-route MLP unit choice: importance, candidate cuts, the val rule, the stage's files and the export it feeds."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from steerprune.errors import UserError  # noqa: E402
from steerprune.steering.units import (UnitCandidate, UnitsConfig, apply_units, candidate_units,  # noqa: E402
                                       select_units, unit_importance)


def test_config_validation():
    assert UnitsConfig(fractions=[0.5, 0.1, 0.5]).fractions == [0.1, 0.5]
    for bad in (dict(eps=-0.1), dict(reference="x"), dict(importance="x"), dict(images=0), dict(fractions=[0.0]),
                dict(fractions=[1.5]), dict(schemes=["x"]), dict(schemes=[])):
        with pytest.raises(UserError):
            UnitsConfig(**bad)


def test_candidate_units_cut_the_least_important():
    imp = [np.array([5.0, 1.0, 3.0, 0.5]), np.array([0.1, 0.2, 0.3, 0.4])]
    assert candidate_units(imp, 0.5, "uniform") == [[0, 2], [2, 3]]
    # global: the 4 most important of all 8 units, wherever they are
    assert candidate_units(imp, 0.5, "global") == [[0, 1, 2, 3], []]
    assert candidate_units(imp, 0.25, "global") == [[0, 1, 2, 3], [2, 3]]
    assert candidate_units(imp, 1.0, "uniform") == [[], []]


def test_select_units_rule():
    c = [UnitCandidate("none", 0.0, None, 0.8, 0.75), UnitCandidate("uniform", 0.2, [[0]], 0.7, 0.748),
         UnitCandidate("uniform", 0.4, [[0]], 0.6, 0.74), UnitCandidate("global", 0.4, [[0]], 0.6, 0.745)]
    assert select_units(c, 0.75, 0.003).cut == 0.2
    best = select_units(c, 0.75, 0.01)
    assert (best.scheme, best.flops_rel) == ("global", 0.6)  # same FLOPs: the more accurate one
    assert select_units(c, 0.75, 0.0).scheme == "none"
    with pytest.raises(ValueError):
        select_units(c[1:], 0.9, 0.0)


def _vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, in_chans=1,
                             num_classes=5, embed_dim=48, depth=3, num_heads=6, mlp_ratio=2.0).eval()


class _Cfg:  # what to_tensor reads from a BackboneConfig
    img_size, mean, std = 8, [0.5], [0.25]


def test_taylor_importance_is_the_mask_gradient():
    """|sum_tokens a dL/da| per image equals |dL/dm_u| for a unit mask m at 1: check it against autograd directly."""
    from steerprune.export.prune import mask_mlp_units
    from steerprune.training.model import GatedViT
    from steerprune.training.tensors import to_tensor

    vit = _vit()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 8, 8, 1), dtype=np.uint8)
    labels = rng.integers(0, 5, size=6)
    head_mask = [[1] * 6, [1, 0, 1, 0, 1, 1], [0, 0, 1, 1, 0, 0]]
    got = unit_importance(vit, images, labels, _Cfg, head_mask, "taylor", batch_size=4)
    masked = mask_mlp_units(vit, [list(range(96))[:-1]] * 3)  # MaskedMlp everywhere (the mask is reset below)
    model = GatedViT(masked)
    want = [np.zeros(96) for _ in range(3)]
    for i in range(6):
        ms = []
        for blk in masked.blocks:
            blk.mlp.unit_mask = torch.ones(96, requires_grad=True)
            ms.append(blk.mlp.unit_mask)
        x = to_tensor(images[i:i + 1], _Cfg)
        loss = torch.nn.functional.cross_entropy(model(x, head_mask=torch.tensor(head_mask, dtype=torch.float32)).logits,
                                                 torch.tensor(labels[i:i + 1]))
        for l, g in enumerate(torch.autograd.grad(loss, ms)):
            want[l] += g.abs().numpy() / 6
    for l in range(3):
        np.testing.assert_allclose(got[l], want[l], rtol=1e-4, atol=1e-8)
    assert all(g.max() > 0 for g in got)
    act = unit_importance(vit, images, labels, _Cfg, head_mask, "activation")
    assert all((a >= 0).all() and a.shape == (96,) for a in act)


ROUTES = [  # depth 4 x 6 heads: "0" and "1" share a head mask, "7" has no head left in its last layer
    {"name": "0", "classes": [0], "mask": [[1] * 6, [1, 1, 0, 0, 1, 0], [0, 1, 1, 0, 0, 1], [0, 0, 1, 0, 0, 1]]},
    {"name": "1", "classes": [1], "mask": [[1] * 6, [1, 1, 0, 0, 1, 0], [0, 1, 1, 0, 0, 1], [0, 0, 1, 0, 0, 1]]},
    {"name": "7", "classes": [7], "mask": [[1] * 6, [1, 0, 1, 1, 0, 1], [1, 1, 0, 0, 0, 0], [0] * 6]},
    {"name": "even", "classes": [0, 2, 4, 6, 8], "mask": [[1] * 6, [1, 1, 1, 0, 1, 1], [1, 1, 0, 1, 1, 0], [1, 0, 1, 0, 0, 1]]},
    {"name": "3", "classes": [3], "mask": [[1] * 6] * 4},
]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """A digits run built in seconds: the digits preset's ViT after 60 Adam steps, and an untrained head policy (the
    units stage needs a policy only for the global model's head mask)."""
    from steerprune.training.config import TrainConfig, backbone_config_for
    from steerprune.training.data import load_data
    from steerprune.training.model import build_vit
    from steerprune.training.policy import HeadPolicy, PolicyConfig
    from steerprune.training.run import save_module, write_json
    from steerprune.training.tensors import to_tensor

    run = tmp_path_factory.mktemp("quick") / "run"
    run.mkdir()
    data = load_data("digits", 0.2, 0)
    bcfg = backbone_config_for(TrainConfig.for_preset("digits"), data)
    torch.manual_seed(0)
    vit = build_vit(bcfg)
    opt = torch.optim.Adam(vit.parameters(), lr=2e-3)
    x, y = to_tensor(data.train.images, bcfg), torch.as_tensor(data.train.labels, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        idx = torch.randint(0, len(y), (64,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(vit(x[idx]), y[idx]).backward()
        opt.step()
    vit.eval()
    bcfg.save(run / "backbone.json")
    save_module(vit, run / "backbone.safetensors")
    policy = HeadPolicy(PolicyConfig(dim=96, num_heads=6, gated_layers=[1, 2, 3]))
    policy.save_config(run / "policy.json")
    save_module(policy, run / "policy.safetensors")
    write_json(run / "train_config.json", {"data": "digits", "train": {"val_fraction": 0.2, "seed": 0}})
    return run


@pytest.fixture(scope="module")
def tiny_units(quick_run, tmp_path_factory):
    """units_run on quick_run with a hand-made steering report."""
    from steerprune.steering.units import units_run

    tmp = tmp_path_factory.mktemp("units")
    report = tmp / "report.json"
    report.write_text(json.dumps({"routes": ROUTES, "config": {"tau": 0.5, "aggregate": "vote"}}))
    cfg = UnitsConfig(eps=0.05, claim_eps=0.05, images=64, global_images=128, global_val=120,
                      fractions=[0.25, 0.5, 0.75])
    out = units_run(quick_run, cfg, report_path=report, out_dir=tmp / "steering", log=lambda *_: None)
    return tmp, report, out


@pytest.mark.slow
def test_units_stage_files_and_rule(tiny_units):
    tmp, report, out = tiny_units
    saved = json.loads((tmp / "steering" / "units.json").read_text())
    cfg = json.loads((tmp / "steering" / "units_config.json").read_text())
    assert cfg["eps"] == 0.05 and cfg["selection"] == "val" and cfg["importance_on"] == "train"
    assert [r["name"] for r in saved["routes"]] == ["0", "1", "7", "even", "3"]
    for r in saved["routes"]:
        v = r["val"]
        # the rule held on val, and nothing cheaper that also held was passed over
        assert v["acc"] >= v["reference_acc"] - 0.05 - 1e-9
        assert v["claim"] <= v["claim_heads_only"] + 0.05 + 1e-9
        claims = {(sch, cut): c for sch, cut, c in v["claims"]}
        ok = [c for c in v["candidates"] if c[3] >= v["reference_acc"] - 0.05 - 1e-9
              and claims.get((c[0], c[1]), 1.0) <= v["claim_heads_only"] + 0.05 + 1e-9]
        assert r["flops_rel"] == pytest.approx(min(c[2] for c in ok), abs=1e-4)
        assert r["flops_rel"] <= r["flops_rel_heads_only"] + 1e-12
        if r["mlp_units"] is None:
            assert r["cut"] == 0.0 and r["scheme"] == "none"
        else:
            assert sum(r["mlp_kept"].values()) == sum(map(len, r["mlp_units"])) < 4 * 192
    assert saved["summary"]["routes_cut"] >= 1  # at eps 5 points some route can lose units
    g = saved["global"]
    assert g["chosen"]["flops_rel"] <= g["flops_rel_heads_only"] + 1e-12
    assert len(g["matched_heads_mlp"]["test_route_acc"]) == 5


@pytest.mark.slow
def test_export_with_units(tiny_units, quick_run, tmp_path):
    from steerprune.export.bundle import export_bundle
    from steerprune.export.manifest import verify_bundle

    tmp, report, out = tiny_units
    units_path = tmp / "steering" / "units.json"
    m = export_bundle(quick_run, tmp_path / "b", report_path=report, units_path=units_path, cost_batch=None,
                      log=lambda *_: None)
    assert m["run"]["units_source"] == f"units:{units_path}"
    chosen = {r["name"]: r for r in out["routes"]}
    for name, r in m["routes"].items():
        want = chosen[name]
        assert r["flops_rel"] == pytest.approx(want["flops_rel"])
        assert r["mlp_kept"] == want["mlp_kept"]
        if want["mlp_units"] is not None:
            assert "heads_mlp_" in r["model"] and m["models"][r["model"]]["mlp_units"] == want["mlp_units"]
    # routes "0" and "1" share a head mask; they share a model only if their units are the same too
    same = chosen["0"]["mlp_units"] == chosen["1"]["mlp_units"]
    assert (m["routes"]["0"]["model"] == m["routes"]["1"]["model"]) == same
    verify_bundle(tmp_path / "b")


@pytest.mark.slow
def test_export_shared_units_is_the_units_files_global_model(tiny_units, quick_run, tmp_path):
    from steerprune.export.bundle import export_bundle, shared_mask
    from steerprune.export.manifest import verify_bundle
    from steerprune.training.run import load_run

    tmp, report, out = tiny_units
    units_path = tmp / "steering" / "units.json"
    m = export_bundle(quick_run, tmp_path / "b", report_path=report, units_path=units_path, cost_batch=None,
                      shared="units", log=lambda *_: None)
    g = out["global"]["matched_heads_mlp"]
    sh = m["shared"]
    assert sh["mask"] == out["global"]["mask"] and m["models"][sh["model"]]["mlp_units"] == g["mlp_units"]
    assert sh["flops_rel"] == pytest.approx(g["flops_rel"]) and sh["mlp_kept"] == g["mlp_kept"]
    assert sh["source"]["from"].startswith(f"units:{units_path}") and set(sh["routes"]) == set(m["routes"])
    if g["mlp_units"] is not None:
        assert "heads_mlp_" in sh["model"]
    verify_bundle(tmp_path / "b")
    vit = load_run(quick_run).vit
    with pytest.raises(UserError, match="needs --units"):
        shared_mask(f"report:{report}", 5, "units", len(vit.blocks), vit.blocks[0].attn.num_heads, None, vit)
    bare = tmp_path / "no_global.json"
    bare.write_text(json.dumps({k: v for k, v in json.loads(units_path.read_text()).items() if k != "global"}))
    with pytest.raises(UserError, match="no global model"):
        shared_mask(f"report:{report}", 5, "units", len(vit.blocks), vit.blocks[0].attn.num_heads, bare, vit)


@pytest.mark.slow
def test_units_for_another_mask_refused(tiny_units, quick_run, tmp_path):
    from steerprune.training.run import load_run

    tmp, report, _ = tiny_units
    d = json.loads((tmp / "steering" / "units.json").read_text())
    d["routes"][0]["mask"] = [[1] * 6] * 4
    bad = tmp_path / "units.json"
    bad.write_text(json.dumps(d))
    routes = [dict(name="0", classes=[0], mask=json.loads(report.read_text())["routes"][0]["mask"])]
    with pytest.raises(UserError, match="different head mask"):
        apply_units(load_run(quick_run), routes, bad)
    d["routes"][0]["mlp_units"] = [[999]] * 4
    bad.write_text(json.dumps(d))
    with pytest.raises(UserError, match="unit indices"):
        apply_units(load_run(quick_run), routes, bad)


def test_cost_selection_config():
    assert UnitsConfig(select="cost").accept_eps == 0.005
    for bad in (dict(select="x"), dict(select="cost", search="cheapest-first"), dict(accept_eps=1.0),
                dict(accept_wrong_eps=-0.1)):
        with pytest.raises(UserError):
            UnitsConfig(**bad)


@pytest.mark.slow
def test_cost_selection_takes_the_cheapest_candidate_under_the_acceptance_rule(quick_run, tmp_path):
    """select='cost': every candidate is scored by export's acceptance search; the one chosen is the cheapest."""
    from steerprune.steering.units import units_run

    report = tmp_path / "report.json"
    report.write_text(json.dumps({"routes": ROUTES, "config": {"tau": 0.5, "aggregate": "vote"}}))
    cfg = UnitsConfig(select="cost", images=64, fractions=[0.25, 0.5, 0.75], off_images=200, global_model=False)
    out = units_run(quick_run, cfg, report_path=report, out_dir=tmp_path / "steering", routes=["0", "even"],
                    log=lambda *_: None)
    for r in out["routes"]:
        v = r["val"]
        assert len(v["costs"]) == len(v["candidates"]) == 1 + 2 * 3  # no cut, then 2 schemes x 3 fractions
        best = min(c[3] for c in v["costs"])
        assert v["acceptance"]["cost"] == pytest.approx(best, abs=1e-4)
        chosen = [c for c in v["costs"] if (c[0], c[1]) == (r["scheme"], r["cut"])]
        assert chosen and chosen[0][3] == pytest.approx(best, abs=1e-4)
        assert r["flops_rel"] == pytest.approx(chosen[0][2], abs=1e-4)
        # expected cost = FLOPs + fallback, and the rule keeps the accuracy bound on the route's val images
        a = v["acceptance"]
        assert a["cost"] == pytest.approx(r["flops_rel"] + a["fallback"])
        assert a["acc"] >= a["full_acc"] - 0.005 - 1e-9
        assert a["wrong_hints"]["acc"] >= a["wrong_hints"]["full_acc"] - 0.05 - 1e-9


def test_recovery_config_in_units():
    assert UnitsConfig().recover_config() is None
    rc = UnitsConfig(select="cost", recover_epochs=2, recover_lr=1e-3).recover_config()
    assert (rc.epochs, rc.lr) == (2, 1e-3)
    for bad, msg in ((dict(recover_epochs=-1), "--recover-epochs must be from 0 to 100"),
                     (dict(recover_epochs=101), "--recover-epochs must be from 0 to 100"),
                     (dict(recover_epochs=1, recover_lr=0.0), "--recover-lr must be in")):
        with pytest.raises(UserError, match=msg):
            UnitsConfig(**bad)


@pytest.mark.slow
def test_cost_selection_with_recovery_scores_the_model_export_recovers(quick_run, tmp_path):
    """recover_epochs: every candidate is recovered before it is scored, and export (following the units file)
    recovers the chosen cut into the very model that was scored."""
    from steerprune.export.bundle import export_bundle
    from steerprune.export.manifest import verify_bundle
    from steerprune.export.prune import mask_key
    from steerprune.export.manifest import open_session
    from steerprune.steering.units import units_run
    from steerprune.training.run import load_run
    from steerprune.training.tensors import to_tensor

    report = tmp_path / "report.json"
    routes = [ROUTES[0], ROUTES[3]]
    report.write_text(json.dumps({"routes": routes, "config": {"tau": 0.5, "aggregate": "vote"}}))
    cfg = UnitsConfig(select="cost", images=64, fractions=[0.5, 0.9], schemes=["global"], off_images=100,
                      global_model=False, recover_epochs=1)
    out = units_run(quick_run, cfg, report_path=report, out_dir=tmp_path / "steering", log=lambda *_: None)
    plain = units_run(quick_run, UnitsConfig(select="cost", images=64, fractions=[0.5, 0.9], schemes=["global"],
                                             off_images=100, global_model=False),
                      report_path=report, out_dir=tmp_path / "plain", log=lambda *_: None)
    for r, p in zip(out["routes"], plain["routes"]):
        rec = r["recovery"]
        assert rec["config"]["epochs"] == 1 and rec["own"] > 0 and rec["images"] == 2 * rec["own"]
        assert len(rec["models"]) == 3  # the heads-only route and both cuts, each recovered once
        assert all(s["loss_after"] < s["loss_before"] for s in rec["models"].values())
        assert p["recovery"] is None
        # the same candidates, scored differently: the recovered curve is not the plain one
        assert [c[:3] for c in r["val"]["candidates"]] == [c[:3] for c in p["val"]["candidates"]]
        assert [c[3] for c in r["val"]["candidates"]] != [c[3] for c in p["val"]["candidates"]]
        best = min(c[3] for c in r["val"]["costs"])
        assert r["val"]["acceptance"]["cost"] == pytest.approx(best, abs=1e-4)
    m = export_bundle(quick_run, tmp_path / "b", report_path=report, units_path=tmp_path / "steering" / "units.json",
                      cost_batch=None, log=lambda *_: None)
    assert m["export"]["recover_from"] == "units" and m["export"]["recover"]["epochs"] == 1
    run = load_run(quick_run, need=("backbone",))
    val = run.load_data().val
    for r in out["routes"]:
        entry = m["models"][m["routes"][r["name"]]["model"]]
        key = mask_key(r["mask"], r["mlp_units"])
        assert entry["recovery"]["loss_after"] == pytest.approx(r["recovery"]["models"][key]["loss_after"], abs=1e-4)
        # the exported model answers the route's val images as the scored candidate did
        vi = np.flatnonzero(np.isin(val.labels, r["classes"]))
        x = to_tensor(val.images[vi], run.backbone).numpy()
        sess = open_session(tmp_path / "b", m["routes"][r["name"]]["model"])
        got = sess.run(None, {m["input"]["input_name"]: x})[0].argmax(-1)
        assert float((got == val.labels[vi]).mean()) == pytest.approx(r["val"]["acc"], abs=1.5 / len(vi))
    verify_bundle(tmp_path / "b")
    # told otherwise, export follows the flag (and says so)
    from steerprune.export.recover import RecoverConfig

    said = []
    m0 = export_bundle(quick_run, tmp_path / "b0", report_path=report, units_path=tmp_path / "steering" / "units.json",
                       cost_batch=None, log=said.append, recover=RecoverConfig(epochs=0))
    assert m0["export"]["recover"] is None and m0["export"]["recover_from"] is None
    assert any("chose its cuts for models recovered 1 epochs" in s for s in said)
    assert all(e["recovery"] is None for e in m0["models"].values())

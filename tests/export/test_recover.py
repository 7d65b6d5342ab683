"""`export --recover-epochs`: each pruned model trained briefly against the full model on its routes' train images."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import TINY_ROUTES

from steerprune.errors import UserError

torch = pytest.importorskip("torch")


def test_sample_is_the_routes_classes_plus_others_from_train_only():
    from steerprune.export.recover import RecoverConfig, recovery_sample

    labels = np.repeat(np.arange(10), 50)  # 500 train labels, 50 per class
    idx, own = recovery_sample(labels, [3, 4], RecoverConfig(max_own=60, other_ratio=0.5))
    assert own == 60 and len(idx) == 90 and np.all(np.diff(idx) > 0)
    assert np.isin(labels[idx], [3, 4]).sum() == 60
    idx2, _ = recovery_sample(labels, [3, 4], RecoverConfig(max_own=60, other_ratio=0.5))
    assert np.array_equal(idx, idx2)  # seeded
    idx_all, own_all = recovery_sample(labels, range(10), RecoverConfig(max_own=100))
    assert own_all == 100 and len(idx_all) == 100  # every class: no "others" left to draw
    with pytest.raises(UserError, match="no train images"):
        recovery_sample(labels, [11], RecoverConfig())


@pytest.mark.parametrize("bad", [dict(epochs=-1), dict(lr=0), dict(other_ratio=-1), dict(temperature=0),
                                 dict(batch_size=0)])
def test_config_is_validated(bad):
    from steerprune.export.recover import RecoverConfig

    with pytest.raises(UserError, match="recover"):
        RecoverConfig(**bad)


@pytest.fixture(scope="module")
def recovered(tiny_run, tmp_path_factory):
    from steerprune.export.bundle import export_bundle
    from steerprune.export.recover import RecoverConfig

    tmp = tmp_path_factory.mktemp("recovered")
    report = tmp / "report.json"
    report.write_text(json.dumps({"routes": TINY_ROUTES, "summary": {}, "zero_shot": {}, "config": {}}))
    manifest = export_bundle(tiny_run, tmp / "bundle", report_path=report, log=lambda *_: None, cost_batch=None,
                             recover=RecoverConfig(epochs=2))
    return tmp / "bundle", manifest


def test_recovered_models_are_trained_exported_and_verified(recovered, tiny_run):
    from steerprune.export.manifest import verify_bundle
    from steerprune.training.run import load_run

    bundle, manifest = recovered
    assert manifest["export"]["recover"]["epochs"] == 2
    full = manifest["full"]["model"]
    assert manifest["models"][full]["recovery"] is None  # the teacher itself is never trained
    pruned = [rel for rel in manifest["models"] if rel != full]
    assert pruned
    data = load_run(tiny_run, need=("backbone",)).load_data()
    counts = np.bincount(data.train.labels, minlength=10)
    for rel in pruned:
        rec = manifest["models"][rel]["recovery"]
        classes = sorted({c for r in TINY_ROUTES if r["name"] in manifest["models"][rel]["routes"]
                          for c in r["classes"]})
        assert rec["classes"] == len(classes) and rec["own"] == min(2000, counts[classes].sum())
        assert rec["images"] == rec["own"] * 2 and rec["steps"] == 2 * -(-rec["images"] // 64)
        assert rec["loss_after"] < rec["loss_before"]  # the training lowered its own loss on its sample
    # parity is against the recovered model: the stored samples verify on the exported files
    assert len(verify_bundle(bundle)["models"]) == len(manifest["models"])


def test_recovered_model_differs_from_the_plain_slice(recovered, tiny_bundle):
    """Same masks, same run: the plain export's route model is the gated model; the recovered one is not."""
    from steerprune.export.manifest import load_manifest, open_session

    bundle, manifest = recovered
    plain = load_manifest(tiny_bundle)
    x = np.load(bundle / manifest["samples"]["file"])["inputs"]
    route = "7"
    rel = manifest["routes"][route]["model"]
    assert rel == plain["routes"][route]["model"]  # the file name is the mask's, recovered or not
    assert manifest["models"][rel]["sha256"] != plain["models"][rel]["sha256"]
    a = open_session(bundle, rel).run(None, {manifest["input"]["input_name"]: x})[0]
    b = open_session(tiny_bundle, rel).run(None, {plain["input"]["input_name"]: x})[0]
    assert np.abs(a - b).max() > 1e-3
    f1 = open_session(bundle, manifest["full"]["model"]).run(None, {manifest["input"]["input_name"]: x})[0]
    f2 = open_session(tiny_bundle, plain["full"]["model"]).run(None, {manifest["input"]["input_name"]: x})[0]
    assert np.abs(f1 - f2).max() < 1e-5  # the full model is exported unchanged


def test_cli_refuses_bad_recovery_flags(tiny_run, tmp_path, capsys):
    from steerprune.cli import main

    assert main(["export", str(tiny_run), "--out", str(tmp_path / "b"), "--recover-epochs", "-1"]) == 2
    assert "--recover-epochs must be from 0 to 100, got -1" in capsys.readouterr().err
    assert main(["export", str(tiny_run), "--out", str(tmp_path / "b"), "--recover-epochs", "101"]) == 2
    assert "--recover-epochs must be from 0 to 100, got 101" in capsys.readouterr().err
    assert main(["export", str(tiny_run), "--out", str(tmp_path / "b"), "--recover-lr", "0.001"]) == 2
    assert "--recover-lr needs --recover-epochs" in capsys.readouterr().err
    assert main(["export", str(tiny_run), "--out", str(tmp_path / "b"), "--recover-epochs", "1",
                 "--recover-lr", "2"]) == 2
    assert "--recover-lr must be in (0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()

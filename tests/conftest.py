"""Shared fixtures: one tiny digits run trained once per test session (about 10 s on 2 cores)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

CIFAR10 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"


def tiny_train_config(**overrides):
    from steerprune.training.config import TrainConfig

    base = dict(epochs=25, policy_epochs=4, sae_steps=400, sae_aug_passes=2, seed=0)
    base.update(overrides)
    return TrainConfig.for_preset("digits", **base)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A complete digits run (backbone + policy + SAEs on every gated layer), shared read-only by the tests."""
    pytest.importorskip("torch")
    from steerprune.training.pipeline import run_training

    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    run_training(run_dir, "digits", tiny_train_config(), log=lambda *_: None)
    return run_dir


@pytest.fixture(scope="session")
def cifar10_path() -> Path:
    if not (CIFAR10 / "train.npz").exists():
        pytest.skip(f"CIFAR-10 not found at {CIFAR10}")
    return CIFAR10


# ---------------------------------------------------------------------------------------------- export (added by export)

# Hand-made steering report for tiny_run (depth 4 x 6 heads, gated layers 1-3): routes "0" and "1" share a mask,
# "7" has no head left in its last layer, "even" is a group route, "3" keeps every head (shares the full model).
TINY_ROUTES = [
    {"name": "0", "classes": [0], "mask": [[1] * 6, [1, 1, 0, 0, 1, 0], [0, 1, 1, 0, 0, 1], [0, 0, 1, 0, 0, 1]],
     "acc": 0.97, "off_route_acc": 0.41},
    {"name": "1", "classes": [1], "mask": [[1] * 6, [1, 1, 0, 0, 1, 0], [0, 1, 1, 0, 0, 1], [0, 0, 1, 0, 0, 1]],
     "acc": 0.95, "off_route_acc": 0.38},
    {"name": "7", "classes": [7], "mask": [[1] * 6, [1, 0, 1, 1, 0, 1], [1, 1, 0, 0, 0, 0], [0] * 6],
     "acc": 0.92, "off_route_acc": 0.30},
    {"name": "even", "classes": [0, 2, 4, 6, 8], "mask": [[1] * 6, [1, 1, 1, 0, 1, 1], [1, 1, 0, 1, 1, 0], [1, 0, 1, 0, 0, 1]],
     "acc": 0.94, "off_route_acc": 0.55},
    {"name": "3", "classes": [3], "mask": [[1] * 6] * 4, "acc": 0.96, "off_route_acc": 0.96},
]


@pytest.fixture(scope="session")
def tiny_bundle(tiny_run, tmp_path_factory) -> Path:
    """tiny_run exported with TINY_ROUTES (a hand-made steering report): 3 pruned models + full; read-only."""
    import json

    from steerprune.export.bundle import export_bundle

    tmp = tmp_path_factory.mktemp("tiny_bundle")
    report = tmp / "report.json"
    report.write_text(json.dumps({"routes": TINY_ROUTES, "summary": {}, "zero_shot": {}, "config": {}}))
    export_bundle(tiny_run, tmp / "bundle", report_path=report, log=lambda *_: None)
    return tmp / "bundle"

"""Shared fixtures: one tiny digits run trained once per test session (about 10 s on 2 cores)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

CIFAR10 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"


def tiny_train_config(**overrides):
    from steerprune.training.train import TrainConfig

    base = dict(epochs=12, policy_epochs=4, sae_steps=400, sae_aug_passes=2, seed=0)
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

"""Backbone training augmentation beyond crop/flip: timm's RandAugment on the stored uint8 images and timm's
Mixup/CutMix with soft targets; settings validated up front, recorded, and reproducible from the seed."""
import random

import numpy as np
import pytest
import torch

from steerprune.errors import UserError
from steerprune.training.config import TrainConfig
from steerprune.training.data import load_data
from steerprune.training.tensors import apply_to_images, rand_augment
from tests.training.test_streaming import _cfg


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", 0.2, 0)


@pytest.mark.parametrize("shape, mean", [((6, 8, 8, 1), (0.3,)), ((6, 32, 32, 3), (0.5, 0.4, 0.3))])
def test_rand_augment_changes_images_keeps_shape_and_follows_the_seed(shape, mean):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, shape, dtype=np.uint8)
    ra = rand_augment("rand-m9-mstd0.5", shape[1], mean)
    random.seed(1), np.random.seed(1)
    a = apply_to_images(x, ra)
    random.seed(1), np.random.seed(1)
    b = apply_to_images(x, ra)
    assert a.shape == x.shape and a.dtype == np.uint8
    assert np.array_equal(a, b)  # the same draws from the same seed
    assert (a != x).any(axis=(1, 2, 3)).sum() >= 4  # most images changed (an op can be a no-op at m9 rarely)


@pytest.mark.parametrize("field, value, message", [
    ("randaugment", "rand-x9", "not a timm RandAugment policy"),
    ("mixup", -0.2, "mixup must be >= 0"),
    ("cutmix", -1.0, "cutmix must be >= 0"),
    ("label_smoothing", 1.0, "label_smoothing must be in [0, 1)"),
])
def test_bad_augmentation_settings_are_refused_before_training(field, value, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace(")", r"\)")):
        TrainConfig(**{field: value})


def _train(tmp_path, digits, **aug):
    from steerprune.training.loops import train_backbone

    tcfg = TrainConfig(epochs=1, batch_size=33, crop_pad=1, seed=3, **aug)  # odd batches: Mixup pairs images
    logs = []
    torch.manual_seed(0)
    vit = train_backbone(tmp_path, digits, tcfg, _cfg(digits), log=logs.append)
    return vit, logs


def test_mixup_cutmix_and_randaugment_train_reproducibly_and_differ_from_plain(digits, tmp_path):
    plain, _ = _train(tmp_path / "plain", digits)
    aug, logs = _train(tmp_path / "a", digits, randaugment="rand-m9-mstd0.5", mixup=0.8, cutmix=1.0)
    again, _ = _train(tmp_path / "b", digits, randaugment="rand-m9-mstd0.5", mixup=0.8, cutmix=1.0)
    loss = float(logs[-1].split("loss ")[1].split()[0])
    assert np.isfinite(loss) and loss > 0
    same = [torch.equal(p, q) for p, q in zip(aug.state_dict().values(), again.state_dict().values())]
    assert all(same)  # RandAugment and Mixup draw from generators seeded per epoch
    diff = [not torch.equal(p, q) for p, q in zip(aug.state_dict().values(), plain.state_dict().values())]
    assert any(diff)


def test_the_cli_records_augmentation_settings(tmp_path):
    from steerprune.cli import build_parser
    from steerprune.training.cli import train_config_from_args

    args = build_parser().parse_args(["train", str(tmp_path / "run"), "--data", "digits", "--stage", "backbone",
                                      "--mixup", "0.8", "--cutmix", "1", "--randaugment", "rand-m7-mstd0.5",
                                      "--label-smoothing", "0.05"])
    _, tcfg = train_config_from_args(args)
    assert (tcfg.mixup, tcfg.cutmix, tcfg.randaugment, tcfg.label_smoothing) == (0.8, 1.0, "rand-m7-mstd0.5", 0.05)
    assert TrainConfig.for_preset("cifar").mixup == 0.0 and TrainConfig.for_preset("cifar").randaugment is None

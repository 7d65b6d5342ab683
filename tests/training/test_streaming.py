"""Images are converted to float one batch at a time (never a whole split), with the same numbers as converting
everything at once; the cosine schedule is timm's; --device."""
import math

import numpy as np
import pytest
import torch

from steerprune.errors import UserError
from steerprune.training import tensors
from steerprune.training.data import load_data
from steerprune.training.model import BackboneConfig
from steerprune.training.tensors import ImageTensors, to_tensor


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", 0.2, 0)


def _cfg(data, img_size=8):
    mean, std = data.channel_stats()
    return BackboneConfig(model_name="vit_tiny_patch16_224", model_kwargs=dict(
        patch_size=2, embed_dim=24, depth=2, num_heads=2, mlp_ratio=2.0), num_classes=10,
        class_names=data.class_names, img_size=img_size, in_chans=1, mean=mean, std=std)


@pytest.fixture()
def conversions(monkeypatch):
    """Number of images in every to_tensor call made by the training code."""
    sizes = []
    real = tensors.to_tensor

    def recording(images, cfg, device=None):
        sizes.append(len(images))
        return real(images, cfg, device)

    monkeypatch.setattr(tensors, "to_tensor", recording)
    return sizes


def test_training_and_collection_convert_one_batch_at_a_time(digits, conversions, tmp_path):
    from steerprune.training.config import TrainConfig
    from steerprune.training.evaluate import evaluate_backbone, evaluate_policy
    from steerprune.training.loops import collect_policy_inputs, train_backbone, train_policy

    tcfg = TrainConfig(epochs=1, policy_epochs=1, batch_size=32, crop_pad=1)
    cfg = _cfg(digits)
    vit = train_backbone(tmp_path, digits, tcfg, cfg, log=lambda *_: None)
    model = train_policy(vit, digits, tcfg, cfg, log=lambda *_: None)
    inputs = collect_policy_inputs(model, digits.train, cfg, passes=2, pad=1, hflip=False, seed=0, batch_size=100)
    evaluate_backbone(vit, digits.test, cfg)
    evaluate_policy(model, digits.test, cfg)
    assert inputs.shape == (2 * len(digits.train), 1, 24)
    assert conversions and max(conversions) <= 256 < len(digits.train)  # never a whole split
    assert sum(n == 32 for n in conversions) >= 2 * (len(digits.train) // 32)  # every training step streamed


def test_streamed_batches_equal_converting_the_whole_split(digits):
    cfg = _cfg(digits, img_size=12)  # resized as well
    whole = to_tensor(digits.val.images, cfg)
    streamed = torch.cat([x for _, x in tensors.image_batches(digits.val.images, cfg, 50)])
    assert torch.equal(whole, streamed)
    view = ImageTensors(digits.val.images, cfg)
    assert view.shape == whole.shape and len(view) == len(whole)
    pick = np.array([5, 0, 17])
    assert torch.equal(view[pick], whole[pick]) and torch.equal(view[3:9], whole[3:9])
    on = torch.from_numpy(digits.val.labels == 4)
    assert torch.equal(view[on], whole[on]) and torch.equal(view[2], whole[2])
    assert np.array_equal(view.numpy(), whole.numpy())


def test_cosine_schedule_is_timms_and_matches_the_closed_form():
    """timm's CosineLRScheduler against the closed form the loops used before: identical after warmup; during
    warmup timm starts at 0 and trails by one step (a difference of base/warmup at most, over the warmup only)."""
    from steerprune.training.loops import cosine_schedule

    base, total, warmup = 1e-3, 200, 20
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = cosine_schedule(opt, total, warmup)
    lrs = []
    for step in range(total):
        sched.step_update(step)
        lrs.append(opt.param_groups[0]["lr"])
    closed = [base * (s + 1) / warmup if s < warmup else
              base * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))) for s in range(total)]
    assert lrs[0] == 0.0 and lrs[warmup] == pytest.approx(base)
    assert np.allclose(lrs[warmup:], closed[warmup:], rtol=1e-12, atol=0)
    assert max(abs(a - b) for a, b in zip(lrs[:warmup], closed[:warmup])) == pytest.approx(base / warmup)
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    no_warmup = cosine_schedule(opt2, 100)
    for step in (0, 37, 99):
        no_warmup.step_update(step)
        assert opt2.param_groups[0]["lr"] == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * step / 100)))


def test_device_resolution():
    from steerprune.training.device import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda")


def test_amp_auto_resolves_to_what_the_device_computes_natively(monkeypatch):
    from steerprune.training import device as dev

    cpu = torch.device("cpu")
    for native in (True, False):
        monkeypatch.setattr(dev, "native_bf16", lambda d, native=native: native)
        assert dev.resolve_amp("auto", cpu) == ("bf16" if native else "none")
        said = []
        assert dev.resolve_amp("bf16", cpu, log=said.append) == "bf16"  # an explicit choice is kept
        assert bool(said) is (not native) and (not said or "emulated" in said[0])
        assert dev.resolve_amp("none", cpu) == "none"
    with pytest.raises(UserError, match="amp must be one of"):
        dev.resolve_amp("fp16", cpu)


def test_recorded_amp_is_the_resolved_one(tmp_path):
    import json

    from steerprune.training.config import TrainConfig
    from steerprune.training.device import native_bf16
    from steerprune.training.pipeline import run_training

    tcfg = TrainConfig.for_preset("digits", epochs=1, amp="auto")
    run_training(tmp_path / "r", "digits", tcfg, stage="backbone", log=lambda *_: None)
    recorded = json.loads((tmp_path / "r" / "train_config.json").read_text())["train"]["amp"]
    assert recorded == ("bf16" if native_bf16(torch.device("cpu")) else "none")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cli_device_cuda_without_cuda_is_one_line(tmp_path, capsys):
    from steerprune.cli import main

    rc = main(["train", str(tmp_path / "r"), "--device", "cuda", "--epochs", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "CUDA is not available" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r" / "train_config.json").exists()  # refused before anything was written

"""`steerprune train` end to end on digits (few epochs): artifacts, metrics, reload, resume, checkpoints, CLI errors."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from steerprune.training.run import load_run
from steerprune.training.forward import run_model

pytestmark = pytest.mark.slow


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "steerprune.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_run_has_every_artifact_with_its_config(tiny_run):
    for name in ("backbone", "policy", "sae_L1", "sae_L2", "sae_L3"):
        assert (tiny_run / f"{name}.safetensors").stat().st_size > 0
        assert json.loads((tiny_run / f"{name}.json").read_text())
    cfg = json.loads((tiny_run / "train_config.json").read_text())
    assert cfg["data"] == "digits" and "torch" in cfg["versions"]
    m = json.loads((tiny_run / "metrics.json").read_text())
    for key in ("backbone.test_acc", "policy.test_acc", "policy.head_usage", "sae.fvu", "sae.l0", "sae.dead_fraction"):
        section, field = key.split(".")
        assert isinstance(m[section][field], float), key
    assert m["backbone"]["test_acc"] > 0.5  # 25 epochs on digits: far above the 0.1 of chance
    assert 0.0 < m["policy"]["head_usage"] < 1.0
    assert len(m["policy"]["layer_head_usage"]) == 3 and len(m["policy"]["per_class"]) == 10
    assert set(m["sae"]["layers"]) == {"1", "2", "3"} and m["sae"]["reported_layer"] == 3
    assert m["sae"]["l0"] <= 16.0 and 0 <= m["sae"]["fvu"] < 1


def test_run_reloads_and_reproduces_its_metrics(tiny_run):
    run = load_run(tiny_run, need=("policy", "sae"))
    data = run.load_data()
    out = run_model(run.model, data.test.images, run.backbone)
    m = json.loads((tiny_run / "metrics.json").read_text())
    acc = float((out.logits.argmax(-1) == data.test.labels).mean())
    assert acc == pytest.approx(m["policy"]["test_acc"], abs=1e-9)
    assert out.masks[:, 1:].mean() == pytest.approx(m["policy"]["head_usage"], abs=1e-6)
    assert set(run.saes) == {1, 2, 3}


def test_cli_rejects_bad_input_in_one_line(tmp_path):
    r = cli("train", str(tmp_path / "r"), "--data", "mnist")
    assert r.returncode == 2 and "unknown data spec 'mnist'" in r.stderr and "Traceback" not in r.stderr
    r = cli("train", str(tmp_path / "r"), "--data", "cifar10:/no/such/folder")
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"this is not a checkpoint")
    r = cli("train", str(tmp_path / "r"), "--data", "digits", "--epochs", "1", "--checkpoint", str(bad))
    assert r.returncode == 2 and "cannot read checkpoint" in r.stderr and "Traceback" not in r.stderr
    r = cli("train", str(tmp_path / "r2"), "--stage", "policy", "--data", "digits")
    assert r.returncode == 2 and "no backbone.json" in r.stderr


def test_checkpoint_initialises_backbone_and_resume_continues(tmp_path, tiny_run):
    from steerprune.training.pipeline import run_training

    from ..conftest import tiny_train_config

    # zero epochs from a checkpoint: the saved backbone is exactly the checkpoint (torch file, weights_only)
    src = load_run(tiny_run).vit.state_dict()
    torch.save(src, tmp_path / "ckpt.pth")
    run_training(tmp_path / "a", "digits", tiny_train_config(epochs=0, checkpoint=str(tmp_path / "ckpt.pth")),
                 stage="backbone", log=lambda *_: None)
    again = load_run(tmp_path / "a").vit.state_dict()
    assert all(torch.equal(src[k], again[k]) for k in src)

    logs = []
    run_training(tmp_path / "b", "digits", tiny_train_config(epochs=1), stage="backbone", log=logs.append)
    first = json.loads((tmp_path / "b" / "metrics.json").read_text())["backbone"]
    logs.clear()
    run_training(tmp_path / "b", "digits", tiny_train_config(epochs=2), stage="backbone", resume=True, log=logs.append)
    assert any("resuming backbone from epoch 1" in line for line in logs)
    assert sum("backbone epoch" in line for line in logs) == 1  # only epoch 2 ran
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["backbone"]["epochs"] == 2 and first["epochs"] == 1


def test_retraining_the_backbone_drops_stale_policy_and_saes(tmp_path, tiny_run):
    import shutil

    from steerprune.training.pipeline import run_training

    from ..conftest import tiny_train_config

    shutil.copytree(tiny_run, tmp_path / "r")
    run_training(tmp_path / "r", "digits", tiny_train_config(epochs=1), stage="backbone", log=lambda *_: None)
    assert not (tmp_path / "r" / "policy.json").exists() and not list((tmp_path / "r").glob("sae_L*"))
    assert np.isfinite(json.loads((tmp_path / "r" / "metrics.json").read_text())["backbone"]["test_acc"])


def test_distillation_pulls_the_gated_model_toward_the_untuned_backbone(tiny_run):
    from steerprune.training.model import build_vit
    from steerprune.training.loops import train_policy
    from steerprune.training.tensors import to_tensor

    from ..conftest import tiny_train_config

    run = load_run(tiny_run, need=("backbone",))
    data = run.load_data()
    x_val = to_tensor(data.val.images, run.backbone)
    with torch.no_grad():
        teacher = run.vit.eval()(x_val).log_softmax(-1)
    kl = {}
    for weight in (0.0, 5.0):
        vit = build_vit(run.backbone)
        vit.load_state_dict(run.vit.state_dict())
        model = train_policy(vit, data, tiny_train_config(policy_epochs=3, distill_weight=weight), run.backbone,
                             log=lambda *_: None)
        with torch.no_grad():
            student = model(x_val).logits.log_softmax(-1)
        kl[weight] = float(torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean"))
    assert kl[5.0] < 0.8 * kl[0.0], kl


def test_negative_distill_weight_is_refused():
    from steerprune.errors import UserError
    from steerprune.training.config import TrainConfig

    with pytest.raises(UserError, match="distill_weight"):
        TrainConfig(distill_weight=-1.0)


def test_finetune_lr_sets_how_far_joint_tuning_moves_the_backbone(tiny_run):
    from steerprune.training.model import build_vit
    from steerprune.training.loops import train_policy

    from ..conftest import tiny_train_config

    run = load_run(tiny_run, need=("backbone",))
    data = run.load_data()
    start = {k: v.clone() for k, v in run.vit.state_dict().items()}
    moved = {}
    for lr in (1e-6, 1e-3):
        vit = build_vit(run.backbone)
        vit.load_state_dict(start)
        train_policy(vit, data, tiny_train_config(policy_epochs=1, finetune_lr=lr), run.backbone, log=lambda *_: None)
        moved[lr] = float(sum((v - start[k]).abs().sum() for k, v in vit.state_dict().items() if v.is_floating_point()))
    assert 0 < moved[1e-6] < 0.01 * moved[1e-3], moved


def test_non_positive_learning_rates_are_refused():
    from steerprune.errors import UserError
    from steerprune.training.config import TrainConfig

    with pytest.raises(UserError, match="finetune_lr"):
        TrainConfig(finetune_lr=0.0)
    with pytest.raises(UserError, match="policy_lr"):
        TrainConfig(policy_lr=-1e-3)


def test_policy_noise_anneals_linearly_to_the_configured_end(tiny_run, monkeypatch):
    from steerprune.training import policy as policy_mod
    from steerprune.training.model import build_vit
    from steerprune.training.loops import train_policy

    from ..conftest import tiny_train_config

    scales = []
    real = policy_mod.gumbel_sigmoid

    def recording(logits, temperature, hard=True, noise_scale=1.0):
        scales.append(noise_scale)
        return real(logits, temperature, hard, noise_scale)

    monkeypatch.setattr(policy_mod, "gumbel_sigmoid", recording)
    run = load_run(tiny_run, need=("backbone",))
    vit = build_vit(run.backbone)
    vit.load_state_dict(run.vit.state_dict())
    model = train_policy(vit, run.load_data(), tiny_train_config(policy_epochs=2, policy_noise_end=0.0), run.backbone,
                         log=lambda *_: None)
    per_step = scales[::len(model.policy.cfg.gated_layers)]  # one call per gated layer per step
    assert per_step[0] == 1.0 and 0.0 <= per_step[-1] < 0.2
    assert all(a > b for a, b in zip(per_step, per_step[1:]))
    assert model.policy.noise_scale == 1.0  # the schedule does not leak into later training or eval


def test_policy_noise_end_outside_unit_interval_is_refused():
    from steerprune.errors import UserError
    from steerprune.training.config import TrainConfig

    with pytest.raises(UserError, match="policy_noise_end"):
        TrainConfig(policy_noise_end=1.5)

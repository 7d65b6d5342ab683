"""A later stage follows the run's record (RUN/train_config.json): recorded data and splits, contradicting flags
refused in one line, the record never rewritten before the checks pass, and only in the fields the stage owns."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from steerprune.cli import main
from steerprune.errors import UserError
from steerprune.training.data import load_data
from steerprune.training.record import owned_fields

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    """scikit-learn's digits written as an image folder (train/ + test/, one folder per class, 8x8 grayscale PNG):
    the same images as `digits`, under another data spec."""
    root = tmp_path_factory.mktemp("digits_folder")
    d = load_data("digits", val_fraction=0.2, seed=0)
    for split, images, labels in (("train", np.concatenate([d.train.images, d.val.images]),
                                   np.concatenate([d.train.labels, d.val.labels])),
                                  ("test", d.test.images, d.test.labels)):
        for i, (im, y) in enumerate(zip(images, labels)):
            (root / split / str(y)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(im[..., 0], mode="L").save(root / split / str(y) / f"{i:04d}.png")
    return root


@pytest.fixture()
def folder_run(tiny_run, digits_folder, tmp_path):
    """A copy of tiny_run whose record says it was trained on the image-folder copy of digits."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    rec = json.loads((run / "train_config.json").read_text())
    rec["data"] = f"imagefolder:{digits_folder}"
    (run / "train_config.json").write_text(json.dumps(rec, indent=2))
    return run


def _record(run):
    return json.loads((run / "train_config.json").read_text())


def test_later_stage_without_data_uses_the_recorded_data(folder_run, capsys):
    before = _record(folder_run)
    rc = main(["train", str(folder_run), "--stage", "sae", "--sae-layers", "3", "--sae-steps", "30"])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"data {before['data']}:" in out  # not digits, the old default
    after = _record(folder_run)
    assert after["data"] == before["data"]
    assert after["train"]["sae_steps"] == 30 and after["train"]["sae_layers"] == [3]  # the stage's own settings
    # everything the SAE stage does not own is as the backbone recorded it
    assert {k: v for k, v in after["train"].items() if not k.startswith("sae_")} == \
           {k: v for k, v in before["train"].items() if not k.startswith("sae_")}


@pytest.mark.parametrize("flags, named", [
    (["--seed", "1"], "--seed 1 (recorded 0)"),
    (["--val-fraction", "0.3"], "--val-fraction 0.3 (recorded 0.2)"),
    (["--data", "digits"], "--data digits (recorded imagefolder:"),
    (["--epochs", "3"], "--epochs 3 (recorded 25)"),
])
def test_later_stage_refuses_flags_that_contradict_the_record(folder_run, capsys, flags, named):
    record_bytes = (folder_run / "train_config.json").read_bytes()
    sae_bytes = (folder_run / "sae_L3.safetensors").read_bytes()
    rc = main(["train", str(folder_run), "--stage", "sae", "--sae-steps", "30", *flags])
    err = capsys.readouterr().err
    assert rc == 2 and named in err and "contradict" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert (folder_run / "train_config.json").read_bytes() == record_bytes  # untouched
    assert (folder_run / "sae_L3.safetensors").read_bytes() == sae_bytes  # nothing retrained


def test_agreeing_flags_are_accepted(folder_run, digits_folder, capsys):
    rc = main(["train", str(folder_run), "--stage", "sae", "--sae-layers", "3", "--sae-steps", "30", "--seed", "0",
               "--val-fraction", "0.2", "--data", f"imagefolder:{digits_folder}/."])  # same folder, other spelling
    assert rc == 0, capsys.readouterr().err


def test_python_api_refuses_a_later_stage_on_other_splits(tiny_run, tmp_path):
    from steerprune.training.pipeline import run_training

    from ..conftest import tiny_train_config

    shutil.copytree(tiny_run, tmp_path / "r")
    record_bytes = (tmp_path / "r" / "train_config.json").read_bytes()
    with pytest.raises(UserError, match=r"seed 1 \(recorded 0\)"):
        run_training(tmp_path / "r", None, tiny_train_config(seed=1), stage="policy", log=lambda *_: None)
    assert (tmp_path / "r" / "train_config.json").read_bytes() == record_bytes


def test_a_backbone_that_cannot_start_leaves_the_record_alone(tiny_run, tmp_path, capsys):
    shutil.copytree(tiny_run, tmp_path / "r")
    record_bytes = (tmp_path / "r" / "train_config.json").read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    rc = main(["train", str(tmp_path / "r"), "--stage", "backbone", "--epochs", "1", "--checkpoint", str(bad)])
    assert rc == 2 and "cannot read checkpoint" in capsys.readouterr().err
    assert (tmp_path / "r" / "train_config.json").read_bytes() == record_bytes


def test_a_record_without_split_keeps_the_legacy_split(tiny_run, tmp_path):
    """Runs recorded before the sklearn split (examples/cifar10 among them) carry no "split": they reload, and
    continue, with the per-class permutation they were trained on."""
    from steerprune.training.data import stratified_split
    from steerprune.training.run import load_run

    shutil.copytree(tiny_run, tmp_path / "r")
    rec = _record(tmp_path / "r")
    del rec["train"]["split"]
    (tmp_path / "r" / "train_config.json").write_text(json.dumps(rec))
    data = load_run(tmp_path / "r").load_data()
    full = load_data("digits", 0.2, 0, split="legacy")
    assert np.array_equal(data.val.images, full.val.images)
    new = load_data("digits", 0.2, 0)
    assert not np.array_equal(new.val.images, full.val.images)  # sklearn's split is another one
    labels = np.repeat(np.arange(3), 10)
    assert not np.array_equal(stratified_split(labels, 0.2, 0)[1], stratified_split(labels, 0.2, 0, "legacy")[1])


def test_owned_fields():
    assert "seed" not in owned_fields(("sae",), False) and "sae_k" in owned_fields(("sae",), False)
    assert "target_usage" in owned_fields(("policy",), False) and "epochs" not in owned_fields(("policy",), False)
    resumed = owned_fields(("backbone",), True)
    assert "epochs" in resumed and not {"seed", "val_fraction", "split", "model_name", "checkpoint"} & resumed
    assert "seed" in owned_fields(("backbone", "policy", "sae"), False)

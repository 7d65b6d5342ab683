"""A user's timm checkpoint trained on another label set: everything but the classifier loads (timm's layouts:
bare state dict, {"state_dict": ...}, {"model": ...}, safetensors), the classifier is re-initialised for the data's
classes with one log line, and training fine-tunes from there."""
import numpy as np
import pytest
import torch
from PIL import Image

from steerprune.cli import main
from steerprune.errors import UserError
from steerprune.training.model import BackboneConfig, build_vit, load_checkpoint_into

NAME = "deit_tiny_patch16_224"


@pytest.fixture(scope="module")
def imagenet_state():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model(NAME, pretrained=False).state_dict()  # 1000 classes, 224 px


def _three_class_cfg(img_size=32):
    return BackboneConfig(model_name=NAME, model_kwargs={}, num_classes=3, class_names=["a", "b", "c"],
                          img_size=img_size, in_chans=3, mean=[0.5] * 3, std=[0.25] * 3)


def _save(state, path, layout):
    if layout == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"bare": state, "state_dict": {"state_dict": state, "epoch": 300},
                    "model": {"model": state, "optimizer": {}}}[layout], path)


@pytest.mark.parametrize("layout", ["bare", "state_dict", "model", "safetensors"])
def test_checkpoint_for_another_label_set_loads_all_but_the_classifier(imagenet_state, tmp_path, layout):
    path = tmp_path / ("ckpt.safetensors" if layout == "safetensors" else "ckpt.pth")
    _save(imagenet_state, path, layout)
    torch.manual_seed(1)
    model = build_vit(_three_class_cfg())
    fresh_head = model.head.weight.detach().clone()
    logs = []
    load_checkpoint_into(model, path, log=logs.append)
    assert len(logs) == 1 and "has 1000 classes but the data has 3" in logs[0] and "re-initialised" in logs[0]
    state = model.state_dict()
    for k, v in imagenet_state.items():
        if k.startswith("head."):
            continue
        if k == "pos_embed":  # resampled from 14x14 to 2x2 patches, as timm does
            assert state[k].shape == (1, 5, 192) and torch.equal(state[k][:, 0], v[:, 0])
        else:
            assert torch.equal(state[k], v), k
    assert model.head.weight.shape == (3, 192) and torch.equal(model.head.weight, fresh_head)


def test_checkpoint_with_the_same_classes_loads_its_classifier(imagenet_state, tmp_path):
    state = {k: v for k, v in imagenet_state.items()}
    state["head.weight"], state["head.bias"] = state["head.weight"][:3].clone(), state["head.bias"][:3].clone()
    torch.save(state, tmp_path / "three.pth")
    model, logs = build_vit(_three_class_cfg()), []
    load_checkpoint_into(model, tmp_path / "three.pth", log=logs.append)
    assert not logs and torch.equal(model.head.weight, state["head.weight"])


def test_checkpoint_of_another_architecture_is_refused_in_one_line(tmp_path):
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="does not fit"):
        load_checkpoint_into(build_vit(_three_class_cfg()), tmp_path / "other.pth", log=lambda *_: None)


class NotATensor:
    """Any class: torch.load(weights_only=True) must refuse to construct it."""


def test_unsafe_pickle_is_refused(tmp_path):
    torch.save({"model": NotATensor()}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_checkpoint_into(build_vit(_three_class_cfg()), tmp_path / "evil.pth", log=lambda *_: None)


@pytest.mark.slow
def test_train_fine_tunes_from_an_imagenet_checkpoint(imagenet_state, tmp_path, capsys):
    """The command of the issue: --model deit_tiny_patch16_224 --checkpoint deit_tiny.pth on a 3-class image folder."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        for c, colour in enumerate(([200, 30, 30], [30, 200, 30], [30, 30, 200])):
            (tmp_path / "data" / split / f"class{c}").mkdir(parents=True)
            for i in range(n):
                im = np.clip(np.array(colour) + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(im).save(tmp_path / "data" / split / f"class{c}" / f"{i}.png")
    torch.save(imagenet_state, tmp_path / "deit_tiny.pth")
    rc = main(["train", str(tmp_path / "run"), "--data", f"imagefolder:{tmp_path / 'data'}", "--model", NAME,
               "--checkpoint", str(tmp_path / "deit_tiny.pth"), "--stage", "backbone", "--epochs", "2",
               "--batch-size", "8", "--lr", "1e-4", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0
    assert sum("re-initialised for 3 classes" in line for line in out.splitlines()) == 1
    from steerprune.training.run import load_run

    tuned = load_run(tmp_path / "run").vit.state_dict()
    w0, w = imagenet_state["blocks.0.attn.qkv.weight"], tuned["blocks.0.attn.qkv.weight"]
    # fine-tuned from the checkpoint: moved, but by far less than the distance to a fresh initialisation
    fresh = build_vit(_three_class_cfg()).state_dict()["blocks.0.attn.qkv.weight"]
    assert 0 < (w - w0).norm() < 0.05 * (fresh - w0).norm()
    assert tuned["head.weight"].shape == (3, 192)

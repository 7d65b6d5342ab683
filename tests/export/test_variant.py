"""Export of a run whose backbone is another timm ViT variant (DeiT-tiny shape, no qkv bias) from a user checkpoint."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from steerprune.cli import main  # noqa: E402
from steerprune.export.manifest import load_manifest, verify_bundle  # noqa: E402

KW = {"patch_size": 2, "embed_dim": 48, "depth": 3, "num_heads": 3, "mlp_ratio": 2.0, "qkv_bias": False}


@pytest.mark.slow
def test_deit_checkpoint_run_exports(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    ref = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=8, in_chans=1, num_classes=10, **KW).eval()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "ckpt.safetensors"))
    run = tmp_path / "run"
    # epochs 0: the backbone is exactly the checkpoint, so the exported full model must reproduce `ref`
    assert main(["train", str(run), "--data", "digits", "--model", "deit_tiny_patch16_224", "--model-kwargs",
                 json.dumps(KW), "--img-size", "8", "--checkpoint", str(tmp_path / "ckpt.safetensors"),
                 "--stage", "backbone", "--epochs", "0"]) == 0
    masks = {"a": {"classes": [0, 1], "mask": [[1, 1, 1], [0, 1, 0], [1, 0, 1]]},
             "b": {"classes": [2], "mask": [[1, 0, 0], [0, 0, 0], [0, 0, 1]]}}
    (tmp_path / "masks.json").write_text(json.dumps(masks))
    out = tmp_path / "bundle"
    assert main(["export", str(run), "--out", str(out), "--masks", str(tmp_path / "masks.json")]) == 0
    m = load_manifest(out)
    assert m["run"]["backbone"]["model_name"] == "deit_tiny_patch16_224"
    assert len(m["models"]) == 3 and m["routes"]["b"]["kept_heads"] == {"L0": [0], "L1": [], "L2": [2]}
    assert m["full"]["params"] == sum(p.numel() for p in ref.parameters())
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    sess = ort.InferenceSession(str(out / m["full"]["model"]), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy()
    assert np.abs(sess.run(["logits"], {"images": x})[0] - want).max() <= 1e-4
    for e in m["models"].values():
        assert max(e["parity"].values()) <= 1e-4
    assert len(verify_bundle(out)["models"]) == 3

"""`bundle verify` passes on a good bundle and names the problem on a corrupt one (exit 2, one line)."""
from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("onnxruntime")

from steerprune.cli import main  # noqa: E402
from steerprune.export.manifest import BundleError, verify_bundle  # noqa: E402


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    return shutil.copytree(tiny_bundle, tmp_path / "b")


def test_verify_ok(tiny_bundle, capsys):
    res = verify_bundle(tiny_bundle)
    assert len(res["models"]) == 4 and all(v["max_abs"] <= 1e-4 for v in res["models"].values())
    assert main(["bundle", "verify", str(tiny_bundle)]) == 0
    out = capsys.readouterr().out
    assert "OK (4 models)" in out
    assert "cost per right-hint request vs unhinted, in-process ONNX Runtime, batch 16" in out  # export recorded it
    assert "load-test mix (60% right, 20% wrong, 20% none)" in out


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_flipped_byte_in_every_model(bundle_copy, capsys):
    m = json.loads((bundle_copy / "manifest.json").read_text())
    for rel in m["models"]:
        path = bundle_copy / rel
        data = bytearray(path.read_bytes())
        original = bytes(data)
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        with pytest.raises(BundleError, match="sha256 mismatch"):
            verify_bundle(bundle_copy)
        assert main(["bundle", "verify", str(bundle_copy)]) == 2
        assert rel in _error_line(capsys)
        path.write_bytes(original)
    verify_bundle(bundle_copy)


def test_missing_file(bundle_copy, capsys):
    m = json.loads((bundle_copy / "manifest.json").read_text())
    rel = m["routes"]["7"]["model"]
    (bundle_copy / rel).unlink()
    assert main(["bundle", "verify", str(bundle_copy)]) == 2
    assert "missing model file" in _error_line(capsys)


def test_manifest_points_elsewhere(bundle_copy, capsys):
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["routes"]["0"]["model"] = "models/nope.onnx"
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    assert main(["bundle", "verify", str(bundle_copy)]) == 2
    assert "nope.onnx" in _error_line(capsys)


def test_wrong_expected_logits(bundle_copy):
    """A model that loads but computes something else (here: swapped files, sha256 updated) fails parity."""
    import numpy as np

    m = json.loads((bundle_copy / "manifest.json").read_text())
    a, b = m["routes"]["7"]["model"], m["routes"]["even"]["model"]
    z = dict(np.load(bundle_copy / "samples.npz"))
    z[m["samples"]["logits"][a]], z[m["samples"]["logits"][b]] = z[m["samples"]["logits"][b]], z[m["samples"]["logits"][a]]
    np.savez(bundle_copy / "samples.npz", **z)
    m["samples"].pop("sha256")
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="logits differ"):
        verify_bundle(bundle_copy)


def test_not_a_bundle(tmp_path, capsys):
    assert main(["bundle", "verify", str(tmp_path)]) == 2
    assert "manifest.json not found" in _error_line(capsys)


def test_manifest_module_is_torch_free():
    import subprocess
    import sys

    code = ("import sys; import steerprune.export.manifest, steerprune.export, steerprune.export.cli, "
            "steerprune.export.runtime, steerprune.export.acceptance, steerprune.export.cost; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_bundle_cost_command(tiny_bundle, tmp_path, capsys):
    """`bundle cost` on an NPZ: right hints vs unhinted with the service's engine; both acceptance modes; bad input."""
    import numpy as np

    from steerprune.training.data import load_data

    test = load_data("digits").test
    npz = tmp_path / "test.npz"
    np.savez(npz, images=test.images, labels=test.labels)
    for acc in ("route", "global"):
        out = tmp_path / f"{acc}.json"
        assert main(["bundle", "cost", str(tiny_bundle), "--images", str(npz), "--batch", "1", "--rounds", "1",
                     "--max-images", "150", "--acceptance", acc, "--out", str(out)]) == 0
        res = json.loads(out.read_text())
        assert res["acceptance"] == acc and res["batch_size"] == 1 and res["n"] == 150
        o = res["overall"]
        assert o["cost_rel"] > 0 and o["cost_rel_wall"] > 0 and o["n"] == 150 and 0 <= o["fallback"] <= 1
        # the not-served route "3" answers with the full model under per-route rules, and is served under global
        assert res["routes"]["3"]["served"] is (acc == "global")
        assert f"acceptance {acc}: CPU" in capsys.readouterr().out
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    assert main(["bundle", "cost", str(tiny_bundle), "--images", str(tmp_path / "bad.npz")]) == 2
    assert "not an NPZ" in _error_line(capsys)
    np.savez(tmp_path / "big.npz", images=np.zeros((4, 16, 16, 1), np.uint8), labels=np.zeros(4, int))
    assert main(["bundle", "cost", str(tiny_bundle), "--images", str(tmp_path / "big.npz")]) == 2
    assert "images must be uint8 (N, 8, 8, C)" in _error_line(capsys)

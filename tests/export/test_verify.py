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

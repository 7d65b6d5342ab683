"""Sessions sharing one CPU arena and one copy of each distinct weight answer exactly as private sessions do."""
from __future__ import annotations

import json

import numpy as np
import pytest

from steerprune.export.manifest import model_paths
from steerprune.export.runtime import ort_session
from steerprune.export.session_memory import MIN_SHARED_BYTES, SharedInitializers
from steerprune.service.config import ServeConfig
from steerprune.service.engine import FULL, Engine

pytest.importorskip("onnx")


def _inputs(bundle, n=9, seed=0):
    spec = json.loads((bundle / "manifest.json").read_text())["input"]
    c = spec.get("channels", 1)
    s = spec["img_size"]
    return np.random.default_rng(seed).standard_normal((n, c, s, s)).astype(np.float32)


def test_shared_initializers_dedup_by_content(tiny_bundle):
    import onnx
    from onnx import numpy_helper

    paths = [tiny_bundle / rel for rel in model_paths(json.loads((tiny_bundle / "manifest.json").read_text()))]
    shared = SharedInitializers(paths)
    st = shared.stats
    assert st.models == len(paths) == 4
    # what the models hold, counted independently of the class
    distinct, total, count = set(), 0, 0
    for p in paths:
        for init in onnx.load(str(p)).graph.initializer:
            a = numpy_helper.to_array(init)
            if a.nbytes >= MIN_SHARED_BYTES:
                distinct.add((a.dtype.str, a.shape, a.tobytes()))
                total += a.nbytes
                count += 1
    assert st.tensors == count and st.distinct == len(distinct)
    assert st.total_mb == pytest.approx(total / 2**20)
    # the pruned models keep the patch embedding, norms, MLPs and head of the full model: shared, so held < total
    assert st.distinct < st.tensors and st.held_mb < 0.75 * st.total_mb
    # the same tensor content is one OrtValue object in every model that has it
    full = shared.for_model(paths[0])
    other = shared.for_model(paths[1])
    common = [n for n in full if n in other and np.array_equal(full[n].numpy(), other[n].numpy())]
    assert common and all(full[n] is other[n] for n in common)


def test_sessions_with_shared_weights_and_arena_match_private_ones(tiny_bundle):
    paths = [tiny_bundle / rel for rel in model_paths(json.loads((tiny_bundle / "manifest.json").read_text()))]
    shared = SharedInitializers(paths)
    x = _inputs(tiny_bundle)
    for p in paths:
        private = ort_session(p, threads=1)
        pooled = ort_session(p, threads=1, env_allocator=True, initializers=shared.for_model(p))
        name = private.get_inputs()[0].name
        a, b = private.run(None, {name: x})[0], pooled.run(None, {name: x})[0]
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("share", [False, True])
def test_engine_answers_the_same_with_sharing(tiny_bundle, share):
    x = _inputs(tiny_bundle, n=6, seed=1)
    base = Engine(ServeConfig(bundle=str(tiny_bundle), shared_arena=False, share_weights=False, verify=False))
    other = Engine(ServeConfig(bundle=str(tiny_bundle), shared_arena=True, share_weights=share, verify=False))
    assert (other.shared is not None) == share
    for route in list(base.routes):
        a, b = base.run(x, [route] * len(x)), other.run(x, [route] * len(x))
        for ra, rb in zip(a, b):
            assert ra.route == rb.route and ra.index == rb.index and ra.fallback == rb.fallback
            np.testing.assert_allclose(rb.probs, ra.probs, rtol=1e-5, atol=1e-6)
    assert FULL in base.routes


def test_share_weights_config_from_env():
    cfg = ServeConfig.from_env({"STEERPRUNE_BUNDLE": "b", "STEERPRUNE_SHARE_WEIGHTS": "1",
                                "STEERPRUNE_SHARED_ARENA": "0"})
    assert cfg.share_weights is True and cfg.shared_arena is False
    assert ServeConfig(bundle="b").to_env()["STEERPRUNE_SHARED_ARENA"] == "1"


def test_unreadable_model_is_a_clear_error(tmp_path):
    from steerprune.errors import UserError

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(UserError, match="cannot read the initializers of"):
        SharedInitializers([bad])

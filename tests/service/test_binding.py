"""I/O-bound runs at the warmed batch sizes (service/binding.py) and CUDA graphs per size: parity, config, fallback."""
from __future__ import annotations

import numpy as np
import pytest

from steerprune.errors import UserError
from steerprune.service.binding import NO_GRAPH, BoundRunner
from steerprune.service.config import ServeConfig
from steerprune.service.engine import FULL, Engine
from steerprune.service.preprocess import normalize

SIZES = (1, 3, 8, 9, 2, 8, 1)  # 3 pads to 4; 8 is the largest bucket; 9 runs unbound; repeats reuse stale buffers


@pytest.fixture(scope="module")
def digits_x(tiny_bundle):
    from steerprune.export.manifest import load_manifest
    from steerprune.service.preprocess import InputSpec
    from steerprune.training.data import load_data

    spec = InputSpec.from_manifest(load_manifest(tiny_bundle)["input"])
    return normalize(load_data("digits").test.images[:48], spec)


def _engine(bundle, **kw) -> Engine:
    return Engine(ServeConfig(bundle=str(bundle), verify=False, max_batch_size=8, **kw))


def _cuda_here() -> bool:
    from steerprune.export.runtime import cuda_built, gpu_visible

    return cuda_built() and gpu_visible()


def test_bound_engine_answers_like_the_unbound_one(tiny_bundle, digits_x):
    bound, plain = _engine(tiny_bundle, io_binding="on"), _engine(tiny_bundle, io_binding="off")
    assert bound.io_binding and set(bound.runners) == set(bound.sessions) and bound.pad
    assert not plain.io_binding and plain.runners == {}
    start = 0
    for model in bound.sessions:
        for n in SIZES:
            x = digits_x[start % 32:start % 32 + n]  # different images each call: no stale answer can pass
            start += 5
            got = bound.logits(model, x)
            assert got.shape == (n, 10) and got.dtype == np.float32
            np.testing.assert_allclose(got, plain.logits(model, x), atol=1e-6, rtol=0)
        r = bound.runners[model]
        assert sorted(r._by_size) == [1, 2, 4, 8] and r.unbound_runs == 1  # 3 ran in bucket 4, 9 unbound
        assert r.captured == [] and not r.cuda_graph  # the CPU has no graphs
    routes = [FULL, "0", "7", "even", "3", FULL, "1"]
    for a, b in zip(bound.run(digits_x[:7], routes), plain.run(digits_x[:7], routes)):
        assert (a.route, a.model, a.fallback, a.index) == (b.route, b.model, b.fallback, b.index)
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-6, rtol=0)


def test_a_result_is_not_a_view_of_the_bound_buffer(tiny_bundle, digits_x):
    eng = _engine(tiny_bundle, io_binding="on")
    first = eng.logits(eng.full_model, digits_x[:4])
    kept = first.copy()
    eng.logits(eng.full_model, digits_x[4:8])  # same bucket, new images
    np.testing.assert_array_equal(first, kept)


def test_io_binding_is_off_on_the_cpu_by_default(tiny_bundle):
    if _cuda_here():
        pytest.skip("CUDA is available here: auto turns I/O binding on")
    eng = _engine(tiny_bundle)
    listing = eng.describe()
    assert eng.device == "cpu" and not eng.io_binding and eng.runners == {}
    assert listing["io_binding"] == {"enabled": False, "requested": "auto", "unbound_runs": {}}
    assert listing["cuda_graph"] == {"enabled": False, "requested": "auto", "not_applicable": None, "models": {}}


def test_cuda_graph_on_is_reported_not_applicable_on_a_cpu_engine(tiny_bundle, digits_x):
    """device auto landing on the CPU: graphs cannot apply, which is logged and listed, not a readiness problem."""
    if _cuda_here():
        pytest.skip("CUDA is available here: graphs apply")
    eng = _engine(tiny_bundle, io_binding="on", cuda_graph="on")
    assert eng.device == "cpu" and eng.problems == [] and eng.graph_not_applicable == "the engine runs on cpu"
    graph = eng.describe()["cuda_graph"]
    assert (graph["enabled"], graph["requested"], graph["not_applicable"]) == (False, "on", "the engine runs on cpu")
    np.testing.assert_allclose(eng.logits(eng.full_model, digits_x[:3]),
                               _engine(tiny_bundle).logits(eng.full_model, digits_x[:3]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kw,words", [
    (dict(io_binding="on", pad_batches="off"), "contradicts pad_batches off"),
    (dict(cuda_graph="on", io_binding="off"), "contradicts io_binding off"),
    (dict(cuda_graph="on", pad_batches="off"), "contradicts pad_batches off"),
    (dict(cuda_graph="on", device="cpu"), "contradicts device cpu"),
    (dict(io_binding="yes"), "io_binding must be one of auto, on, off"),
    (dict(cuda_graph="always"), "cuda_graph must be one of auto, on, off"),
])
def test_contradictory_settings_are_refused(kw, words):
    with pytest.raises(UserError, match=words):
        ServeConfig(bundle="x", **kw)


def test_settings_travel_through_the_environment(tiny_bundle):
    from steerprune.service.cli import server_env

    env = server_env(tiny_bundle, base={}, io_binding="on", cuda_graph="off")
    cfg = ServeConfig.from_env(env)
    assert (cfg.io_binding, cfg.cuda_graph) == ("on", "off")
    assert (env["STEERPRUNE_IO_BINDING"], env["STEERPRUNE_CUDA_GRAPH"]) == ("on", "off")
    # pad_batches off keeps auto off instead of contradicting it
    assert not _engine(tiny_bundle, pad_batches="off").io_binding


def test_serve_has_the_flags():
    import argparse

    from steerprune.service.cli import register

    sub = argparse.ArgumentParser().add_subparsers()
    register(sub)
    args = sub.choices["serve"].parse_args(["b", "--io-binding", "on", "--cuda-graph", "off"])
    assert (args.io_binding, args.cuda_graph) == ("on", "off")


class _Spy:
    """A session that records each run's gpu_graph_id and can refuse graph runs, as a failed capture would."""

    def __init__(self, sess, refuse_graphs=False):
        self.sess, self.refuse, self.ids = sess, refuse_graphs, []

    def __getattr__(self, name):
        return getattr(self.sess, name)

    def run_with_iobinding(self, binding, options):
        gid = options.get_run_config_entry("gpu_graph_id")
        self.ids.append(gid)
        if self.refuse and gid != NO_GRAPH:
            raise RuntimeError("CUDA failure 901: operation not permitted when stream is capturing")
        return self.sess.run_with_iobinding(binding, options)

    def run(self, names, feeds, options=None):
        self.ids.append(options.get_run_config_entry("gpu_graph_id") if options else None)
        return self.sess.run(names, feeds, options)


def _spied_runner(eng, model, refuse):
    spy = _Spy(eng.sessions[model], refuse)
    r = BoundRunner(spy, eng.input_name, eng.output_name, "cpu", [1, 2, 4, 8])
    r.cuda_graph = True  # as on CUDA: the graph logic itself runs the same on the CPU
    return spy, r


def test_one_graph_id_per_bucket_and_plain_runs_past_the_largest(tiny_bundle, digits_x):
    eng = _engine(tiny_bundle, io_binding="off")
    spy, r = _spied_runner(eng, eng.full_model, refuse=False)
    for n in (1, 3, 8, 9, 2, 3):
        np.testing.assert_allclose(r.run(digits_x[:n]), eng.logits(eng.full_model, digits_x[:n]), atol=1e-6, rtol=0)
    # ids 1.. in bucket order (ONNX Runtime keeps 0 for itself); the unbound run never touches a graph
    assert spy.ids == ["1", "3", "4", NO_GRAPH, "2", "3"]
    assert r.captured == [1, 4, 8, 2] and r.graph_error is None


def test_a_failed_capture_falls_back_to_plain_bound_runs(tiny_bundle, digits_x):
    eng = _engine(tiny_bundle, io_binding="off")
    spy, r = _spied_runner(eng, eng.full_model, refuse=True)
    for n in (4, 1, 4):
        np.testing.assert_allclose(r.run(digits_x[:n]), eng.logits(eng.full_model, digits_x[:n]), atol=1e-6, rtol=0)
    assert spy.ids == ["3", NO_GRAPH, NO_GRAPH, NO_GRAPH]  # one failed capture, then graphs stay off
    assert r.captured == [] and "capture at batch 4 failed: CUDA failure 901" in r.graph_error
    assert r.describe()["cuda_graph"] is False


def test_a_cpu_runner_refuses_cuda_graphs(tiny_bundle):
    eng = _engine(tiny_bundle, io_binding="off")
    with pytest.raises(UserError, match="CUDA graphs need the CUDA provider"):
        BoundRunner(eng.sessions[eng.full_model], eng.input_name, eng.output_name, "cpu", [1, 2], cuda_graph=True)


@pytest.mark.gpu
def test_cuda_graphs_are_captured_for_every_bucket_in_warm_up_and_answer_like_the_cpu(tiny_bundle, digits_x):
    if not _cuda_here():
        pytest.skip("no CUDA here (onnxruntime-gpu and an NVIDIA GPU)")
    eng = _engine(tiny_bundle, device="cuda", warmup="all")  # io_binding and cuda_graph auto: both on with CUDA
    assert not eng.problems and eng.io_binding and eng.graph_problems == {}, eng.graph_problems
    assert all(r.cuda_graph and r.device == "cuda" for r in eng.runners.values())
    eng.warm_up(8, rounds=2)
    graph = eng.describe()["cuda_graph"]
    assert graph["enabled"] is True
    for model, state in graph["models"].items():  # every (model, size) captured by warm-up, none failed
        assert state == {"captured": [1, 2, 4, 8], "problem": None}, (model, state)
    cpu = _engine(tiny_bundle, device="cpu")
    start = 0
    for model in eng.sessions:
        for n in SIZES:  # replays: each call's new images must reach the captured graph's input
            x = digits_x[start % 32:start % 32 + n]
            start += 7
            np.testing.assert_allclose(eng.logits(model, x), cpu.logits(model, x), atol=1e-3, rtol=0)
        assert eng.runners[model].captured == [1, 2, 4, 8] and eng.runners[model].unbound_runs == 1


def test_route_models_share_one_set_of_input_buffers(tiny_bundle, digits_x):
    """Every runner of an engine takes its input buffers from one pool: one per batch size, not one per model."""
    eng = Engine(ServeConfig(bundle=str(tiny_bundle), verify=False, io_binding="on"))
    plain = Engine(ServeConfig(bundle=str(tiny_bundle), verify=False, io_binding="off"))
    for model in eng.sessions:
        for n in (1, 3):
            np.testing.assert_allclose(eng.logits(model, digits_x[:n]), plain.logits(model, digits_x[:n]), atol=1e-6)
    pools = {id(r._pool) for r in eng.runners.values()}
    assert len(pools) == 1 and len(eng.runners) >= 3
    pool = next(iter(eng.runners.values()))._pool
    assert sorted(k[0] for k in pool.by_size) == [1, 4]  # sizes 1 and 3 -> buckets 1 and 4, once for all models

"""Service pieces without a server: preprocessing parity, the routing engine, config, load-test planning."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest

from steerprune.errors import UserError
from steerprune.export.acceptance import AcceptRule, accepted, answer_index
from steerprune.service.config import ServeConfig
from steerprune.service.engine import FULL, Engine, UnknownHint, softmax
from steerprune.service.preprocess import BadImage, decode_image, normalize


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    return Engine(ServeConfig(bundle=str(tiny_bundle)))


@pytest.fixture(scope="module")
def digits_test():
    from steerprune.training.data import load_data

    return load_data("digits").test


def _png(arr: np.ndarray, fmt="PNG", mode=None) -> bytes:
    from PIL import Image

    im = Image.fromarray(arr) if mode is None else Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def test_service_module_does_not_import_torch():
    code = ("import sys, steerprune.service.service, steerprune.service.cli; "
            "print(json.dumps(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))))")
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, timeout=120,
                         env={"BENTOML_DO_NOT_TRACK": "true", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_decode_matches_training_preprocessing(engine, digits_test):
    torch = pytest.importorskip("torch")
    from steerprune.training.model import BackboneConfig
    from steerprune.training.tensors import to_tensor

    inp = engine.manifest["input"]  # the run's preprocessing, as the bundle carries it
    bcfg = BackboneConfig(model_name="x", model_kwargs={}, num_classes=10, class_names=[str(i) for i in range(10)],
                          img_size=inp["img_size"], in_chans=inp["channels"], mean=inp["mean"], std=inp["std"])
    imgs = digits_test.images[:16]
    ref = to_tensor(imgs, bcfg).numpy()
    got = np.stack([decode_image(_png(im[..., 0]), engine.spec, 1 << 20) for im in imgs])
    assert got.shape == ref.shape == (16, 1, 8, 8) and got.dtype == np.float32
    np.testing.assert_array_equal(got, ref)  # bit-exact: same division order as torch
    np.testing.assert_array_equal(normalize(imgs, engine.spec), ref)
    assert isinstance(torch.__version__, str)


def test_decode_converts_any_mode_and_size(engine):
    rgb = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    for fmt, mode in (("PNG", None), ("JPEG", None), ("WEBP", None), ("PNG", "RGBA"), ("PNG", "P"), ("TIFF", "CMYK"),
                      ("BMP", "1"), ("PNG", "I;16")):
        x = decode_image(_png(rgb, fmt, mode), engine.spec, 1 << 20)
        assert x.shape == (1, 8, 8) and np.isfinite(x).all(), (fmt, mode)


@pytest.mark.parametrize("data,status,words", [
    (b"", 400, "empty"),
    (b"hello, not an image", 415, "not an image"),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", 415, "not an image"),  # EPS would shell out: refused
])
def test_decode_rejects_non_images(engine, data, status, words):
    with pytest.raises(BadImage) as e:
        decode_image(data, engine.spec, 1 << 20)
    assert e.value.status == status and words in str(e.value)


def test_decode_rejects_truncated_and_huge(engine):
    png = _png(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))
    with pytest.raises(BadImage) as e:
        decode_image(png[: len(png) // 2], engine.spec, 1 << 20)
    assert e.value.status == 400 and "truncated" in str(e.value)
    big = _png(np.zeros((300, 300), np.uint8))
    with pytest.raises(BadImage) as e:
        decode_image(big, engine.spec, max_pixels=256 * 256)
    assert e.value.status == 413 and "300x300" in str(e.value)


def test_sessions_are_shared_by_routes_with_one_mask(engine):
    m = engine.manifest
    assert len(engine.sessions) == len(m["models"]) < len(m["routes"]) + 1
    assert engine.routes["0"].model == engine.routes["1"].model
    assert engine.sessions[engine.routes["0"].model] is engine.sessions[engine.routes["1"].model]
    listing = engine.describe()
    shared = [s["routes"] for s in listing["sessions"].values()]
    assert ["0", "1"] in shared
    assert listing["routes"]["7"]["kept_heads"] == m["routes"]["7"]["kept_heads"]


def test_engine_run_equals_each_models_offline_answer(engine, digits_test):
    x = normalize(digits_test.images[:24], engine.spec)
    routes = [FULL, "0", "1", "7", "even", "3"] * 4
    trust = Engine(ServeConfig(bundle=str(engine.bundle), hint_mode="trust", verify=False))
    res = trust.run(x, routes)
    for i, (r, out) in enumerate(zip(routes, res)):
        ref = softmax(trust.logits(trust.routes[r].model, x[i:i + 1]))[0]
        np.testing.assert_allclose(out.probs, ref, atol=1e-5)
        assert out.route == r and not out.fallback and out.model == trust.routes[r].model


def test_verify_mode_reruns_contradicted_hints_on_the_full_model(engine, digits_test):
    """The global rule (acceptance='global', as --min-prob forces): top-1 in the route and >= min_prob."""
    engine = Engine(ServeConfig(bundle=str(engine.bundle), acceptance="global", verify=False))
    assert engine.acceptance == "global" and all(r.served for r in engine.routes.values())
    x = normalize(digits_test.images[:60], engine.spec)
    full = softmax(engine.logits(engine.full_model, x))
    routed = softmax(engine.logits(engine.routes["7"].model, x))
    res = engine.run(x, ["7"] * len(x))
    for i, out in enumerate(res):
        top = int(routed[i].argmax())
        expect_fb = top != 7 or routed[i, top] < engine.cfg.min_prob
        assert out.fallback == expect_fb
        if expect_fb:
            np.testing.assert_allclose(out.probs, full[i], atol=1e-5)
            assert out.model == engine.full_model and out.fallback_reason in ("off_route", "low_confidence")
            assert out.wrong_hint == (int(full[i].argmax()) != 7)
            np.testing.assert_allclose(out.routed_probs, routed[i], atol=1e-5)
        else:
            np.testing.assert_allclose(out.probs, routed[i], atol=1e-5)
    assert sum(o.fallback for o in res) > 0  # most of 60 digits are not 7s


def test_verify_mode_applies_each_routes_rule_and_skips_unserved_routes(engine, digits_test):
    m = engine.manifest
    assert engine.acceptance == "route" and m["schema_version"] == 2
    x = normalize(digits_test.images[:120], engine.spec)
    full = softmax(engine.logits(engine.full_model, x))
    for name in engine.hint_names():
        r, a = engine.routes[name], m["routes"][name]["acceptance"]
        assert r.served == a["served"] and r.rule == AcceptRule.from_json(a["rule"])
        res = engine.run(x, [name] * len(x))
        if not r.served:  # straight to the full model: one run, nothing to verify
            assert all(o.fallback and o.fallback_reason == "not_served" and o.routed_probs is None
                       and o.model == engine.full_model for o in res)
            np.testing.assert_allclose(np.stack([o.probs for o in res]), full, atol=1e-5)
            continue
        routed = softmax(engine.logits(r.model, x))
        ok = accepted(routed, sorted(r.classes), r.rule)
        assert [not o.fallback for o in res] == ok.tolist(), name
        answer = answer_index(routed, r.classes, r.rule)
        for i, o in enumerate(res):
            np.testing.assert_allclose(o.probs, routed[i] if ok[i] else full[i], atol=1e-5)
            assert o.index == (int(answer[i]) if ok[i] else int(full[i].argmax()))
            if ok[i]:
                assert o.index in r.classes
            else:
                off = r.rule.top1_in_route and int(routed[i].argmax()) not in r.classes
                assert o.fallback_reason == ("off_route" if off else "low_confidence")
    # route "3" keeps every head: it can never be cheaper than the full model
    assert not engine.routes["3"].served and "cheaper" in m["routes"]["3"]["acceptance"]["reason"]
    listing = engine.describe()
    assert listing["acceptance"] == "route" and listing["routes"]["3"]["acceptance"]["served"] is False
    assert listing["routes"]["0"]["acceptance"]["val"] == m["routes"]["0"]["acceptance"]["val"]
    trust = Engine(ServeConfig(bundle=str(engine.bundle), hint_mode="trust", verify=False))
    assert not trust.run(x[:2], ["3", "3"])[0].fallback  # trust mode answers with the route's own model


def test_engine_reads_thresholds_from_the_manifest(tiny_bundle, tmp_path, digits_test):
    """A hand-set rule in the manifest is what the engine applies (confidence and margin)."""
    import shutil

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    m = json.loads((bundle / "manifest.json").read_text())
    m["routes"]["even"]["acceptance"].update(served=True, reason=None,
                                             rule={"min_prob": 0.9, "min_margin": 0.85, "top1_in_route": True})
    (bundle / "manifest.json").write_text(json.dumps(m))
    eng = Engine(ServeConfig(bundle=str(bundle), verify=False))
    assert eng.routes["even"].rule == AcceptRule(0.9, 0.85)
    x = normalize(digits_test.images[:80], eng.spec)
    routed = softmax(eng.logits(eng.routes["even"].model, x))
    top = routed.argmax(1)
    p = np.sort(routed, axis=1)
    want = np.isin(top, [0, 2, 4, 6, 8]) & (p[:, -1] >= 0.9) & (p[:, -1] - p[:, -2] >= 0.85)
    assert [not o.fallback for o in eng.run(x, ["even"] * len(x))] == want.tolist()
    assert 0 < want.sum() < len(x)


def test_engine_applies_a_route_probability_rule(tiny_bundle, tmp_path, digits_test):
    """min_route_prob: accepted when the hint's classes hold that much probability, answered inside the route."""
    import shutil

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    m = json.loads((bundle / "manifest.json").read_text())
    m["routes"]["even"]["acceptance"].update(served=True, reason=None, kind="route_prob",
                                             rule={"min_prob": 0.0, "min_margin": 0.0, "top1_in_route": False,
                                                   "min_route_prob": 0.3})
    (bundle / "manifest.json").write_text(json.dumps(m))
    eng = Engine(ServeConfig(bundle=str(bundle), verify=False))
    assert eng.routes["even"].rule == AcceptRule(0.0, 0.0, 0.3)
    x = normalize(digits_test.images[:80], eng.spec)
    routed = softmax(eng.logits(eng.routes["even"].model, x))
    full = softmax(eng.logits(eng.full_model, x))
    even = [0, 2, 4, 6, 8]
    want = routed[:, even].sum(1) >= 0.3
    res = eng.run(x, ["even"] * len(x))
    assert [not o.fallback for o in res] == want.tolist() and 0 < want.sum() < len(x)
    for i, o in enumerate(res):
        expect = even[int(routed[i, even].argmax())] if want[i] else int(full[i].argmax())
        assert o.index == expect
        if not want[i]:
            assert o.fallback_reason == "low_confidence"


def test_routes_costlier_than_the_full_model_by_measured_time_are_not_served(tiny_bundle, digits_test):
    """unserve_costlier: route ms at batch 1 + val fallback x full ms >= full ms -> the hint goes to the full model."""
    eng = Engine(ServeConfig(bundle=str(tiny_bundle), verify=False, batch_plan="route"))
    served = [n for n in eng.hint_names() if eng.routes[n].served]
    assert len(served) >= 2
    cheap, dear = served[0], served[1]
    fb = {n: eng.manifest["routes"][n]["acceptance"]["val"]["fallback"] for n in (cheap, dear)}
    assert fb[cheap] < 0.9
    eng.run_ms = {m: {1: 1.0} for m in eng.sessions}  # every model as slow as the full one ...
    eng.run_ms[eng.routes[cheap].model] = {1: 0.05}  # ... except the cheap route's (shares no model with dear)
    if eng.routes[dear].model == eng.routes[cheap].model:
        pytest.skip("the two routes share a model")
    dropped = eng.unserve_costlier()
    assert dear in dropped and cheap not in dropped
    assert eng.measured_cost[cheap] == pytest.approx(0.05 + fb[cheap], abs=1e-4)
    assert eng.measured_cost[dear] == pytest.approx(1.0 + fb[dear], abs=1e-4)
    x = normalize(digits_test.images[:8], eng.spec)
    assert all(o.fallback and o.fallback_reason == "not_served" and o.model == eng.full_model
               for o in eng.run(x, [dear] * len(x)))
    listing = eng.describe()["routes"]
    assert listing[dear]["acceptance"]["served"] is False
    assert "measured on this server" in listing[dear]["acceptance"]["reason"]
    assert listing[cheap]["acceptance"]["served"] is True
    trust = Engine(ServeConfig(bundle=str(tiny_bundle), verify=False, hint_mode="trust"))
    trust.run_ms = eng.run_ms
    assert trust.unserve_costlier() == []  # trust mode never reruns: nothing to weigh
    planned = Engine(ServeConfig(bundle=str(tiny_bundle), verify=False))
    planned.run_ms = eng.run_ms
    assert planned.unserve_costlier() == []  # the cost plan weighs the same timings for every batch instead


def test_schema_1_bundle_gets_the_global_rule(tiny_bundle, tmp_path):
    import shutil

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    m = json.loads((bundle / "manifest.json").read_text())
    m["schema_version"] = 1
    del m["acceptance"]
    for r in m["routes"].values():
        del r["acceptance"]
    (bundle / "manifest.json").write_text(json.dumps(m))
    logs = []
    eng = Engine(ServeConfig(bundle=str(bundle), verify=False, min_prob=0.6), log_fn=logs.append)
    assert eng.acceptance == "global" and any("no per-route acceptance rules" in s for s in logs)
    assert all(r.served and r.rule == AcceptRule(0.6, 0.0) for n, r in eng.routes.items() if n != FULL)
    assert eng.describe()["acceptance"] == "global"


def test_resolve_hints(engine, tmp_path):
    assert engine.resolve(None) == FULL and engine.resolve("") == FULL and engine.resolve("even") == "even"
    with pytest.raises(UnknownHint, match="valid hints: 0, 1, 7, even, 3"):
        engine.resolve("cat")
    lenient = Engine(ServeConfig(bundle=str(engine.bundle), unknown_hint="full", verify=False, hint_mode="trust"))
    assert lenient.resolve("cat") == FULL


def test_requesting_cuda_without_it_is_a_problem_not_a_silent_cpu_run(tiny_bundle):
    from steerprune.service.engine import gpu_visible

    eng = Engine(ServeConfig(bundle=str(tiny_bundle), device="cuda", verify=False))
    if gpu_visible() and all("CUDAExecutionProvider" in p for p in eng.providers.values()):
        pytest.skip("CUDA is really active here (see the gpu test)")
    assert eng.problems and "CUDA was requested" in eng.problems[0] and eng.device == "cpu"


@pytest.mark.gpu
def test_cuda_sessions_run_on_cuda(tiny_bundle, digits_test):
    from steerprune.service.engine import gpu_visible

    if not gpu_visible():
        pytest.skip("no NVIDIA GPU visible")
    eng = Engine(ServeConfig(bundle=str(tiny_bundle), device="cuda"))
    assert not eng.problems and all(p[0] == "CUDAExecutionProvider" for p in eng.providers.values())
    cpu = Engine(ServeConfig(bundle=str(tiny_bundle), device="cpu", verify=False))
    x = normalize(digits_test.images[:32], eng.spec)
    np.testing.assert_allclose(eng.logits(eng.full_model, x), cpu.logits(cpu.full_model, x), atol=1e-3)


def test_corrupt_bundle_is_refused(tiny_bundle, tmp_path):
    import shutil

    from steerprune.export.manifest import BundleError

    bad = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bad)
    model = bad / json.loads((bad / "manifest.json").read_text())["routes"]["7"]["model"]
    model.write_bytes(model.read_bytes()[:-16] + b"\0" * 16)
    with pytest.raises(BundleError, match="sha256"):
        Engine(ServeConfig(bundle=str(bad)))


def test_engine_checks_parity_on_its_own_sessions(tiny_bundle, tmp_path):
    """verify at start-up loads each model once: the sessions that serve are the ones parity-checked."""
    import shutil

    from steerprune.export.manifest import BundleError

    bad = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bad)
    m = json.loads((bad / "manifest.json").read_text())
    a, b = m["routes"]["7"]["model"], m["routes"]["even"]["model"]
    z = dict(np.load(bad / "samples.npz"))
    z[m["samples"]["logits"][a]], z[m["samples"]["logits"][b]] = z[m["samples"]["logits"][b]], z[m["samples"]["logits"][a]]
    np.savez(bad / "samples.npz", **z)
    m["samples"].pop("sha256")
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="logits differ"):
        Engine(ServeConfig(bundle=str(bad)))
    said = []
    eng = Engine(ServeConfig(bundle=str(tiny_bundle)), log_fn=said.append)
    checked = [line.split()[1] for line in said if line.startswith("ok  ")]
    assert sorted(checked) == sorted(eng.sessions)  # one parity line per serving session, none twice


def test_serve_config_env_round_trip_and_validation(tmp_path):
    cfg = ServeConfig(bundle=str(tmp_path), hint_mode="trust", min_prob=0.3, threads=2, verify=False)
    assert ServeConfig.from_env(cfg.to_env()) == cfg
    glob = ServeConfig(bundle=str(tmp_path), acceptance="global", min_prob=0.5)
    assert ServeConfig.from_env(glob.to_env()) == glob
    with pytest.raises(UserError, match="acceptance"):
        ServeConfig(bundle="x", acceptance="always")
    with pytest.raises(UserError, match="STEERPRUNE_BUNDLE"):
        ServeConfig.from_env({})
    with pytest.raises(UserError, match="hint_mode"):
        ServeConfig(bundle="x", hint_mode="maybe")
    with pytest.raises(UserError, match="STEERPRUNE_MIN_PROB"):
        ServeConfig.from_env({"STEERPRUNE_BUNDLE": "x", "STEERPRUNE_MIN_PROB": "high"})
    with pytest.raises(UserError, match="gc_gen2_threshold"):
        ServeConfig(bundle="x", gc_gen2_threshold=0)
    with pytest.raises(UserError, match="request_timeout_s"):
        ServeConfig.from_env({"STEERPRUNE_BUNDLE": "x", "STEERPRUNE_REQUEST_TIMEOUT_S": "0"})
    with pytest.raises(UserError, match="pad_batches"):
        ServeConfig(bundle="x", pad_batches="sometimes")
    with pytest.raises(UserError, match="switch_interval_ms"):
        ServeConfig.from_env({"STEERPRUNE_BUNDLE": "x", "STEERPRUNE_SWITCH_INTERVAL_MS": "0"})
    assert ServeConfig.from_env({"STEERPRUNE_BUNDLE": "x", "STEERPRUNE_SWITCH_INTERVAL_MS": "2"}).switch_interval_ms == 2.0
    with pytest.raises(UserError, match="inline_ms"):
        ServeConfig(bundle="x", inline_ms=-1)
    with pytest.raises(UserError, match="gc_young_ms"):
        ServeConfig(bundle="x", gc_young_ms=0.5)  # 0 (off) or at least 1 ms
    with pytest.raises(UserError, match="gc_full_s"):
        ServeConfig.from_env({"STEERPRUNE_BUNDLE": "x", "STEERPRUNE_GC_FULL_S": "0"})
    assert ServeConfig.from_env({"STEERPRUNE_BUNDLE": "x", "STEERPRUNE_GC_YOUNG_MS": "0"}).gc_young_ms == 0.0


def test_padding_to_warmed_batch_sizes_keeps_every_answer(tiny_bundle, digits_test):
    plain = Engine(ServeConfig(bundle=str(tiny_bundle), verify=False, pad_batches="off", max_batch_size=8))
    padded = Engine(ServeConfig(bundle=str(tiny_bundle), verify=False, pad_batches="on", max_batch_size=8))
    assert not plain.pad and padded.pad and padded.warm_sizes == [1, 2, 4, 8]
    assert not Engine(ServeConfig(bundle=str(tiny_bundle), verify=False)).pad  # auto: off on the CPU
    seen: list[int] = []

    class Recording:  # what batch sizes the ONNX Runtime session really gets
        def __init__(self, sess):
            self.sess = sess

        def run(self, names, feeds):
            seen.append(next(iter(feeds.values())).shape[0])
            return self.sess.run(names, feeds)

    padded.sessions = {m: Recording(s) for m, s in padded.sessions.items()}
    x = normalize(digits_test.images[:12], padded.spec)
    model = padded.routes["7"].model
    for n in (1, 3, 5, 7, 8, 12):
        got = padded.logits(model, x[:n])
        assert got.shape == (n, 10)
        np.testing.assert_allclose(got, plain.logits(model, x[:n]), atol=1e-5)
    assert seen == [1, 4, 8, 8, 8, 12]  # 12 is past the largest warmed size: run as it is
    hints = ["7", "0", None, "even", "3", "7", "1"]
    routes = [h or FULL for h in hints]
    for a, b in zip(padded.run(x[:7], routes), plain.run(x[:7], routes)):
        assert (a.route, a.model, a.fallback) == (b.route, b.model, b.fallback)
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-6)


def test_server_env_turns_opentelemetry_off_unless_asked(tiny_bundle):
    from steerprune.service.cli import server_env

    env = server_env(tiny_bundle, base={}, threads=1)
    assert env["OTEL_SDK_DISABLED"] == "true" and env["STEERPRUNE_THREADS"] == "1"
    assert "OTEL_SDK_DISABLED" not in server_env(tiny_bundle, base={}, tracing=True)
    assert server_env(tiny_bundle, base={"OTEL_SDK_DISABLED": "false"})["OTEL_SDK_DISABLED"] == "false"


def test_expected_ms_adds_one_run_per_model_and_the_worst_case_fallback(tiny_bundle):
    eng = Engine(ServeConfig(bundle=str(tiny_bundle), verify=False, max_batch_size=8, warmup="all"))
    assert eng.expected_ms([FULL]) == float("inf")  # nothing timed before warm-up
    eng.warm_up(8, rounds=3)
    assert set(eng.run_ms) == set(eng.sessions) and all(sorted(t) == [1, 2, 4, 8] for t in eng.run_ms.values())
    assert all(0 < ms < 1000 for t in eng.run_ms.values() for ms in t.values())
    full, seven = eng.full_model, eng.routes["7"].model
    assert seven != full
    assert eng.expected_ms([FULL]) == eng.run_ms[full][1]
    assert eng.expected_ms([FULL] * 3) == eng.run_ms[full][4]  # the smallest timed size that holds 3
    # verify mode: the routed run plus a full-model rerun for every hinted row, in case all of them fall back
    assert eng.expected_ms(["7", "7", FULL]) == pytest.approx(
        eng.run_ms[seven][2] + eng.run_ms[full][1] + eng.run_ms[full][2])
    trusting = Engine(ServeConfig(bundle=str(tiny_bundle), verify=False, hint_mode="trust", max_batch_size=8))
    trusting.run_ms = eng.run_ms
    assert trusting.expected_ms(["7", "7"]) == eng.run_ms[seven][2]
    assert eng.expected_ms([FULL] * 9) == float("inf")  # larger than anything timed: never assumed cheap
    assert eng.run_ms_estimated == {}


def test_light_warm_up_times_route_models_at_batch_1_and_estimates_the_extra_rows_from_flops(tiny_bundle):
    eng = Engine(ServeConfig(bundle=str(tiny_bundle), verify=False, max_batch_size=8))  # auto: light on the CPU
    calls = []
    run = eng.logits
    eng.logits = lambda model, x: calls.append((model, len(x))) or run(model, x)
    eng.warm_up(8, rounds=2)
    full = eng.full_model
    assert sorted({b for m, b in calls if m == full}) == [1, 2, 4, 8]
    assert all(b == 1 for m, b in calls if m != full) and {m for m, _ in calls} == set(eng.sessions)
    assert set(eng.run_ms_estimated) == set(eng.sessions) - {full}
    extra_row = []  # the full model's ms from batch 1 (run after run) to batch 2, the same through every model
    for m in eng.run_ms_estimated:
        assert eng.run_ms_estimated[m] == [2, 4, 8] and eng.run_ms[m][1] > 0
        rel = eng.manifest["models"][m]["flops_rel"]
        t = eng.run_ms[m]
        f = eng.run_ms[full]
        assert rel < 1 and all(t[b] - t[b // 2] == pytest.approx((f[b] - f[b // 2]) * rel, abs=2e-4) for b in (4, 8))
        extra_row.append((t[2] - t[1]) / rel)
    # a route model's larger sizes: its own batch-1 run plus the full model's time per extra row x its FLOPs
    assert max(extra_row) - min(extra_row) < 2e-3
    assert eng.expected_ms(["7"] * 8) < float("inf")
    with pytest.raises(UserError, match="warmup"):
        ServeConfig(bundle=str(tiny_bundle), warmup="some")


@pytest.mark.parametrize("inline_ok", [True, False])
def test_greedy_batcher_runs_approved_batches_on_the_event_loop(inline_ok):
    import asyncio
    import threading

    from steerprune.service.batching import GreedyBatcher

    threads, sizes = set(), []

    def fn(items):
        threads.add(threading.get_ident())
        sizes.append(len(items))
        return [i * 10 for i in items]

    async def main():
        batcher = GreedyBatcher(fn, max_batch_size=4, inline=lambda items: inline_ok)
        return await asyncio.gather(*(batcher.submit(i) for i in range(10))), threading.get_ident()

    results, loop_thread = asyncio.run(main())
    assert results == [i * 10 for i in range(10)]  # every caller gets its own answer, in order
    assert max(sizes) <= 4 and sum(sizes) == 10
    assert threads == ({loop_thread} if inline_ok else threads - {loop_thread}) and threads


def test_batch_plan_gives_scattered_hints_to_the_full_models_run(tiny_bundle, digits_test):
    """batch_plan 'cost': one row per route model costs more than those rows on the full model's run, so the full model
    answers them ('batched'); a batch of one route's rows stays on its model; 'route' never merges."""
    eng = Engine(ServeConfig(bundle=str(tiny_bundle), verify=False))
    by_model = {}
    for n in eng.hint_names():
        if eng.routes[n].served:
            by_model.setdefault(eng.routes[n].model, n)
    hints = list(by_model.values())
    assert len(hints) >= 2
    # timings shaped like a small model on the CPU: a fixed cost per run plus a cost per row (route models: 0.8 of it)
    eng.run_ms = {m: {b: 1.0 + b * (1.0 if m == eng.full_model else 0.8) for b in eng.warm_sizes}
                  for m in eng.sessions}
    for m, table in eng.run_ms.items():  # as warm_up seeds them (no refit: threads is not 1)
        eng.times.seed(m, table)
    x16 = normalize(digits_test.images[:16], eng.spec)
    one = eng.run(x16, [hints[0]] * 16)
    assert not any(o.fallback_reason == "batched" for o in one)
    assert any(o.model == eng.routes[hints[0]].model for o in one)
    assert 0.0 <= eng.fallback_rate[eng.routes[hints[0]].model] <= 1.0  # followed from what it reran

    x = normalize(digits_test.images[:len(hints)], eng.spec)
    full = softmax(eng.logits(eng.full_model, x))
    res = eng.run(x, hints)
    assert [o.fallback_reason for o in res] == ["batched"] * len(hints)
    assert all(o.fallback and o.model == eng.full_model and o.routed_probs is None for o in res)
    assert [o.index for o in res] == full.argmax(1).tolist()
    np.testing.assert_allclose(np.stack([o.probs for o in res]), full, atol=1e-5)
    assert eng.plan(hints, [eng.model_for(h) for h in hints]).expected_ms == pytest.approx(eng.run_ms[eng.full_model][
        eng.warm_size(len(hints))] if eng.pad else 1.0 + len(hints))

    route = Engine(ServeConfig(bundle=str(tiny_bundle), verify=False, batch_plan="route"))
    route.run_ms, route.times = eng.run_ms, eng.times
    assert not any(o.fallback_reason == "batched" for o in route.run(x, hints))
    untimed = Engine(ServeConfig(bundle=str(tiny_bundle), verify=False))  # before warm-up nothing is merged
    assert not any(o.fallback_reason == "batched" for o in untimed.run(x, hints))


def test_plan_snapshot_follows_the_runs(tiny_bundle, digits_test):
    """With 1 thread the plan refits on what runs take; `plan_snapshot` (what GET /routes shows) is refreshed by the
    batch thread every PLAN_SNAPSHOT_EVERY batches, not frozen at warm-up."""
    from steerprune.service.engine import PLAN_SNAPSHOT_EVERY

    eng = Engine(ServeConfig(bundle=str(tiny_bundle), verify=False, threads=1))
    assert eng.plan_snapshot is None
    eng.warm_up(8, rounds=2)
    warm = eng.plan_snapshot
    assert warm["batches"] == 0 and set(warm["run_ms_line"]) == set(eng.sessions)
    x = normalize(digits_test.images[:4], eng.spec)
    for _ in range(PLAN_SNAPSHOT_EVERY - 1):
        eng.run(x, ["full"] * 4)
    assert eng.plan_snapshot is warm  # not yet refreshed
    eng.run(x, ["full"] * 4)
    snap = eng.plan_snapshot
    assert snap["batches"] == PLAN_SNAPSHOT_EVERY and snap["mode"] == "cost"
    # taken as batch 50 starts: the 49 runs before it refitted the full model's line
    assert snap["run_ms_line"][eng.full_model] != warm["run_ms_line"][eng.full_model]


def test_run_overhead_is_counted_once_per_run_the_plan_weighs(tiny_bundle):
    from steerprune.errors import UserError

    eng = Engine(ServeConfig(bundle=str(tiny_bundle), verify=False, run_overhead_ms=2.0))
    m = eng.full_model
    eng.times.seed(m, {1: 1.5, 2: 2.0, 4: 3.0})  # 1 ms per run + 0.5 ms per row
    assert eng.serving_time(m, 3) == pytest.approx(eng.times.ms(m, 3) + 2.0)
    assert eng.serving_time(m, 0.25) == pytest.approx(eng.times.ms(m, 0.25) + 0.5)  # a rerun with chance 1/4
    assert eng.serving_time(m, 0) == 0.0
    with pytest.raises(UserError, match="run_overhead_ms"):
        ServeConfig(bundle=str(tiny_bundle), run_overhead_ms=-1.0)

"""Against a real `bentoml serve` process on a free 127.0.0.1 port with the tiny digits bundle."""
from __future__ import annotations

import concurrent.futures as cf
import io
import json
import time

import numpy as np
import pytest

requests = pytest.importorskip("requests")

from steerprune.service.cli import curl_example, free_port, start_server, stop_server  # noqa: E402
from steerprune.service.config import ServeConfig  # noqa: E402
from steerprune.service.engine import FULL, Engine  # noqa: E402
from steerprune.loadtest.client import multipart_body  # noqa: E402
from steerprune.loadtest.plan import encode_png  # noqa: E402
from steerprune.service.preprocess import normalize  # noqa: E402

pytestmark = [pytest.mark.http, pytest.mark.slow]


def server_env(tmp_path) -> dict:
    import os

    return dict(os.environ, BENTOML_DO_NOT_TRACK="true", BENTOML_HOME=str(tmp_path / "bentoml_home"))


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    # answers are compared with an offline Engine: keep export's served flags and every hinted row on its route
    # model (the timing decisions are the server's own, tested in test_offline and over HTTP in tests/loadtest)
    proc = start_server(tiny_bundle, port=free_port(), timeout=120, log_path=tmp / "server.log",
                        env=server_env(tmp), threads=1, unserve_costlier=False, batch_plan="route")
    yield proc
    stop_server(proc)


@pytest.fixture(scope="module")
def offline(tiny_bundle):
    return Engine(ServeConfig(bundle=str(tiny_bundle), verify=False))


@pytest.fixture(scope="module")
def digits():
    from steerprune.training.data import load_data

    return load_data("digits").test


def classify(url, png: bytes, **fields):
    return requests.post(url + "/classify", files={"image": ("x.png", png, "image/png")}, data=fields, timeout=30)


def healthy(url) -> bool:
    return requests.get(url + "/livez", timeout=5).status_code == 200 and \
        requests.get(url + "/readyz", timeout=5).status_code == 200


def test_probes_and_routes_listing(server, tiny_bundle):
    assert healthy(server.url)
    r = requests.get(server.url + "/routes", timeout=5)
    assert r.status_code == 200
    body = r.json()
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    assert set(body["routes"]) == set(m["routes"]) and body["ready"] is True
    # the bundle's identity: sha256 of its manifest (which holds every model's sha256), as `sha256sum` prints it
    import hashlib

    assert body["bundle_id"] == hashlib.sha256((tiny_bundle / "manifest.json").read_bytes()).hexdigest()[:16]
    assert body["max_queue"] == 512 and body["max_wait_ms"] == 1000.0
    assert body["routes"]["even"]["classes"] == ["0", "2", "4", "6", "8"]
    assert body["routes"]["7"]["head_usage"] == m["routes"]["7"]["head_usage"]
    assert body["routes"]["7"]["kept_heads"] == m["routes"]["7"]["kept_heads"]
    assert body["routes"]["0"]["acc"] == m["routes"]["0"]["acc"]
    # dedup'd sessions: one per model file; '0'/'1' share one, '3' keeps every head and shares the full model
    assert len(body["sessions"]) == len(m["models"])
    assert sorted(body["sessions"][m["routes"]["0"]["model"]]["routes"]) == ["0", "1"]
    assert body["routes"]["3"]["model"] == body["full"]["model"]
    assert body["device"] == "cpu" and body["hint_mode"] == "verify"
    assert body["pad_batches"] is False  # no padding on the CPU
    # the worker's GC clock runs young collections, CPython's automatic collection off
    assert body["gc_clock"]["automatic"] is False and body["gc_clock"]["young_ms"] == 20.0
    assert body["gc_clock"]["young_collections"] > 0
    # warm-up timed every session at every warmed size; batches expected under inline_ms skip the thread hop
    assert body["inline_ms"] == 1.0 and set(body["warm_run_ms"]) == set(body["sessions"])
    assert all(set(t) == {str(b) for b in body["warm_batch_sizes"]} and all(v > 0 for v in t.values())
               for t in body["warm_run_ms"].values())
    # light warm-up on the CPU: route models timed at batch 1, their larger sizes estimated from FLOPs
    assert body["warmup"] == "auto" and set(body["warm_run_ms_estimated"]) == set(body["sessions"]) - {m["full"]["model"]}


def test_answers_equal_offline_onnxruntime(server, offline, digits):
    imgs = digits.images[:30]
    x = normalize(imgs, offline.spec)
    hints = [None, "0", "7", "even", "3", "1"] * 5
    expect = offline.run(x, [h or FULL for h in hints])
    for i, h in enumerate(hints):
        r = classify(server.url, encode_png(imgs[i]), **({"hint": h} if h else {}), top_k="10")
        assert r.status_code == 200, r.text
        a = r.json()
        e = expect[i]
        assert a["index"] == e.index and a["label"] == offline.classes[a["index"]]
        got = np.zeros(10, np.float32)
        for s in a["scores"]:
            got[s["index"]] = s["prob"]
        np.testing.assert_allclose(got, e.probs, atol=1e-5)
        assert a["route"] == (h or "full") and a["fallback"] == e.fallback and a["model"] == e.model
        assert len(a["bundle_id"]) == 16 and int(a["bundle_id"], 16) >= 0
        assert [s["prob"] for s in a["scores"]] == sorted([s["prob"] for s in a["scores"]], reverse=True)
        usage = offline.manifest["full" if (e.fallback or not h) else "routes"]
        usage = usage["head_usage"] if (e.fallback or not h) else usage[h]["head_usage"]
        assert a["head_usage"] == usage


def test_hinted_vs_unhinted_and_fallback(server, offline, digits):
    sevens = np.flatnonzero(digits.labels == 7)[:3]
    twos = np.flatnonzero(digits.labels == 2)[:3]
    for i in sevens:
        png = encode_png(digits.images[i])
        plain, hinted = classify(server.url, png).json(), classify(server.url, png, hint="7").json()
        assert plain["route"] == "full" and plain["head_usage"] == 1.0 and not plain["fallback"]
        assert hinted["route"] == "7"
        if not hinted["fallback"]:  # answered by the pruned model of route 7
            assert hinted["head_usage"] == offline.manifest["routes"]["7"]["head_usage"] < 1.0
    fallbacks = 0
    for i in twos:  # a '7' hint on a 2: verify mode catches it unless the pruned model is confidently wrong
        a = classify(server.url, encode_png(digits.images[i]), hint="7").json()
        if a["fallback"]:
            fallbacks += 1
            assert a["fallback_reason"] and a["head_usage"] == 1.0 and a["model"] == offline.full_model
            assert a["routed"]["label"] in [str(c) for c in range(10)]
    assert fallbacks >= 1


def test_top_k_and_unknown_hint(server, digits):
    png = encode_png(digits.images[0])
    assert len(classify(server.url, png, top_k="1").json()["scores"]) == 1
    assert len(classify(server.url, png).json()["scores"]) == 3
    r = classify(server.url, png, hint="giraffe")
    assert r.status_code == 400
    assert "giraffe" in r.json()["error"] and r.json()["valid_hints"] == ["0", "1", "7", "even", "3"]


def _image(mode, size, fmt="PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format=fmt)
    return buf.getvalue()


def _chunks(data: bytes, n=1 << 16):
    for i in range(0, len(data), n):
        yield data[i:i + n]


@pytest.mark.parametrize("case,status,words", [
    ("text_image_field", 400, "file upload"),
    ("not_an_image", 415, "not an image"),
    ("truncated", 400, "truncated"),
    ("empty_file", 400, "empty"),
    ("empty_body", 415, "multipart/form-data"),
    ("json_body", 415, "multipart/form-data"),
    ("missing_image", 400, "missing the 'image'"),
    ("bomb", 413, "pixels"),
    ("oversize", 413, "limit"),
    ("oversize_chunked", 413, "limit"),
    ("bad_top_k", 400, "top_k"),
    ("zero_top_k", 400, "top_k"),
    ("unknown_field", 400, "unknown form field"),
    ("query_param", 400, "query parameter"),
    ("two_images", 400, "more than once"),
    ("hint_as_file", 400, "text field"),
    ("broken_multipart", 400, "image"),
])
def test_bad_inputs_are_4xx_and_server_stays_healthy(server, case, status, words):
    url = server.url + "/classify"
    png = _image("L", (8, 8))
    huge = b"\0" * (ServeConfig().max_upload_bytes + 1024)
    body, ctype = multipart_body({}, huge)
    post = {
        "text_image_field": lambda: requests.post(url, files={"image": (None, "http://127.0.0.1:1/x.png")}),
        "not_an_image": lambda: requests.post(url, files={"image": ("a.png", b"GIF89 nope")}),
        "truncated": lambda: requests.post(url, files={"image": ("a.jpg", _image("RGB", (64, 64), "JPEG")[:300])}),
        "empty_file": lambda: requests.post(url, files={"image": ("a.png", b"")}),
        "empty_body": lambda: requests.post(url, data=b""),
        "json_body": lambda: requests.post(url, json={"image": "aGVsbG8="}),
        "missing_image": lambda: requests.post(url, files={"hint": (None, "7")}),
        "bomb": lambda: requests.post(url, files={"image": ("a.png", _image("1", (5000, 5000)))}),
        "oversize": lambda: requests.post(url, files={"image": ("a.png", huge)}),
        "oversize_chunked": lambda: requests.post(url, data=_chunks(body), headers={"Content-Type": ctype}),
        "bad_top_k": lambda: requests.post(url, files={"image": ("a.png", png)}, data={"top_k": "many"}),
        "zero_top_k": lambda: requests.post(url, files={"image": ("a.png", png)}, data={"top_k": "0"}),
        "unknown_field": lambda: requests.post(url, files={"image": ("a.png", png)}, data={"colour": "red"}),
        "query_param": lambda: requests.post(url + "?hint=7", files={"image": ("a.png", png)}),
        "two_images": lambda: requests.post(url, files=[("image", ("a.png", png)), ("image", ("b.png", png))]),
        "hint_as_file": lambda: requests.post(url, files={"image": ("a.png", png), "hint": ("h.txt", b"7")}),
        "broken_multipart": lambda: requests.post(url, data=b"--xyz\r\nnonsense",
                                                  headers={"Content-Type": "multipart/form-data; boundary=xyz"}),
    }[case]
    try:
        r = post()
    except requests.ConnectionError:  # the server may close an oversize upload early; it must still be healthy
        assert case.startswith("oversize")
    else:
        assert r.status_code == status, r.text[:300]
        assert words in r.json()["error"]
    assert healthy(server.url)


def test_concurrent_clients_get_their_own_answers(server, offline, digits):
    n = 96
    imgs = digits.images[:n]
    hints = [[None, "0", "1", "7", "even", "3"][i % 6] for i in range(n)]
    expect = offline.run(normalize(imgs, offline.spec), [h or FULL for h in hints])

    def one(i):
        r = classify(server.url, encode_png(imgs[i]), **({"hint": hints[i]} if hints[i] else {}))
        return i, r.status_code, r.json()

    with cf.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(n)))
    for i, status, a in results:
        assert status == 200
        assert a["index"] == expect[i].index and a["route"] == (hints[i] or "full")
        assert a["fallback"] == expect[i].fallback
        assert abs(a["prob"] - float(expect[i].probs[expect[i].index])) < 1e-5
    metrics = requests.get(server.url + "/metrics", timeout=5).text
    batches = [ln for ln in metrics.splitlines() if ln.startswith("steerprune_batch_size_count")]
    sums = [ln for ln in metrics.splitlines() if ln.startswith("steerprune_batch_size_sum")]
    assert batches and sums and float(sums[0].split()[-1]) >= n


def test_metrics_count_routes_fallbacks_and_wrong_hints(server, digits):
    png = encode_png(digits.images[np.flatnonzero(digits.labels == 2)[0]])
    classify(server.url, png, hint="0")
    text = requests.get(server.url + "/metrics", timeout=5).text
    names = {ln.split("{")[0].split(" ")[0] for ln in text.splitlines() if not ln.startswith("#")}
    for name in ("steerprune_requests_total", "steerprune_fallbacks_total", "steerprune_wrong_hints_total",
                 "steerprune_rejected_total", "steerprune_request_duration_seconds_bucket",
                 "steerprune_gc_pause_seconds_bucket"):
        assert name in names, name
    assert any(ln.startswith('steerprune_requests_total{') and 'route="0"' in ln for ln in text.splitlines())
    assert any(ln.startswith("bentoml_") for ln in text.splitlines())  # BentoML's own series are still there


def test_bentoml_sync_client_reaches_classify_through_request(server, digits):
    """BentoML's own client has no typed classify() (it lists only @bentoml.api methods), but its request() calls
    every endpoint with the client's base URL: the form docs/api.md shows."""
    import bentoml

    with bentoml.SyncHTTPClient(server.url, timeout=30) as client:
        assert "classify" not in client.endpoints
        r = client.request("POST", "/classify", files={"image": ("x.png", encode_png(digits.images[0]), "image/png")},
                           data={"hint": "7", "top_k": "2"})
        assert r.status_code == 200 and r.json()["route"] == "7" and len(r.json()["scores"]) == 2
        assert client.request("GET", "/routes").json()["bundle_id"] == r.json()["bundle_id"]


def test_curl_example_names_a_hint(tiny_bundle):
    cmd = curl_example(tiny_bundle, "127.0.0.1", 3000)
    assert cmd.startswith("curl") and "hint=0" in cmd and "http://127.0.0.1:3000/classify" in cmd


def test_readiness_waits_for_warm_up_and_trust_mode(tiny_bundle, digits, tmp_path):
    """Long warm-up: /livez is 200 while /readyz is 503 (and /classify 503), then both 200; trust mode, lenient hints;
    every batch in a worker thread (inline_ms=0), the path larger models take."""
    import subprocess
    import sys

    from steerprune.service.cli import SERVICE_REF, server_env as env_for

    port = free_port()
    env = env_for(tiny_bundle, base=server_env(tmp_path), hint_mode="trust", unknown_hint="full", warmup_rounds=60,
                  verify=False, threads=1, inline_ms=0, gc_young_ms=0, batch_plan="route")
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", SERVICE_REF, "--port", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    seen = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                live = requests.get(url + "/livez", timeout=10).status_code
                ready = requests.get(url + "/readyz", timeout=10).status_code
            except (requests.ConnectionError, requests.Timeout):
                time.sleep(0.2)
                continue
            if ready == 503 and live == 200 and not seen:
                seen.append("warming")
                assert classify(url, encode_png(digits.images[0])).status_code == 503
            if ready == 200:
                seen.append("ready")
                break
            time.sleep(0.05)
        assert seen == ["warming", "ready"], (tmp_path / "server.log").read_text()[-2000:]
        two = encode_png(digits.images[np.flatnonzero(digits.labels == 2)[0]])
        a = classify(url, two, hint="7").json()
        assert a["route"] == "7" and a["fallback"] is False  # trust mode returns the routed answer
        assert classify(url, two, hint="giraffe").json()["route"] == "full"  # unknown_hint=full
        listing = requests.get(url + "/routes", timeout=10).json()
        assert listing["inline_ms"] == 0
        # gc_young_ms=0: CPython collects on its own trigger, with the third threshold set once warm
        assert listing["gc_clock"]["automatic"] is True and listing["gc_clock"]["young_collections"] == 0
        assert listing["gc_threshold"][2] == 1000
        from steerprune.loadtest import LoadTestConfig, run_loadtest

        # wrong hints are answered by the routed model here: the offline answers must follow the server's mode
        rep = run_loadtest(LoadTestConfig(url=url, users=2, duration=30, max_requests=40, mix="wrong=1",
                                          bundle=str(tiny_bundle), inprocess_threads=1, out=None), log=lambda *_: None)
        assert rep["errors"] == 0 and rep["fallback_rate"] == 0.0
        assert rep["inprocess"]["answers_differing_from_offline"] == 0 and rep["inprocess"]["threads"] == 1
    finally:
        stop_server(proc)
        log.close()


def test_cuda_requested_without_cuda_never_becomes_ready(tiny_bundle, tmp_path):
    from steerprune.errors import UserError
    from steerprune.service.engine import gpu_visible

    if gpu_visible():
        pytest.skip("a GPU is visible here: CUDA may really start")
    with pytest.raises(UserError, match="not ready after"):
        start_server(tiny_bundle, port=free_port(), timeout=12, log_path=tmp_path / "server.log",
                     env=server_env(tmp_path), device="cuda", verify=False)
    assert "CUDA was requested" in (tmp_path / "server.log").read_text()


@pytest.mark.gpu
def test_cuda_server_answers_like_the_cpu_engine(tiny_bundle, offline, digits, tmp_path):
    from steerprune.service.engine import gpu_visible

    if not gpu_visible():
        pytest.skip("no NVIDIA GPU visible")
    proc = start_server(tiny_bundle, port=free_port(), timeout=180, log_path=tmp_path / "server.log",
                        env=server_env(tmp_path), device="cuda", verify=False, unserve_costlier=False,
                        batch_plan="route")
    try:
        body = requests.get(proc.url + "/routes", timeout=5).json()
        assert body["device"] == "cuda" and body["ready"] is True
        assert all(s["providers"][0] == "CUDAExecutionProvider" for s in body["sessions"].values())
        imgs = digits.images[:12]
        hints = [None, "0", "7", "even"] * 3
        expect = offline.run(normalize(imgs, offline.spec), [h or FULL for h in hints])
        for i, h in enumerate(hints):
            r = classify(proc.url, encode_png(imgs[i]), **({"hint": h} if h else {}), top_k="10")
            assert r.status_code == 200, r.text
            a, e = r.json(), expect[i]
            assert a["route"] == (h or "full") and a["model"] == e.model and a["fallback"] == e.fallback
            got = np.zeros(10, np.float32)
            for s in a["scores"]:
                got[s["index"]] = s["prob"]
            np.testing.assert_allclose(got, e.probs, atol=1e-4)  # CUDA kernels differ from the CPU's in the last bits
    finally:
        stop_server(proc)

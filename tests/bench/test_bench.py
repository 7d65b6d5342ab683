"""The offline benchmark runs end to end and reports what it measured (speeds are written, never asserted)."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from steerprune.bench.run import run_bench  # noqa: E402


@pytest.mark.slow
def test_bench_writes_json_and_plot(tiny_bundle, tmp_path):
    out = tmp_path / "bench.json"
    res = run_bench(tiny_bundle, out, threads=1, batches=(1, 2), runs=4, rounds=1, torch_peers=False,
                    masked_peers=True, warmup_s=0.05, log=lambda *_: None)
    saved = json.loads(out.read_text())
    assert saved["variants"] == json.loads(json.dumps(res["variants"]))
    assert (tmp_path / "bench.png").stat().st_size > 1000
    roles = [v["role"] for v in res["variants"]]
    assert roles.count("full") == 1 and roles.count("removed") == 3 and roles.count("masked") == 3
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    for v in res["variants"]:
        for b in ("1", "2"):
            s = v["batch"][b]
            assert s["n"] == 4 and 0 < s["p10_ms"] <= s["median_ms"] <= s["p90_ms"]
            assert s["ms_per_image"] == pytest.approx(s["median_ms"] / int(b))
        if v["role"] == "full":
            assert v["batch"]["2"]["speedup_vs_full"] == 1.0
        if v["role"] == "removed":
            assert v["flop_bound_speedup"] == pytest.approx(1 / m["models"][v["model"]]["flops_rel"])
    assert res["machine"]["threads"] == 1 and set(res["summary"]) == {1, 2}


def test_bench_refuses_cuda_it_cannot_use(tiny_bundle, tmp_path):
    from steerprune.errors import UserError
    from steerprune.export.runtime import gpu_visible, ort_providers

    try:
        cuda_usable = bool(ort_providers("cuda")) and gpu_visible()
    except UserError:
        cuda_usable = False
    if cuda_usable:
        pytest.skip("CUDA is usable here: see test_bench_on_cuda")
    with pytest.raises(UserError, match="CUDA provider|no NVIDIA GPU"):
        run_bench(tiny_bundle, tmp_path / "b.json", device="cuda", log=lambda *_: None)
    assert not (tmp_path / "b.json").exists()
    with pytest.raises(UserError, match="unknown device"):
        run_bench(tiny_bundle, tmp_path / "b.json", device="tpu", log=lambda *_: None)


@pytest.mark.gpu
@pytest.mark.slow
def test_bench_on_cuda(tiny_bundle, tmp_path):
    from steerprune.export.runtime import gpu_visible

    if not gpu_visible():
        pytest.skip("no NVIDIA GPU visible")
    res = run_bench(tiny_bundle, tmp_path / "b.json", threads=1, batches=(1, 8), runs=6, rounds=1, torch_peers=False,
                    masked_peers=False, warmup_s=0.1, device="cuda", log=lambda *_: None)
    assert res["machine"]["provider"].startswith("CUDAExecutionProvider") and res["machine"]["gpu"]
    assert len(res["variants"]) == 4
    for v in res["variants"]:
        assert all(v["batch"][b]["n"] == 6 and v["batch"][b]["median_ms"] > 0 for b in ("1", "8"))

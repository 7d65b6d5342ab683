"""`steerprune loadtest`: a bounded, local-only load test of a steerprune server, a client of the service.

    from steerprune.loadtest import LoadTestConfig, run_loadtest
    report = run_loadtest(LoadTestConfig(url="http://127.0.0.1:3000", users=16, duration=20, rate=700, out=None))

Modules: `plan` (hint mix, test images, the seeded request stream), `client` (aiohttp keep-alive users on one event
loop, open-loop pacing), `probes` (the server's CPU and memory via psutil, its /metrics histograms), `report`
(percentiles, accuracy, summary, plot), `baseline` (the in-process ONNX Runtime answers and speed), `run` (the
configuration, one run, and the hinted-vs-unhinted comparison), `cli`.
"""
import importlib

# Lazy: `steerprune` imports every stage's cli at start-up; the client (aiohttp) loads only when a load test runs.
_EXPORTS = {"DEFAULT_MIX": "plan", "KINDS": "plan", "Planned": "plan", "encode_png": "plan", "load_images": "plan",
            "parse_mix": "plan", "plan_requests": "plan", "LOCAL_HOSTS": "run", "LoadTestConfig": "run",
            "compare_hints": "run", "run_loadtest": "run"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

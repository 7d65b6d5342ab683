"""A load test of one local server: the configuration, one measured run (`run_loadtest`), and the hinted-versus-
unhinted comparison (`compare_hints`): the same server, a phase with no hints and a phase with right hints."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Optional
from urllib.parse import urlparse

import numpy as np

from steerprune.errors import UserError

from .baseline import baseline_report
from .client import Sample, form_body, get, run_open_loop
from .plan import DEFAULT_MIX, Planned, encode_png, load_images, parse_mix, plan_requests
from .probes import find_server_pid, idle_cpu_per_s, snapshot
from .report import measure_report, plot, summary, write_report

__all__ = ["LOCAL_HOSTS", "LoadTestConfig", "Target", "connect", "run_loadtest", "compare_hints", "hint_headline"]

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
COMPARED = ("none", "right")  # compare_hints' phases: unhinted first, then right hints


@dataclass
class LoadTestConfig:
    """A bounded load test of one local server."""

    url: str
    """Server base URL; the host must be 127.0.0.1, localhost or ::1."""
    users: int = 8
    """Concurrent keep-alive clients (1-64)."""
    duration: float = 20.0
    """Seconds of load per measured run (at most 600)."""
    max_requests: int = 50_000
    """Stop a run after this many requests even if time is left."""
    mix: str = DEFAULT_MIX
    """Share of requests with the right hint, a wrong hint, and no hint (compare_hints sets its own per phase)."""
    images: Optional[str] = None
    """NPZ (images uint8 NHWC + labels) or class-folder directory; default: digits test split for digits bundles."""
    bundle: Optional[str] = None
    """Bundle directory for the in-process ONNX Runtime baseline and offline answers (skipped without it)."""
    inprocess_threads: int = 0
    """ONNX Runtime threads of the in-process baseline (0: its default); give it what the server has (e.g. 1 when
    the server is pinned to one core) for a fair throughput share."""
    server_pid: Optional[int] = None
    """Server process for CPU accounting (default: the process listening on the URL's port)."""
    rate: float = 0.0
    """Total requests per second to pace at (0: as fast as the server answers: saturation)."""
    seed: int = 0
    """Seed of the request plan (images and hints)."""
    sweep: bool = False
    """Send every test image exactly once (shuffled; bounded by duration and max_requests) instead of drawing images
    with replacement: the accuracy check against the manifest then sees the same images the export measured."""
    warmup: float = 0.0
    """Seconds of unmeasured load (the configured mix) before the measured runs."""
    compare_hints: bool = False
    """Run compare_hints: unhinted and right-hint phases instead of one run of `mix`."""
    rounds: int = 1
    """compare_hints: rounds of the two phases (in ABBA order: none/right, then right/none, ...)."""
    out: Optional[str] = "loadtest.json"
    """JSON report path (the PNG plot goes beside it); None writes nothing."""

    def __post_init__(self):
        u = urlparse(self.url)
        if u.scheme != "http" or not u.hostname:
            raise UserError(f"url must look like http://127.0.0.1:3000, got {self.url!r}")
        if u.hostname not in LOCAL_HOSTS:
            raise UserError(f"load tests only target this machine ({', '.join(LOCAL_HOSTS)}), not {u.hostname!r}")
        if not 1 <= self.users <= 64:
            raise UserError(f"users must be from 1 to 64, got {self.users}")
        if not 0 < self.duration <= 600:
            raise UserError(f"duration must be in (0, 600] seconds, got {self.duration}")
        if not 1 <= self.max_requests <= 1_000_000:
            raise UserError(f"max_requests must be from 1 to 1,000,000, got {self.max_requests}")
        if self.inprocess_threads < 0:
            raise UserError("inprocess_threads must be >= 0")
        if self.rate < 0:
            raise UserError("rate must be >= 0")
        if not 0 <= self.warmup <= 600:
            raise UserError(f"warmup must be in [0, 600] seconds, got {self.warmup}")
        if not 1 <= self.rounds <= 20:
            raise UserError(f"rounds must be from 1 to 20, got {self.rounds}")
        if self.rounds > 1 and not self.compare_hints:
            raise UserError("rounds applies to compare_hints (--compare-hints) only")
        parse_mix(self.mix)


class Target(NamedTuple):
    """A ready server and the requests that can be sent to it."""

    url: str  # base URL
    listing: dict  # GET /routes
    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # (N,)
    source: str
    pngs: list  # PNG bytes per image
    pid: Optional[int]  # server process (tree root) for CPU accounting


def connect(cfg: LoadTestConfig) -> Target:
    """Check /readyz, read /routes, load and encode the test images, find the server's process."""
    base = cfg.url.rstrip("/")
    status, _ = get(base, "/readyz")
    if status != 200:
        raise UserError(f"{cfg.url}/readyz answered {status}: the server is not ready")
    listing = json.loads(get(base, "/routes")[1])
    images, labels, source = load_images(cfg.images, listing.get("data_spec"), listing["classes"])
    port = urlparse(base).port or 80
    return Target(base, listing, images, labels, source, [encode_png(im) for im in images],
                  cfg.server_pid or find_server_pid(port))


def _plan(cfg: LoadTestConfig, t: Target, mix: str) -> list[Planned]:
    routes = {n: r["class_indices"] for n, r in t.listing["routes"].items()}
    return plan_requests(cfg.max_requests, t.labels, routes, parse_mix(mix), cfg.seed, cfg.sweep)


def _run(cfg: LoadTestConfig, t: Target, plan: list[Planned], idle: Optional[float], duration: float
         ) -> tuple[list[Sample], dict]:
    """One run of `plan` -> (samples, measured report)."""
    cache: dict = {}

    async def body(i: int):
        p = plan[i]
        key = (p.image, p.hint)
        if key not in cache:
            cache[key] = await form_body({"hint": p.hint} if p.hint else {}, t.pngs[p.image])
        return cache[key]

    before = snapshot(t.url, t.pid, scrape_first=True)
    samples, wall = run_open_loop(t.url + "/classify", body, len(plan), cfg.users, duration, cfg.rate)
    after = snapshot(t.url, t.pid, scrape_first=False)
    return samples, measure_report(samples, plan, t.labels, t.listing, wall, before, after, idle)


def _start(cfg: LoadTestConfig, t: Target, log: Callable, what: str) -> Optional[float]:
    """Log the setup, measure the server's idle CPU, run the warm-up; returns idle CPU seconds per second."""
    log(f"load test: {cfg.users} users, {cfg.duration:g} s, {what}, {len(t.images)} images ({t.source}), "
        f"server pid {t.pid or 'unknown'}{f', paced at {cfg.rate:g} req/s' if cfg.rate else ''}")
    idle = idle_cpu_per_s(t.pid) if t.pid else None  # BentoML's arbiter and watchers use CPU even when idle
    if cfg.warmup:
        _run(cfg, t, _plan(cfg, t, cfg.mix), idle, cfg.warmup)
    return idle


def _header(cfg: LoadTestConfig, t: Target) -> dict:
    return {"config": asdict(cfg), "source": t.source, "device": t.listing.get("device"),
            "batcher": t.listing.get("batcher"), "hint_mode": t.listing.get("hint_mode"),
            "min_prob": t.listing.get("min_prob")}


def _baseline(cfg: LoadTestConfig, t: Target, plan, samples, rep: dict) -> None:
    if cfg.bundle:
        rep.update(baseline_report(cfg.bundle, t.pngs, plan, samples, t.labels, t.listing, rep["throughput_rps"],
                                   rep.get("accuracy"), threads=cfg.inprocess_threads))


def _write(cfg: LoadTestConfig, report: dict, runs: dict) -> None:
    if cfg.out:
        out = Path(cfg.out)
        write_report(report, out)
        report["plot"] = str(plot(runs, out.with_suffix(".png")))
        write_report(report, out)


def run_loadtest(cfg: LoadTestConfig, log: Callable = print) -> dict:
    """One run of `cfg.mix` (or, with cfg.compare_hints, `compare_hints`); returns the report (also written to
    cfg.out with a plot beside it) and logs its summary."""
    if cfg.compare_hints:
        return compare_hints(cfg, log)
    t = connect(cfg)
    idle = _start(cfg, t, log, f"mix {cfg.mix}")
    plan = _plan(cfg, t, cfg.mix)
    samples, measured = _run(cfg, t, plan, idle, cfg.duration)
    report = {**_header(cfg, t), **measured}
    _baseline(cfg, t, plan, samples, report)
    _write(cfg, report, {"": (samples, plan, report)})
    log(summary(report))
    return report


def _aggregate(reps: list[dict]) -> dict:
    """One phase over its rounds: totals, not means of rates."""
    n = sum(r["requests"] for r in reps)
    ok = sum(r["ok"] for r in reps)
    wall = sum(r["wall_s"] for r in reps)
    out = {"requests": n, "ok": ok, "errors": sum(r["errors"] for r in reps),
           "throughput_rps": round(ok / wall, 2) if wall else None,
           "fallback_rate": round(sum(r.get("fallbacks", 0) for r in reps) / ok, 4) if ok else None,
           "accuracy": round(sum(r.get("correct", 0) for r in reps) / ok, 4) if ok else None,
           "p50_ms": float(np.median([r["latency"]["p50_ms"] for r in reps if r["latency"].get("n")] or [np.nan])),
           "p99_ms": float(np.median([r["latency"]["p99_ms"] for r in reps if r["latency"].get("n")] or [np.nan]))}
    if all("server_cpu_s" in r for r in reps) and n:
        out["server_cpu_ms_per_request"] = round(sum(r["server_cpu_s"] for r in reps) / n * 1000, 3)
        if all("server_cpu_ms_per_request_net_of_idle" in r for r in reps):
            out["server_cpu_ms_per_request_net_of_idle"] = round(
                sum(r["server_cpu_ms_per_request_net_of_idle"] * r["requests"] for r in reps) / n, 3)
    return out


def _ratio(a, b) -> Optional[float]:
    return round(a / b, 4) if a is not None and b else None


def hint_headline(report: dict) -> str:
    """The one-line hinted-vs-unhinted summary of a compare_hints report."""
    h = report["hinted_vs_unhinted"]
    none, right = h["none"], h["right"]
    cpu = (f"server CPU {right.get('server_cpu_ms_per_request')} vs {none.get('server_cpu_ms_per_request')} ms/request "
           f"(ratio {h.get('server_cpu_ratio')})" if h.get("server_cpu_ratio") is not None else "server CPU unknown")
    fb = lambda v: "?" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    return (f"right hints vs no hints ({report.get('hint_mode')} mode): {cpu}, {right['throughput_rps']} vs "
            f"{none['throughput_rps']} req/s (ratio {h.get('throughput_ratio')}), fallback {fb(right['fallback_rate'])}"
            f" vs {fb(none['fallback_rate'])}, accuracy {fb(right['accuracy'])} vs {fb(none['accuracy'])}")


def compare_hints(cfg: LoadTestConfig, log: Callable = print) -> dict:
    """Against one server, in one invocation: a phase with no hints and a phase with right hints (the same images,
    same seed), `cfg.rounds` times in ABBA order, each phase `cfg.duration` seconds at `cfg.rate`. Reports each phase
    (server CPU ms per request from the process tree's CPU delta over its requests, throughput, fallback rate,
    accuracy, latency) and the hinted/unhinted ratios of server CPU per request and throughput."""
    t = connect(cfg)
    idle = _start(cfg, t, log, f"right hints vs no hints, {cfg.rounds} round(s)")
    plans = {k: _plan(cfg, t, f"{k}=1") for k in COMPARED}
    phases: dict = {k: [] for k in COMPARED}
    first: dict = {}
    rounds = []
    for r in range(cfg.rounds):
        row = {"round": r}
        for kind in (COMPARED if r % 2 == 0 else COMPARED[::-1]):
            samples, rep = _run(cfg, t, plans[kind], idle, cfg.duration)
            if kind not in first:
                _baseline(cfg, t, plans[kind], samples, rep)
                first[kind] = (samples, plans[kind], rep)
            phases[kind].append(rep)
            row[kind] = {k: rep.get(k) for k in ("throughput_rps", "server_cpu_ms_per_request", "fallback_rate",
                                                 "accuracy")}
            log(f"round {r} {kind} hints: {rep['throughput_rps']} req/s, server CPU "
                f"{rep.get('server_cpu_ms_per_request')} ms/request, fallback {rep.get('fallback_rate')}")
        row["server_cpu_ratio"] = _ratio(row["right"]["server_cpu_ms_per_request"],
                                         row["none"]["server_cpu_ms_per_request"])
        rounds.append(row)
    agg = {k: _aggregate(v) for k, v in phases.items()}
    ratios = [r["server_cpu_ratio"] for r in rounds if r["server_cpu_ratio"] is not None]
    head = {**agg,
            "server_cpu_ratio": _ratio(agg["right"].get("server_cpu_ms_per_request"),
                                       agg["none"].get("server_cpu_ms_per_request")),
            "server_cpu_ratio_net_of_idle": _ratio(agg["right"].get("server_cpu_ms_per_request_net_of_idle"),
                                                   agg["none"].get("server_cpu_ms_per_request_net_of_idle")),
            "server_cpu_ratio_median_of_rounds": round(float(np.median(ratios)), 4) if ratios else None,
            "throughput_ratio": _ratio(agg["right"]["throughput_rps"], agg["none"]["throughput_rps"]),
            "accuracy_difference_points": (round(100 * (agg["right"]["accuracy"] - agg["none"]["accuracy"]), 2)
                                           if agg["right"]["accuracy"] is not None and agg["none"]["accuracy"]
                                           is not None else None)}
    report = {**_header(cfg, t), "mode": "compare_hints", "hinted_vs_unhinted": head, "rounds": rounds,
              "phases": phases, "errors": agg["none"]["errors"] + agg["right"]["errors"]}
    report["headline"] = hint_headline(report)
    _write(cfg, report, {f"{k} hints": first[k] for k in COMPARED})
    for kind in COMPARED:
        log(f"-- {kind} hints, round 0 --\n" + summary(first[kind][2]))
    log(report["headline"])
    return report

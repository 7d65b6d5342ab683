"""Overload benchmark: saturate a local server, then drive it open-loop at k x the saturated rate.

    python benchmarks/overload.py BUNDLE --images ../shared/data/cifar10/test.npz --repeat 5 \
        --out benchmarks/results/overload_cifar10.json

Starts `bentoml serve` on a free 127.0.0.1 port (ONNX Runtime at --threads), measures the saturated throughput
with --sat-users closed-loop users, then for each factor paces requests at factor x saturation from enough users
that the schedule, not the answers, sets the send times (open loop; every phase bounded by --duration and a
request count). Reports per phase: offered and achieved send rate, statuses (200 / 503 / connection errors /
other), accepted throughput and its share of saturation, accepted p50/p99/max, 503 latency, the server's skip and
overload counters and /readyz afterwards. With --repeat N, N fresh servers one after another: every run's
summary, their medians, and the full phases of the median run. JSON to --out, plot beside it (.png).

With --proxy haproxy, every run puts HAProxy (`haproxy` on PATH, deploy/kubernetes/components/haproxy/haproxy.cfg)
in front of the server and sends everything, saturation included, through it: /classify limited to
--proxy-maxconn requests in the worker, --proxy-maxqueue waiting in HAProxy, --max-wait-ms in its queue at most.
With --proxy none,haproxy each repeat runs both, one after the other, and the report holds each under `by_proxy`
(plots `OUT_none.png`, `OUT_haproxy.png`).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from steerprune.loadtest.client import form_body, get, run_open_loop
from steerprune.loadtest.plan import encode_png, load_images, parse_mix, plan_requests
from steerprune.service.cli import free_port, start_haproxy, start_server, stop_server


def counters(base_url: str) -> dict:
    """steerprune_* counters from /metrics: {series{labels}: value}."""
    _, raw = get(base_url, "/metrics")
    out = {}
    for line in raw.decode().splitlines():
        m = re.match(r"(steerprune_(?:skipped|overloaded|rejected|requests)_total)(\{[^}]*\})? (\S+)$", line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def delta(a: dict, b: dict) -> dict:
    return {k: b[k] - a.get(k, 0.0) for k in b if b[k] - a.get(k, 0.0)}


def pct(xs, q):
    return round(float(np.percentile(xs, q)) * 1000.0, 2) if len(xs) else None


def phase(url: str, bodies, n: int, users: int, duration: float, rate: float, sat: float | None) -> dict:
    before = counters(url)

    async def body(i):
        return bodies[i % len(bodies)]

    samples, wall = run_open_loop(url + "/classify", body, n, users, duration, rate)
    after = counters(url)
    st = {}
    for s in samples:
        st[str(s.status)] = st.get(str(s.status), 0) + 1
    ok = [s.latency for s in samples if s.status == 200]
    busy = [s.latency for s in samples if s.status == 503]
    sends = sorted(s.t for s in samples)
    span = (sends[-1] - sends[0]) if len(sends) > 1 else wall
    ready = get(url, "/readyz")[0]
    res = {
        "rate_target": round(rate, 1) if rate else "saturate", "users": users, "wall_s": round(wall, 2),
        "requests": len(samples), "send_rate": round(len(samples) / span, 1) if span else None,
        "statuses": st, "connection_errors": st.get("0", 0),
        "answered_or_503": sum(v for k, v in st.items() if k in ("200", "503")) == len(samples),
        "accepted_rps": round(len(ok) / wall, 1),
        "accepted_latency_ms": {"p50": pct(ok, 50), "p99": pct(ok, 99), "max": pct(ok, 100)},
        "rejected_latency_ms": {"p50": pct(busy, 50), "p99": pct(busy, 99)},
        "server_counters": delta(before, after), "readyz_after": ready,
        "samples": [(round(s.t, 4), round(s.latency * 1000, 2), s.status) for s in samples],
    }
    if sat:
        res["accepted_share_of_saturation"] = round(len(ok) / wall / sat, 3)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--images", help="NPZ (images uint8 NHWC, labels) or class folders (default: digits test)")
    ap.add_argument("--mix", default="right=0.6,wrong=0.2,none=0.2")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads of the server")
    ap.add_argument("--max-queue", type=int, default=512)
    ap.add_argument("--max-wait-ms", type=float, default=1000.0)
    ap.add_argument("--sat-users", type=int, default=32)
    ap.add_argument("--factors", default="2,5")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per phase (at most 120)")
    ap.add_argument("--warmup", type=float, default=5.0, help="unmeasured saturating seconds first")
    ap.add_argument("--max-users", type=int, default=1024)
    ap.add_argument("--pin", action="store_true",
                    help="pin the server to the first core and this generator to the second (a one-core server)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="fresh servers, one after another: the report gives every run and their medians, and the "
                         "phases (with samples, plotted) of the run of median accepted share at the highest factor")
    ap.add_argument("--proxy", default="none",
                    help="none, haproxy (every request through HAProxy with "
                         "deploy/kubernetes/components/haproxy/haproxy.cfg), or none,haproxy: both, run after run")
    ap.add_argument("--proxy-maxconn", type=int, default=32, help="/classify requests HAProxy lets into the worker")
    ap.add_argument("--proxy-maxqueue", type=int, default=256, help="requests waiting in HAProxy before it refuses")
    ap.add_argument("--out", default="benchmarks/results/overload.json")
    a = ap.parse_args(argv)
    if not 1 <= a.duration <= 120:
        sys.exit("--duration must be in [1, 120]")
    if not 1 <= a.repeat <= 20:
        sys.exit("--repeat must be in [1, 20]")
    if not a.proxy or not set(a.proxy.split(",")) <= {"none", "haproxy"}:
        sys.exit(f"--proxy must be none, haproxy or none,haproxy, got {a.proxy!r}")
    if "haproxy" in a.proxy.split(",") and shutil.which("haproxy") is None:
        sys.exit("--proxy haproxy needs haproxy on PATH (Debian: apt-get install haproxy)")
    from steerprune.export.manifest import load_manifest

    m = load_manifest(a.bundle)
    data_spec = (m.get("run") or {}).get("data_spec") if isinstance(m.get("run"), dict) else None
    images, labels, source = load_images(a.images, data_spec or "digits", m["classes"])
    routes = {name: r["classes"] for name, r in m["routes"].items()}
    plan = plan_requests(2000, labels, routes, parse_mix(a.mix), seed=0)

    async def encode_all():
        return [await form_body({"hint": p.hint} if p.hint else {}, encode_png(images[p.image])) for p in plan]

    bodies = asyncio.run(encode_all())
    load_before = round(os.getloadavg()[0], 2)
    settings = a.proxy.split(",")
    runs = {name: [] for name in settings}
    for i in range(a.repeat):
        for name in settings:  # alternated, so both settings see the same machine
            print(f"run {i + 1}/{a.repeat}, proxy {name}", flush=True)
            runs[name].append(one_run(a, bodies, name))
    reports = {name: _report(rs, a) for name, rs in runs.items()}
    first = reports[settings[0]]
    report = {"bundle": str(a.bundle), "bundle_id": first["bundle_id"], "images": source, "config": vars(a),
              "machine": f"{os.cpu_count()}-core x86 VM, no GPU", "load_average_before": load_before,
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if len(settings) == 1:
        report.update(first)
    else:
        report["by_proxy"] = reports
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    for name, rep in reports.items():
        png = out.with_suffix(".png") if len(settings) == 1 else out.with_name(f"{out.stem}_{name}.png")
        _plot(rep, png)
        print(f"wrote {png}")
    print(f"wrote {out}")
    return 0


def _report(runs: list[dict], a) -> dict:
    """Every run's summary, their medians, and the phases (with samples) of the run of median accepted share at the
    highest factor."""
    key = f"{max(float(x) for x in a.factors.split(',')):g}x"
    shares = [r["phases"][key]["accepted_share_of_saturation"] for r in runs]
    mid = runs[int(np.argsort(shares)[len(shares) // 2])]
    summaries = [{name: _summary(ph) for name, ph in r["phases"].items()} for r in runs]
    return {"bundle_id": mid["listing"].get("bundle_id"),
            "server": {k: mid["listing"].get(k) for k in ("max_queue", "max_wait_ms", "max_batch_size",
                                                          "expected_ms_per_image", "device")},
            "pinned": mid["pinned"], "proxy": mid["proxy"], "runs": summaries,
            "median_of_runs": {name: {k: float(np.median([sm[name][k] for sm in summaries]))
                                      for k in ("accepted_rps", "accepted_share_of_saturation",
                                                "accepted_share_of_best", "accepted_p99_ms")}
                               for name in mid["phases"]},
            "phases": mid["phases"]}


def one_run(a, bodies, proxy_kind: str = "none") -> dict:
    """A fresh server: saturation with --sat-users closed-loop users, then each factor open-loop."""
    log = Path(tempfile.mkdtemp(prefix="overload-")) / "server.log"
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    pin = a.pin and len(cores) >= 2
    if pin:
        # the server's workers inherit the first core; the generator's own CPU then cannot slow the server down,
        # so the accepted share of saturation is the server's, not this machine's
        os.sched_setaffinity(0, {cores[0]})
    proc = start_server(a.bundle, port=free_port(), timeout=300, log_path=log, threads=a.threads,
                        max_queue=a.max_queue, max_wait_ms=a.max_wait_ms)
    haproxy, proxy, url = None, None, proc.url
    try:
        if pin:
            os.sched_setaffinity(0, {cores[1]})
        if proxy_kind == "haproxy":  # on the generator's core when pinned: as a sidecar, the proxy has its own CPU
            haproxy = start_haproxy(proc.url, free_port(), maxconn=a.proxy_maxconn, maxqueue=a.proxy_maxqueue,
                                    queue_ms=a.max_wait_ms)
            url = haproxy.url
            version = subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout.splitlines()[0]
            proxy = {"haproxy": version, "config": "deploy/kubernetes/components/haproxy/haproxy.cfg",
                     **haproxy.settings}
        run_open_loop(url + "/classify", lambda i: _const(bodies[i % len(bodies)]), 10**6, a.sat_users, a.warmup)
        sat = phase(url, bodies, 10**6, a.sat_users, a.duration, 0.0, None)
        sat_rps = sat["accepted_rps"]
        print(f"saturated: {sat_rps} req/s, p99 {sat['accepted_latency_ms']['p99']} ms", flush=True)
        phases = {"saturated": sat}
        for f in [float(x) for x in a.factors.split(",")]:
            rate = f * sat_rps
            # users: enough that every accepted request's wait (bounded by max_wait_ms) holds a user, x 1.5
            users = int(min(a.max_users, max(64, rate * (a.max_wait_ms / 1000.0 + 0.5) * 1.5)))
            r = phase(url, bodies, int(rate * a.duration * 1.2), users, a.duration, rate, sat_rps)
            phases[f"{f:g}x"] = r
            print(f"{f:g}x: sent {r['send_rate']} req/s of {rate:.0f}, statuses {r['statuses']}, accepted "
                  f"{r['accepted_rps']} req/s ({r['accepted_share_of_saturation']:.0%} of saturation), p99 "
                  f"{r['accepted_latency_ms']['p99']} ms, readyz {r['readyz_after']}", flush=True)
        _, raw = get(url, "/routes")
        listing = json.loads(raw)
    finally:
        if haproxy is not None:
            haproxy.terminate()
            haproxy.wait(10)
        stop_server(proc)
        if pin:
            os.sched_setaffinity(0, set(cores))
    best = max(ph["accepted_rps"] for ph in phases.values())
    for ph in phases.values():  # the saturation phase's closed-loop users retry at once after a 503, so a paced
        ph["accepted_share_of_best"] = round(ph["accepted_rps"] / best, 3) if best else None  # phase can beat it
    phases["saturated"]["accepted_share_of_saturation"] = 1.0
    return {"phases": phases, "listing": listing, "proxy": proxy,
            "pinned": {"server": cores[0], "generator": cores[1]} if pin else None}


def _summary(ph: dict) -> dict:
    return {"send_rate": ph["send_rate"], "statuses": ph["statuses"], "accepted_rps": ph["accepted_rps"],
            "accepted_share_of_saturation": ph.get("accepted_share_of_saturation"),
            "accepted_share_of_best": ph.get("accepted_share_of_best"),
            "accepted_p99_ms": ph["accepted_latency_ms"]["p99"], "answered_or_503": ph["answered_or_503"],
            "readyz_after": ph["readyz_after"]}


async def _const(v):
    return v


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["phases"])
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), sharey=True)
    for ax, name in zip(np.atleast_1d(axes), names):
        s = np.array(report["phases"][name]["samples"], dtype=float).reshape(-1, 3)
        for status, color in ((200, "tab:blue"), (503, "tab:orange"), (0, "tab:red")):
            sel = s[:, 2] == status
            if sel.any():
                ax.scatter(s[sel, 0], s[sel, 1], s=2, c=color, label=f"{int(status)} ({int(sel.sum())})")
        p = report["phases"][name]
        ax.set_title(f"{name}: {p['accepted_rps']} accepted req/s")
        ax.set_xlabel("send time (s)")
        ax.set_yscale("log")
        ax.legend(loc="upper left", fontsize=7, markerscale=4)
    np.atleast_1d(axes)[0].set_ylabel("latency (ms)")
    proxy = report.get("proxy")
    via = f", through HAProxy (maxconn {proxy['STEERPRUNE_PROXY_MAXCONN']})" if proxy else ""
    fig.suptitle(f"overload: max_queue {report['server']['max_queue']}, max_wait_ms {report['server']['max_wait_ms']}"
                 f"{via}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

"""`steerprune serve`, plus `start_server` / `stop_server` / `free_port` / `curl_example` for quickstart, tests and
benchmarks.

Module-level imports stay light (no bentoml, no onnxruntime): the CLI parser imports every stage.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from steerprune.errors import UserError

__all__ = ["register", "acceptance_from_flags", "start_server", "stop_server", "curl_example", "server_env",
           "free_port", "start_haproxy", "HAPROXY_CONFIG", "SERVICE_REF"]

SERVICE_REF = "steerprune.service.service:SteerPrune"
_OWN_HOME = "STEERPRUNE_OWN_BENTOML_HOME"  # set when server_env made BENTOML_HOME: stop_server removes it


def server_env(bundle_dir, base: dict | None = None, **config) -> dict:
    """Environment for a BentoML process serving `bundle_dir` with ServeConfig overrides in `config`."""
    from .config import ENV_PREFIX, ServeConfig

    cfg = ServeConfig(bundle=str(Path(bundle_dir).expanduser().resolve()),
                      **{k: v for k, v in config.items() if k not in ("workers", "access_log", "tracing")})
    env = dict(os.environ if base is None else base)
    env.update(cfg.to_env())
    env.setdefault("BENTOML_DO_NOT_TRACK", "true")
    if not env.get("BENTOML_HOME"):
        # BentoML empties BENTOML_HOME/prometheus_multiproc_dir when a server starts: servers sharing the default
        # ~/bentoml wipe each other's /metrics. A server of ours needs nothing else from BENTOML_HOME.
        env["BENTOML_HOME"] = tempfile.mkdtemp(prefix="steerprune-bentoml-")
        env[_OWN_HOME] = env["BENTOML_HOME"]
    if not config.get("tracing"):
        # BentoML records an OpenTelemetry span per request even when it samples none (its default), and BentoML's
        # timeout timer keeps each request's span alive for 60 s: without the SDK the digits server answered 13%
        # faster and grew 21 MB instead of 91 MB in 30 s at 613 req/s. An explicit OTEL_SDK_DISABLED wins.
        env.setdefault("OTEL_SDK_DISABLED", "true")
    if config.get("workers"):
        env[ENV_PREFIX + "WORKERS"] = str(int(config["workers"]))
    if config.get("access_log"):
        env[ENV_PREFIX + "ACCESS_LOG"] = "1"
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for tests and benchmarks that start servers)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _check_bundle(bundle_dir) -> Path:
    from steerprune.export.manifest import load_manifest

    bundle = Path(bundle_dir).expanduser()
    load_manifest(bundle)  # quick schema check here; the worker re-verifies sha256 and parity
    return bundle


def start_server(bundle_dir, host: str = "127.0.0.1", port: int = 3000, timeout: float = 120.0,
                 log_path=None, env: dict | None = None, **config) -> subprocess.Popen:
    """Start `bentoml serve` for a bundle and wait until /readyz answers 200.

    `config` holds ServeConfig fields (device, hint_mode, min_prob, unknown_hint, batcher, threads, ...) plus
    `workers`, `access_log` and `tracing`. The server's output goes to `log_path` (a temp file by default;
    `proc.log_path`).
    If the server is not ready within `timeout` seconds or exits, it is killed and UserError says why (a failing
    service __init__ makes BentoML respawn the worker forever, so waiting without a limit would hang).
    """
    _check_bundle(bundle_dir)
    penv = server_env(bundle_dir, base=env, **config)
    if log_path is None:
        fd, log_path = tempfile.mkstemp(prefix="steerprune-serve-", suffix=".log")
        os.close(fd)
    log_path = Path(log_path)
    cmd = [sys.executable, "-m", "bentoml", "serve", SERVICE_REF, "--host", host, "--port", str(port)]
    with open(log_path, "ab") as logf:
        # own process group: stop_server ends BentoML's workers with it
        proc = subprocess.Popen(cmd, env=penv, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log_path = log_path  # type: ignore[attr-defined]
    proc.bentoml_home = penv.get(_OWN_HOME)  # type: ignore[attr-defined]
    proc.url = f"http://{_url_host(host)}:{port}"  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            stop_server(proc)  # removes the BENTOML_HOME made for it
            raise UserError(f"the server exited with code {proc.returncode}; last log lines:\n{_tail(log_path)}")
        if _get_status(proc.url + "/readyz") == 200:
            return proc
        time.sleep(0.25)
    stop_server(proc)
    raise UserError(f"the server was not ready after {timeout:.0f} s (killed); last log lines:\n{_tail(log_path)}")


# deploy/kubernetes/components/haproxy/haproxy.cfg of a source checkout (the package is installed editable from it)
HAPROXY_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes" / "components" / "haproxy" / \
    "haproxy.cfg"


def start_haproxy(upstream_url: str, port: int, maxconn: int = 32, maxqueue: int = 256, queue_ms: int = 1000,
                  config=HAPROXY_CONFIG, timeout: float = 10.0) -> subprocess.Popen:
    """HAProxy (on PATH) in the foreground in front of a server, with `config` and its STEERPRUNE_PROXY_* settings;
    returns once it accepts connections on 127.0.0.1:`port`. `proc.url` is its address, `proc.settings` the
    environment it was given. Stop it with `proc.terminate()`."""
    exe = shutil.which("haproxy")
    if exe is None:
        raise UserError("haproxy is not on PATH (Debian: apt-get install haproxy)")
    settings = {"STEERPRUNE_PROXY_BIND": f"127.0.0.1:{port}", "STEERPRUNE_UPSTREAM": upstream_url.split("//", 1)[-1],
                "STEERPRUNE_PROXY_MAXCONN": str(maxconn), "STEERPRUNE_PROXY_MAXQUEUE": str(maxqueue),
                "STEERPRUNE_PROXY_QUEUE_MS": str(int(queue_ms))}
    err_log = tempfile.TemporaryFile()  # a file, not a pipe: nobody reads it while HAProxy runs
    proc = subprocess.Popen([exe, "-db", "-f", str(config)], env={**os.environ, **settings},
                            stdout=subprocess.DEVNULL, stderr=err_log)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            if proc.poll() is not None:
                err_log.seek(0)
                err = err_log.read().decode(errors="replace").strip().splitlines()
                raise UserError(f"haproxy exited with {proc.returncode}: {err[-1] if err else 'no output'}") from None
            if time.monotonic() > deadline:
                proc.kill()
                raise UserError(f"haproxy did not listen on 127.0.0.1:{port} within {timeout:g} s") from None
            time.sleep(0.05)
    proc.url, proc.settings = f"http://127.0.0.1:{port}", settings
    return proc


def stop_server(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM the server's process group, SIGKILL it if it lingers; remove the BENTOML_HOME server_env made."""
    try:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
    except ProcessLookupError:
        pass
    home = getattr(proc, "bentoml_home", None)
    if home:
        shutil.rmtree(home, ignore_errors=True)


def curl_example(bundle_dir, host: str = "127.0.0.1", port: int = 3000) -> str:
    """A ready-to-paste curl call for this bundle: the first hint, and a sample image path to fill in."""
    from steerprune.export.manifest import load_manifest

    m = load_manifest(bundle_dir)
    hint = next(iter(m["routes"]), None)
    url = f"http://{_url_host(host)}:{port}/classify"
    parts = ["curl", "-s", "-F", "image=@IMAGE.png"]
    if hint is not None:
        parts += ["-F", shlex.quote(f"hint={hint}")]
    parts += ["-F", "top_k=3", url]
    return " ".join(parts)


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _get_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, ValueError):
        return None


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------------------------------------- CLI

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a bundle over HTTP with BentoML (POST /classify, GET /routes)",
                       description="Serve an exported bundle with BentoML: POST /classify (multipart image, hint, "
                                   "top_k), GET /routes, /livez, /readyz, /metrics.")
    p.add_argument("bundle", help="bundle directory written by `steerprune export`")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=3000)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="cuda: fail readiness unless ONNX Runtime really runs on CUDA (default: auto)")
    p.add_argument("--hint-mode", choices=["verify", "trust"], default="verify")
    p.add_argument("--acceptance", choices=["route", "global"], default=None,
                   help="verify mode: route = each route's acceptance rule chosen at export on validation (default); "
                        "global = one rule for every route, top-1 in the hint and top-1 probability >= --min-prob")
    p.add_argument("--min-prob", type=float, default=None,
                   help="verify mode, global rule: fall back below this top-1 probability (default 0.7); giving it "
                        "selects --acceptance global unless --acceptance says otherwise")
    p.add_argument("--unknown-hint", choices=["error", "full"], default="error")
    p.add_argument("--batcher", choices=["greedy", "bentoml"], default="greedy")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    p.add_argument("--shared-arena", action=argparse.BooleanOptionalAction, default=True,
                   help="all ONNX Runtime sessions allocate from one CPU arena (default on; see docs/serving.md)")
    p.add_argument("--share-weights", action=argparse.BooleanOptionalAction, default=False,
                   help="hold each distinct weight of the bundle's models once for all sessions, prepacking off "
                        "(less memory with many routes, slower runs; needs onnx; see docs/serving.md)")
    p.add_argument("--request-timeout", type=float, default=60.0, help="seconds before an unanswered request gets 504")
    p.add_argument("--concurrency", type=int, default=8,
                   help="BentoML's traffic.concurrency: concurrent requests a worker is sized for (BentoCloud's "
                        "autoscaling target; see docs/deployment.md)")
    p.add_argument("--max-queue", type=int, default=512,
                   help="greedy batcher: most queued requests; more get 503 + Retry-After (see docs/overload.md)")
    p.add_argument("--max-wait-ms", type=float, default=1000.0,
                   help="greedy batcher: longest wait for a batch to start; a request expected to wait longer gets "
                        "503 + Retry-After on arrival, one that did is answered 503 unrun (see docs/overload.md)")
    p.add_argument("--gc-gen2-threshold", type=int, default=1000,
                   help="with --gc-young-ms 0: Python's third GC threshold in the worker (Python's default 10; "
                        "see docs/serving.md)")
    p.add_argument("--gc-young-ms", type=float, default=20.0,
                   help="collect Python's young generations on this clock in the worker, CPython's automatic "
                        "collection off (0: CPython's own; see docs/serving.md)")
    p.add_argument("--gc-full-s", type=float, default=600.0,
                   help="full garbage collections on this clock while --gc-young-ms runs")
    p.add_argument("--pad-batches", choices=["auto", "on", "off"], default="auto",
                   help="pad model runs to warmed batch sizes (default auto: on with CUDA, off on the CPU)")
    p.add_argument("--io-binding", choices=["auto", "on", "off"], default="auto",
                   help="bind per-size input/output buffers on the device once (default auto: on with CUDA, off on "
                        "the CPU; see docs/gpu.md)")
    p.add_argument("--cuda-graph", choices=["auto", "on", "off"], default="auto",
                   help="with I/O binding on CUDA, capture one CUDA graph per model and batch size during warm-up "
                        "and replay it (default auto: on with CUDA and I/O binding; see docs/gpu.md)")
    p.add_argument("--warmup", choices=["auto", "all", "light"], default="auto",
                   help="all: every model at every warmed batch size; light: the full model at every size, route "
                        "models at batch 1 (default auto: all with CUDA, light on the CPU; see docs/serving.md)")
    p.add_argument("--inline-ms", type=float, default=1.0,
                   help="run batches expected to take at most this many ms (warm-up timings) on the event loop "
                        "instead of a thread (0: always a thread; see docs/serving.md)")
    p.add_argument("--batch-plan", choices=["cost", "route"], default="cost",
                   help="cost: hinted requests run on their route's model only when, in that batch, it is cheaper "
                        "than adding them to the full model's run (warm-up timings); route: always (see "
                        "docs/cost.md)")
    p.add_argument("--run-overhead-ms", type=float, default=0.0,
                   help="--batch-plan cost: ms added to every model run the plan weighs (default 0; docs/cost.md)")
    p.add_argument("--shared-model", action=argparse.BooleanOptionalAction, default=True,
                   help="--batch-plan cost: also answer scattered hints on the bundle's shared model when it has one "
                        "(export --shared; default on)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--access-log", action="store_true")
    p.add_argument("--tracing", action="store_true",
                   help="keep OpenTelemetry on (for BentoML's tracing exporters); off by default: it costs per request")
    p.add_argument("--startup-timeout", type=float, default=180.0)
    p.set_defaults(func=_serve)


def acceptance_from_flags(acceptance: str | None, min_prob: float | None) -> tuple[str, float]:
    """`serve`'s --acceptance/--min-prob as ServeConfig fields: a --min-prob of its own asks for the global rule."""
    from .config import ServeConfig

    default = ServeConfig.__dataclass_fields__["min_prob"].default
    return acceptance or ("global" if min_prob is not None else "route"), default if min_prob is None else min_prob


def _serve(args) -> int:
    bundle = _check_bundle(args.bundle)
    acceptance, min_prob = acceptance_from_flags(args.acceptance, args.min_prob)
    config = dict(device=args.device, hint_mode=args.hint_mode, acceptance=acceptance, min_prob=min_prob,
                  unknown_hint=args.unknown_hint, batcher=args.batcher, max_batch_size=args.max_batch_size,
                  threads=args.threads, workers=args.workers, access_log=args.access_log, tracing=args.tracing,
                  pad_batches=args.pad_batches, io_binding=args.io_binding, cuda_graph=args.cuda_graph,
                  request_timeout_s=args.request_timeout,
                  gc_gen2_threshold=args.gc_gen2_threshold, gc_young_ms=args.gc_young_ms,
                  gc_full_s=args.gc_full_s, inline_ms=args.inline_ms, max_queue=args.max_queue,
                  max_wait_ms=args.max_wait_ms, concurrency=args.concurrency,
                  shared_arena=args.shared_arena, share_weights=args.share_weights, warmup=args.warmup,
                  batch_plan=args.batch_plan, shared_model=args.shared_model, run_overhead_ms=args.run_overhead_ms)
    env = server_env(bundle, **config)
    cmd = [sys.executable, "-m", "bentoml", "serve", SERVICE_REF, "--host", args.host, "--port", str(args.port)]
    print(f"serving {bundle} on http://{_url_host(args.host)}:{args.port} (POST /classify, GET /routes, /readyz, "
          f"/metrics)", flush=True)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    proc.bentoml_home = env.get(_OWN_HOME)  # type: ignore[attr-defined]
    url = f"http://{_url_host(args.host)}:{args.port}/readyz"

    def on_term(*_):  # `docker stop` sends SIGTERM to PID 1: stop BentoML's process group with us
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        deadline = time.monotonic() + args.startup_timeout
        while proc.poll() is None and _get_status(url) != 200:
            if time.monotonic() > deadline:
                stop_server(proc)
                raise UserError(f"not ready after {args.startup_timeout:.0f} s (see the log above); stopped")
            time.sleep(0.25)
        if proc.poll() is None:
            print(f"ready: {curl_example(bundle, args.host, args.port)}", flush=True)
        proc.wait()
        return proc.returncode
    except KeyboardInterrupt:
        return 130
    finally:
        stop_server(proc)


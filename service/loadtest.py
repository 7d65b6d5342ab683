"""`steerprune loadtest`: a bounded, local-only load test with right, wrong and missing hints.

Clients with keep-alive connections, all on one asyncio event loop, send real test images (PNG-encoded once, up
front) to POST /classify until the duration or the request budget runs out; with `rate` they pace themselves,
spread evenly over the interval (half of saturation is how p99/p50 is judged). One loop rather than a thread per
client: with 16 client threads the generator's own GIL hand-offs showed up as server latency (p99/p50 17 where a
single client measured 1.6 at the same rate). The report holds throughput, latency percentiles overall / per route / per
hint kind, errors, fallback rate, accuracy against the true labels, the server's CPU time per request (psutil on
the server's process tree) and, with a bundle, the same models' in-process ONNX Runtime speed and the offline
answers for the same requests (every server answer must equal them).
"""
from __future__ import annotations

import asyncio
import gc
import http.client
import io
import json
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Optional
from urllib.parse import urlparse

import numpy as np

from steerprune.errors import UserError

__all__ = ["LoadTestConfig", "Planned", "Sample", "run_loadtest", "load_images", "encode_png", "multipart_body",
           "plan_requests", "parse_mix", "route_accuracy_check", "LOCAL_HOSTS", "server_cpu_seconds", "server_rss_mb",
           "find_server_pid", "scrape_histograms", "histogram_delta"]

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
KINDS = ("right", "wrong", "none")


@dataclass
class LoadTestConfig:
    """A bounded load test of one local server."""

    url: str
    """Server base URL; the host must be 127.0.0.1, localhost or ::1."""
    users: int = 8
    """Concurrent client threads (1-64)."""
    duration: float = 20.0
    """Seconds of load (at most 600)."""
    max_requests: int = 50_000
    """Stop after this many requests even if time is left."""
    mix: str = "right=0.6,wrong=0.2,none=0.2"
    """Share of requests with the right hint, a wrong hint, and no hint."""
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
    sweep: bool = False
    """Send every test image exactly once (shuffled; bounded by duration and max_requests) instead of drawing images
    with replacement: the accuracy check against the manifest then sees the same images the export measured."""
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
        parse_mix(self.mix)


def parse_mix(mix: str) -> dict[str, float]:
    """'right=0.6,wrong=0.2,none=0.2' -> normalised shares."""
    out = {k: 0.0 for k in KINDS}
    try:
        for part in filter(None, (p.strip() for p in mix.split(","))):
            k, v = part.split("=")
            if k.strip() not in KINDS:
                raise ValueError(k)
            out[k.strip()] = float(v)
    except ValueError:
        raise UserError(f"mix must look like right=0.6,wrong=0.2,none=0.2 (kinds: {', '.join(KINDS)}), got {mix!r}") from None
    total = sum(out.values())
    if total <= 0 or min(out.values()) < 0:
        raise UserError(f"mix shares must be >= 0 and not all zero, got {mix!r}")
    return {k: v / total for k, v in out.items()}


# ---------------------------------------------------------------------------------------------- inputs

def load_images(spec: Optional[str], data_spec: Optional[str], classes: list[str]) -> tuple[np.ndarray, np.ndarray, str]:
    """(uint8 images (N, H, W, C), labels, source description)."""
    if spec:
        p = Path(spec).expanduser()
        if p.is_file() and p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                if "images" not in z.files or "labels" not in z.files:
                    raise UserError(f"{p} must hold 'images' (uint8 N,H,W,C) and 'labels'")
                images, labels = z["images"], z["labels"].astype(np.int64)
            if images.dtype != np.uint8 or images.ndim not in (3, 4):
                raise UserError(f"{p}: images must be uint8 (N, H, W[, C]), got {images.dtype} {images.shape}")
            return (images[..., None] if images.ndim == 3 else images), labels, str(p)
        if p.is_dir():
            return (*_read_folder(p, classes), str(p))
        raise UserError(f"--images {spec}: expected an .npz file or a folder of class folders")
    if data_spec == "digits":
        try:
            from steerprune.training.data import load_data
            test = load_data("digits").test
        except ModuleNotFoundError as e:
            raise UserError(f"the digits test split needs {e.name} (pip install scikit-learn), or pass --images") from None
        return test.images, test.labels, "digits test split"
    raise UserError("pass --images (an .npz with images/labels or a folder of class folders): the bundle was not "
                    f"trained on digits (data spec {data_spec!r})")


def _read_folder(root: Path, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    images, labels = [], []
    for label, name in enumerate(classes):
        d = root / name
        for f in sorted(d.iterdir()) if d.is_dir() else []:
            if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
                with Image.open(f) as im:
                    images.append(np.asarray(im.convert("RGB")))
                    labels.append(label)
    if not images:
        raise UserError(f"{root} has no images in folders named after the classes ({', '.join(classes[:5])}, ...)")
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise UserError(f"{root}: images differ in size {sorted(shapes)[:3]}; use an .npz of equal-size images")
    return np.stack(images), np.asarray(labels, np.int64)


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def multipart_body(fields: dict[str, str], image: bytes) -> tuple[bytes, str]:
    """(body, content-type) of a multipart form with an 'image' file and text fields."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="image.png"\r\n'
             f"Content-Type: image/png\r\n\r\n".encode() + image + b"\r\n"]
    for k, v in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class Planned(NamedTuple):
    image: int  # index into the test images
    kind: str  # right | wrong | none
    hint: Optional[str]


def plan_requests(n: int, labels: np.ndarray, routes: dict[str, list[int]], mix: dict[str, float],
                  seed: int, sweep: bool = False) -> list[Planned]:
    """A seeded request stream: images drawn uniformly (or, with sweep, each image once in a shuffled order, at most
    n), hints by `mix` (a 'right' hint is a route holding the label)."""
    rng = np.random.default_rng(seed)
    if sweep:
        n = min(n, len(labels))
    names = sorted(routes)
    holds = {c: [r for r in names if c in routes[r]] for c in set(labels.tolist())}
    lacks = {c: [r for r in names if c not in routes[r]] for c in set(labels.tolist())}
    kinds = rng.choice(len(KINDS), size=n, p=[mix[k] for k in KINDS])
    idx = rng.permutation(len(labels))[:n] if sweep else rng.integers(0, len(labels), size=n)
    plan = []
    for i, k in zip(idx, kinds):
        kind, c = KINDS[k], int(labels[i])
        pool = holds[c] if kind == "right" else lacks[c] if kind == "wrong" else []
        if kind != "none" and not pool:
            kind = "none"  # no route holds (or lacks) this class: send it unhinted
        plan.append(Planned(int(i), kind, pool[rng.integers(len(pool))] if pool else None))
    return plan


# ---------------------------------------------------------------------------------------------- server CPU

def find_server_pid(port: int) -> Optional[int]:
    """The top-most process listening on `port` (BentoML's arbiter; its workers are its descendants)."""
    import psutil

    try:
        pids = {c.pid for c in psutil.net_connections(kind="tcp")
                if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid}
    except (psutil.AccessDenied, PermissionError):
        return None
    for pid in sorted(pids):
        try:
            parents = {p.pid for p in psutil.Process(pid).parents()}
        except psutil.NoSuchProcess:
            continue
        if not parents & pids:
            return pid
    return None


def _tree_sum(pid: int, measure: Callable) -> float:
    """Sum of `measure(process)` over a process and all its descendants (ones that exit meanwhile count 0)."""
    import psutil

    total = 0.0
    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            total += measure(p)
        except psutil.NoSuchProcess:
            pass
    return total


def server_rss_mb(pid: int) -> float:
    """Resident memory (MiB) of a process and all its descendants."""
    return _tree_sum(pid, lambda p: p.memory_info().rss) / 2**20


def server_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants (children that exited are not counted)."""
    return _tree_sum(pid, lambda p: sum(p.cpu_times()[:2]))


# ---------------------------------------------------------------------------------------------- the run

class Sample(NamedTuple):
    t: float  # seconds since start when the request was sent
    latency: float  # seconds
    status: int  # HTTP status, 0 for a connection error
    planned: int  # index into the plan
    answer: Optional[dict]


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """One HTTP/1.1 response -> (status, body, server wants the connection closed)."""
    line = await reader.readline()
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
        raise ValueError(f"not an HTTP response: {line[:60]!r}")
    status, length, chunked, close = int(parts[1]), 0, False, False
    while True:
        h = await reader.readline()
        if h in (b"\r\n", b"\n", b""):
            break
        k, _, v = h.partition(b":")
        k, v = k.strip().lower(), v.strip().lower()
        if k == b"content-length":
            length = int(v)
        elif k == b"transfer-encoding":
            chunked = b"chunked" in v
        elif k == b"connection":
            close = v == b"close"
    if not chunked:
        return status, await reader.readexactly(length), close
    chunks = []
    while True:
        n = int((await reader.readline()).split(b";")[0], 16)
        if n == 0:
            await reader.readline()
            return status, b"".join(chunks), close
        chunks.append(await reader.readexactly(n))
        await reader.readline()


async def _user(host: str, port: int, bodies, plan, next_index, deadline, interval, phase, t0, out: list):
    """One keep-alive client; paced ones send every `interval` seconds starting `phase` after t0."""
    reader = writer = None
    next_send = t0 + phase  # paced users are spread over one interval, not released together in bursts
    try:
        while True:
            i = next_index()
            if i is None or time.perf_counter() >= deadline:
                break
            if interval:
                delay = next_send - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                next_send += interval
            body, ctype = bodies(plan[i])
            head = (f"POST /classify HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n").encode()
            ts = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 30)
                writer.write(head + body)
                status, data, close = await asyncio.wait_for(_read_response(reader), 30)
                answer = json.loads(data) if status == 200 else {"error": data[:300].decode(errors="replace")}
                if close:
                    writer.close()
                    reader = writer = None
            except (OSError, EOFError, asyncio.TimeoutError, ValueError) as e:  # IncompleteReadError is an EOFError
                if writer is not None:
                    writer.close()
                reader = writer = None
                status, answer = 0, {"error": f"{type(e).__name__}: {e}"}
            out.append(Sample(ts - t0, time.perf_counter() - ts, status, i, answer))
    finally:
        if writer is not None:
            writer.close()


async def _drive(cfg: "LoadTestConfig", host: str, port: int, bodies, plan, next_index, t0: float, out: list):
    deadline = t0 + cfg.duration
    interval = cfg.users / cfg.rate if cfg.rate else 0.0
    await asyncio.gather(*(_user(host, port, bodies, plan, next_index, deadline, interval, u * interval / cfg.users,
                                 t0, out) for u in range(cfg.users)))


def _percentiles(lat_s: list[float]) -> dict:
    if not lat_s:
        return {"n": 0}
    a = np.asarray(lat_s) * 1000.0
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {"n": int(a.size), "p50_ms": round(float(p50), 3), "p95_ms": round(float(p95), 3),
            "p99_ms": round(float(p99), 3), "mean_ms": round(float(a.mean()), 3), "max_ms": round(float(a.max()), 3),
            "p99_over_p50": round(float(p99 / p50), 2) if p50 > 0 else None}


def _get(host: str, port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    except OSError as e:
        raise UserError(f"cannot reach the server at {host}:{port}: {e}") from None
    finally:
        conn.close()


def _get_json(host: str, port: int, path: str) -> tuple[int, dict]:
    status, body = _get(host, port, path)
    return status, (json.loads(body) if status == 200 and path != "/readyz" else {})


# The server's own histograms (service.py): time inside the /classify handler, images per batch, and GC pauses.
SERVER_HISTOGRAMS = {"handler_ms": ("steerprune_request_duration_seconds", 1000.0),
                     "batch_size": ("steerprune_batch_size", 1.0),
                     "gc_pause_ms": ("steerprune_gc_pause_seconds", 1000.0)}


def scrape_histograms(host: str, port: int) -> dict[str, dict]:
    """/metrics -> {histogram: {"buckets": {upper bound: cumulative count}, "sum", "count"}}, summed over labels.
    Empty when the server does not answer (the load test still reports what the clients measured)."""
    out = {name: {"buckets": {}, "sum": 0.0, "count": 0.0} for name, _ in SERVER_HISTOGRAMS.values()}
    try:
        status, body = _get(host, port, "/metrics")
    except UserError:
        return out
    if status != 200:
        return out
    for line in body.decode(errors="replace").splitlines():
        if line.startswith("#") or " " not in line:
            continue
        series, value = line.rsplit(" ", 1)
        name, _, labels = series.partition("{")
        for hist in out:
            if name == hist + "_bucket":
                le = labels.split('le="', 1)[1].split('"', 1)[0]
                bound = float("inf") if le == "+Inf" else float(le)
                out[hist]["buckets"][bound] = out[hist]["buckets"].get(bound, 0.0) + float(value)
            elif name in (hist + "_sum", hist + "_count"):
                out[hist][name[len(hist) + 1:]] += float(value)
    return out


def histogram_delta(before: dict, after: dict, scale: float) -> dict:
    """What a histogram gained between two scrapes: count, mean, and the share of observations above each bound
    (bounds scaled, e.g. seconds -> ms). Buckets give bounds, not exact percentiles."""
    count = after["count"] - before["count"]
    if count <= 0:
        return {"count": 0}
    above = {}
    for bound in sorted(after["buckets"]):
        if bound != float("inf"):
            below = after["buckets"][bound] - before["buckets"].get(bound, 0.0)
            above[f"{bound * scale:g}"] = round(1.0 - below / count, 5)
    total = (after["sum"] - before["sum"]) * scale
    return {"count": int(count), "sum": round(total, 4), "mean": round(total / count, 4), "share_above": above}


def inprocess_baseline(bundle: str, x: np.ndarray, plan: list[Planned], routes: dict, threads: int = 0,
                       seconds: float = 1.5, hint_mode: str = "verify", min_prob: float = 0.7) -> dict:
    """Offline answers for the plan (what the server must return, in its hint mode) and each model's ONNX Runtime
    ms per image."""
    from .config import ServeConfig
    from .engine import FULL, Engine

    eng = Engine(ServeConfig(bundle=bundle, verify=False, threads=threads, hint_mode=hint_mode, min_prob=min_prob))
    per_model = {}
    for model in eng.sessions:
        row = {}
        for b in (1, 32):
            xb = x[:b] if len(x) >= b else np.repeat(x[:1], b, 0)
            eng.logits(model, xb)
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds / 2:
                eng.logits(model, xb)
                n += 1
            row[f"ms_per_image_b{b}"] = round((time.perf_counter() - t0) / (n * b) * 1000, 4)
        row["routes"] = sorted(r for r, v in eng.routes.items() if v.model == model)
        per_model[model] = row
    route_names = [p.hint if p.hint in eng.routes else FULL for p in plan]
    xs = x[[p.image for p in plan]]
    answers = []
    for s in range(0, len(plan), 256):
        answers += eng.run(xs[s:s + 256], route_names[s:s + 256])
    full_pred = eng.logits(eng.full_model, x).argmax(1)
    return {"models": per_model, "answers": answers, "full_pred": full_pred, "threads": threads or "ort default"}


def run_loadtest(cfg: LoadTestConfig, log: Callable = print) -> dict:
    from .preprocess import InputSpec, decode_image

    u = urlparse(cfg.url)
    host, port = u.hostname, u.port or 80
    status, _ = _get_json(host, port, "/readyz")
    if status != 200:
        raise UserError(f"{cfg.url}/readyz answered {status}: the server is not ready")
    _, listing = _get_json(host, port, "/routes")
    classes = listing["classes"]
    routes = {n: r["class_indices"] for n, r in listing["routes"].items()}
    images, labels, source = load_images(cfg.images, listing.get("data_spec"), classes)
    mix = parse_mix(cfg.mix)
    plan = plan_requests(cfg.max_requests, labels, routes, mix, cfg.seed, cfg.sweep)
    pngs = [encode_png(im) for im in images]
    cache: dict = {}

    def bodies(p: Planned):
        key = (p.image, p.hint)
        if key not in cache:
            cache[key] = multipart_body({"hint": p.hint} if p.hint else {}, pngs[p.image])
        return cache[key]

    counter = iter(range(len(plan)))

    def next_index():  # one event loop thread: no lock needed
        return next(counter, None)

    pid = cfg.server_pid or find_server_pid(port)
    log(f"load test: {cfg.users} users, {cfg.duration:g} s, mix {cfg.mix}, {len(images)} images ({source}), "
        f"server pid {pid or 'unknown'}{f', paced at {cfg.rate:g} req/s' if cfg.rate else ''}")
    idle_cpu_per_s = None
    if pid:  # BentoML's arbiter and watchers use CPU even when idle: measure it to report it apart
        c0, w0 = server_cpu_seconds(pid), time.perf_counter()
        time.sleep(2.0)
        idle_cpu_per_s = (server_cpu_seconds(pid) - c0) / (time.perf_counter() - w0)
    cpu0 = server_cpu_seconds(pid) if pid else None
    rss0 = server_rss_mb(pid) if pid else None
    hist0 = scrape_histograms(host, port)
    samples: list[Sample] = []
    gc.collect()
    gc.freeze()  # the generator's own full collections would otherwise show up as server latency
    t0 = time.perf_counter()
    try:
        asyncio.run(_drive(cfg, host, port, bodies, plan, next_index, t0, samples))
    except KeyboardInterrupt:
        pass  # report what was measured so far
    wall = time.perf_counter() - t0
    cpu1 = server_cpu_seconds(pid) if pid else None
    rss1 = server_rss_mb(pid) if pid else None
    hist1 = scrape_histograms(host, port)
    gc.unfreeze()

    ok = [s for s in samples if s.status == 200]
    errors = [s for s in samples if s.status != 200]
    report: dict = {
        "config": asdict(cfg), "source": source, "device": listing.get("device"), "batcher": listing.get("batcher"),
        "hint_mode": listing.get("hint_mode"), "wall_s": round(wall, 3), "requests": len(samples), "ok": len(ok),
        "errors": len(errors), "error_statuses": _count(s.status for s in errors),
        "error_examples": [s.answer for s in errors[:5]],
        "throughput_rps": round(len(ok) / wall, 2) if wall else None,
        "latency": _percentiles([s.latency for s in ok]),
        "latency_by_route": {r: _percentiles([s.latency for s in ok if s.answer["route"] == r])
                             for r in sorted({s.answer["route"] for s in ok})},
        "latency_by_kind": {k: _percentiles([s.latency for s in ok if plan[s.planned].kind == k]) for k in KINDS},
        # the server's view of the same run: handler time (a tail the clients see but the handler does not lies
        # outside it: event loop, HTTP stack, GC) and how many images each model run got
        "server_side": {key: histogram_delta(hist0[name], hist1[name], scale)
                        for key, (name, scale) in SERVER_HISTOGRAMS.items()},
    }
    if ok:
        n_fb = sum(s.answer["fallback"] for s in ok)
        report["fallback_rate"] = round(n_fb / len(ok), 4)
        report["fallback_rate_by_kind"] = {k: _rate([s.answer["fallback"] for s in ok if plan[s.planned].kind == k])
                                           for k in KINDS}
        correct = [s.answer["index"] == int(labels[plan[s.planned].image]) for s in ok]
        report["accuracy"] = round(float(np.mean(correct)), 4)
        report["accuracy_by_kind"] = {k: _rate([c for s, c in zip(ok, correct) if plan[s.planned].kind == k])
                                      for k in KINDS}
        report["right_hint_vs_manifest"] = route_accuracy_check(ok, correct, plan, listing["routes"])
    if cpu0 is not None and ok:
        report["server_cpu_s"] = round(cpu1 - cpu0, 3)
        report["server_cpu_ms_per_request"] = round((cpu1 - cpu0) / len(samples) * 1000, 3)
        report["server_idle_cpu_ms_per_s"] = round(idle_cpu_per_s * 1000, 2)
        report["server_cpu_ms_per_request_net_of_idle"] = round(
            (cpu1 - cpu0 - idle_cpu_per_s * wall) / len(samples) * 1000, 3)
        # growth under load is request state still held (BentoML keeps each request's context for its timeout)
        report["server_rss_mb"] = {"start": round(rss0, 1), "end": round(rss1, 1)}
    if cfg.bundle:
        spec = InputSpec.from_manifest(_manifest_input(cfg.bundle))
        x = np.stack([decode_image(p, spec, 1 << 30) for p in pngs])  # the server's decode of the same bytes
        used = max((s.planned for s in samples), default=-1) + 1
        base = inprocess_baseline(cfg.bundle, x, plan[:used], routes, threads=cfg.inprocess_threads,
                                  hint_mode=listing.get("hint_mode", "verify"), min_prob=listing.get("min_prob", 0.7))
        full_correct = [int(base["full_pred"][plan[s.planned].image]) == int(labels[plan[s.planned].image]) for s in ok]
        mism = [s.planned for s in ok if s.answer["index"] != int(base["answers"][s.planned].probs.argmax())
                or s.answer["fallback"] != base["answers"][s.planned].fallback]
        report["inprocess"] = {"models": base["models"], "threads": base["threads"],
                               "full_model_accuracy_same_requests": round(float(np.mean(full_correct)), 4) if ok else None,
                               "full_model_accuracy_all_images": round(float(np.mean(base["full_pred"] == labels)), 4),
                               "answers_differing_from_offline": len(mism)}
        if ok:
            report["accuracy_minus_full_points"] = round((report["accuracy"] - np.mean(full_correct)) * 100, 2)
            # the same answers computed in-process, each model at its faster batch size (1 or 32: on 2 threads a
            # DeiT-S runs faster per image at batch 1): each request's model, plus the full model on fallback
            ms = {m.split("/")[-1]: min(v["ms_per_image_b1"], v["ms_per_image_b32"]) for m, v in base["models"].items()}
            full_ms = ms[Path(listing["full"]["model"]).name]
            routed_ms = {r: ms[Path(v["model"]).name] for r, v in listing["routes"].items()}
            busy_ms = sum(routed_ms.get(s.answer["route"], full_ms) + (full_ms if s.answer["fallback"] else 0.0)
                          for s in ok)
            inproc_rps = len(ok) / (busy_ms / 1000) if busy_ms else None
            report["inprocess"]["throughput_rps_same_requests"] = round(inproc_rps, 1) if inproc_rps else None
            report["server_share_of_inprocess_throughput"] = (round(report["throughput_rps"] / inproc_rps, 3)
                                                              if inproc_rps else None)
    if cfg.out:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=_jsonable))
        report["plot"] = str(_plot(samples, plan, out.with_suffix(".png"), report))
        out.write_text(json.dumps(report, indent=2, default=_jsonable))
    log(_summary(report))
    return report


def route_accuracy_check(ok: list["Sample"], correct: list[bool], plan: list[Planned], listed: dict) -> Optional[dict]:
    """Served accuracy of right-hint requests per route beside the manifest's route accuracy (the steering report's
    test figure): with every test image sent once (sweep) and trust mode they should agree to rounding.
    The difference is weighted by each route's served requests."""
    per: dict = {}
    for s, c in zip(ok, correct):
        p = plan[s.planned]
        if p.kind == "right":
            per.setdefault(p.hint, []).append(c)
    rows = {r: {"n": len(cs), "served_acc": round(float(np.mean(cs)), 4), "manifest_acc": listed[r].get("acc")}
            for r, cs in sorted(per.items()) if r in listed}
    known = {r: v for r, v in rows.items() if v["manifest_acc"] is not None}
    if not known:
        return None
    n = sum(v["n"] for v in known.values())
    served = sum(v["served_acc"] * v["n"] for v in known.values()) / n
    manifest = sum(v["manifest_acc"] * v["n"] for v in known.values()) / n
    return {"requests": n, "served_acc": round(served, 4), "manifest_acc": round(manifest, 4),
            "difference_points": round(100 * (served - manifest), 2), "by_route": rows}


def _manifest_input(bundle: str) -> dict:
    from steerprune.export.manifest import load_manifest

    return load_manifest(bundle)["input"]


def _count(values) -> dict:
    out: dict = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return out


def _rate(flags: list) -> Optional[float]:
    return round(float(np.mean(flags)), 4) if flags else None


def _jsonable(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    return str(o)


def _summary(r: dict) -> str:
    lat = r["latency"]
    lines = [f"{r['requests']} requests in {r['wall_s']:.1f} s: {r['throughput_rps']} req/s, {r['errors']} errors",
             f"latency p50 {lat.get('p50_ms')} ms, p95 {lat.get('p95_ms')} ms, p99 {lat.get('p99_ms')} ms"]
    if "accuracy" in r:
        lines.append(f"accuracy {r['accuracy']:.4f} (by hint kind {r['accuracy_by_kind']}), fallback rate "
                     f"{r['fallback_rate']:.3f}")
    if r.get("right_hint_vs_manifest"):
        c = r["right_hint_vs_manifest"]
        lines.append(f"right hints: served accuracy {c['served_acc']:.4f} vs manifest route accuracy "
                     f"{c['manifest_acc']:.4f} ({c['difference_points']:+.2f} points, {c['requests']} requests)")
    if "server_cpu_ms_per_request" in r:
        lines.append(f"server CPU {r['server_cpu_ms_per_request']} ms per request "
                     f"({r['server_cpu_ms_per_request_net_of_idle']} net of {r['server_idle_cpu_ms_per_s']} ms/s idle)")
    handler, batch = r["server_side"]["handler_ms"], r["server_side"]["batch_size"]
    if handler.get("count"):
        over = {b: v for b, v in handler["share_above"].items() if float(b) in (1, 3, 10)}
        lines.append(f"server side: handler mean {handler['mean']:.3f} ms, share over "
                     + ", ".join(f"{b} ms {100 * v:.2f}%" for b, v in over.items())
                     + (f"; {batch['mean']:.2f} images per batch" if batch.get("count") else ""))
    pauses = r["server_side"].get("gc_pause_ms", {})
    if pauses.get("count"):
        over = pauses["share_above"]
        lines.append(f"server GC: {pauses['count']} collections, {pauses['sum']:.1f} ms in all, over 1 ms "
                     f"{100 * over.get('1', 0):.2f}%, over 10 ms {100 * over.get('10', 0):.2f}%")
    if "server_rss_mb" in r:
        lines.append(f"server memory (RSS) {r['server_rss_mb']['start']} -> {r['server_rss_mb']['end']} MiB")
    if "inprocess" in r:
        ip = r["inprocess"]
        lines.append("in-process ONNX Runtime ms/image (batch 1 / 32): " + ", ".join(
            f"{m.split('/')[-1]} {v['ms_per_image_b1']}/{v['ms_per_image_b32']}" for m, v in ip["models"].items()))
        if r.get("server_share_of_inprocess_throughput") is not None:
            lines.append(f"in-process ONNX Runtime would answer the same requests at {ip['throughput_rps_same_requests']} "
                         f"req/s (each model at its faster batch size, 1 or 32): the server reached "
                         f"{100 * r['server_share_of_inprocess_throughput']:.0f}%")
        lines.append(f"full model accuracy on the same requests {ip['full_model_accuracy_same_requests']}; "
                     f"answers differing from offline ONNX Runtime: {ip['answers_differing_from_offline']}")
    if r.get("plot"):
        lines.append(f"plot: {r['plot']}")
    return "\n".join(lines)


def _plot(samples: list[Sample], plan: list[Planned], path: Path, report: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [s for s in samples if s.status == 200]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for k in KINDS:
        lat = [s.latency * 1000 for s in ok if plan[s.planned].kind == k]
        if lat:
            a.hist(lat, bins=60, alpha=0.5, label=f"{k} hint (n={len(lat)})")
    a.set_xlabel("latency (ms)")
    a.set_ylabel("requests")
    a.set_yscale("log")
    a.legend()
    a.set_title(f"p50 {report['latency'].get('p50_ms')} ms, p99 {report['latency'].get('p99_ms')} ms")
    if ok:
        t = np.asarray([s.t + s.latency for s in ok])
        edges = np.arange(0, max(t.max(), 1.0) + 0.5, 0.5)
        counts, _ = np.histogram(t, edges)
        b.plot(edges[1:], counts / 0.5)
    b.set_xlabel("time (s)")
    b.set_ylabel("answered requests / s")
    b.set_title(f"{report['throughput_rps']} req/s, {report['errors']} errors")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path

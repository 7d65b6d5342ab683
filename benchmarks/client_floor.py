"""The load generator's own latency floor: `steerprune loadtest`'s client against a do-nothing HTTP server.

    python benchmarks/client_floor.py --out benchmarks/results/client_floor.json

A stub server (its own process, an asyncio protocol that answers every request with a fixed JSON body of the
service's size without looking at it; `--server uvicorn` uses a one-line ASGI app instead) on 127.0.0.1, the client
paced at `--rate` with `--users` users sending a digits-sized multipart PNG form, as a load test does. With two or
more cores the server runs on one and the client on another. `--clients` alternates several clients over
`--rounds` rounds (httpx: a minimal httpx.AsyncClient driver with the same pacing, for comparison); the report
holds each run (with the client's own CPU per request and the machine's load average) and the medians per client.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ANSWER = json.dumps({"label": "7", "index": 7, "prob": 0.98, "route": "7", "model": "models/route_7.onnx",
                     "fallback": False, "top_k": [{"label": "7", "index": 7, "prob": 0.98}]}).encode()


# ---------------------------------------------------------------------------------------------- stub servers

class _Stub(asyncio.Protocol):
    """Answers each request once its body has arrived (Content-Length framing, as the load generator sends)."""

    RESPONSE = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                + str(len(ANSWER)).encode() + b"\r\n\r\n" + ANSWER)

    def connection_made(self, transport):
        self.transport, self.buf = transport, b""

    def data_received(self, data):
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].lower()
            at = head.find(b"content-length:")
            length = int(head[at + 15:].split(b"\r\n", 1)[0]) if at >= 0 else 0
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length:]
            self.transport.write(self.RESPONSE)


async def _asgi_app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": ANSWER})


def _serve(kind: str, port: int) -> None:
    if kind == "uvicorn":
        import uvicorn

        uvicorn.run(_asgi_app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
        return

    async def main():
        server = await asyncio.get_running_loop().create_server(_Stub, "127.0.0.1", port)
        await server.serve_forever()

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------- clients

def _steerprune_client(url, body, n, users, duration, rate):
    from steerprune.loadtest.client import run_open_loop

    samples, wall = run_open_loop(url, body, n, users, duration, rate)
    return [s.latency for s in samples if s.status == 200], len(samples), wall


def _httpx_client(url, body, n, users, duration, rate):
    import gc

    import httpx

    lat, sent = [], [0]

    async def user(client, deadline, interval, next_send):
        while sent[0] < n and time.perf_counter() < deadline:
            sent[0] += 1
            delay = next_send - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            next_send += interval
            data, ctype = await body(0)
            ts = time.perf_counter()
            r = await client.post(url, content=data, headers={"Content-Type": ctype})
            json.loads(r.content)
            lat.append(time.perf_counter() - ts)

    async def drive(t0):
        interval = users / rate
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=users), timeout=30) as client:
            await asyncio.gather(*(user(client, t0 + duration, interval, t0 + u * interval / users)
                                   for u in range(users)))

    gc.collect()
    gc.freeze()
    t0 = time.perf_counter()
    asyncio.run(drive(t0))
    gc.unfreeze()
    return lat, sent[0], time.perf_counter() - t0


CLIENTS = {"steerprune": _steerprune_client, "httpx": _httpx_client}


def _body_fn():
    from steerprune.loadtest.client import form_body
    from steerprune.loadtest.plan import encode_png

    png = encode_png(np.random.default_rng(0).integers(0, 17, (8, 8, 1), dtype=np.uint8) * 15)
    cache = {}

    async def body(i):
        if "b" not in cache:
            cache["b"] = await form_body({"hint": "7"}, png)
        return cache["b"]
    return body


def measure(client: str, url: str, users: int, duration: float, rate: float) -> dict:
    """One paced run: latency percentiles, and the client's own CPU per request (its process, not the stub's)."""
    cpu0 = time.process_time()
    lat, sent, wall = CLIENTS[client](url, _body_fn(), int(rate * duration * 2), users, duration, rate)
    cpu = time.process_time() - cpu0
    a = np.asarray(lat) * 1000
    p50, p99 = np.percentile(a, [50, 99])
    return {"client": client, "requests": sent, "ok": len(lat), "rps": round(len(lat) / wall, 1),
            "p50_ms": round(float(p50), 3), "p99_ms": round(float(p99), 3), "max_ms": round(float(a.max()), 3),
            "client_cpu_us_per_request": round(cpu / max(sent, 1) * 1e6, 1), "load_avg_1m": os.getloadavg()[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=700.0, help="paced requests/s in total (default 700)")
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", default="steerprune", help=f"comma-separated, of {', '.join(CLIENTS)}")
    ap.add_argument("--server", choices=["asyncio", "uvicorn"], default="asyncio")
    ap.add_argument("--out", help="JSON report (default: print only)")
    ap.add_argument("--serve-port", type=int, help=argparse.SUPPRESS)  # internal: run the stub server
    args = ap.parse_args()
    if args.serve_port:
        _serve(args.server, args.serve_port)
        return 0
    clients = args.clients.split(",")
    if unknown := set(clients) - set(CLIENTS):
        ap.error(f"unknown client(s) {sorted(unknown)}")
    from steerprune.service.cli import free_port

    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    port = free_port()
    pre = (lambda: os.sched_setaffinity(0, {cores[0]})) if len(cores) >= 2 else None
    proc = subprocess.Popen([sys.executable, __file__, "--server", args.server, "--serve-port", str(port)],
                            preexec_fn=pre)
    try:
        if len(cores) >= 2:
            os.sched_setaffinity(0, {cores[1]})
        url = f"http://127.0.0.1:{port}/classify"
        for _ in range(100):  # wait for the stub to listen
            try:
                import socket

                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        runs = []
        for k in range(args.rounds):
            for c in clients:
                runs.append(dict(measure(c, url, args.users, args.duration, args.rate), round=k))
                print(json.dumps(runs[-1]), flush=True)
    finally:
        proc.terminate()
        proc.wait(10)
    medians = {c: {key: round(float(np.median([r[key] for r in runs if r["client"] == c])), 3)
                   for key in ("p50_ms", "p99_ms", "rps", "client_cpu_us_per_request")} for c in clients}
    report = {"rate": args.rate, "users": args.users, "duration_s": args.duration, "rounds": args.rounds,
              "server": args.server, "machine": f"{os.cpu_count()} cores" + (
                  f"; stub server on core {cores[0]}, client on core {cores[1]}" if len(cores) >= 2 else ""),
              "median": medians, "runs": runs}
    print(json.dumps(medians))
    if args.out:
        out = ROOT / args.out if not Path(args.out).is_absolute() else Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

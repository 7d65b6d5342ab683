"""Faults against a real `bentoml serve`: the worker killed with SIGKILL under load, a bundle swapped for another,
bundles that are broken at start-up."""
from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
psutil = pytest.importorskip("psutil")

from steerprune.errors import UserError  # noqa: E402
from steerprune.service.cli import free_port, start_server, stop_server  # noqa: E402

pytestmark = [pytest.mark.http, pytest.mark.slow]


def _env(tmp):
    return dict(os.environ, BENTOML_DO_NOT_TRACK="true", BENTOML_HOME=str(tmp / "bentoml_home"))


def service_workers(proc) -> list:
    """The BentoML worker processes (the ones running the service) under a `bentoml serve` process."""
    out = []
    for p in psutil.Process(proc.pid).children(recursive=True):
        try:
            if any("_bentoml_impl.worker" in part for part in p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (8, 8), 200).save(buf, format="PNG")
    return buf.getvalue()


class Load:
    """`users` threads POSTing /classify back to back, recording (start, end, status or error name, answer)."""

    def __init__(self, url, users=4, hint="7", timeout=30.0):
        self.url, self.hint, self.timeout = url, hint, timeout
        self.records: list = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._user, daemon=True) for _ in range(users)]

    def _user(self):
        with httpx.Client(timeout=self.timeout) as client:
            body = png()
            while not self.stop.is_set():
                t0 = time.monotonic()
                try:
                    r = client.post(self.url + "/classify", files={"image": ("x.png", body, "image/png")},
                                    data={"hint": self.hint})
                    rec = (t0, time.monotonic(), r.status_code, r.json(), r.headers.get("retry-after"))
                except httpx.HTTPError as e:
                    rec = (t0, time.monotonic(), type(e).__name__, None, None)
                self.records.append(rec)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(self.timeout + 5)


def wait_ready(url, timeout=60.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return time.monotonic()
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"not ready again within {timeout} s")


def smaller_bundle(src, dst, drop: str):
    """A copy of bundle `src` without route `drop` (its model file goes too when no other route uses it)."""
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    model = m["routes"].pop(drop)["model"]
    if all(r["model"] != model for r in m["routes"].values()) and model != m["full"]["model"]:
        (dst / model).unlink()
        m["models"] = {k: v for k, v in m["models"].items() if k != model} if isinstance(m["models"], dict) else \
            [e for e in m["models"] if (e.get("file") or e.get("model") or e.get("path")) != model]
        for k in ("logits",):
            m.get("samples", {}).get(k, {}).pop(model, None)
    (dst / "manifest.json").write_text(json.dumps(m, indent=1))
    return dst


def test_killed_worker_restarts_and_a_swapped_bundle_is_picked_up_whole(tiny_bundle, tmp_path):
    """kill -9 of the worker under load: BentoML starts a new one; only requests in flight fail, each with a clear
    error, and none hangs; while it warms up /classify says 503 + Retry-After. The server resolves its bundle path
    once, at start: the symlink it was given was switched to another bundle before the kill, and the respawned
    worker still serves the first one (two workers can never serve different bundles); a server restart serves
    the new one, whole."""
    import hashlib

    old = tmp_path / "bundle_a"
    shutil.copytree(tiny_bundle, old)
    new = smaller_bundle(tiny_bundle, tmp_path / "bundle_b", drop="7")
    ids = {p: hashlib.sha256((p / "manifest.json").read_bytes()).hexdigest()[:16] for p in (old, new)}
    current = tmp_path / "current"
    current.symlink_to(old)
    proc = start_server(current, port=free_port(), timeout=120, log_path=tmp_path / "server.log",
                        env=_env(tmp_path), threads=1, verify=True)
    try:
        assert httpx.get(proc.url + "/routes", timeout=5).json()["bundle_id"] == ids[old]
        (worker,) = service_workers(proc)
        users = 4
        with Load(proc.url, users=users) as load:
            time.sleep(1.5)
            tmp_link = tmp_path / "current.new"
            tmp_link.symlink_to(new)
            os.replace(tmp_link, current)  # atomic switch to the new bundle
            time.sleep(0.5)
            t_kill = time.monotonic()
            os.kill(worker.pid, signal.SIGKILL)
            t_ready = wait_ready(proc.url, timeout=90)
            time.sleep(1.5)
        back_s = t_ready - t_kill
        recs = sorted(load.records)
        failed = [r for r in recs if not isinstance(r[2], int)]
        warming = [r for r in recs if r[2] == 503]
        print(f"\nback to ready {back_s:.1f} s after kill -9; {len(recs)} requests, {len(failed)} failed "
              f"({sorted({r[2] for r in failed})}), {len(warming)} answered 503 while the new worker warmed up")
        (again,) = service_workers(proc)
        assert again.pid != worker.pid
        # nobody hung: a request sent while no worker ran waits in the listen backlog (the arbiter holds the
        # socket) until the new worker accepts it and answers 503, so no wait is longer than the restart itself
        assert recs and all(end - start < back_s + 5 for start, end, *_ in recs), max(e - s for s, e, *_ in recs)
        # a request fails only if it was in flight when the worker died (one per user at most)
        assert len(failed) <= users and all(start <= t_kill + 0.05 for start, *_ in failed), (t_kill, failed)
        assert all(retry and int(retry) >= 1 and js["reason"] in ("warming_up", "starting")
                   for _, _, _, js, retry in warming)
        answered = [js for _, _, s, js, _ in recs if s == 200]
        assert answered and {js["bundle_id"] for js in answered} == {ids[old]}  # before and after the kill
        assert any(start > t_ready for start, _, s, *_ in recs if s == 200)
        assert httpx.get(proc.url + "/routes", timeout=5).json()["bundle_id"] == ids[old]
    finally:
        stop_server(proc)
    proc = start_server(current, port=free_port(), timeout=120, log_path=tmp_path / "server2.log",
                        env=_env(tmp_path), threads=1, verify=True)
    try:  # the restarted server serves the new bundle and nothing of the old one
        listing = httpx.get(proc.url + "/routes", timeout=5).json()
        assert listing["bundle_id"] == ids[new] and "7" not in listing["routes"]
        r = httpx.post(proc.url + "/classify", files={"image": ("x.png", png(), "image/png")}, data={"hint": "7"},
                       timeout=10)
        assert r.status_code == 400 and "7" not in r.json()["valid_hints"]
        r = httpx.post(proc.url + "/classify", files={"image": ("x.png", png(), "image/png")}, timeout=10)
        assert r.status_code == 200 and r.json()["bundle_id"] == ids[new]
    finally:
        stop_server(proc)


def test_half_written_manifest_is_refused_before_serving(tiny_bundle, tmp_path):
    bad = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bad)
    raw = (bad / "manifest.json").read_bytes()
    (bad / "manifest.json").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError, match="manifest"):
        start_server(bad, port=free_port(), timeout=30, log_path=tmp_path / "server.log", env=_env(tmp_path))


def test_truncated_model_never_serves(tiny_bundle, tmp_path):
    """A model file cut short (a copy that was interrupted): the worker refuses it at start-up (sha256), so
    /readyz never turns 200 and the server is reported as not ready, with the reason in its log."""
    bad = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bad)
    model = bad / json.loads((bad / "manifest.json").read_text())["routes"]["even"]["model"]
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    with pytest.raises(UserError, match="not ready after"):
        start_server(bad, port=free_port(), timeout=20, log_path=tmp_path / "server.log", env=_env(tmp_path))
    assert "sha256" in (tmp_path / "server.log").read_text()

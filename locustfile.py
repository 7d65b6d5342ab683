"""Locust load test for a local steerprune server (the bounded, scripted alternative is `steerprune loadtest`).

    locust -f locustfile.py --host http://127.0.0.1:3000 --headless -u 16 -r 16 -t 30s
Images: STEERPRUNE_LOADTEST_IMAGES (an .npz with images/labels, or class folders); default: the digits test split
when the server's bundle was trained on digits. Hint mix: STEERPRUNE_LOADTEST_MIX (default: `steerprune loadtest`'s).
Only 127.0.0.1 / localhost / ::1 hosts are accepted.
"""
from __future__ import annotations

import os
import random
from urllib.parse import urlparse

import requests  # locust's own dependency (HttpUser is built on it)
from locust import HttpUser, between, events, task

from steerprune.loadtest.plan import DEFAULT_MIX, encode_png, load_images, parse_mix, plan_requests
from steerprune.loadtest.run import LOCAL_HOSTS

_STATE: dict = {}


@events.test_start.add_listener
def _prepare(environment, **_):
    host = urlparse(environment.host or "").hostname
    if host not in LOCAL_HOSTS:
        raise SystemExit(f"refusing to load-test {environment.host!r}: local hosts only ({', '.join(LOCAL_HOSTS)})")
    listing = requests.get(environment.host.rstrip("/") + "/routes", timeout=10).json()
    images, labels, _ = load_images(os.environ.get("STEERPRUNE_LOADTEST_IMAGES"), listing.get("data_spec"),
                                    listing["classes"])
    routes = {n: r["class_indices"] for n, r in listing["routes"].items()}
    mix = parse_mix(os.environ.get("STEERPRUNE_LOADTEST_MIX", DEFAULT_MIX))
    _STATE["plan"] = plan_requests(20_000, labels, routes, mix, seed=0)
    _STATE["pngs"] = [encode_png(im) for im in images]
    _STATE["labels"] = labels


class Classifier(HttpUser):
    wait_time = between(0, 0)

    @task
    def classify(self):
        p = random.choice(_STATE["plan"])
        data = {"hint": p.hint} if p.hint else {}
        with self.client.post("/classify", files={"image": ("x.png", _STATE["pngs"][p.image], "image/png")},
                              data=data, name=f"/classify [{p.kind} hint]", catch_response=True) as r:
            if r.status_code != 200:  # wrong answers are model errors, not failed requests (see steerprune loadtest)
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")

"""The in-process baseline: the bundle's models run by ONNX Runtime in this process on the same requests, for the
answers the server must return and the throughput it could reach. Needs the serve extra (onnxruntime)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import numpy as np

from .client import Sample
from .plan import Planned

__all__ = ["inprocess_baseline", "baseline_report"]

_TIMED: dict = {}  # (bundle, threads, seconds) -> per-model speeds: one load test's phases time the models once


def inprocess_baseline(bundle: str, x: np.ndarray, plan: list[Planned], threads: int = 0, seconds: float = 1.5,
                       hint_mode: str = "verify", min_prob: float = 0.7, acceptance: str = "route",
                       served: Optional[dict] = None) -> dict:
    """Offline answers for the plan (what the server must return, in its hint mode and acceptance), the full
    model's prediction for every image, and each model's ONNX Runtime ms per image at batch 1 and 32. `served`
    ({route: bool}, from the server's /routes) overrides which routes are served: the server may stop serving a
    route by its own timings, which this process cannot repeat. The answers are every hinted request on its route's
    model (batch plan 'route'), in "batched" the same requests answered by the full model's run and in "shared" by
    the bundle's shared model, as the batch plan answers the rows it moves: `baseline_report` checks each server
    answer against the one its model and fallback reason say.
    Model speeds are measured once per process and bundle."""
    from steerprune.service.config import ServeConfig
    from steerprune.service.engine import FULL, Engine

    eng = Engine(ServeConfig(bundle=bundle, verify=False, threads=threads, hint_mode=hint_mode, min_prob=min_prob,
                             acceptance=acceptance, unserve_costlier=False, batch_plan="route"))
    for name, flag in (served or {}).items():
        if name in eng.routes and name != FULL:
            eng.routes[name] = eng.routes[name]._replace(served=bool(flag))
    key = (str(Path(bundle).resolve()), threads, seconds)
    per_model = _TIMED.get(key, {})
    for model in [] if per_model else eng.sessions:
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
    _TIMED[key] = per_model
    route_names = [p.hint if p.hint in eng.routes else FULL for p in plan]
    xs = x[[p.image for p in plan]]
    answers, batched, shared = [], [], []
    for s in range(0, len(plan), 256):
        answers += eng.run(xs[s:s + 256], route_names[s:s + 256], merge="none")
        batched += eng.run(xs[s:s + 256], route_names[s:s + 256], merge="full")
        if eng.shared_model is not None:
            shared += eng.run(xs[s:s + 256], route_names[s:s + 256], merge="shared")
    full_pred = eng.logits(eng.full_model, x).argmax(1)
    return {"models": per_model, "answers": answers, "batched": batched, "shared": shared or None,
            "full_pred": full_pred, "shared_model": eng.shared_model,
            "threads": threads or "ort default"}


def baseline_report(bundle: str, pngs: list[bytes], plan: list[Planned], samples: list[Sample], labels: np.ndarray,
                    listing: dict, throughput_rps: Optional[float], accuracy: Optional[float],
                    threads: int = 0) -> dict:
    """Report keys from the in-process baseline: "inprocess" (model speeds, full-model accuracy, answers differing
    from the server's), and with answers "accuracy_minus_full_points" and "server_share_of_inprocess_throughput"."""
    from steerprune.export.manifest import load_manifest
    from steerprune.service.engine import FALLBACK_REASONS
    from steerprune.service.preprocess import InputSpec, decode_image

    spec = InputSpec.from_manifest(load_manifest(bundle)["input"])
    x = np.stack([decode_image(p, spec, 1 << 30) for p in pngs])  # the server's decode of the same bytes
    ok = [s for s in samples if s.status == 200]
    used = max((s.planned for s in samples), default=-1) + 1
    base = inprocess_baseline(bundle, x, plan[:used], threads=threads, hint_mode=listing.get("hint_mode", "verify"),
                              min_prob=listing.get("min_prob", 0.7), acceptance=listing.get("acceptance", "route"),
                              served={n: (r.get("acceptance") or {}).get("served", True)
                                      for n, r in listing.get("routes", {}).items()})
    full_correct = [int(base["full_pred"][plan[s.planned].image]) == int(labels[plan[s.planned].image]) for s in ok]
    batched = FALLBACK_REASONS["batched"]

    def differs(s: Sample) -> bool:
        # a request the server's batch plan moved is checked against the answer of the run it moved it to
        a = s.answer
        on_shared = base["shared_model"] is not None and base["shared_model"] in (
            a["model"], (a.get("routed") or {}).get("model"))
        kind = "batched" if a.get("fallback_reason") == batched else "shared" if on_shared else "answers"
        a = base[kind][s.planned]
        return s.answer["index"] != a.index or s.answer["fallback"] != a.fallback

    mism = [s.planned for s in ok if differs(s)]
    out: dict = {"inprocess": {
        "models": base["models"], "threads": base["threads"],
        "full_model_accuracy_same_requests": round(float(np.mean(full_correct)), 4) if ok else None,
        "full_model_accuracy_all_images": round(float(np.mean(base["full_pred"] == labels)), 4),
        "answers_differing_from_offline": len(mism)}}
    if ok:
        out["accuracy_minus_full_points"] = round((accuracy - np.mean(full_correct)) * 100, 2)
        # the same answers computed in-process, each model at its faster batch size (1 or 32: on 2 threads a DeiT-S
        # runs faster per image at batch 1): each request's routed model if it ran (not for a route the bundle does
        # not serve), plus the full model when it answered
        ms = {m.split("/")[-1]: min(v["ms_per_image_b1"], v["ms_per_image_b32"]) for m, v in base["models"].items()}
        full_ms = ms[Path(listing["full"]["model"]).name]
        routed_ms = {r: ms[Path(v["model"]).name] for r, v in listing["routes"].items()}

        def cost_ms(a: dict) -> float:
            if a["route"] not in routed_ms:
                return full_ms
            routed_ran = not a["fallback"] or "routed" in a  # "routed": the overruled routed answer
            return (routed_ms[a["route"]] if routed_ran else 0.0) + (full_ms if a["fallback"] else 0.0)

        busy_ms = sum(cost_ms(s.answer) for s in ok)
        inproc_rps = len(ok) / (busy_ms / 1000) if busy_ms else None
        out["inprocess"]["throughput_rps_same_requests"] = round(inproc_rps, 1) if inproc_rps else None
        out["server_share_of_inprocess_throughput"] = (round(throughput_rps / inproc_rps, 3)
                                                       if inproc_rps and throughput_rps else None)
    return out

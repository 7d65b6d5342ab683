"""The headline figure: CPU time per request with the right hint, fallbacks included, relative to the same requests
without a hint (the full model), measured in-process (ONNX Runtime) with the service's own routing engine.

Requests are taken in a seeded shuffled order and answered in batches of `batch_size` as the service's batcher would
hand them over: one batch holds several hints, `Engine.run` splits it by model and reruns the rejected rows on the
full model. Every batch is timed hinted and unhinted back to back (`rounds` times, the median of each batch's times
kept), so machine drift hits both sides alike. Per route, the same is done on that route's images alone.
Torch-free (numpy, onnxruntime).
"""
from __future__ import annotations

import time
from typing import Optional

import numpy as np

__all__ = ["MIX", "right_hints", "wrong_hints", "offline_cost", "cost_of_npz", "cost_lines"]

MIX = {"right": 0.6, "wrong": 0.2, "none": 0.2}  # the load test's default mix, for the accuracy check


def right_hints(engine, labels: np.ndarray, rng: np.random.Generator) -> list[str]:
    """A hint naming a route that holds each label (drawn among them, as the load test does); 'full' if none."""
    names = engine.hint_names()
    holds = {c: [n for n in names if c in engine.routes[n].classes] for c in set(labels.tolist())}
    return [holds[c][rng.integers(len(holds[c]))] if holds[c] else "full" for c in labels.tolist()]


def wrong_hints(engine, labels: np.ndarray, rng: np.random.Generator) -> list[str]:
    """A hint naming a route that does not hold each label; 'full' if every route holds it."""
    names = engine.hint_names()
    lacks = {c: [n for n in names if c not in engine.routes[n].classes] for c in set(labels.tolist())}
    return [lacks[c][rng.integers(len(lacks[c]))] if lacks[c] else "full" for c in labels.tolist()]


def _as_batch(images, idx: np.ndarray) -> np.ndarray:
    """Preprocessed float32 (n, C, S, S) for these indices (`images` may convert lazily, e.g. ImageTensors)."""
    return np.ascontiguousarray(np.asarray(images[idx]), np.float32)


def _timed(engine, images, idx: np.ndarray, routes: list[str], batch_size: int, rounds: int):
    """Answer images[idx] in batches, hinted (`routes`) and unhinted back to back.
    Returns (hinted results, unhinted results, {"cpu": (hinted s, unhinted s), "wall": (...)}).

    CPU time is this process's (every ONNX Runtime thread included): what a request costs the server, and what
    other jobs on the machine disturb least; wall time is kept beside it."""
    hinted, plain = [], []
    tot = {"cpu": [0.0, 0.0], "wall": [0.0, 0.0]}
    for s in range(0, len(idx), batch_size):
        xb, rb = _as_batch(images, idx[s:s + batch_size]), routes[s:s + batch_size]
        full = ["full"] * len(xb)
        t = {"cpu": ([], []), "wall": ([], [])}
        for _ in range(rounds):
            for side, rr in ((0, rb), (1, full)):
                w, c = time.perf_counter(), time.process_time()
                res = engine.run(xb, rr)
                t["cpu"][side].append(time.process_time() - c)
                t["wall"][side].append(time.perf_counter() - w)
                if side == 0:
                    hb = res
                else:
                    pb = res
        hinted += hb
        plain += pb
        for k in tot:
            tot[k][0] += float(np.median(t[k][0]))
            tot[k][1] += float(np.median(t[k][1]))
    return hinted, plain, {k: tuple(v) for k, v in tot.items()}


def _flops(engine, r) -> float:
    """FLOPs of one answered request relative to the full model: its first model run plus any rerun on full."""
    from steerprune.service.engine import FIRST_ON_FULL

    if engine.model_for(r.route) == engine.full_model or r.fallback_reason in FIRST_ON_FULL:
        return 1.0
    first = r.routed_model if r.fallback else r.model  # the route's model, or the shared model the plan chose
    return float(engine.manifest["models"][first]["flops_rel"]) + (1.0 if r.fallback else 0.0)


def _pred(results) -> np.ndarray:
    return np.array([r.index for r in results], np.int64)


def _summary(hinted, plain, labels: np.ndarray, times: dict, engine) -> dict:
    n = max(len(labels), 1)
    (t_hint, t_full), (w_hint, w_full) = times["cpu"], times["wall"]
    return {"n": int(len(labels)), "cost_rel": t_hint / t_full if t_full else None,
            "hinted_ms": 1000.0 * t_hint / n, "full_ms": 1000.0 * t_full / n,  # CPU ms per request
            "cost_rel_wall": w_hint / w_full if w_full else None,
            "hinted_wall_ms": 1000.0 * w_hint / n, "full_wall_ms": 1000.0 * w_full / n,
            "acc": float((_pred(hinted) == labels).mean()), "full_acc": float((_pred(plain) == labels).mean()),
            "fallback": float(np.mean([r.fallback for r in hinted])),
            # FLOPs per request relative to the full model, fallbacks included
            "flops_cost": float(np.mean([_flops(engine, r) for r in hinted]))}


def offline_cost(bundle, images, labels: np.ndarray, batch_size: int = 16, threads: int = 1, rounds: int = 3,
                 acceptance: str = "route", min_prob: float = 0.7, per_route: bool = True, route_rounds: int = 1,
                 max_images: Optional[int] = 2000, seed: int = 0, batch_plan: str = "cost", shared_model: bool = True,
                 log=None) -> dict:
    """Cost per hinted request relative to an unhinted one, in-process, on preprocessed `images` (N, C, S, S; any
    array indexable by an index array, converted batch by batch) with their `labels` (N,): overall (mixed hints per
    batch; each batch timed `rounds` times), and per route (its images only, `route_rounds` times) when `per_route`;
    on a seeded draw of at most `max_images` of them (None: all).

    Also the accuracy of the load test's default mix (60% right, 20% wrong, 20% no hint) and of wrong hints alone,
    against the full model's: wrong hints must stay caught. The engine is warmed up as the server's is (its timings
    drive `batch_plan`, see service/plan.py).
    """
    from steerprune.service.config import ServeConfig
    from steerprune.service.engine import Engine

    if batch_size < 1 or rounds < 1:
        raise ValueError("batch_size and rounds must be at least 1")
    engine = Engine(ServeConfig(bundle=str(bundle), verify=False, threads=threads, acceptance=acceptance,
                                min_prob=min_prob, max_batch_size=max(batch_size, 2), batch_plan=batch_plan,
                                shared_model=shared_model),
                    log_fn=lambda *_: None)
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))[:max_images]
    y = labels[order]
    engine.warm_up(max(batch_size, 2), rounds=3)  # as the server does: timings for the batch plan
    hints = right_hints(engine, y, rng)
    t0 = time.perf_counter()
    hinted, plain, times = _timed(engine, images, order, hints, batch_size, rounds)
    full_pred = _pred(plain)
    out = {"batch_size": batch_size, "threads": threads, "rounds": rounds, "route_rounds": route_rounds,
           "batch_plan": batch_plan, "shared_model": engine.shared_model,
           "acceptance": engine.acceptance,
           "min_prob": min_prob if engine.acceptance == "global" else None, "n": int(len(y)),
           "what": "CPU seconds (this process, ONNX Runtime included) for right-hint requests, fallbacks included, "
                   "/ the same requests unhinted; *_wall: the same in wall time",
           "overall": _summary(hinted, plain, y, times, engine)}
    if log:
        o = out["overall"]
        log(f"offline cost, batch {batch_size}, {threads} thread(s): right hints {o['cost_rel']:.3f} of unhinted "
            f"({o['hinted_ms']:.3f} vs {o['full_ms']:.3f} CPU ms/request; wall {o['cost_rel_wall']:.3f}; acc {o['acc']:.4f} vs full {o['full_acc']:.4f}, "
            f"fallback {o['fallback']:.3f}) in {time.perf_counter() - t0:.0f} s")
    # the load test's mix and wrong hints alone, accuracy only (untimed)
    kinds = rng.choice(3, size=len(y), p=[MIX["right"], MIX["wrong"], MIX["none"]])
    wrong = wrong_hints(engine, y, rng)
    mix = [hints[i] if k == 0 else wrong[i] if k == 1 else "full" for i, k in enumerate(kinds)]
    mixed, wrong_res = [], []
    for s in range(0, len(y), batch_size):
        xb = _as_batch(images, order[s:s + batch_size])
        mixed += engine.run(xb, mix[s:s + batch_size])
        wrong_res += engine.run(xb, wrong[s:s + batch_size])
    out["mix"] = {"shares": MIX, "acc": float((_pred(mixed) == y).mean()), "full_acc": float((full_pred == y).mean()),
                  "wrong_hint_acc": float((_pred(wrong_res) == y).mean()),
                  "wrong_hint_fallback": float(np.mean([r.fallback for r in wrong_res]))}
    if per_route:
        out["routes"] = {}
        for name in engine.hint_names():
            on = np.flatnonzero(np.isin(y, sorted(engine.routes[name].classes)))
            if not len(on):
                continue
            r_h, r_p, r_times = _timed(engine, images, order[on], [name] * len(on), batch_size, route_rounds)
            out["routes"][name] = {**_summary(r_h, r_p, y[on], r_times, engine),
                                   "served": engine.routes[name].served}
    return out


class _Normalized:
    """uint8 (N, S, S, C) images read as the service's preprocessed float32 (N, C, S, S), converted when indexed."""

    def __init__(self, images: np.ndarray, spec):
        self.images, self.spec = images, spec

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx):
        from steerprune.service.preprocess import normalize

        return normalize(self.images[idx], self.spec)


def cost_of_npz(bundle, npz, **kw) -> dict:
    """`offline_cost` on an NPZ of test images (`images` uint8 (N, S, S, C) at the model's size, `labels`)."""
    from steerprune.errors import UserError
    from steerprune.export.manifest import load_manifest
    from steerprune.service.preprocess import InputSpec

    spec = InputSpec.from_manifest(load_manifest(bundle)["input"])
    try:
        with np.load(npz, allow_pickle=False) as z:
            images, labels = z["images"], z["labels"]
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"{npz}: not an NPZ with 'images' and 'labels' ({e})") from None
    if images.ndim != 4 or images.dtype != np.uint8 or images.shape[1:3] != (spec.img_size, spec.img_size):
        raise UserError(f"{npz}: images must be uint8 (N, {spec.img_size}, {spec.img_size}, C), got "
                        f"{images.dtype} {images.shape}")
    return offline_cost(bundle, _Normalized(images, spec), labels, **kw)


def cost_lines(cost: Optional[dict]) -> list[str]:
    """Human-readable lines for a manifest's "cost" record (export's log, `bundle verify`)."""
    if not cost:
        return ["no offline cost recorded in this bundle (export it with --cost-batch N)"]
    o, m = cost["overall"], cost.get("mix") or {}
    lines = [f"cost per right-hint request vs unhinted, in-process ONNX Runtime, batch {cost['batch_size']}, "
             f"{cost['threads']} thread(s), {cost['n']} test images, acceptance {cost['acceptance']}: "
             f"CPU {o['cost_rel']:.3f}, wall {o['cost_rel_wall']:.3f} (FLOPs {o['flops_cost']:.3f}); accuracy {o['acc']:.4f} vs full "
             f"{o['full_acc']:.4f}; fallback {o['fallback']:.3f}"]
    if m:
        lines.append(f"load-test mix (60% right, 20% wrong, 20% none): accuracy {m['acc']:.4f} vs full "
                     f"{m['full_acc']:.4f}; wrong hints alone {m['wrong_hint_acc']:.4f} "
                     f"(fallback {m['wrong_hint_fallback']:.3f})")
    for name, r in (cost.get("routes") or {}).items():
        lines.append(f"  {name:>12}: cost {r['cost_rel']:.3f} (FLOPs {r['flops_cost']:.3f}), acc {r['acc']:.4f} "
                     f"vs full {r['full_acc']:.4f}, fallback {r['fallback']:.3f}"
                     + ("" if r.get("served", True) else " (not served: full model)"))
    return lines

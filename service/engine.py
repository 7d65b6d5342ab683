"""The routing engine: one ONNX Runtime session per distinct model of a bundle, hints -> routes, verify/fallback.

Torch-free and BentoML-free, so the offline parity check, the offline cost figure (export/cost.py), the load test's
in-process baseline and the service all run the same code. Routes whose head masks are identical share one model
file (export dedups them) and therefore one session here; a batch is split by session, not by route, so such routes
also share one model run.

In verify mode a routed answer stands only if its top-1 class is one of the route's classes and it passes the
route's acceptance rule (export/acceptance.py): by default each route's own rule, chosen at export on validation
(schema-2 manifests); a route export marked as not served sends its hint straight to the full model. With
`acceptance='global'`, or for a schema-1 bundle, every route is served with the one rule top-1 >= `min_prob`.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np

from steerprune.errors import UserError
from steerprune.export.acceptance import AcceptRule, accepted, answer_index, softmax
from steerprune.export.runtime import cuda_built, gpu_visible
from steerprune.export.session_memory import SharedInitializers

from .config import ServeConfig
from .preprocess import InputSpec

__all__ = ["FULL", "FALLBACK_REASONS", "ServingRoute", "Result", "Engine", "UnknownHint", "gpu_visible", "softmax",
           "warm_sizes"]

log = logging.getLogger("steerprune.service")

FULL = "full"  # the route name of the unpruned model (also what a request without hint gets)

FALLBACK_REASONS = {  # Result.fallback_reason -> what the answer says
    "off_route": "the routed model's top-1 class is not one of the hint's classes: answered by the full model",
    "low_confidence": "the routed answer fails the route's acceptance rule (top-1 probability, margin or the "
                      "hint's total probability too low): answered by the full model",
    "not_served": "this route is no cheaper than the full model once its fallbacks are counted (by export's "
                  "estimate or this server's timings): its hints go to the full model",
}


class UnknownHint(UserError):
    """A hint that is neither a route name nor 'full'."""


class ServingRoute(NamedTuple):
    """A hint name as the engine serves it."""
    name: str
    model: str  # bundle-relative model path: the session key
    classes: frozenset  # class indices this route answers for (all classes for 'full')
    entry: dict  # the manifest's route (or full) entry
    rule: AcceptRule  # verify mode: what a routed answer must pass besides top-1 in `classes`
    served: bool  # verify mode: False sends the hint straight to the full model


class Result(NamedTuple):
    probs: np.ndarray  # (C,) float32 softmax of the model that answered
    route: str  # route the request was sent to ('full' without hint)
    model: str  # model file that answered (the full model after a fallback)
    fallback: bool
    fallback_reason: Optional[str]  # a FALLBACK_REASONS key ('off_route' | 'low_confidence' | 'not_served') | None
    wrong_hint: bool  # the full model's answer lies outside the hint's classes
    routed_probs: Optional[np.ndarray]  # (C,) the routed model's softmax when it was overruled
    index: int  # the answer's class: top-1 of probs, or under a route-probability rule the route's most probable class


class Engine:
    """Load a bundle's models and answer batches of preprocessed images routed by hint."""

    def __init__(self, cfg: ServeConfig, log_fn=None):
        from steerprune.export.manifest import (check_parity, load_manifest, model_paths, open_session, parity_line,
                                                verify_bundle, verify_files)

        self.cfg = cfg
        self.bundle = Path(cfg.bundle).expanduser().resolve()
        say = log_fn or log.info
        samples = None
        if cfg.verify:  # sha256 of every file now (raises BundleError with the reason); sample parity below
            self.manifest, samples, digests = verify_files(self.bundle)
        else:
            self.manifest = load_manifest(self.bundle)
        m = self.manifest
        self.spec = InputSpec.from_manifest(m["input"])
        self.classes: list[str] = list(m["classes"])
        self.input_name, self.output_name = m["input"]["input_name"], m["input"]["output_name"]
        all_classes = frozenset(range(len(self.classes)))
        # per-route rules need a manifest that has them (schema 2); otherwise the one global rule
        self.acceptance = "route" if cfg.acceptance == "route" and m["schema_version"] >= 2 else "global"
        if cfg.acceptance == "route" and self.acceptance == "global":
            say(f"bundle schema {m['schema_version']} has no per-route acceptance rules: every route is served "
                f"with top-1 probability >= min_prob {cfg.min_prob}")
        self.routes: dict[str, ServingRoute] = {
            FULL: ServingRoute(FULL, m["full"]["model"], all_classes, m["full"], AcceptRule(), True)}
        for name, r in m["routes"].items():
            if name == FULL:
                raise UserError("a route may not be called 'full': that name is the unpruned model")
            if self.acceptance == "route":
                rule, served = AcceptRule.from_json(r["acceptance"]["rule"]), bool(r["acceptance"]["served"])
            else:
                rule, served = AcceptRule(cfg.min_prob, 0.0), True
            self.routes[name] = ServingRoute(name, r["model"], frozenset(r["classes"]), r, rule, served)
        self.full_model = m["full"]["model"]
        unserved = [n for n, r in self.routes.items() if not r.served]
        if unserved and cfg.hint_mode == "verify":
            say(f"routes not served (their hints go to the full model, as export decided): {', '.join(unserved)}")

        self.requested_cuda = cfg.device == "cuda" or (cfg.device == "auto" and cuda_built() and gpu_visible())
        self.sessions = {}
        self.providers: dict[str, list[str]] = {}
        self.problems: list[str] = []  # reasons the engine must not report ready
        if self.requested_cuda and not cuda_built():
            self.problems.append(f"CUDA was requested (device={cfg.device}) but this onnxruntime has no CUDA "
                                 "provider: install onnxruntime-gpu (and not onnxruntime beside it)")
        device = "cuda" if self.requested_cuda and not self.problems else "cpu"
        paths = model_paths(m)
        # one copy of each distinct weight for all sessions (kept alive here: the sessions point into it)
        self.shared = SharedInitializers([self.bundle / rel for rel in paths], device) if cfg.share_weights else None
        if self.shared is not None:
            st = self.shared.stats
            say(f"weights shared across {st.models} sessions: {st.distinct} distinct tensors, {st.held_mb:.1f} MB held "
                f"for {st.total_mb:.1f} MB of initializers")
        if samples is not None and device == "cuda":
            # the stored logits are the CPU's: checked on CPU sessions, since CUDA kernels round differently
            verify_bundle(self.bundle, log=say)
        for rel in paths:
            # require_device off: a session that fell back to the CPU becomes a readiness problem, not a crash
            sess = open_session(self.bundle, rel, threads=cfg.threads or None, device=device, require_device=False,
                                log=log.warning, env_allocator=cfg.shared_arena,
                                initializers=self.shared.for_model(self.bundle / rel) if self.shared else None)
            if samples is not None and device == "cpu":  # parity of the very sessions that will serve
                say(parity_line(rel, digests[rel], check_parity(m, samples, rel, sess),
                                len(samples[m["samples"]["inputs"]])))
            self.sessions[rel] = sess
            self.providers[rel] = sess.get_providers()
            if self.requested_cuda and "CUDAExecutionProvider" not in self.providers[rel]:
                # onnxruntime logs an error and silently runs on the CPU when CUDA cannot start: refuse instead
                self.problems.append(f"CUDA was requested (device={cfg.device}) but {rel} runs on "
                                     f"{self.providers[rel]}: check onnxruntime-gpu, CUDA 13 and cuDNN 9")
        for p in self.problems:
            log.error("!!! %s", p)
        self.device = "cuda" if self.requested_cuda and not self.problems else "cpu"
        self.pad = cfg.pad_batches == "on" or (cfg.pad_batches == "auto" and self.device == "cuda")
        self.warm_sizes = warm_sizes(cfg.max_batch_size)
        self.run_ms: dict[str, dict[int, float]] = {}  # model -> batch size -> ms per run, filled by warm_up
        self.run_ms_estimated: dict[str, list[int]] = {}  # model -> sizes of run_ms estimated from FLOPs (light warm-up)
        self.measured_cost: dict[str, float] = {}  # route -> right-hint cost vs unhinted here, by unserve_costlier
        self.unserved_why: dict[str, str] = {}  # route -> why unserve_costlier stopped serving it
        say(f"{len(self.sessions)} sessions for {len(self.routes) - 1} routes + full on {self.device} "
            f"({', '.join(sorted({p[0] for p in self.providers.values()}))})")

    # ------------------------------------------------------------------------------------------ routing

    def resolve(self, hint: Optional[str]) -> str:
        """Route name for a hint: None/'' -> full; unknown -> UnknownHint, or full with unknown_hint='full'."""
        if hint is None or hint == "":
            return FULL
        if hint in self.routes:
            return hint
        if self.cfg.unknown_hint == "full":
            return FULL
        raise UnknownHint(f"unknown hint {hint!r}; valid hints: {', '.join(self.hint_names())}")

    def hint_names(self) -> list[str]:
        return [n for n in self.routes if n != FULL]

    # ------------------------------------------------------------------------------------------ inference

    def logits(self, model: str, x: np.ndarray) -> np.ndarray:
        """Raw model run: x (N, C, S, S) float32 -> logits (N, num_classes).

        With padding on, x is first filled up with zero images to the next warmed batch size and the extra rows
        are dropped from the answer (images never interact in a ViT, so the real rows are unchanged).
        """
        n = x.shape[0]
        if self.pad:
            size = self.warm_size(n) or n
            if size > n:
                x = np.concatenate([x, np.zeros((size - n, *x.shape[1:]), x.dtype)])  # (size, C, S, S)
        return self.sessions[model].run([self.output_name], {self.input_name: x})[0][:n]

    def model_for(self, route: str) -> str:
        """The model a request on `route` runs first: the full model for a route that is not served (verify)."""
        r = self.routes[route]
        return r.model if r.served or self.cfg.hint_mode != "verify" else self.full_model

    def run(self, x: np.ndarray, routes: Sequence[str]) -> list[Result]:
        """Answer a batch: x (N, C, S, S), one route per row; the results keep the input order."""
        n = len(routes)
        probs = np.empty((n, len(self.classes)), np.float32)
        answered_by = [self.model_for(r) for r in routes]
        by_model: dict[str, list[int]] = {}
        for i, model in enumerate(answered_by):
            by_model.setdefault(model, []).append(i)
        for model, idx in by_model.items():  # one run per distinct model: routes sharing a mask share it
            probs[idx] = softmax(self.logits(model, x[idx] if len(idx) < n else x))

        reasons: list[Optional[str]] = [None] * n
        index = probs.argmax(1)
        redo = []
        if self.cfg.hint_mode == "verify":
            by_route: dict[str, list[int]] = {}
            for i, r in enumerate(routes):
                if r == FULL:
                    continue
                if not self.routes[r].served:
                    reasons[i] = "not_served"  # answered by the full model already: nothing to rerun
                else:
                    by_route.setdefault(r, []).append(i)
            for r, idx in by_route.items():
                route = self.routes[r]
                ok = accepted(probs[idx], sorted(route.classes), route.rule)
                if not route.rule.top1_in_route:
                    index[idx] = answer_index(probs[idx], route.classes, route.rule)
                for i, good in zip(idx, ok):
                    if not good:
                        off = route.rule.top1_in_route and int(probs[i].argmax()) not in route.classes
                        reasons[i] = "off_route" if off else "low_confidence"
                        redo.append(i)
            redo.sort()
        routed = {}
        if redo:
            routed = {i: probs[i].copy() for i in redo}
            probs[redo] = softmax(self.logits(self.full_model, x[redo]))
            index[redo] = probs[redo].argmax(1)
            for i in redo:
                answered_by[i] = self.full_model
        return [Result(probs[i], r, answered_by[i], reasons[i] is not None, reasons[i],
                       reasons[i] is not None and int(probs[i].argmax()) not in self.routes[r].classes,
                       routed.get(i), int(index[i])) for i, r in enumerate(routes)]

    def warm_up(self, max_batch_size: int, rounds: int) -> float:
        """Run the sessions `rounds` times per batch size (powers of two up to max_batch_size); returns seconds taken.

        Records each model's ms per run at each of those sizes (median of the rounds after the first) in `run_ms`,
        which `expected_ms` reads. Scope (cfg.warmup, 'auto' = 'all' on CUDA, 'light' on the CPU): 'all' runs every
        session at every size; 'light' runs the full model at every size and every other model at batch 1 only, and
        fills in a route model's larger sizes as the full model's time x the model's FLOPs relative to full (listed in
        `run_ms_estimated`). On the CPU a session's first run at a new batch size is no slower than its next ones,
        while warming 100 route models at 7 sizes took minutes.
        """
        t0 = time.perf_counter()
        s = self.spec.img_size
        c = 1 if self.spec.color_mode == "L" else 3
        light = self.cfg.warmup == "light" or (self.cfg.warmup == "auto" and self.device != "cuda")
        sizes = warm_sizes(max_batch_size)
        for model in self.sessions:
            for b in (sizes if model == self.full_model or not light else sizes[:1]):
                x = np.zeros((b, c, s, s), np.float32)
                times = []
                for _ in range(rounds):
                    t = time.perf_counter()
                    self.logits(model, x)
                    times.append((time.perf_counter() - t) * 1000.0)
                if times:
                    self.run_ms.setdefault(model, {})[b] = round(float(np.median(times[1:] or times)), 4)
        full = self.run_ms.get(self.full_model, {})
        if light and full:
            for model in self.sessions:
                rel = float(self.manifest["models"][model]["flops_rel"])
                missing = [b for b in sizes if b not in self.run_ms.get(model, {}) and b in full]
                for b in missing:
                    self.run_ms.setdefault(model, {})[b] = round(full[b] * rel, 4)
                if missing:
                    self.run_ms_estimated[model] = missing
        return time.perf_counter() - t0

    def unserve_costlier(self) -> list[str]:
        """After warm_up, in verify mode with per-route rules: stop serving each route whose right-hint request
        costs at least an unhinted one here, run_ms[route][1] + val fallback x run_ms[full][1] >= run_ms[full][1]
        (records every served route's ratio in `measured_cost`). Returns the routes it stopped serving."""
        if self.cfg.hint_mode != "verify" or self.acceptance != "route":
            return []
        full = self.run_ms.get(self.full_model, {}).get(1)
        if not full:
            return []
        dropped = []
        for name, r in list(self.routes.items()):
            if name == FULL or not r.served:
                continue
            fallback = float(((r.entry.get("acceptance") or {}).get("val") or {}).get("fallback", 0.0))
            cost = (self.run_ms[r.model][1] + fallback * full) / full
            self.measured_cost[name] = round(cost, 4)
            if cost >= 1.0:
                self.routes[name] = r._replace(served=False)
                self.unserved_why[name] = (f"measured on this server: a right-hint request costs {cost:.3f} of an "
                                           f"unhinted one (batch-1 warm-up timings, val fallback {fallback:.3f})")
                dropped.append(name)
        return dropped

    def expected_ms(self, routes: Sequence[str]) -> float:
        """What `run` should take for a batch with these routes, from the warm-up timings: one run per distinct
        model, plus, in verify mode, a full-model run for every hinted row (the worst case). inf before warm-up."""
        counts: dict[str, int] = {}
        for r in routes:
            counts[self.model_for(r)] = counts.get(self.model_for(r), 0) + 1
        hinted = sum(1 for r in routes if r != FULL and self.model_for(r) != self.full_model)
        runs = list(counts.items()) + ([(self.full_model, hinted)] if hinted and self.cfg.hint_mode == "verify" else [])
        total = 0.0
        for model, n in runs:
            ms = self.run_ms.get(model, {}).get(self.warm_size(n))
            if ms is None:
                return float("inf")
            total += ms
        return total

    def warm_size(self, n: int) -> Optional[int]:
        """The smallest warmed batch size that holds n images; None past the largest."""
        return next((b for b in self.warm_sizes if b >= n), None)

    # ------------------------------------------------------------------------------------------ listing

    def describe(self) -> dict:
        """The /routes listing: hints, their classes, head usage, kept heads, accuracy, shared sessions."""
        def info(r: ServingRoute) -> dict:
            e = r.entry
            out = {"classes": [self.classes[c] for c in sorted(r.classes)], "class_indices": sorted(r.classes),
                   "model": r.model, "head_usage": e.get("head_usage"), "kept_heads": e.get("kept_heads"),
                   "flops_rel": e.get("flops_rel"), "acc": e.get("acc"), "off_route_acc": e.get("off_route_acc")}
            if r.name != FULL:
                a = e.get("acceptance") or {}
                out["acceptance"] = {
                    "served": r.served or self.cfg.hint_mode != "verify", "reason": (self.unserved_why.get(r.name) or a.get("reason")) if not r.served else None,
                    "rule": r.rule.to_json(), "kind": a.get("kind") if self.acceptance == "route" else "global",
                    # what export measured for this rule on validation (None under the global rule)
                    "val": a.get("val") if self.acceptance == "route" else None,
                    # this server's right-hint cost vs an unhinted request at batch 1 (unserve_costlier)
                    "measured_cost": self.measured_cost.get(r.name),
                    "cost": (self.manifest.get("cost") or {}).get("routes", {}).get(r.name)}
            return out

        return {
            "routes": {n: info(r) for n, r in self.routes.items() if n != FULL},
            "full": info(self.routes[FULL]),
            "classes": self.classes,
            "groups": self.manifest.get("groups", {}),
            "hint_mode": self.cfg.hint_mode,
            "acceptance": self.acceptance,  # 'route': each route's rule from the manifest | 'global': min_prob
            "min_prob": self.cfg.min_prob,  # the global rule's threshold (applied only when acceptance is 'global')
            "offline_cost": (self.manifest.get("cost") or {}).get("overall"),
            "unknown_hint": self.cfg.unknown_hint,
            "sessions": {m: {"routes": sorted(n for n, r in self.routes.items() if r.model == m),
                             "providers": self.providers[m]} for m in self.sessions},
            "device": self.device,
            "pad_batches": self.pad,
            "warm_batch_sizes": self.warm_sizes,
            "data_spec": _data_spec(self.manifest),
        }


def _data_spec(manifest: dict):
    """The run's --data spec (e.g. 'digits'), wherever export nested it under 'run'."""
    run = manifest.get("run") or {}
    for d in (run, run.get("backbone") or {}, run.get("data") or {}):
        if isinstance(d, dict) and isinstance(d.get("data_spec"), str):
            return d["data_spec"]
    return run.get("data") if isinstance(run.get("data"), str) else None


def warm_sizes(max_batch_size: int) -> list[int]:
    """The batch sizes warm-up runs: powers of two up to max_batch_size, and max_batch_size itself."""
    return sorted({min(1 << k, max_batch_size) for k in range(max_batch_size.bit_length() + 1)})


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
from steerprune.export.acceptance import AcceptRule, accepted_rows, answer_rows, softmax
from steerprune.export.runtime import cuda_built, gpu_visible
from steerprune.export.session_memory import SharedInitializers

from .binding import BoundRunner, InputPool
from .config import ServeConfig
from .plan import Group, RunTimes, plan_batch
from .preprocess import InputSpec

__all__ = ["FULL", "FALLBACK_REASONS", "FIRST_ON_FULL", "ServingRoute", "Result", "Engine", "UnknownHint", "gpu_visible", "softmax",
           "warm_sizes"]

log = logging.getLogger("steerprune.service")

FULL = "full"  # the route name of the unpruned model (also what a request without hint gets)

FALLBACK_REASONS = {  # Result.fallback_reason -> what the answer says
    "off_route": "the routed model's top-1 class is not one of the hint's classes: answered by the full model",
    "low_confidence": "the routed answer fails the route's acceptance rule (top-1 probability, margin or the "
                      "hint's total probability too low): answered by the full model",
    "not_served": "this route is no cheaper than the full model once its fallbacks are counted (by export's "
                  "estimate or this server's timings): its hints go to the full model",
    "batched": "this batch held too few requests for this hint's model for a run of its own to be cheaper than "
               "adding them to the full model's run (this server's timings): answered by the full model",
}
FIRST_ON_FULL = frozenset({"not_served", "batched"})  # fallback reasons of hinted rows the full model answered first
PLAN_SNAPSHOT_EVERY = 50  # batches between refreshes of `plan_snapshot` (what GET /routes shows of the plan)
COLD_ROUNDS = 9  # warm-up turns over all models at batch 1 (cold caches) whose median seeds the batch plan


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
    fallback_reason: Optional[str]  # a FALLBACK_REASONS key | None
    wrong_hint: bool  # the full model's answer lies outside the hint's classes
    routed_probs: Optional[np.ndarray]  # (C,) the routed model's softmax when it was overruled
    index: int  # the answer's class: top-1 of probs, or under a route-probability rule the route's most probable class
    routed_model: Optional[str] = None  # the model whose answer was overruled (with routed_probs)


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
        # the shared model (export --shared): route name -> its rule there, for the routes it serves
        sh = m.get("shared") if cfg.shared_model and self.acceptance == "route" else None
        self.shared_model: Optional[str] = sh["model"] if sh else None
        self.shared_rules: dict[str, AcceptRule] = {} if not sh else {
            n: AcceptRule.from_json(a["rule"]) for n, a in sh["routes"].items() if a["served"] and n in self.routes}
        # every rule as a row of classes and thresholds, so that a batch's rules are applied in one numpy pass:
        # each route's own, then each route's on the shared model
        rules = [(n, r.classes, r.rule) for n, r in self.routes.items()]
        rules += [(("shared", n), self.routes[n].classes, rule) for n, rule in self.shared_rules.items()]
        self._rule_row = {key: k for k, (key, _, _) in enumerate(rules)}
        self._in_route = np.zeros((len(rules), len(self.classes)), bool)  # (R, C)
        self._thresholds = np.zeros((len(rules), 3), np.float32)  # (R, 3): min_prob, min_margin, min_route_prob
        for k, (_, classes, rule) in enumerate(rules):
            self._in_route[k, sorted(classes)] = True
            mrp = rule.min_route_prob
            self._thresholds[k] = (rule.min_prob, rule.min_margin, np.nan if mrp is None else mrp)
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
        # I/O binding always runs at the warmed sizes, so pad_batches off keeps 'auto' off (config refuses 'on')
        self.io_binding = cfg.io_binding == "on" or (cfg.io_binding == "auto" and device == "cuda"
                                                     and cfg.pad_batches != "off")
        graphs = self.io_binding and device == "cuda" and cfg.cuda_graph != "off"
        # why CUDA graphs were asked for ('on') but cannot apply to this engine at all; None when they can
        self.graph_not_applicable: Optional[str] = None if graphs or cfg.cuda_graph != "on" else (
            f"the engine runs on {device}" if device != "cuda" else "io_binding is off")
        if self.graph_not_applicable:
            log.warning("cuda_graph on does not apply: %s", self.graph_not_applicable)
        if graphs and cfg.warmup == "light":
            log.warning("CUDA graphs with warmup light: a route model's graphs past batch 1 are captured on its first "
                        "request at that size, not during warm-up")
        self.graph_problems: dict[str, str] = {}  # model -> why it runs without a CUDA graph (not a readiness issue)
        graph_sessions = set()
        for rel in paths:
            # require_device off: a session that fell back to the CPU becomes a readiness problem, not a crash
            kw = dict(threads=cfg.threads or None, device=device, require_device=False, log=log.warning,
                      env_allocator=cfg.shared_arena,
                      initializers=self.shared.for_model(self.bundle / rel) if self.shared else None)
            sess = None
            if graphs:  # ONNX Runtime refuses a graph session when a compute node would run on the CPU
                try:
                    sess = open_session(self.bundle, rel, cuda_graph=True, **kw)
                    graph_sessions.add(rel)
                except UserError as e:
                    self.graph_problems[rel] = f"no CUDA-graph session: {e}"
                    log.warning("%s: plain I/O-bound runs instead", self.graph_problems[rel])
            if sess is None:
                sess = open_session(self.bundle, rel, **kw)
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
        self.pad = cfg.pad_batches == "on" or (cfg.pad_batches == "auto" and self.device == "cuda") or self.io_binding
        self.warm_sizes = warm_sizes(cfg.max_batch_size)
        # one runner per session: bound buffers per warmed size, graphs captured on each size's first run (warm-up);
        # the input buffers are one set for all of them (a DeiT-S batch of 64 is 38 MB: not one per route model)
        pool = InputPool()
        self.runners: dict[str, BoundRunner] = {} if not self.io_binding else {
            rel: BoundRunner(sess, self.input_name, self.output_name, self.device, self.warm_sizes,
                             cuda_graph=rel in graph_sessions and self.device == "cuda", pool=pool)
            for rel, sess in self.sessions.items()}
        self.run_ms: dict[str, dict[int, float]] = {}  # model -> batch size -> ms per run, filled by warm_up
        self.run_ms_estimated: dict[str, list[int]] = {}  # model -> sizes of run_ms estimated from FLOPs (light warm-up)
        self.measured_cost: dict[str, float] = {}  # route -> right-hint cost vs unhinted here, by unserve_costlier
        self.unserved_why: dict[str, str] = {}  # route -> why unserve_costlier stopped serving it
        self.fallback_rate: dict[str, float] = {}  # route model -> share of its rows rerun on full (batch_plan)
        self.times = RunTimes()  # each model's ms per run in its rows, seeded by warm_up, refitted on runs
        self.plan_snapshot: Optional[dict] = None  # plan_state() as the batch thread last saw it (run)
        # refit on the CPU time of each run, which only the calling thread spends when ONNX Runtime has one thread
        # (the server's wall time would count the event loop's turns on the core too)
        self.refit = cfg.threads == 1
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
        are dropped from the answer (images never interact in a ViT, so the real rows are unchanged). With I/O
        binding on, the model's BoundRunner does the same in its bound buffers (service/binding.py).
        """
        runner = self.runners.get(model)
        if runner is not None:  # I/O binding: the runner pads to its bucket itself
            return runner.run(x)
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

    def run(self, x: np.ndarray, routes: Sequence[str], merge: Optional[str] = None) -> list[Result]:
        """Answer a batch: x (N, C, S, S), one route per row; the results keep the input order.

        `merge` None follows cfg.batch_plan (service/plan.py); 'none' runs every hinted row on its route's model;
        'full' answers every hinted row on the full model's run; 'shared' every one the shared model serves on
        the shared model's. Rows given to the full model's run are 'batched' (in verify mode the hint still counts:
        an answer passing the route's route-probability rule is the hint's most probable class); rows given to the
        shared model are verified with the route's rule for it, like a route model's.
        """
        n = len(routes)
        probs = np.empty((n, len(self.classes)), np.float32)
        answered_by = [self.model_for(r) for r in routes]
        reasons: list[Optional[str]] = [None] * n
        shared = [False] * n  # rows the shared model answers first
        self.times.tick()
        if self.times.clock % PLAN_SNAPSHOT_EVERY == 0:
            self.plan_snapshot = self.plan_state()
        if merge is None and self.cfg.batch_plan == "cost":
            plan = self.plan(routes, answered_by)
            to_full, to_shared = plan.to_full, plan.to_shared
        elif merge in (None, "none"):
            to_full, to_shared = frozenset(), frozenset()
        elif merge in ("full", "shared"):
            hinted = frozenset(answered_by) - {self.full_model}
            to_full, to_shared = (hinted, frozenset()) if merge == "full" else (frozenset(), hinted)
        else:
            raise ValueError(f"merge must be None, 'none', 'full' or 'shared', got {merge!r}")
        for i, model in enumerate(answered_by):
            if model in to_shared and routes[i] in self.shared_rules:
                answered_by[i], shared[i] = self.shared_model, True
            elif model in to_full or model in to_shared:
                answered_by[i], reasons[i] = self.full_model, "batched"
        by_model: dict[str, list[int]] = {}
        for i, model in enumerate(answered_by):
            by_model.setdefault(model, []).append(i)
        for model, idx in by_model.items():  # one run per distinct model: routes sharing a mask share it
            t0 = time.thread_time()
            probs[idx] = softmax(self.logits(model, x[idx] if len(idx) < n else x))
            self._observe_run(model, len(idx), t0)

        index = probs.argmax(1)
        redo = []
        if self.cfg.hint_mode == "verify":
            rows = []  # hinted rows that ran on their route model or the shared one, or were batched onto full
            for i, r in enumerate(routes):
                if r == FULL:
                    continue
                if reasons[i] is None and not self.routes[r].served:
                    reasons[i] = "not_served"  # answered by the full model already: nothing to rerun
                else:
                    rows.append(i)
            if rows:
                k = [self._rule_row[("shared", routes[i]) if shared[i] else routes[i]] for i in rows]
                p, in_route, thr = probs[rows], self._in_route[k], self._thresholds[k]
                ok = accepted_rows(p, in_route, thr[:, 0], thr[:, 1], thr[:, 2])
                by_route_prob = ~np.isnan(thr[:, 2])
                answer = answer_rows(p, in_route, by_route_prob)
                top_in = in_route[np.arange(len(rows)), p.argmax(1)]
                seen: dict = {}  # route model, or ('shared', route) -> [rows, rerun]
                for j, i in enumerate(rows):
                    if reasons[i] == "batched":  # the full model's answer, judged by the route's own rule
                        if ok[j] and by_route_prob[j]:
                            index[i] = answer[j]
                        continue
                    tally = seen.setdefault(("shared", routes[i]) if shared[i] else answered_by[i], [0, 0])
                    tally[0] += 1
                    if ok[j]:
                        index[i] = answer[j]
                    else:
                        reasons[i] = "low_confidence" if by_route_prob[j] or top_in[j] else "off_route"
                        redo.append(i)
                        tally[1] += 1
                self._observe_fallbacks(seen)
        routed, overruled = {}, {}
        if redo:
            routed = {i: probs[i].copy() for i in redo}
            overruled = {i: answered_by[i] for i in redo}
            t0 = time.thread_time()
            probs[redo] = softmax(self.logits(self.full_model, x[redo]))
            self._observe_run(self.full_model, len(redo), t0)
            index[redo] = probs[redo].argmax(1)
            for i in redo:
                answered_by[i] = self.full_model
        return [Result(probs[i], r, answered_by[i], reasons[i] is not None, reasons[i],
                       reasons[i] is not None and int(probs[i].argmax()) not in self.routes[r].classes,
                       routed.get(i), int(index[i]), overruled.get(i)) for i, r in enumerate(routes)]

    def warm_up(self, max_batch_size: int, rounds: int) -> float:
        """Run the sessions `rounds` times per batch size (powers of two up to max_batch_size); returns seconds taken.

        Records each model's ms per run at each of those sizes (median of the rounds after the first) in
        `run_ms`, which `expected_ms` reads. Scope (cfg.warmup, 'auto' = 'all' on CUDA, 'light' on the CPU):
        'all' runs every session at every size; 'light' runs the full model at every size and every other model
        at batch 1 only, and fills in a route model's larger sizes as its own batch-1 time plus the full model's
        time per extra row x the model's FLOPs relative to full (listed in `run_ms_estimated`): what a run costs
        beyond its rows (launch, and weights fetched from memory) is paid once per run, not scaled by FLOPs. On
        the CPU a session's first run at a new batch size is no slower than its next ones, while warming 100
        route models at 7 sizes took minutes. With several models, the batch-1 time recorded is that of runs
        made in turn, each model after all the others: in a batch of mixed hints each route model runs once,
        with its weights out of the CPU's caches (CIFAR-100 bundle: 2.0 ms against 1.46 ms run after run); those
        are the median of at least `COLD_ROUNDS` turns.
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
        hot_full = dict(self.run_ms.get(self.full_model, {}))  # run after run, before batch 1 is retimed cold
        if len(self.sessions) > 1 and rounds:
            x = np.zeros((1, c, s, s), np.float32)
            cold: dict[str, list[float]] = {m: [] for m in self.sessions}
            for _ in range(max(rounds, COLD_ROUNDS)):  # the plan starts from these: more turns than `rounds`
                for model in self.sessions:
                    t = time.perf_counter()
                    self.logits(model, x)
                    cold[model].append((time.perf_counter() - t) * 1000.0)
            for model, times in cold.items():
                self.run_ms[model][1] = round(float(np.median(times)), 4)
        if light and 1 in hot_full:
            for model in self.sessions:
                rel = float(self.manifest["models"][model]["flops_rel"])
                own = self.run_ms[model]  # light warm-up timed every model at batch 1
                missing = [b for b in sizes if b not in own and b in hot_full]
                for b in missing:  # its own batch-1 run, plus the full model's time per extra row x its FLOPs
                    own[b] = round(own[1] + max(hot_full[b] - hot_full[1], 0.0) * rel, 4)
                if missing:
                    self.run_ms_estimated[model] = missing
        for model, points in self.run_ms.items():
            self.times.seed(model, points)
        self.fallback_rate = {}
        for name, r in self.routes.items():  # export's validation rate per route model, the plan's prior
            val = ((r.entry.get("acceptance") or {}).get("val") or {}) if name != FULL else {}
            if "fallback" in val and self.acceptance == "route":
                self.fallback_rate.setdefault(r.model, float(val["fallback"]))
        for name in self.shared_rules:  # and each route's on the shared model
            self.fallback_rate[("shared", name)] = float(self.manifest["shared"]["routes"][name]["val"]["fallback"])
        self.plan_snapshot = self.plan_state()
        return time.perf_counter() - t0

    def unserve_costlier(self) -> list[str]:
        """After warm_up, in verify mode with per-route rules and batch plan 'route': stop serving each route whose
        right-hint request costs at least an unhinted one here, run_ms[route][1] + val fallback x run_ms[full][1] >=
        run_ms[full][1] (records every served route's ratio in `measured_cost`). Returns the routes it stopped
        serving. With batch plan 'cost' it does nothing: the plan makes the same comparison for every batch, at the
        batch's size, and its answers on the full model still weigh the hint by the route's rule."""
        if self.cfg.hint_mode != "verify" or self.acceptance != "route" or self.cfg.batch_plan == "cost":
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

    # ------------------------------------------------------------------------------------------ batch plan

    def plan(self, routes: Sequence[str], answered_by: Sequence[str]):
        """The batch plan (service/plan.py) for rows on these routes that would first run on these models: which
        route models' rows the full model's run, or the shared model's, should answer instead. Nothing moves before
        warm-up has timed the models (`times`); a group goes to the shared model only if it serves every route in
        it."""
        rows: dict[str, list[str]] = {}
        for r, model in zip(routes, answered_by):
            rows.setdefault(model, []).append(r)
        full_rows = len(rows.pop(self.full_model, ()))
        if not rows or self.times.line(self.full_model) is None:
            return plan_batch([], full_rows, self.full_model, self.serving_time)
        verify = self.cfg.hint_mode == "verify"
        groups = []
        for model, names in rows.items():
            on_shared = None
            if self.shared_model is not None and all(r in self.shared_rules for r in names):
                on_shared = float(np.mean([self.fallback_rate.get(("shared", r), 0.0) for r in names])) if verify else 0.0
            groups.append(Group(model, len(names), self.fallback_rate.get(model, 0.0) if verify else 0.0, on_shared))
        return plan_batch(groups, full_rows, self.full_model, self.serving_time, self.shared_model)

    def serving_time(self, model: str, rows: float) -> float:
        """What the plan weighs: a run's ms by this server's fitted times (`times`), at the padded bucket when
        padding."""
        run = self.times.ms(model, self._rows_run(rows) if rows >= 1 else rows)
        return run + self.cfg.run_overhead_ms * min(rows, 1.0) if rows > 0 else run  # below 1 row: chance of a run

    def _rows_run(self, rows: float) -> float:
        """Rows a run on `rows` images really computes: the padded bucket's when padding."""
        return float(self.warm_size(int(np.ceil(rows))) or rows) if self.pad else rows

    def _observe_run(self, model: str, rows: int, t0: float) -> None:
        if self.refit:
            self.times.observe(model, self._rows_run(rows), (time.thread_time() - t0) * 1000.0)

    def _observe_fallbacks(self, seen: dict) -> None:
        """Follow each route model's share of rows rerun on the full model, and each route's on the shared model
        (what the plan counts; `seen`: model or ('shared', route) -> [rows, rerun] of one batch): an exponential
        average over rows, about the last 50, started from export's validation rate (`warm_up`)."""
        for model, (rows, rerun) in seen.items():
            share, keep = rerun / rows, 0.98 ** rows
            self.fallback_rate[model] = keep * self.fallback_rate.get(model, share) + (1.0 - keep) * share

    def plan_state(self) -> dict:
        """What the batch plan weighs now: each model's fitted ms per run and per row, each route model's followed
        share of rows rerun on the full model (and each route's on the shared model), and the batches seen. Call it
        from the thread that runs the batches (`run` refreshes `plan_snapshot` with it every PLAN_SNAPSHOT_EVERY
        batches for readers on other threads)."""
        rates = list(self.fallback_rate.items())
        return {"mode": self.cfg.batch_plan, "batches": self.times.clock,
                "run_ms_line": {m: [round(v, 4) for v in line] for m in self.sessions
                                if (line := self.times.line(m)) is not None},
                "fallback_rate": {m: round(v, 4) for m, v in rates if isinstance(m, str)},
                "shared_fallback_rate": {m[1]: round(v, 4) for m, v in rates if not isinstance(m, str)}}

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
            "batch_plan": self.plan_state(),
            # the shared model (export --shared) and the routes it serves, or None
            "shared": None if self.shared_model is None else {
                "model": self.shared_model, "flops_rel": self.manifest["shared"].get("flops_rel"),
                "head_usage": self.manifest["shared"].get("head_usage"), "routes": sorted(self.shared_rules)},
            "warm_batch_sizes": self.warm_sizes,
            "io_binding": {"enabled": self.io_binding, "requested": self.cfg.io_binding,
                           "unbound_runs": {m: r.unbound_runs for m, r in self.runners.items()}},
            "cuda_graph": {"enabled": any(r.cuda_graph and r.graph_error is None for r in self.runners.values()),
                           "requested": self.cfg.cuda_graph, "not_applicable": self.graph_not_applicable,
                           # per model: the sizes whose graph was captured, and why it has none if so
                           "models": {m: {"captured": sorted(r.captured),
                                          "problem": self.graph_problems.get(m) or r.graph_error}
                                      for m, r in self.runners.items() if r.cuda_graph or m in self.graph_problems}},
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


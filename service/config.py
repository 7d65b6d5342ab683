"""Serving options (`ServeConfig`), read from `STEERPRUNE_*` environment variables by the BentoML worker.

`bentoml serve` gives the service class no arguments, so everything a worker needs travels as environment
variables: `STEERPRUNE_BUNDLE` (required) and one `STEERPRUNE_<FIELD>` per field below (e.g.
`STEERPRUNE_HINT_MODE=trust`). `steerprune serve` and `start_server` set them from their options.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Mapping

from steerprune.errors import UserError

__all__ = ["ServeConfig", "ENV_PREFIX"]

ENV_PREFIX = "STEERPRUNE_"


@dataclass
class ServeConfig:
    """How the service loads a bundle, routes hints and bounds its inputs."""

    bundle: str = ""
    """Bundle directory written by `steerprune export` (manifest.json + models/)."""
    device: str = "auto"
    """auto (CUDA when onnxruntime has it and an NVIDIA GPU is visible) | cpu | cuda (fail readiness without CUDA)."""
    hint_mode: str = "verify"
    """verify: rerun on the full model when the routed answer contradicts the hint; trust: return the routed answer."""
    min_prob: float = 0.7
    """verify mode with acceptance 'global': a routed top-1 probability below this also falls back to the full model."""
    acceptance: str = "route"
    """verify mode: route (each route's acceptance rule and served flag, chosen at export on validation; a schema-1
    bundle has none and gets the global rule) | global (every route served with top-1 >= min_prob)."""
    unknown_hint: str = "error"
    """error: an unknown hint is a 400 listing the valid hints; full: answer with the full model."""
    top_k: int = 3
    """Scores returned when the request gives no top_k (clipped to the number of classes)."""
    max_batch_size: int = 64
    """Largest batch one model run sees; also the largest warm-up batch."""
    batcher: str = "greedy"
    """greedy: run whatever queued while the previous batch ran (no added wait) | bentoml: BentoML's CorkDispatcher."""
    max_latency_ms: int = 10_000
    """bentoml batcher only: its hard queueing limit (requests past it get 503), so keep it generous."""
    threads: int = 0
    """ONNX Runtime intra-op threads per session (0: ONNX Runtime's default, one per physical core)."""
    shared_arena: bool = True
    """Every session allocates from one CPU arena registered with ONNX Runtime's environment instead of growing a
    private one to its largest batch, so scratch memory no longer grows with the number of route models."""
    share_weights: bool = False
    """Hold each distinct initializer of the bundle's models once and hand it to every session that has it (ONNX
    Runtime add_initializer), with weight prepacking off in those sessions (a prepacked copy would be private):
    memory for many routes against some speed per run. Needs the onnx package."""
    warmup_rounds: int = 3
    """Warm-up runs per session and batch size before /readyz turns ready."""
    warmup: str = "auto"
    """all: every session runs at every warmed batch size | light: the full model at every size, every other model
    at batch 1 only (its time at larger sizes, used to bound queued work, is the full model's x its FLOPs relative
    to full) | auto: all with CUDA (a first run at a new shape can cost a kernel search), light on the CPU."""
    pad_batches: str = "auto"
    """Pad each model run's batch with zero images up to the next warmed size (powers of two up to max_batch_size),
    so a session never meets a batch size it has not seen: on | off | auto (on with CUDA, where a new input shape
    can cost a cuDNN search and a small model's run costs the same at batch 1 and 64; off on the CPU, where padding
    costs compute)."""
    io_binding: str = "auto"
    """Run each model through ONNX Runtime I/O bindings: per model and warmed batch size, input and output buffers
    on the device are bound once, a batch is copied into the smallest that holds it (padding as pad_batches on)
    and only its rows of the output are copied back (service/binding.py) | on | off | auto (on with CUDA; off on
    the CPU, where it was not faster: docs/gpu.md). A batch past max_batch_size runs unbound."""
    cuda_graph: str = "auto"
    """With I/O binding on CUDA: capture one CUDA graph per model and warmed batch size on its first run (warm-up)
    and replay it afterwards, so a run costs one graph launch instead of a kernel launch per node | on | off |
    auto (on with CUDA when io_binding is on). A session ONNX Runtime cannot build or capture with graphs falls
    back to plain I/O-bound runs, logged and listed under /routes' cuda_graph. on needs io_binding and
    pad_batches not off, and a device that can be CUDA."""
    max_upload_bytes: int = 8 << 20
    """Largest accepted request body (413 above)."""
    max_pixels: int = 4096 * 4096
    """Largest accepted image (width x height, checked from the header before decoding: decompression bombs)."""
    gc_gen2_threshold: int = 1000
    """With gc_young_ms 0 only: Python's third GC threshold in the worker once ready (Python's default is 10): full
    collections become ~100x rarer. Each one walks every live object that is not frozen, and a loaded server keeps
    many alive, so frequent full collections were its latency tail (digits, 613 req/s for 60 s: p99/p50 18 with 10,
    2.7 with 1000)."""
    gc_young_ms: float = 20.0
    """Period of the worker's own gen-0/1 garbage collections (gc_schedule.py); CPython's automatic collection is off
    while this clock runs. Under steady load CPython's trigger all but stops once the objects that BentoML's and
    uvicorn's timers keep alive start expiring, and a young collection then walks 100k+ objects (4-132 ms pauses on
    digits at 670 req/s). 0: CPython's automatic collection, with gc_gen2_threshold."""
    gc_full_s: float = 600.0
    """Period of full collections while the gen-0/1 clock runs. Each walks every live object that is not frozen (under
    load mostly what those timers hold, about rate x (8 x request_timeout_s + 350)), so it pauses the worker once per
    period."""
    request_timeout_s: float = 60.0
    """BentoML's traffic timeout: a request still unanswered after this long gets 504."""
    concurrency: int = 8
    """BentoML's `traffic.concurrency`: the concurrent requests one worker is sized for. BentoCloud's autoscaler adds
    replicas to keep each near it; a plain `bentoml serve` only records it. The CIFAR-10 bundle's worker (1 ONNX
    Runtime thread) is near saturation at 16 concurrent requests, so 8 keeps replicas near half load."""
    max_queue: int = 512
    """greedy batcher: most requests waiting for a batch; a request arriving at a full queue gets 503 with
    Retry-After before its body is read."""
    max_wait_ms: float = 1000.0
    """greedy batcher: the longest a request waits for its batch to start. A request arriving when the queued work
    (warm-up ms per image at max_batch_size, scaled by the measured/expected ratio of recent runs) exceeds it gets
    503 with Retry-After; a queued request whose batch has not started this long after it arrived is answered 503
    without being run. An accepted request's queueing delay is therefore at most this, plus one batch run."""
    inline_ms: float = 1.0
    """Batches whose expected ONNX Runtime time (measured per model and batch size during warm-up, fallback run
    included) is at most this many ms run on the event loop itself instead of a worker thread. For a small model the
    thread hop costs more than the run, and two runnable threads on one core add a scheduling tail (digits at half
    of saturation, medians of 3 A/B runs: server CPU 1.14 against 1.26 ms per request, requests over 3 ms in the
    handler 0.22% against 0.67%). Longer batches still go to a thread so the event loop keeps taking requests.
    0: always a thread."""
    batch_plan: str = "cost"
    """cost: in each batch, the requests hinted to one route model run on it only when that run (plus the fallback
    reruns expected at the route's observed rate) is expected to take less than adding them to the full model's run
    of the same batch (or the shared model's), by this server's run times (warm-up, refitted while serving with
    threads 1); otherwise the full model answers them (fallback_reason 'batched') or the shared model does. With
    many routes and little traffic per route a batch holds one request per route model, and a batch-1 run costs
    more than a row of a full-model batch | route: every hinted request runs on its route's model."""
    run_overhead_ms: float = 0.0
    """batch_plan 'cost': ms the plan adds to every model run it weighs, for work a run causes outside its own thread's
    CPU time (which is what the plan fits): with the server on one core, each run hands the core to the event loop
    and back. Larger values favour fewer, bigger runs (the shared or the full model) over one run per route model."""
    shared_model: bool = True
    """batch_plan 'cost' with a bundle that has a shared model (`export --shared`): the plan may also answer a
    batch's scattered hints on it, under each route's rule for it, instead of on the full model."""
    verify: bool = True
    """Re-check sha256 and stored-sample parity of every model at start-up (export's verify_bundle)."""
    unserve_costlier: bool = True
    """Verify mode with per-route rules: after warm-up, a route whose right-hint request would cost at least an
    unhinted one on this machine is not served (its hints go to the full model). The cost is measured, not
    counted: the route model's warm-up time per call at batch 1, plus the fallback rate export measured on
    validation times the full model's, against the full model's. Export's own choice counts FLOPs, which on a
    small model or a deep cut fall faster than ONNX Runtime's time does. Only with batch_plan 'route': the cost
    plan weighs the same timings for every batch."""
    switch_interval_ms: float = 0.5
    """Python's GIL switch interval in the worker once ready (default 5 ms): the event loop parsing uploads and the
    thread running ONNX Runtime hand the GIL back and forth, and each hand-off can hold a request that long."""

    def __post_init__(self):
        choices = {"device": ("auto", "cpu", "cuda"), "hint_mode": ("verify", "trust"),
                   "unknown_hint": ("error", "full"), "batcher": ("greedy", "bentoml"),
                   "pad_batches": ("auto", "on", "off"), "acceptance": ("route", "global"),
                   "warmup": ("auto", "all", "light"), "io_binding": ("auto", "on", "off"),
                   "cuda_graph": ("auto", "on", "off"), "batch_plan": ("cost", "route")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.io_binding == "on" and self.pad_batches == "off":
            raise UserError("io_binding on runs at the warmed batch sizes only: it contradicts pad_batches off")
        if self.cuda_graph == "on":  # a graph is one static shape at fixed addresses: it needs both
            for name, off in (("io_binding", "off"), ("pad_batches", "off"), ("device", "cpu")):
                if getattr(self, name) == off:
                    raise UserError(f"cuda_graph on needs I/O binding, padding and CUDA: it contradicts {name} {off}")
        if not 0.0 <= self.min_prob <= 1.0:
            raise UserError(f"min_prob must be in [0, 1], got {self.min_prob}")
        for name in ("top_k", "max_batch_size", "max_latency_ms", "max_upload_bytes", "max_pixels"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_batch_size < 2:
            raise UserError("max_batch_size must be at least 2")
        if not 0.01 <= self.switch_interval_ms <= 100:
            raise UserError(f"switch_interval_ms must be in [0.01, 100], got {self.switch_interval_ms}")
        if self.gc_gen2_threshold < 1:
            raise UserError(f"gc_gen2_threshold must be at least 1, got {self.gc_gen2_threshold}")
        if self.gc_young_ms != 0 and not 1.0 <= self.gc_young_ms <= 10_000.0:
            raise UserError(f"gc_young_ms must be 0 (CPython's own collection) or in [1, 10000], "
                            f"got {self.gc_young_ms}")
        if not 1.0 <= self.gc_full_s <= 86_400.0:
            raise UserError(f"gc_full_s must be in [1, 86400], got {self.gc_full_s}")
        if self.max_queue < 1:
            raise UserError(f"max_queue must be at least 1, got {self.max_queue}")
        if not 1.0 <= self.max_wait_ms <= 600_000.0:
            raise UserError(f"max_wait_ms must be in [1, 600000], got {self.max_wait_ms}")
        if self.concurrency < 1:
            raise UserError(f"concurrency must be >= 1, got {self.concurrency}")
        if not self.request_timeout_s > 0:
            raise UserError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        if not 0.0 <= self.inline_ms <= 1000.0:
            raise UserError(f"inline_ms must be in [0, 1000], got {self.inline_ms}")
        if self.threads < 0 or self.warmup_rounds < 0:
            raise UserError("threads and warmup_rounds must be >= 0")
        if not 0.0 <= self.run_overhead_ms <= 1000.0:
            raise UserError(f"run_overhead_ms must be in [0, 1000], got {self.run_overhead_ms}")

    def to_env(self) -> dict[str, str]:
        """Environment variables that make a BentoML worker rebuild this config."""
        env = {}
        for f in fields(self):
            v = getattr(self, f.name)
            env[ENV_PREFIX + f.name.upper()] = ("1" if v else "0") if isinstance(v, bool) else str(v)
        return env

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "ServeConfig":
        environ = os.environ if environ is None else environ
        kwargs = {}
        for f in fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            kind = type(f.default)
            try:
                if kind is bool:
                    if raw.strip().lower() not in ("1", "0", "true", "false", "yes", "no"):
                        raise ValueError(raw)
                    kwargs[f.name] = raw.strip().lower() in ("1", "true", "yes")
                else:
                    kwargs[f.name] = kind(raw)
            except ValueError:
                raise UserError(f"{ENV_PREFIX}{f.name.upper()}={raw!r} is not a valid {kind.__name__}") from None
        cfg = cls(**kwargs)
        if not cfg.bundle:
            raise UserError(f"set {ENV_PREFIX}BUNDLE to a bundle directory (written by `steerprune export`)")
        return cfg

"""I/O-bound model runs at fixed batch buckets, optionally replayed as CUDA graphs (ONNX Runtime).

A `BoundRunner` serves one session. For each batch bucket (the engine's warmed batch sizes) it holds an input and
an output OrtValue on the session's device, bound once to an IOBinding. A run copies the batch into the smallest
bucket that holds it, runs that binding and copies the batch's rows of the output back. Rows past the batch keep
whatever an earlier run left there: images never interact in a ViT, and those output rows are dropped.

On CUDA this skips ONNX Runtime's per-run device allocation and binding of inputs and outputs, and it is what CUDA
graphs need (static shapes, fixed addresses). With `cuda_graph`, bucket i runs with the run option
`gpu_graph_id = i + 1` (ONNX Runtime reserves 0 for itself and -1 for "no graph"): the first run at a bucket
captures its graph, every later one replays it. A capture that fails turns graphs off for that runner (the run is
retried with `gpu_graph_id -1`, a plain run) and `graph_error` says why.

Torch-free (onnxruntime and numpy only).
"""
from __future__ import annotations

import logging
import threading
from typing import NamedTuple, Optional, Sequence

import numpy as np

from steerprune.errors import UserError

__all__ = ["BoundRunner", "InputPool", "NO_GRAPH"]

log = logging.getLogger("steerprune.service")

NO_GRAPH = "-1"  # gpu_graph_id that runs without capturing or replaying a graph
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class _Bucket(NamedTuple):
    host: np.ndarray  # (b, *item) input staging; on the CPU it is the bound input itself
    inp: object  # OrtValue of the input on the device
    out: object  # OrtValue of the output on the device
    binding: object  # IOBinding with inp and out bound
    options: object  # RunOptions (gpu_graph_id)


class InputPool:
    """Input buffers per batch size shared by every runner of an engine (same device, same input shape), and the
    lock that serialises their runs: with many route models, one set of input buffers instead of one per model.
    A CUDA graph records its input's address, so graphs of different sessions may share a buffer as long as their
    replays never overlap, which the shared lock guarantees."""

    def __init__(self):
        self.lock = threading.Lock()
        self.by_size: dict[tuple, tuple[np.ndarray, object]] = {}  # (size, item, dtype, device) -> (host, OrtValue)

    def get(self, size: int, item: tuple, dtype, device: str, device_id: int):
        import onnxruntime as ort

        key = (size, item, np.dtype(dtype).str, device, device_id)
        if key not in self.by_size:
            host = np.zeros((size, *item), dtype)
            inp = (ort.OrtValue.ortvalue_from_numpy(host) if device == "cpu"
                   else ort.OrtValue.ortvalue_from_numpy(host, device, device_id))
            self.by_size[key] = (host, inp)
        return self.by_size[key]


class BoundRunner:
    """Run one ONNX Runtime session through I/O bindings at fixed batch sizes (`buckets`).

    `run(x)` returns the logits of x's rows; a batch larger than the largest bucket runs unbound (`sess.run`).
    Not reentrant per runner, as CUDA graphs require: a lock serialises runs (the pool's, with a shared `pool`).
    """

    def __init__(self, sess, input_name: str, output_name: str, device: str, buckets: Sequence[int],
                 cuda_graph: bool = False, device_id: int = 0, pool: Optional[InputPool] = None):
        import onnxruntime as ort

        if cuda_graph and device != "cuda":
            raise UserError(f"CUDA graphs need the CUDA provider, not {device}")
        self.sess, self.input_name, self.output_name = sess, input_name, output_name
        self.device, self.device_id = device, device_id
        self.buckets = sorted(set(int(b) for b in buckets))
        self.cuda_graph = cuda_graph
        self.graph_error: Optional[str] = None  # why graphs were turned off after a failed capture
        self.captured: list[int] = []  # buckets whose graph was captured (their first run with a graph id)
        self.unbound_runs = 0  # batches past the largest bucket
        self._item, self._in_dtype = _static_dims(sess.get_inputs(), input_name)
        self._classes, self._out_dtype = _static_dims(sess.get_outputs(), output_name)
        self._pool = pool
        self._lock = pool.lock if pool is not None else threading.Lock()
        self._plain = ort.RunOptions()  # for unbound runs and for bound runs without graphs
        self._plain.add_run_config_entry("gpu_graph_id", NO_GRAPH)
        self._by_size: dict[int, _Bucket] = {}  # made on a bucket's first run (light warm-up may never use some)

    def run(self, x: np.ndarray) -> np.ndarray:
        """x (N, *item) -> logits (N, *classes), a fresh array."""
        n = x.shape[0]
        size = next((b for b in self.buckets if b >= n), None)
        with self._lock:
            if size is None:  # past every bucket: nothing breaks, it only runs like an unbound session
                self.unbound_runs += 1
                return self.sess.run([self.output_name], {self.input_name: x}, self._plain)[0]
            b = self._bucket(size)
            b.host[:n] = x
            if self.device != "cpu":  # on the CPU the bound input is b.host itself
                b.inp.update_inplace(b.host)
            self._run(size, b)
            return b.out.numpy()[:n].copy()  # the CPU's numpy() is a view of the bound buffer

    def _run(self, size: int, b: _Bucket) -> None:
        graph = self.cuda_graph and self.graph_error is None
        first = graph and size not in self.captured
        try:
            self.sess.run_with_iobinding(b.binding, b.options if graph else self._plain)
        except Exception as e:  # noqa: BLE001 - ORT raises its own types; only a capture is retried
            if not first:
                raise
            self.graph_error = f"capture at batch {size} failed: {str(e).splitlines()[0][:200]}"
            log.warning("CUDA graphs off for this session (%s): plain I/O-bound runs instead", self.graph_error)
            self.sess.run_with_iobinding(b.binding, self._plain)
            return
        if first:
            self.captured.append(size)

    def _bucket(self, size: int) -> _Bucket:
        b = self._by_size.get(size)
        if b is None:
            b = self._by_size[size] = self._make(size)
        return b

    def _make(self, size: int) -> _Bucket:
        import onnxruntime as ort

        out_shape = (size, *self._classes)
        if self._pool is not None:
            host, inp = self._pool.get(size, self._item, self._in_dtype, self.device, self.device_id)
        elif self.device == "cpu":  # an OrtValue over our own array: no copy in
            host = np.zeros((size, *self._item), self._in_dtype)
            inp = ort.OrtValue.ortvalue_from_numpy(host)
        else:
            host = np.zeros((size, *self._item), self._in_dtype)
            inp = ort.OrtValue.ortvalue_from_numpy(host, self.device, self.device_id)
        if self.device == "cpu":  # ours to read out, no copy but ours
            out = ort.OrtValue.ortvalue_from_numpy(np.zeros(out_shape, self._out_dtype))
        else:
            out = ort.OrtValue.ortvalue_from_shape_and_type(out_shape, self._out_dtype, self.device, self.device_id)
        binding = self.sess.io_binding()
        binding.bind_ortvalue_input(self.input_name, inp)
        binding.bind_ortvalue_output(self.output_name, out)
        options = ort.RunOptions()
        # one graph per bucket: ids from 1 in bucket order (0 is ONNX Runtime's own default id)
        options.add_run_config_entry("gpu_graph_id", str(self.buckets.index(size) + 1))
        return _Bucket(host, inp, out, binding, options)

    def describe(self) -> dict:
        return {"buckets": self.buckets, "cuda_graph": self.cuda_graph and self.graph_error is None,
                "captured": sorted(self.captured), "graph_error": self.graph_error, "unbound_runs": self.unbound_runs}


def _static_dims(args, name: str) -> tuple[tuple[int, ...], type]:
    """The non-batch dims and numpy dtype of one session input/output; bound buffers need them static."""
    arg = next((a for a in args if a.name == name), None)
    if arg is None:
        raise UserError(f"the model has no input/output {name!r}")
    dims = tuple(arg.shape[1:])
    if not all(isinstance(d, int) and d > 0 for d in dims) or arg.type not in _DTYPES:
        raise UserError(f"I/O binding needs static non-batch dims and a float type: {name} is {arg.shape} "
                        f"{arg.type} (turn io_binding off)")
    return dims, _DTYPES[arg.type]

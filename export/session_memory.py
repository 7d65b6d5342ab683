"""Memory shared by the ONNX Runtime sessions of one process: one CPU arena, and initializers held once.

A bundle has one session per distinct model, and by default each session grows its own CPU arena to the largest
batch it has run and keeps a private copy of every weight. With many routes that is routes x (arena + model).
Two ONNX Runtime mechanisms bound it:

- `register_env_allocator` registers one arena-based CPU allocator with ONNX Runtime's environment; a session made
  with `env_allocator=True` (`session.use_env_allocators`) allocates from it, so activation scratch is shared by
  every session instead of held per session.
- `SharedInitializers` reads every model's initializers once, keys them by content (dtype, shape, bytes), keeps one
  array per distinct tensor and hands the same `OrtValue` to every session that has it
  (`SessionOptions.add_initializer`). Sessions built this way must not prepack their weights
  (`session.disable_prepacking`): a prepacked copy would be private to the session again.

Reading initializers needs the `onnx` package (protobuf only, no PyTorch); it is imported when sharing is asked for.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from steerprune.errors import UserError

__all__ = ["register_env_allocator", "SharedInitializers", "ShareStats", "MIN_SHARED_BYTES"]

# add_initializer wants caller-owned buffers of >= 128 bytes (ONNX Runtime's own rule for pre-existing memory);
# smaller tensors (shapes for Reshape, scalars) stay in the model, where shape inference can read them
MIN_SHARED_BYTES = 128

_env_allocator_registered = False


def register_env_allocator() -> None:
    """Register one arena-based CPU allocator with ONNX Runtime's environment (once per process)."""
    global _env_allocator_registered
    if _env_allocator_registered:
        return
    import onnxruntime as ort

    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    # (max_mem 0: no cap, -1: ONNX Runtime's defaults for extend strategy, initial chunk and dead-space bound)
    ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
    _env_allocator_registered = True


class ShareStats(NamedTuple):
    models: int
    tensors: int  # initializers handed to sessions, over all models
    distinct: int  # distinct tensors held
    total_mb: float  # bytes of those initializers as the models store them
    held_mb: float  # bytes held once


class SharedInitializers:
    """Initializers of several ONNX models, each distinct tensor held once as an OrtValue on `device`.

    `for_model(path)` gives {initializer name: OrtValue} for one model's session options; the arrays and values
    live as long as this object, which must therefore outlive every session built from it.
    """

    def __init__(self, paths: Sequence[str | Path], device: str = "cpu", device_id: int = 0):
        try:
            import onnx
            from onnx import numpy_helper
        except ImportError:
            raise UserError("sharing weights across sessions reads the models' initializers with the onnx package: "
                            "pip install onnx (or turn share_weights off)") from None
        import onnxruntime as ort

        self._by_model: dict[str, dict[str, object]] = {}
        held: dict[tuple, tuple[np.ndarray, object]] = {}
        tensors, total = 0, 0
        for p in paths:
            key_path = str(Path(p).resolve())
            try:
                proto = onnx.load(str(p), load_external_data=False)
            except Exception as e:  # noqa: BLE001 (protobuf raises its own DecodeError)
                raise UserError(f"cannot read the initializers of {p}: {e}") from None
            names = {}
            for init in proto.graph.initializer:
                if init.data_location == onnx.TensorProto.EXTERNAL:
                    continue  # ONNX Runtime reads external data itself
                arr = numpy_helper.to_array(init)
                if arr.nbytes < MIN_SHARED_BYTES:
                    continue
                arr = np.ascontiguousarray(arr)
                key = (arr.dtype.str, arr.shape, hashlib.sha256(arr.data).digest())
                if key not in held:
                    held[key] = (arr, ort.OrtValue.ortvalue_from_numpy(arr, device, device_id))
                names[init.name] = held[key][1]
                tensors += 1
                total += arr.nbytes
            self._by_model[key_path] = names
            del proto
        self._held = held  # keeps every array (CPU OrtValues point into them) and value alive
        self.stats = ShareStats(len(self._by_model), tensors, len(held), total / 2**20,
                                sum(a.nbytes for a, _ in held.values()) / 2**20)

    def for_model(self, path: str | Path) -> dict[str, object]:
        return self._by_model[str(Path(path).resolve())]

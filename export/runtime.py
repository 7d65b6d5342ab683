"""ONNX Runtime sessions: the one place that creates them (export's checks, `bundle verify`, the service, the bench).

Torch-free (onnxruntime only, imported lazily), so the service can use it without PyTorch installed.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

from steerprune.errors import UserError

__all__ = ["CUDA_PROVIDER", "DEVICES", "gpu_visible", "cuda_built", "ort_providers", "preload_cuda_libs",
           "ort_session"]

DEVICES = ("cpu", "cuda")

# use_tf32 0: CUDA's default TF32 matmuls moved logits by 2e-3 on an H200 (20x the bundle's parity tolerance); the
# bundle's accuracies were measured in float32, so the GPU must compute what was verified.
# cudnn_conv_algo_search HEURISTIC: the default (EXHAUSTIVE) benchmarks every cuDNN algorithm for the patch-embedding
# Conv at each new input shape, and a batching server sees a new batch size per model all the time
# (microsoft/onnxruntime#709, #19838).
CUDA_PROVIDER = ("CUDAExecutionProvider", {"use_tf32": "0", "cudnn_conv_algo_search": "HEURISTIC"})


def gpu_visible() -> bool:
    """An NVIDIA GPU this process could use (onnxruntime-gpu lists CUDA even without one, so ask the system)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return Path("/dev/nvidiactl").exists() or Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi") is not None


def cuda_built() -> bool:
    """This onnxruntime build has a CUDA provider (onnxruntime-gpu)."""
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def preload_cuda_libs(log=None) -> None:
    """Let onnxruntime-gpu find CUDA/cuDNN installed as pip wheels (nvidia-*, e.g. beside a CUDA torch).
    Failure is only logged: whoever asked for CUDA checks which provider each session really got."""
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception as e:  # noqa: BLE001
            if log:
                log(f"onnxruntime.preload_dlls failed: {e}")


def ort_providers(device: str = "cpu", log=None, cuda_graph: bool = False) -> list:
    """Execution providers for `device` ('cpu' | 'cuda'). For CUDA, first preload CUDA/cuDNN from pip wheels
    (nvidia-*) when onnxruntime can, and say plainly when this onnxruntime has no CUDA provider at all.
    `cuda_graph` adds the CUDA provider's `enable_cuda_graph` (runs must then use I/O binding:
    service/binding.py)."""
    import onnxruntime as ort

    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device != "cuda":
        raise UserError(f"unknown device {device!r}: use {' or '.join(DEVICES)}")
    if not cuda_built():
        raise UserError(f"onnxruntime {ort.__version__} has no CUDA provider: install onnxruntime-gpu "
                        "(and not onnxruntime beside it)")
    preload_cuda_libs(log=log)
    name, options = CUDA_PROVIDER
    return [(name, dict(options, enable_cuda_graph="1") if cuda_graph else options), "CPUExecutionProvider"]


def ort_session(path: str | Path, threads: Optional[int] = None, device: str = "cpu", require_device: bool = True,
                log=None, env_allocator: bool = True, initializers: Optional[dict] = None, cuda_graph: bool = False):
    """An ONNX Runtime session on `device`; `threads` fixes intra-op threads (0/None: ONNX Runtime's default, one
    per physical core); inter-op threads are always 1 (the graphs run sequentially).

    `env_allocator` (default): allocate from the CPU arena registered with the environment (shared by every such
    session, see `session_memory.register_env_allocator`) instead of a private one, which grows to its session's
    largest run and stays there. `initializers`: {name: OrtValue} used instead of the model's own
    (`session_memory.SharedInitializers`); prepacking is then off, so the shared buffers stay the only copy.
    `cuda_graph` (CUDA only): the CUDA provider captures and replays CUDA graphs (`enable_cuda_graph`); ONNX Runtime
    refuses to build such a session when a compute node would run on the CPU or the model has control flow.

    onnxruntime-gpu logs an error and silently falls back to the CPU when CUDA cannot start: with
    `require_device` that is refused here with the reason; without it the caller checks `get_providers()`.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if env_allocator:
        from .session_memory import register_env_allocator

        register_env_allocator()
        opts.add_session_config_entry("session.use_env_allocators", "1")
    if initializers:
        opts.add_session_config_entry("session.disable_prepacking", "1")
        for name, value in initializers.items():
            opts.add_initializer(name, value)
    sess = ort.InferenceSession(str(path), sess_options=opts,
                                providers=ort_providers(device, log=log, cuda_graph=cuda_graph and device == "cuda"))
    if require_device and device == "cuda" and sess.get_providers()[0] != "CUDAExecutionProvider":
        raise UserError(f"CUDA was requested but {Path(path).name} runs on {sess.get_providers()}: "
                        "check the GPU driver, CUDA 13 and cuDNN 9")
    return sess

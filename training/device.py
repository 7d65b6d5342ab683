"""Where training runs: `--device auto|cpu|cuda`, bf16 autocast on that device, pinned host-to-device copies."""
from __future__ import annotations

import torch

from steerprune.errors import UserError

__all__ = ["DEVICES", "AMP_MODES", "resolve_device", "native_bf16", "resolve_amp", "autocast", "to_device"]

DEVICES = ("auto", "cpu", "cuda")
AMP_MODES = ("auto", "none", "bf16")


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """'auto': CUDA when available, else the CPU. 'cuda' without CUDA is refused (a one-line UserError)."""
    if isinstance(name, torch.device):
        return name
    name = (name or "auto").lower()
    if name not in DEVICES and not name.startswith("cuda:"):
        raise UserError(f"unknown device '{name}': use {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here (torch {torch.__version__}, "
                        f"torch.cuda.is_available() is False); use --device cpu or auto")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """The device computes bf16 matmuls natively: a CUDA GPU with bf16, or a CPU with AVX512-BF16/AMX (oneDNN's
    check). Elsewhere bf16 autocast is emulated, and on an AVX2-only CPU a training step took 14x as long as fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_amp(amp: str, device: torch.device, log=None) -> str:
    """'auto' -> 'bf16' where the device has native bf16, else 'none'; an explicit 'bf16' is kept, with a warning
    where it is emulated."""
    if amp not in AMP_MODES:
        raise UserError(f"amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
    if amp == "auto":
        return "bf16" if native_bf16(device) else "none"
    if amp == "bf16" and not native_bf16(device) and log is not None:
        log(f"warning: --amp bf16 on a {device.type} without native bf16 is emulated and much slower than fp32 "
            "(use --amp auto or none)")
    return amp


def autocast(amp: str, device: torch.device):
    """bf16 autocast on the device when amp is 'bf16' (and the GPU supports bf16); a no-op context otherwise."""
    enabled = amp == "bf16" and (device.type != "cuda" or torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor to the device; through pinned memory on CUDA so the copy can overlap compute."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)

"""Where training runs: `--device auto|cpu|cuda`, bf16 autocast on that device, pinned host-to-device copies."""
from __future__ import annotations

import torch

from steerprune.errors import UserError

__all__ = ["DEVICES", "resolve_device", "autocast", "to_device"]

DEVICES = ("auto", "cpu", "cuda")


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


def autocast(amp: str, device: torch.device):
    """bf16 autocast on the device when amp is 'bf16' (and the GPU supports bf16); a no-op context otherwise."""
    enabled = amp == "bf16" and (device.type != "cuda" or torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor to the device; through pinned memory on CUDA so the copy can overlap compute."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)

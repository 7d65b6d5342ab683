"""Pure metric functions: SAE quality (FVU, L0, dead latents), accuracy and head usage."""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["fvu", "l0", "dead_fraction", "accuracy", "binomial_ci", "head_usage_summary"]


def fvu(x: torch.Tensor, recon: torch.Tensor) -> float:
    """Fraction of variance unexplained: ||x − x̂||² / ||x − mean(x)||² over the batch."""
    return float(((x - recon) ** 2).sum() / ((x - x.mean(0, keepdim=True)) ** 2).sum().clamp_min(1e-12))


def l0(latents: torch.Tensor) -> float:
    """Mean number of non-zero latents per input."""
    return float((latents != 0).sum(-1).float().mean())


def dead_fraction(latents: torch.Tensor) -> float:
    """Fraction of latents that never fire on the given inputs."""
    return float(((latents != 0).sum(0) == 0).float().mean())


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    return float((np.asarray(pred) == np.asarray(labels)).mean()) if len(labels) else float("nan")


def binomial_ci(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for an accuracy of correct/n."""
    if n == 0:
        return float("nan"), float("nan")
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def head_usage_summary(masks: np.ndarray, gated_layers: list[int]) -> dict:
    """masks (N, depth, H) -> usage over the gated layers: overall, per layer, per layer x head."""
    g = masks[:, gated_layers]  # (N, G, H)
    return {
        "head_usage": float(g.mean()),
        "layer_usage": {str(l): float(u) for l, u in zip(gated_layers, g.mean(axis=(0, 2)))},
        "layer_head_usage": g.mean(axis=0).round(4).tolist(),
    }

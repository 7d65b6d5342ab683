"""Pure metric functions: SAE quality (FVU, L0, dead latents), accuracy, head usage, and the statistics the reports
use (Wilson intervals, the exact McNemar test, a paired bootstrap interval), the latter through `scipy.stats`."""
from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "fvu", "l0", "dead_fraction", "accuracy", "binomial_ci", "mcnemar_p", "paired_diff_ci", "head_usage_summary",
]


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


def binomial_ci(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for an accuracy of correct/n (nan, nan when n is 0)."""
    from scipy.stats import binomtest

    if n == 0:
        return float("nan"), float("nan")
    ci = binomtest(int(correct), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value from the discordant pairs of a paired comparison on the same images:
    b images right only under A, c right only under B (a binomial test of b in b + c at 1/2)."""
    from scipy.stats import binomtest

    return 1.0 if b + c == 0 else float(binomtest(int(b), int(b + c), 0.5).pvalue)


def paired_diff_ci(correct_a: np.ndarray, correct_b: np.ndarray, confidence: float = 0.95,
                   n_resamples: int = 9999, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of acc(A) − acc(B) over the same images, resampling images (pairs kept).
    correct_a, correct_b: (N,) booleans, image i right under A / under B."""
    from scipy.stats import bootstrap

    d = np.asarray(correct_a, dtype=np.float64) - np.asarray(correct_b, dtype=np.float64)  # (N,) in {-1, 0, 1}
    if len(d) < 2:
        return float("nan"), float("nan")
    if np.all(d == d[0]):  # no spread: every resample has the same mean
        return float(d[0]), float(d[0])
    res = bootstrap((d,), np.mean, n_resamples=n_resamples, batch=max(1, min(n_resamples, 2_000_000 // len(d))),
                    confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def head_usage_summary(masks: np.ndarray, gated_layers: list[int]) -> dict:
    """masks (N, depth, H) -> usage over the gated layers: overall, per layer, per layer x head."""
    g = masks[:, gated_layers]  # (N, G, H)
    return {
        "head_usage": float(g.mean()),
        "layer_usage": {str(l): float(u) for l, u in zip(gated_layers, g.mean(axis=(0, 2)))},
        "layer_head_usage": g.mean(axis=0).round(4).tolist(),
    }

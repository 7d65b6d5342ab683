"""From per-image head decisions to one static mask per route, and the validation-only choices around it.

A route is a set of classes (one class, or a group). Its static mask keeps a head if the (steered) policy keeps it
in at least a fraction tau of the route's validation images ('vote'), or if its mean keep-probability reaches tau
('prob'). alpha and k are chosen per route by a stated rule on the validation split only: every function here that
chooses receives a `ValData` (the val split) and nothing else from the dataset.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch

from steerprune.training.metrics import accuracy
from steerprune.training.model import BackboneConfig, GatedViT
from steerprune.training.forward import run_model

__all__ = [
    "ValData", "aggregate", "head_usage", "gated_kept_heads", "kept_heads_text", "gated_kept_heads_text", "MaskEval", "Candidate", "select_candidate",
    "threshold_candidates", "match_usage", "AGGREGATES",
]

AGGREGATES = ("vote", "prob")


@dataclass(frozen=True)
class ValData:
    """The validation split, the only data the choosing functions see (test cannot reach them)."""

    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,)

    def route(self, classes: list[int]) -> np.ndarray:
        return np.flatnonzero(np.isin(self.labels, classes))


def aggregate(masks: np.ndarray, keep_logits: Optional[np.ndarray], gated: list[int], tau: float = 0.5,
              how: str = "vote") -> np.ndarray:
    """Per-image decisions over one route's images -> a static mask (depth, H) of 0/1, ungated layers all 1.

    masks (N, depth, H) applied keep masks; keep_logits (N, G, H) policy logits (needed for how='prob')."""
    if len(masks) == 0:
        raise ValueError("a route needs at least one image to derive its mask")
    out = np.ones(masks.shape[1:], dtype=np.int64)  # (depth, H)
    if how == "vote":
        frac = masks[:, gated].mean(0)  # (G, H) fraction of images keeping each head
    elif how == "prob":
        frac = (1.0 / (1.0 + np.exp(-keep_logits))).mean(0)  # (G, H) mean keep probability
    else:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {how!r}")
    out[gated] = (frac >= tau - 1e-9).astype(np.int64)
    return out


def head_usage(mask: np.ndarray, gated: list[int]) -> float:
    """Mean of a static mask over the gated layers (the policy's usage convention)."""
    return float(np.asarray(mask)[gated].mean())


def gated_kept_heads(mask: np.ndarray, gated: list[int]) -> dict[str, list[int]]:
    """{"L3": [2, 5], ...}: the heads kept at each gated layer (ungated layers, which keep every head, are left
    out; `export.prune.kept_heads` lists every layer)."""
    return {f"L{l}": [int(h) for h in np.flatnonzero(np.asarray(mask)[l])] for l in gated}


def kept_heads_text(heads: dict) -> str:
    """{'L1': [0, 3], 'L2': []} -> 'L1: h0,h3; L2: -' for tables."""
    return "; ".join(f"{k}: {','.join(f'h{h}' for h in v) or '-'}" for k, v in heads.items())


def gated_kept_heads_text(mask: np.ndarray, gated: list[int]) -> str:
    """'L1: h0,h3; L2: -; L3: h2,h5' for tables."""
    return kept_heads_text(gated_kept_heads(mask, gated))


class MaskEval:
    """Accuracy of static masks on a fixed image set, one forward per distinct (mask, image subset) (cached).

    Planning scores hundreds of candidate masks, each on one route's images only: forwarding just that subset
    (not the whole set) is what keeps steering a 10-class, 5000-image validation split in minutes."""

    def __init__(self, model: GatedViT, images: np.ndarray, labels: np.ndarray, bcfg: BackboneConfig):
        self.model, self.images, self.labels, self.bcfg = model, images, labels, bcfg
        self._preds: dict[bytes, np.ndarray] = {}  # mask -> predictions on every image
        self._subset_preds: dict[tuple[bytes, bytes], np.ndarray] = {}  # (mask, indices) -> predictions on those

    def preds(self, mask: np.ndarray, idx: Optional[np.ndarray] = None) -> np.ndarray:
        """Predictions with `mask` on every image, or on images[idx] (in idx order)."""
        key = np.asarray(mask, dtype=np.int8).tobytes()
        if key in self._preds:
            return self._preds[key] if idx is None else self._preds[key][idx]
        images = self.images
        if idx is not None:
            idx = np.asarray(idx, dtype=np.int64)
            sub_key = (key, idx.tobytes())
            if sub_key in self._subset_preds:
                return self._subset_preds[sub_key]
            images = self.images[idx]
        out = run_model(self.model, images, self.bcfg, head_mask=torch.as_tensor(np.asarray(mask), dtype=torch.float32))
        pred = out.logits.argmax(-1)
        if idx is None:
            self._preds[key] = pred
        else:
            self._subset_preds[sub_key] = pred
        return pred

    def acc(self, mask: np.ndarray, idx: Optional[np.ndarray] = None) -> float:
        p = self.preds(mask, idx)
        return accuracy(p, self.labels if idx is None else self.labels[idx])


class Candidate(NamedTuple):
    k: int
    alpha: float
    latents: dict  # layer -> latent indices
    mask: np.ndarray  # (depth, H)
    usage: float
    val_acc: float


def select_candidate(candidates: list[Candidate], base_acc: float, eps: float) -> Candidate:
    """The rule: among candidates whose route val accuracy is >= the unsteered static mask's minus eps, the one with
    the lowest head usage; ties -> higher val accuracy, then alpha closest to 1 (in log space), then smaller k.
    The unsteered candidate (alpha = 1) should be in the list so that there is always one to fall back to."""
    ok = [c for c in candidates if c.val_acc >= base_acc - eps - 1e-12]
    if not ok:
        raise ValueError("no candidate meets the accuracy constraint (include the alpha = 1 candidate)")
    dist = lambda a: abs(np.log(max(a, 1e-3)))  # noqa: E731 - alpha 0 (ablation) counts as farthest
    return min(ok, key=lambda c: (round(c.usage, 9), -c.val_acc, dist(c.alpha), c.k))


def threshold_candidates(model: GatedViT, val: ValData, bcfg: BackboneConfig, thresholds: list[float]
                         ) -> dict[float, tuple[np.ndarray, np.ndarray]]:
    """The no-SAE control's raw material: unsteered per-image decisions on all val images at each keep threshold.
    Thresholds change later layers' inputs (dropped heads change the residual), so each needs its own forward."""
    out = {}
    for t in thresholds:
        f = run_model(model, val.images, bcfg, keep_threshold=float(t))
        out[float(t)] = (f.masks, f.keep_logits)
    return out


def match_usage(decisions: dict[float, tuple[np.ndarray, np.ndarray]], idx: np.ndarray, gated: list[int],
                taus: list[float], how: str, target: float, score: Callable[[np.ndarray], float]) -> tuple[np.ndarray, dict]:
    """Threshold control for one route: among the masks the unsteered policy gives at raised keep thresholds t and
    vote fractions tau, the one whose usage is closest to `target`; ties -> best `score` (route val accuracy).
    Returns (mask, {"keep_threshold", "tau"})."""
    pool: dict[bytes, tuple[np.ndarray, dict]] = {}
    for t, (masks, logits) in decisions.items():
        for tau in taus:
            m = aggregate(masks[idx], logits[idx], gated, tau, how)
            pool.setdefault(m.astype(np.int8).tobytes(), (m, {"keep_threshold": t, "tau": tau}))
    gap = {key: abs(head_usage(m, gated) - target) for key, (m, _) in pool.items()}
    best = min(gap.values())
    tied = [pool[k] for k, g in gap.items() if g <= best + 1e-9]
    mask, setting = max(tied, key=lambda ms: score(ms[0])) if len(tied) > 1 else tied[0]
    return mask, setting

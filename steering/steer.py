"""The steering operation and the latent-selection strategies.

Steering a gated layer l whose CLS residual is x: z = SAE.encode(x) (top-k, dense), z' = z with the selected
latents scaled by alpha, and the head policy reads x' = x + W_dec (z' − z) = x + (alpha − 1) Σ_i z_i W_dec[i].
The SAE's reconstruction error stays in x', and the residual stream itself is never touched: only what the policy
reads changes (GatedViT's `policy_input_fn`). alpha = 1 gives x' = x + 0 = x bit for bit.

Strategies rank latents per layer:
- contrast (label-based): mean activation on the route's classes minus mean activation on every other class (val).
- zero-shot (label-free, "self-reference"): cosine between a latent's decoder row and the class direction, class c's
  classifier row carried back through the final LayerNorm (gamma ⊙ w_c, mean removed). By default the planner
  (plan.py, `zero_shot_pool`) keeps the 16 best aligned and orders them by `effect` over the images the model
  predicts as the class, which still reads no label.
- effect: how far amplifying the latent moves the keep logits toward dropping heads on the route's images:
  −Σ_h E_route[z_i J(x) W_dec[i]], J the Jacobian of the policy's LayerNorm + Linear at each image.
- importance (label-based): effect, with each head weighted by how dispensable it is to the route:
  a first-order (Taylor) estimate of how much the route's loss rises when the head is dropped from its unsteered
  static mask, measured on a seeded sample of the route's *train* images (so the val split that chooses k and alpha
  does not also rank). Latents that lower the keep logits of dispensable heads score up; of important heads, down.
- usage (global): correlation of the latent's activation with low per-image head usage.
- random: latents drawn from those that fire on the route's images (a control that can move the policy at all).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F

from steerprune.training.model import PolicyInputFn
from steerprune.training.sae import TopKSAE
from steerprune.training.tensors import to_tensor

__all__ = [
    "Steering", "steer_fn", "steer_input", "LayerLatents", "encode_layers", "class_directions", "route_direction",
    "weighted_effects", "head_importance", "importance_weights", "rank_contrast",
    "rank_zero_shot", "rank_effect", "rank_usage", "random_latents", "top_k",
]


@dataclass
class Steering:
    """Which latents to scale, per SAE layer, and by how much (one alpha for every steered layer)."""

    latents: dict[int, list[int]] = field(default_factory=dict)
    """Block index -> SAE latent indices to scale."""
    alpha: float = 1.0
    """Scale of the selected latents: > 1 amplifies, < 1 attenuates, 0 ablates, 1 is the identity."""

    def to_json(self) -> dict:
        return {"alpha": float(self.alpha), "latents": {f"L{l}": [int(i) for i in idx] for l, idx in self.latents.items()}}


@torch.no_grad()
def steer_input(sae: TopKSAE, cls: torch.Tensor, latents: torch.Tensor, alpha: float) -> torch.Tensor:
    """x' = x + W_dec (z' − z) with z' = z except z'[latents] = alpha · z[latents]. cls (B, D) -> (B, D)."""
    if latents.numel() == 0:
        return cls
    z = sae.dense_latents(cls)[:, latents]  # (B, k) only latents in the top-k are non-zero
    return cls + ((alpha - 1.0) * z) @ sae.W_dec[latents]  # (B, D)


def steer_fn(saes: dict[int, TopKSAE], steering: Steering) -> Optional[PolicyInputFn]:
    """GatedViT policy_input_fn that steers every layer named in `steering` (None when nothing is steered)."""
    idx = {l: torch.as_tensor(list(v), dtype=torch.long) for l, v in steering.latents.items() if len(v)}
    if not idx or steering.alpha == 1.0:
        return None
    missing = set(idx) - set(saes)
    if missing:
        raise ValueError(f"no SAE at layers {sorted(missing)}")

    def fn(layer: int, cls: torch.Tensor) -> torch.Tensor:
        return steer_input(saes[layer], cls, idx[layer], steering.alpha) if layer in idx else cls

    return fn


# ---------------------------------------------------------------------------------------------- statistics

class LayerLatents(NamedTuple):
    """Per-layer SAE view of a set of images, computed once from the unsteered forward."""

    inputs: dict[int, np.ndarray]  # layer -> (N, D) CLS residual the policy read
    latents: dict[int, np.ndarray]  # layer -> (N, m) dense top-k activations


@torch.no_grad()
def encode_layers(saes: dict[int, TopKSAE], policy_inputs: np.ndarray, gated: list[int], layers: list[int]) -> LayerLatents:
    """policy_inputs (N, G, D) from run_model(keep_inputs=True) -> the SAE latents at each requested layer."""
    inputs, latents = {}, {}
    for l in layers:
        x = policy_inputs[:, gated.index(l)]
        inputs[l] = x
        latents[l] = saes[l].dense_latents(torch.from_numpy(x)).numpy()
    return LayerLatents(inputs, latents)


@torch.no_grad()
def class_directions(vit: torch.nn.Module) -> np.ndarray:
    """(C, D): class c's classifier row carried back through the final LayerNorm, gamma ⊙ w_c, mean removed.

    logit_c = w_c · (gamma ⊙ (h − mean h) / std h + beta) + b_c, so along the residual h the logit grows with
    P(gamma ⊙ w_c), P the centring projection (LayerNorm ignores the mean of h)."""
    w = vit.head.weight.detach().float()  # (C, D)
    norm = vit.norm
    gamma = norm.weight.detach().float() if getattr(norm, "weight", None) is not None else torch.ones(w.shape[1])
    d = w * gamma
    return (d - d.mean(1, keepdim=True)).numpy()


def route_direction(directions: np.ndarray, classes: list[int]) -> np.ndarray:
    """A route's label-free direction: the mean of its classes' unit directions."""
    d = directions[classes]
    d = d / np.linalg.norm(d, axis=1, keepdims=True).clip(1e-12)
    return d.mean(0)


def _policy_parts(policy, j: int) -> tuple[np.ndarray, float]:
    """M = W diag(gamma) (H, D) of gated layer j's LayerNorm + Linear, and the LayerNorm's eps."""
    ln, lin = policy.layers[j][0], policy.layers[j][1]
    W = lin.weight.detach().float()  # (H, D)
    gamma = ln.weight.detach().float() if ln.weight is not None else torch.ones(W.shape[1])
    return (W * gamma).numpy(), float(ln.eps)


def _normalise(inputs: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    xc = inputs - inputs.mean(1, keepdims=True)
    sigma = np.sqrt((xc ** 2).mean(1) + eps)  # (N,)
    return xc / sigma[:, None], sigma


def weighted_effects(policy, j: int, sae: TopKSAE, inputs: np.ndarray, Z: np.ndarray) -> np.ndarray:
    """(m, H): mean_n z_ni · J(x_n) W_dec[i], the first-order change of the keep logits per unit of (alpha − 1) when
    latent i is scaled on these images (a latent that is silent on an image moves nothing there)."""
    M, eps = _policy_parts(policy, j)
    xh, sigma = _normalise(inputs, eps)
    D, N = inputs.shape[1], len(inputs)
    Wc = sae.W_dec.detach().float().numpy()
    Wc = Wc - Wc.mean(1, keepdims=True)
    first = ((Z / sigma[:, None]).sum(0) / N)[:, None] * (Wc @ M.T)  # (m, H)
    A = Z * (xh @ Wc.T) / sigma[:, None]  # (N, m)
    return first - A.T @ (xh @ M.T) / (N * D)


def head_importance(model, images: np.ndarray, targets: np.ndarray, bcfg, mask: np.ndarray,
                    batch_size: int = 128) -> np.ndarray:
    """(depth, H): first-order rise of the mean cross-entropy (w.r.t. `targets`) when each head is switched off from
    the static `mask`, −∂L/∂m at m = mask. Positive: the head matters to these images; negative: dropping it helps.
    (For a head the mask already drops, it is minus the first-order gain of switching the head back on.)"""
    model.eval()
    m = torch.tensor(np.asarray(mask), dtype=torch.float32, requires_grad=True)  # (depth, H)
    grad = torch.zeros_like(m)
    for s in range(0, len(images), batch_size):
        x = to_tensor(images[s:s + batch_size], bcfg)
        y = torch.as_tensor(np.asarray(targets[s:s + batch_size]), dtype=torch.long)
        loss = F.cross_entropy(model(x, head_mask=m).logits.float(), y, reduction="sum")
        grad += torch.autograd.grad(loss, m)[0]
    return (-grad / max(len(images), 1)).numpy()


def importance_weights(importance: np.ndarray, mask: np.ndarray, gated: list[int]) -> np.ndarray:
    """(depth, H) weight of each head's keep-logit change in the `importance` ranking: for heads the mask keeps,
    (median − importance) / std over the kept gated heads (> 0: dispensable, lowering its logit is wanted; < 0:
    important, lowering it is penalised); heads the mask already drops get 1 (keeping them off is wanted too)."""
    mask = np.asarray(mask).astype(bool)
    w = np.ones(mask.shape, dtype=np.float64)
    kept = np.zeros_like(mask)
    kept[gated] = mask[gated]
    if kept.any():
        vals = importance[kept]
        w[kept] = (np.median(vals) - vals) / (vals.std() + 1e-12)
    return w


# ---------------------------------------------------------------------------------------------- rankings

def top_k(scores: np.ndarray, k: int) -> list[int]:
    """Indices of the k largest finite scores, best first (ties broken by index, so runs are reproducible)."""
    order = np.lexsort((np.arange(len(scores)), -np.nan_to_num(scores, nan=-np.inf)))
    return [int(i) for i in order[:k]]


def rank_contrast(Z: np.ndarray, labels: np.ndarray, classes: list[int]) -> np.ndarray:
    """Label-based: mean activation on the route's classes minus the mean over every other class (m,).
    The 'rest' mean weighs every other class equally so one big class cannot dominate it."""
    inside = np.isin(labels, classes)
    if not inside.any():
        return np.full(Z.shape[1], np.nan)
    others = [c for c in np.unique(labels) if c not in set(classes)]
    rest = np.mean([Z[labels == c].mean(0) for c in others], axis=0) if others else np.zeros(Z.shape[1])
    return Z[inside].mean(0) - rest


def rank_zero_shot(W_dec: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """Label-free: cosine between each decoder row (m, D) and the class direction (D,)."""
    num = W_dec @ direction
    return num / (np.linalg.norm(W_dec, axis=1) * np.linalg.norm(direction)).clip(1e-12)


def rank_effect(effects: np.ndarray, sign: float, weights: Optional[np.ndarray] = None) -> np.ndarray:
    """How far scaling a latent lowers the keep logits summed over heads (m,), from `weighted_effects` on the route's
    images. sign = +1 for amplification (alpha > 1), −1 for attenuation (alpha < 1): Δlogits ≈ (alpha − 1) e_i.
    weights (H,): per-head weights of that sum (`importance_weights` of the layer); default all 1."""
    return -sign * (effects.sum(1) if weights is None else effects @ np.asarray(weights, dtype=effects.dtype))


def rank_usage(Z: np.ndarray, usage: np.ndarray) -> np.ndarray:
    """Global: correlation of each latent's activation with LOW per-image head usage (m,); silent latents get nan."""
    zc = Z - Z.mean(0)
    uc = usage - usage.mean()
    denom = np.sqrt((zc ** 2).sum(0) * (uc ** 2).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        r = -(zc * uc[:, None]).sum(0) / denom
    r[denom == 0] = np.nan
    return r


def random_latents(Z: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
    """k latents drawn uniformly from those that fire on the given images (all latents if fewer than k fire)."""
    live = np.flatnonzero((Z != 0).any(0))
    pool = live if len(live) >= k else np.arange(Z.shape[1])
    return sorted(int(i) for i in rng.choice(pool, size=k, replace=False))

"""AdaViT-style head policy (Meng et al., CVPR 2022): per gated block, LayerNorm + Linear(dim, heads) on the CLS token.

Training samples hard masks with Gumbel-sigmoid and straight-through gradients; eval keeps a head when
sigmoid(logit) > threshold (0.5 by default). The usage loss pulls mean head usage (and each layer's) to a target.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from steerprune.errors import UserError

__all__ = ["PolicyConfig", "HeadPolicy", "gumbel_sigmoid", "usage_loss"]


@dataclass
class PolicyConfig:
    dim: int
    """Width of the residual stream the policy reads."""
    num_heads: int
    gated_layers: list[int]
    """Block indices whose heads are gated (AdaViT: every block but the first)."""
    temperature: float = 5.0
    """Gumbel-sigmoid temperature during training (AdaViT's code uses 5)."""
    target_usage: float = 0.5
    """Target mean head usage over (batch, gated layers, heads)."""
    layer_targets: Optional[list[float]] = None
    """Per gated layer targets; default: every layer at target_usage (keeps one layer from starving)."""
    usage_weight: float = 2.0
    """λ of the usage loss λ·|mean usage − target| (AdaViT: 2)."""
    layer_weight: float = 1.0
    """Weight of the per-layer term mean_l |usage_l − target_l|, relative to the global term."""
    init_bias: float = 3.0
    """Initial keep-logit bias: start from keeping every head, then learn to drop."""

    def __post_init__(self):
        if not self.gated_layers or min(self.gated_layers) < 0 or len(set(self.gated_layers)) != len(self.gated_layers):
            raise UserError(f"gated_layers must be distinct non-negative block indices, got {self.gated_layers}")
        self.gated_layers = sorted(int(i) for i in self.gated_layers)
        if not 0.0 < self.target_usage <= 1.0:
            raise UserError(f"target_usage must be in (0, 1], got {self.target_usage}")
        if self.layer_targets is not None:
            if len(self.layer_targets) != len(self.gated_layers) or not all(0 < t <= 1 for t in self.layer_targets):
                raise UserError(f"layer_targets needs {len(self.gated_layers)} values in (0, 1]")
        if self.temperature <= 0:
            raise UserError("temperature must be positive")
        if self.usage_weight < 0 or self.layer_weight < 0:
            raise UserError("usage_weight and layer_weight must be >= 0")

    def targets(self) -> list[float]:
        return list(self.layer_targets) if self.layer_targets is not None else [self.target_usage] * len(self.gated_layers)


def gumbel_sigmoid(logits: torch.Tensor, temperature: float, hard: bool = True, noise_scale: float = 1.0) -> torch.Tensor:
    """Sample from a relaxed Bernoulli; with hard=True return 0/1 whose gradient is the soft sample's.

    noise_scale multiplies the logistic noise: 1 is the Gumbel-sigmoid, 0 the deterministic eval decision
    (logit > 0) with the same straight-through gradient.
    """
    u = torch.rand_like(logits).clamp_(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((logits + noise_scale * (torch.log(u) - torch.log1p(-u))) / temperature)
    if not hard:
        return soft
    return (soft > 0.5).to(soft.dtype) - soft.detach() + soft


def usage_loss(masks: torch.Tensor, cfg: PolicyConfig) -> torch.Tensor:
    """masks (B, G, H) at the gated layers -> λ·(|mean − target| + w·mean_l |layer mean − layer target|)."""
    layer_usage = masks.mean(dim=(0, 2))  # (G,)
    targets = torch.tensor(cfg.targets(), dtype=masks.dtype, device=masks.device)
    total = (masks.mean() - targets.mean()).abs()
    per_layer = (layer_usage - targets).abs().mean()
    return cfg.usage_weight * (total + cfg.layer_weight * per_layer)


class HeadPolicy(nn.Module):
    def __init__(self, cfg: PolicyConfig, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.cfg = cfg
        self.noise_scale = 1.0  # training-time schedule knob (see gumbel_sigmoid), not part of the config
        self.layers = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(cfg.dim, **dd), nn.Linear(cfg.dim, cfg.num_heads, **dd)) for _ in cfg.gated_layers
        )
        for seq in self.layers:
            nn.init.normal_(seq[1].weight, std=0.02)
            nn.init.constant_(seq[1].bias, cfg.init_bias)

    def layer_logits(self, j: int, cls: torch.Tensor) -> torch.Tensor:
        """Keep logits (B, H) of the j-th gated layer from the CLS residual (B, D)."""
        return self.layers[j](cls)

    def decide(self, logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
        if self.training:
            return gumbel_sigmoid(logits, self.cfg.temperature, hard=True, noise_scale=self.noise_scale)
        return (logits > math.log(threshold / (1 - threshold))).to(logits.dtype)

    def save_config(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self.cfg), indent=2))

    @staticmethod
    def load_config(path: Path) -> PolicyConfig:
        return PolicyConfig(**json.loads(Path(path).read_text()))

"""Short per-route recovery of a pruned model: distillation from the full model plus the labels, on train images of
the route's classes mixed with images of other classes.

A route's pruned model is used only for requests hinted with the route, and its answer is accepted only when the
route's acceptance rule (export/acceptance.py) trusts it; everything else is rerun on the full model. What a
request costs is therefore the route's FLOPs plus its fallback rate, and the fallback rate falls when the pruned
model is both closer to the full model and more certain about the route's own classes. The loss does both: KL to
the full model's softened logits (temperature `temperature`) over every image of the sample, plus cross-entropy
with the labels, on a sample in which the route's classes are over-represented (`other_ratio` images of other
classes per image of the route's). The images of other classes keep the model able to say "not this route" for a
wrong hint, which the acceptance rule's wrong-hint bound then measures on validation.

Only train images are read (never the validation split the acceptance rules are chosen on, nor test). The teacher's
logits are computed once per sample, for each image and its mirror, so a step costs one forward and backward of the
small model; the only augmentation is the horizontal flip (where the data allows it).

A recovered model's weights are its own: `serve --share-weights` can no longer share them with other models.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from steerprune.errors import UserError

__all__ = ["RecoverConfig", "RecoverStats", "recovery_sample", "recover_model"]


@dataclass
class RecoverConfig:
    epochs: int = 2
    """Passes over the route's sample (0 turns recovery off)."""
    lr: float = 3e-4
    """AdamW peak learning rate, cosine-decayed to 0 over the steps."""
    batch_size: int = 64
    """Images per step."""
    max_own: int = 2000
    """At most this many train images of the route's classes (seeded draw); a model serving every class (the shared
    model) draws this many of all classes."""
    other_ratio: float = 1.0
    """Train images of other classes per image of the route's classes."""
    temperature: float = 2.0
    """Distillation temperature (the KL term is scaled by its square, as in Hinton et al. 2015)."""
    ce_weight: float = 1.0
    """Weight of the cross-entropy with the labels beside the distillation term (weight 1)."""
    seed: int = 0
    """Seed of the sample and of the step order."""

    def __post_init__(self):
        if not 0 <= self.epochs <= 100:
            raise UserError(f"recover epochs must be from 0 to 100, got {self.epochs}")
        if not 0 < self.lr < 1:
            raise UserError(f"recover lr must be in (0, 1), got {self.lr}")
        if self.batch_size < 1 or self.max_own < 1:
            raise UserError("recover batch_size and max_own must be >= 1")
        if not 0 <= self.other_ratio <= 100:
            raise UserError(f"recover other_ratio must be in [0, 100], got {self.other_ratio}")
        if self.temperature <= 0 or self.ce_weight < 0:
            raise UserError("recover temperature must be > 0 and ce_weight >= 0")

    def to_json(self) -> dict:
        return asdict(self)


class RecoverStats(NamedTuple):
    images: int  # train images in the sample (route's classes + others)
    own: int  # of them, images of the route's classes
    steps: int
    seconds: float
    loss_before: float  # the recovery loss on the sample (no flip), before and after
    loss_after: float


def recovery_sample(labels: np.ndarray, classes: Sequence[int], cfg: RecoverConfig) -> tuple[np.ndarray, int]:
    """Indices into the train split (sorted) for one route's recovery, and how many are of its classes."""
    rng = np.random.default_rng(cfg.seed)
    own_mask = np.isin(labels, list(classes))
    own, other = np.flatnonzero(own_mask), np.flatnonzero(~own_mask)
    if not len(own):
        raise UserError(f"no train images of classes {list(classes)} to recover their route's model on")
    own = rng.choice(own, size=min(cfg.max_own, len(own)), replace=False)
    n_other = min(len(other), int(round(cfg.other_ratio * len(own))))
    other = rng.choice(other, size=n_other, replace=False) if n_other else other[:0]
    return np.sort(np.concatenate([own, other])), len(own)


def _loss(out: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor, cfg: RecoverConfig) -> torch.Tensor:
    T = cfg.temperature
    kd = F.kl_div(F.log_softmax(out / T, -1), F.log_softmax(teacher / T, -1), log_target=True,
                  reduction="batchmean") * T * T
    return kd + cfg.ce_weight * F.cross_entropy(out, y)


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


def recover_model(model: nn.Module, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: RecoverConfig,
                  hflip: bool = True, own: int = 0) -> RecoverStats:
    """Train `model` in place on (x (N, C, S, S) normalised, y (N,)) against `teacher`'s logits; returns it in eval
    mode with the loss on the sample before and after. `own`: how many of the images are of the route's classes
    (recorded only)."""
    t0 = time.perf_counter()
    teacher.eval()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    views = [x, x.flip(-1)] if hflip else [x]
    soft = [_logits(teacher, v) for v in views]  # (N, K) per view, computed once
    before = float(_loss(_logits(model, x), soft[0], y, cfg))
    gen = torch.Generator().manual_seed(cfg.seed)
    steps = cfg.epochs * math.ceil(len(x) / cfg.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / max(steps, 1))))
    model.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(x), generator=gen)
        for s in range(0, len(x), cfg.batch_size):
            b = order[s:s + cfg.batch_size]
            v = int(torch.randint(len(views), (1,), generator=gen))  # one view per step: the teacher saw both
            loss = _loss(model(views[v][b]), soft[v][b], y[b], cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    after = float(_loss(_logits(model, x), soft[0], y, cfg))
    return RecoverStats(len(x), int(own), steps, round(time.perf_counter() - t0, 2), round(before, 4), round(after, 4))

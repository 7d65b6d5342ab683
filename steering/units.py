"""Per-route MLP hidden-unit pruning on top of the steering report's head masks: which units, and how many.

For each route (its head mask taken unchanged from the steering report) every MLP hidden unit gets an importance
measured on a seeded sample of the route's *train* images with the route's head mask applied; the candidate cuts
(a uniform fraction of every block, or one global fraction across blocks, always the least important units first)
are scored on the route's *validation* images, and the rule keeps the candidate with the fewest MACs whose route val
accuracy is within `eps` of the reference (by default the heads-only route itself) and whose claim rate (the share
of other classes' val images it assigns to the route's classes) is at most `claim_eps` above the heads-only
route's. Units ranked on one class's loss can make the model answer that class more often, which raises its
accuracy on its own images for free but would let wrong hints through; the claim constraint stops that. With
`select='cost'` the rule is instead the lowest expected cost per right-hint request (FLOPs + fallback rate) under
the acceptance rule export would choose for each candidate, whose own bounds (right hints within `accept_eps` of
the full model, wrong hints within `accept_wrong_eps`) take the place of eps and the claim check. With
`recover_epochs`, every candidate (the heads-only route too) is pruned and recovered exactly as `steerprune export
--recover-epochs` will recover it (export/recover.py: distillation from the full model on train images of the route's
classes) before it is scored, so that the cut chosen is the one that is cheapest *after* recovery: deeper cuts lose
accuracy that recovery gives back. The test
split is only read afterwards, for the record. A single global model (one head mask for all classes, units ranked on train images of
all classes) is built the same way as the baseline the routes have to beat at matched FLOPs.

Importance ('taylor', the default): the first-order Taylor estimate of the route's loss change when a unit is
removed, |sum over tokens of a * dL/da| per image, averaged over images (Molchanov et al. 2019). It measures what
removing the unit does to the route's own loss, which activation size alone does not (a large activation that the
following layers and the classifier ignore costs nothing to remove); 'activation' (mean |a|) is kept as the
label-free alternative to compare on val.
"""
from __future__ import annotations

import copy
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from steerprune.errors import UserError

__all__ = ["IMPORTANCES", "SCHEMES", "REFERENCES", "UnitsConfig", "UnitCandidate", "unit_importance",
           "candidate_units", "UnitEval", "RecoveredEval", "select_units", "units_run", "read_units", "apply_units",
           "units_recover_config"]

IMPORTANCES = ("taylor", "activation")
SCHEMES = ("uniform", "global")
REFERENCES = ("route", "unsteered", "full")
UNITS_FILE = "units.json"
UNITS_CONFIG = "units_config.json"


@dataclass
class UnitsConfig:
    eps: float = 0.003
    """Rule: a cut is allowed if the route's val accuracy stays >= the reference's minus eps (0.003 = 0.3 points)."""
    reference: str = "route"
    """What eps is measured from: 'route' (the heads-only route as the steering report made it), 'unsteered' (the
    route's unsteered static head mask) or 'full' (the full model on the route's val images)."""
    importance: str = "taylor"
    """'taylor' (|sum_tokens a * dL/da| per image, averaged) or 'activation' (mean |a|): see the module docstring."""
    images: int = 512
    """Train images per route (seeded sample of the route's classes) on which unit importance is measured."""
    global_images: int = 2048
    """Train images (seeded sample of all classes) for the single global model's unit importance."""
    claim_eps: float = 0.01
    """Rule: a cut's claim rate on `off_images` val images of other classes may exceed the heads-only route's by at
    most this much (1 disables the check)."""
    off_images: int = 500
    """Val images of other classes per route (seeded sample) on which the claim rate is measured."""
    global_val: int = 1000
    """Val images (seeded sample of all classes) on which the global model's candidates are scored."""
    fractions: list[float] = field(default_factory=lambda: [0.2, 0.35, 0.5, 0.6, 0.7, 0.8, 0.9])
    """Fractions of the MLP hidden units to cut that are tried per route (each with every scheme)."""
    schemes: list[str] = field(default_factory=lambda: list(SCHEMES))
    """'uniform' cuts the same fraction in every block; 'global' cuts that fraction of all units, least important
    first across blocks (importances are loss estimates, so they compare across blocks)."""
    search: str = "all"
    """'all' scores every candidate on val (full curves, per-scheme bests); 'cheapest-first' scores them in order of
    increasing FLOPs and stops at the first that passes the rule: the same choice for far fewer forwards."""
    select: str = "accuracy"
    """'accuracy': the rule above (fewest FLOPs within eps and claim_eps). 'cost': the candidate of lowest expected
    cost per right-hint request (FLOPs + fallback rate) under the acceptance rule export would choose for it
    (export/acceptance.py, with accept_eps and accept_wrong_eps, on the route's val images and `off_images` wrong-hint
    images); eps and claim_eps then play no part: the acceptance rule's own bounds replace them."""
    accept_eps: float = 0.005
    """select='cost': export's --eps (accuracy with fallbacks >= the full model's - this, on right hints)."""
    accept_wrong_eps: float = 0.05
    """select='cost': export's --wrong-eps (the same on wrong-hint images)."""
    global_model: bool = True
    """Also build the single global model (one head mask + one unit set for all classes) as the baseline."""
    batch_size: int = 128
    """Images per forward/backward when measuring importance."""
    recover_epochs: int = 0
    """Recover every candidate's pruned model for this many epochs before scoring it, with export/recover.py's
    defaults otherwise (0: score the plain cut). `steerprune export --units` then recovers with the same settings
    unless told otherwise."""
    recover_lr: float = 3e-4
    """Peak learning rate of that recovery (export's --recover-lr)."""
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.eps < 1.0:
            raise UserError(f"eps must be in [0, 1), got {self.eps}")
        if not 0.0 <= self.claim_eps <= 1.0:
            raise UserError(f"claim_eps must be in [0, 1], got {self.claim_eps}")
        if self.off_images < 1 or self.global_val < 1:
            raise UserError("off_images and global_val must be >= 1")
        if self.reference not in REFERENCES:
            raise UserError(f"reference must be one of {', '.join(REFERENCES)}, got {self.reference!r}")
        if self.importance not in IMPORTANCES:
            raise UserError(f"importance must be one of {', '.join(IMPORTANCES)}, got {self.importance!r}")
        if self.images < 1 or self.global_images < 1 or self.batch_size < 1:
            raise UserError("images, global_images and batch_size must be >= 1")
        if not self.fractions or any(not 0.0 < f <= 1.0 for f in self.fractions):
            raise UserError(f"fractions must be in (0, 1], got {self.fractions}")
        if self.select not in ("accuracy", "cost"):
            raise UserError(f"select must be 'accuracy' or 'cost', got {self.select!r}")
        if not 0.0 <= self.accept_eps < 1.0 or not 0.0 <= self.accept_wrong_eps <= 1.0:
            raise UserError("accept_eps must be in [0, 1) and accept_wrong_eps in [0, 1]")
        if self.select == "cost" and self.search != "all":
            raise UserError("select='cost' scores every candidate: use search='all'")
        if self.search not in ("all", "cheapest-first"):
            raise UserError(f"search must be 'all' or 'cheapest-first', got {self.search!r}")
        if not self.schemes or any(s not in SCHEMES for s in self.schemes):
            raise UserError(f"schemes must be among {', '.join(SCHEMES)}, got {self.schemes}")
        self.recover_config()  # the recovery's own checks
        self.fractions = sorted({float(f) for f in self.fractions})

    def recover_config(self):
        """The RecoverConfig every candidate is recovered with (None: no recovery)."""
        return units_recover_config({"recover_epochs": self.recover_epochs, "recover_lr": self.recover_lr})


def units_recover_config(cfg: dict):
    """The RecoverConfig recorded in a units config dict (a units.json's "config"), or None when it has none."""
    from steerprune.export.recover import RecoverConfig

    epochs = int(cfg.get("recover_epochs") or 0)
    if not 0 <= epochs <= 100:
        raise UserError(f"--recover-epochs must be from 0 to 100, got {epochs}")
    if not 0 < float(cfg.get("recover_lr", 3e-4)) < 1:
        raise UserError(f"--recover-lr must be in (0, 1), got {cfg.get('recover_lr')}")
    return RecoverConfig(epochs=epochs, lr=float(cfg.get("recover_lr", 3e-4))) if epochs else None


class UnitCandidate(NamedTuple):
    scheme: str  # 'none' (no cut), 'uniform' or 'global'
    cut: float  # fraction of the MLP hidden units removed
    units: Optional[list[list[int]]]  # kept unit indices per block, None = all
    flops_rel: float
    val_acc: float


# ---------------------------------------------------------------------------------------------- importance

def _unit_masked(vit: nn.Module) -> nn.Module:
    """A copy of `vit` whose every MLP is a `MaskedMlp` keeping all units (masks are set in place later)."""
    from steerprune.export.prune import MaskedMlp, check_units

    check_units([[0]] * len(vit.blocks), vit)  # plain timm Mlp everywhere, or a clear error
    out = copy.deepcopy(vit).eval()
    for blk in out.blocks:
        blk.mlp = MaskedMlp(blk.mlp, range(blk.mlp.fc1.out_features))
    return out


def unit_importance(vit: nn.Module, images: np.ndarray, labels: np.ndarray, bcfg, head_mask, how: str = "taylor",
                    batch_size: int = 128) -> list[np.ndarray]:
    """One (hidden,) importance array per block, measured on uint8 `images` with the static `head_mask` applied."""
    from steerprune.training.model import GatedViT
    from steerprune.training.tensors import to_tensor

    if how not in IMPORTANCES:
        raise ValueError(f"importance must be one of {IMPORTANCES}, got {how!r}")
    masked = _unit_masked(vit)
    model = GatedViT(masked).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    acts: list[torch.Tensor] = []

    def keep(_m, _inp, out):  # the hidden activations a (B, N, hidden) before the unit mask
        if how == "taylor":
            out.requires_grad_(True)
            out.retain_grad()
        acts.append(out)

    hooks = [blk.mlp.mlp.drop1.register_forward_hook(keep) for blk in masked.blocks]
    hm = torch.as_tensor(np.asarray(head_mask), dtype=torch.float32)
    total = [torch.zeros(blk.mlp.mlp.fc1.out_features, dtype=torch.float64) for blk in masked.blocks]
    try:
        for i in range(0, len(images), batch_size):
            acts.clear()
            x = to_tensor(images[i:i + batch_size], bcfg)
            y = torch.as_tensor(labels[i:i + batch_size], dtype=torch.long)
            with torch.set_grad_enabled(how == "taylor"):
                logits = model(x, head_mask=hm).logits
                if how == "taylor":
                    F.cross_entropy(logits, y, reduction="sum").backward()  # per-image loss gradients
            for l, a in enumerate(acts):
                if how == "taylor":
                    score = (a * a.grad).sum(1).abs()  # (B, hidden) |sum_tokens a * dL/da|
                else:
                    score = a.abs().mean(1)  # (B, hidden)
                total[l] += score.detach().double().sum(0)
    finally:
        for h in hooks:
            h.remove()
    return [(t / max(len(images), 1)).numpy() for t in total]


def candidate_units(importance: list[np.ndarray], cut: float, scheme: str) -> list[list[int]]:
    """Kept unit indices per block after removing fraction `cut` of the least important units."""
    if scheme == "uniform":
        out = []
        for imp in importance:
            n_keep = int(round((1.0 - cut) * len(imp)))
            order = np.argsort(-imp, kind="stable")  # most important first
            out.append(sorted(int(u) for u in order[:n_keep]))
        return out
    if scheme == "global":
        flat = np.concatenate(importance)
        layer = np.concatenate([np.full(len(imp), l) for l, imp in enumerate(importance)])
        unit = np.concatenate([np.arange(len(imp)) for imp in importance])
        n_keep = int(round((1.0 - cut) * len(flat)))
        order = np.argsort(-flat, kind="stable")[:n_keep]
        out = [[] for _ in importance]
        for j in order:
            out[layer[j]].append(int(unit[j]))
        return [sorted(u) for u in out]
    raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")


# ---------------------------------------------------------------------------------------------- evaluation

class UnitEval:
    """Predictions of the backbone with a static head mask and MLP units kept, on uint8 images (one model copy whose
    unit masks are set in place per call)."""

    def __init__(self, vit: nn.Module, bcfg):
        from steerprune.training.model import GatedViT

        self.masked = _unit_masked(vit)
        self.model = GatedViT(self.masked).eval()
        self.bcfg = bcfg

    def _set(self, units: Optional[list[list[int]]]) -> None:
        for l, blk in enumerate(self.masked.blocks):
            m = blk.mlp.unit_mask
            m.fill_(1.0 if units is None else 0.0)
            if units is not None and units[l]:
                m[torch.tensor(units[l])] = 1.0

    def logits(self, images: np.ndarray, head_mask, units: Optional[list[list[int]]]) -> np.ndarray:
        from steerprune.training.forward import run_model

        self._set(units)
        out = run_model(self.model, images, self.bcfg, head_mask=torch.as_tensor(np.asarray(head_mask), dtype=torch.float32))
        return np.asarray(out.logits, dtype=np.float32)

    def preds(self, images: np.ndarray, head_mask, units: Optional[list[list[int]]]) -> np.ndarray:
        return self.logits(images, head_mask, units).argmax(-1)

    def acc(self, images: np.ndarray, labels: np.ndarray, head_mask, units) -> float:
        return float((self.preds(images, head_mask, units) == labels).mean()) if len(labels) else float("nan")


class RecoveredEval:
    """UnitEval's interface over recovered models: each (head mask, units) asked for is pruned (`prune_vit`, units
    physically removed), recovered on one route's recovery sample exactly as export recovers that route's model
    (export/recover.py), and kept for the route's later calls. The full model (every head and unit) is never
    recovered: it is asked of the plain `ev`."""

    def __init__(self, ev: UnitEval, vit: nn.Module, bcfg, train_images: np.ndarray, train_labels: np.ndarray,
                 classes: list[int], rcfg, hflip: bool = True):
        from steerprune.export.recover import recovery_sample
        from steerprune.training.tensors import to_tensor

        self.ev, self.vit, self.bcfg, self.rcfg, self.hflip = ev, vit, bcfg, rcfg, hflip
        idx, self.own = recovery_sample(train_labels, classes, rcfg)
        self.x = to_tensor(train_images[idx], bcfg)  # (N, C, S, S), the same draw as export's
        self.y = torch.from_numpy(np.asarray(train_labels[idx])).long()
        self.models: dict[str, nn.Module] = {}
        self.stats: dict[str, dict] = {}

    def model(self, mask, units) -> nn.Module:
        from steerprune.export.prune import manual_attention, mask_key, prune_vit
        from steerprune.export.recover import recover_model

        key = mask_key(mask, units)
        if key not in self.models:
            m = manual_attention(prune_vit(self.vit, mask, units)).eval()  # the module export recovers and traces
            self.stats[key] = recover_model(m, self.vit, self.x, self.y, self.rcfg, hflip=self.hflip,
                                            own=self.own)._asdict()
            self.models[key] = m
        return self.models[key]

    def logits(self, images: np.ndarray, head_mask, units: Optional[list[list[int]]]) -> np.ndarray:
        from steerprune.training.tensors import to_tensor

        if units is None and all(all(int(v) for v in row) for row in head_mask):
            return self.ev.logits(images, head_mask, None)
        m = self.model(head_mask, units)
        with torch.no_grad():
            out = [m(to_tensor(images[i:i + 512], self.bcfg)) for i in range(0, len(images), 512)]
        return torch.cat(out).numpy().astype(np.float32) if out else np.zeros((0, self.vit.num_classes), np.float32)

    def preds(self, images: np.ndarray, head_mask, units: Optional[list[list[int]]]) -> np.ndarray:
        return self.logits(images, head_mask, units).argmax(-1)

    def acc(self, images: np.ndarray, labels: np.ndarray, head_mask, units) -> float:
        return float((self.preds(images, head_mask, units) == labels).mean()) if len(labels) else float("nan")


def select_units(candidates: list[UnitCandidate], ref_acc: float, eps: float,
                 claim: Optional[Callable[[UnitCandidate], float]] = None, max_claim: float = 1.0) -> UnitCandidate:
    """The rule: among candidates with val accuracy >= ref_acc - eps (and, with `claim`, claim rate <= max_claim),
    the fewest FLOPs; ties -> higher val accuracy, then the smaller cut. `claim` is only called on candidates that
    meet the accuracy constraint, cheapest first, until one passes. The no-cut candidate should be in the list so
    that there is one to fall back to."""
    ok = sorted((c for c in candidates if c.val_acc >= ref_acc - eps - 1e-12),
                key=lambda c: (round(c.flops_rel, 9), -c.val_acc, c.cut))
    for c in ok:
        if claim is None or claim(c) <= max_claim + 1e-12:
            return c
    raise ValueError("no candidate meets the constraints (include the no-cut candidate)")


def _cheapest(ev: UnitEval, cands: list[UnitCandidate], vx, vy, ox, oy, classes, mask, full_mask, cfg: UnitsConfig,
              v_logits: dict):
    """select='cost': every candidate's expected cost per right-hint request under the acceptance rule export would
    choose for it (right hints: the route's val images `vx`, whose logits `_candidates` kept in `v_logits`; wrong
    hints: other classes' val images `ox`); the cheapest (ties: fewer FLOPs, then the smaller cut), its rule, and the
    per-candidate table."""
    from steerprune.export.acceptance import choose_rule, softmax

    full_v, full_o = ev.preds(vx, full_mask, None), ev.preds(ox, full_mask, None)
    scored = []
    for c in cands:
        lg = v_logits.get((c.scheme, c.cut))
        lg = ev.logits(vx, mask, c.units) if lg is None else lg  # the no-cut candidate was not forwarded there
        ch = choose_rule(softmax(lg), full_v, vy, classes, c.flops_rel, cfg.accept_eps,
                         wrong=(softmax(ev.logits(ox, mask, c.units)), full_o, oy), wrong_eps=cfg.accept_wrong_eps)
        scored.append((c, ch))
    best, ch = min(scored, key=lambda t: (round(t[1].score.cost, 9), round(t[0].flops_rel, 9), t[0].cut))
    table = [[c.scheme, c.cut, round(c.flops_rel, 4), round(x.score.cost, 4), x.kind, round(x.score.fallback, 4)]
             for c, x in scored]
    accept = {"kind": ch.kind, "rule": ch.rule.to_json(), "cost": ch.score.cost, "fallback": ch.score.fallback,
              "acc": ch.score.acc, "full_acc": ch.full_acc, "served": ch.served,
              "wrong_hints": None if ch.wrong is None else ch.wrong._asdict()}
    return best, accept, table


def _sample(idx: np.ndarray, n: int, seed: list[int]) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(idx, size=min(n, len(idx)), replace=False))


def _candidates(ev: UnitEval, vit, imp, images, labels, mask, cfg: UnitsConfig, base_acc: float,
                logits: Optional[dict] = None) -> list[UnitCandidate]:
    """The no-cut candidate and every (scheme, cut), scored on `images`; with `logits`, each cut's logits are kept
    there by (scheme, cut) for a caller that needs more than the accuracy."""
    from steerprune.training.model import head_flops

    out = [UnitCandidate("none", 0.0, None, head_flops(vit, mask)["rel"], base_acc)]
    for scheme in cfg.schemes:
        for cut in cfg.fractions:
            units = candidate_units(imp, cut, scheme)
            lg = ev.logits(images, mask, units)
            if logits is not None:
                logits[(scheme, cut)] = lg
            acc = float((lg.argmax(-1) == labels).mean()) if len(labels) else float("nan")
            out.append(UnitCandidate(scheme, cut, units, head_flops(vit, mask, units)["rel"], acc))
    return out


def _kept(units: Optional[list[list[int]]], vit) -> dict[str, int]:
    from steerprune.export.prune import mlp_kept

    return mlp_kept(vit, units)


def _curve(cands: list[UnitCandidate]) -> list[list]:
    return [[c.scheme, c.cut, round(c.flops_rel, 4), round(c.val_acc, 4)] for c in cands]


# ---------------------------------------------------------------------------------------------- the stage

def _merge_parts(parts: list, names: list[str], report_path: Path) -> list[dict]:
    """The routes of several parts' units.json (finished or cut off), in the report's order; a route in two parts is
    refused."""
    from steerprune.training.run import read_json

    got: dict[str, dict] = {}
    for part in parts:
        d = read_json(Path(part) / UNITS_FILE)
        if Path(d.get("report", "")).resolve() != Path(report_path).resolve():
            raise UserError(f"{part} was made from {d.get('report')}, not {report_path}")
        for r in d["routes"]:
            if r["name"] in got:
                raise UserError(f"route {r['name']!r} is in more than one part")
            got[r["name"]] = r
    if not got:
        raise UserError(f"the parts {[str(x) for x in parts]} hold no route yet")
    return [got[n] for n in names if n in got]  # a route no part has finished stays heads-only at export


def _claim(ev: UnitEval, images: np.ndarray, classes: list[int], mask, units) -> float:
    """Share of `images` (other classes' images) that the model assigns to `classes`."""
    return float(np.isin(ev.preds(images, mask, units), classes).mean()) if len(images) else 0.0


def _route_units(ev: UnitEval, vit, bcfg, r: dict, train, val, test, full_mask, cfg: UnitsConfig,
                 hflip: bool = True) -> dict:
    """Importance on train, choice on val, then the test record, for one steering-report route. With recovery every
    candidate is scored (and the test record taken) on its recovered model; importance is the plain model's."""
    name, classes, mask = str(r["name"]), list(r["classes"]), r["mask"]
    seed = [cfg.seed, zlib.crc32(name.encode())]
    vi, ti = val.route(classes), train.route(classes)
    if len(vi) == 0 or len(ti) == 0:
        raise UserError(f"route {name!r} has no train or val images")
    t_route = time.perf_counter()
    ti = _sample(ti, cfg.images, seed)
    imp = unit_importance(vit, train.images[ti], train.labels[ti], bcfg, mask, cfg.importance, cfg.batch_size)
    rcfg = cfg.recover_config()
    plain = ev
    if rcfg is not None:
        ev = RecoveredEval(plain, vit, bcfg, train.images, train.labels, classes, rcfg, hflip)
    vx, vy = val.images[vi], val.labels[vi]
    off = _sample(np.flatnonzero(~np.isin(val.labels, classes)), cfg.off_images, seed + [1])
    from steerprune.training.model import head_flops

    rv = r.get("val", {}).get("acc")  # the steering report's own val figure for this mask, when it has one
    report_ok = rcfg is None and isinstance(rv, float) and r.get("val", {}).get("n") == len(vi)
    route_acc = rv if report_ok else ev.acc(vx, vy, mask, None)
    ref_acc = {"route": lambda: route_acc, "full": lambda: ev.acc(vx, vy, full_mask, None),
               "unsteered": lambda: ev.acc(vx, vy, r.get("baseline", {}).get("mask", mask), None)}[cfg.reference]()
    claims: dict[tuple, float] = {}

    def claim(c: UnitCandidate) -> float:
        if (c.scheme, c.cut) not in claims:
            claims[(c.scheme, c.cut)] = _claim(ev, val.images[off], classes, mask, c.units)
        return claims[(c.scheme, c.cut)]

    none = UnitCandidate("none", 0.0, None, head_flops(vit, mask)["rel"], route_acc)
    base_claim = claim(none)
    max_claim = base_claim + cfg.claim_eps
    by_scheme, costs, accept = None, None, None
    if cfg.search == "all":
        v_logits: dict = {}  # (scheme, cut) -> logits on vx, for the cost of each candidate
        cands = _candidates(ev, vit, imp, vx, vy, mask, cfg, route_acc, v_logits)
        acc_only = select_units(cands, ref_acc, cfg.eps)  # what the accuracy rule alone would take
        if cfg.select == "cost":
            c, accept, costs = _cheapest(ev, cands, vx, vy, val.images[off], val.labels[off], classes, mask,
                                         full_mask, cfg, v_logits)
            by_scheme = {s: min((x for x in costs if x[0] in ("none", s)), key=lambda x: (x[3], x[2]))[1]
                         for s in cfg.schemes}
        else:
            c = select_units(cands, ref_acc, cfg.eps, claim, max_claim)
            by_scheme = {s: select_units([x for x in cands if x.scheme in ("none", s)], ref_acc, cfg.eps, claim,
                                         max_claim).cut for s in cfg.schemes}
    else:  # cheapest first, stop at the first that passes both checks: select_units' choice, fewer forwards
        specs = sorted(((head_flops(vit, mask, u)["rel"], cut, sch, u) for sch in cfg.schemes for cut in cfg.fractions
                        for u in [candidate_units(imp, cut, sch)]), key=lambda t: (round(t[0], 9), t[1]))
        cands, c, acc_only = [none], none, None
        for flops, cut, sch, u in specs:
            cand = UnitCandidate(sch, cut, u, flops, ev.acc(vx, vy, mask, u))
            cands.append(cand)
            if cand.val_acc >= ref_acc - cfg.eps - 1e-12:
                acc_only = acc_only or cand
                if claim(cand) <= max_claim + 1e-12:
                    c = cand
                    break
        acc_only = acc_only or none
    # the test record: route images, and a seeded sample of other classes' images for the claim rate
    ti_test = test.route(classes)
    off_t = _sample(np.flatnonzero(~np.isin(test.labels, classes)), cfg.off_images, seed + [2])
    tx, ty = test.images[ti_test], test.labels[ti_test]
    acc_h = (r["acc"] if rcfg is None and isinstance(r.get("acc"), float)  # the report's own figure
             else ev.acc(tx, ty, mask, None))
    full_acc = r.get("full", {}).get("acc")
    test_rec = {"n": int(len(ty)), "acc_heads_only": acc_h,
                "acc": ev.acc(tx, ty, mask, c.units) if c.units is not None else acc_h,
                "full_acc": full_acc if isinstance(full_acc, float) else plain.acc(tx, ty, full_mask, None),
                "n_off": int(len(off_t)), "claim_heads_only": _claim(ev, test.images[off_t], classes, mask, None)}
    test_rec["claim"] = (_claim(ev, test.images[off_t], classes, mask, c.units) if c.units is not None
                         else test_rec["claim_heads_only"])
    return {
        "name": name, "classes": classes, "mask": mask, "mlp_units": c.units, "mlp_kept": _kept(c.units, vit),
        "scheme": c.scheme, "cut": c.cut, "flops_rel": c.flops_rel, "flops_rel_heads_only": none.flops_rel,
        "val": {"n": int(len(vi)), "n_off": int(len(off)), "route_acc": route_acc, "reference_acc": ref_acc,
                "acc": c.val_acc, "claim_heads_only": base_claim, "claim": claim(c), "search": cfg.search,
                "best_cut_per_scheme": by_scheme,
                "accuracy_rule_alone": {"scheme": acc_only.scheme, "cut": acc_only.cut, "flops_rel": acc_only.flops_rel,
                                        "acc": acc_only.val_acc, "claim": claims.get((acc_only.scheme, acc_only.cut))},
                "candidates": _curve(cands),
                # select='cost': [scheme, cut, flops_rel, expected cost, rule kind, fallback] per candidate, and the
                # acceptance rule export would choose for the chosen one (export chooses again on its own draw)
                "costs": costs, "acceptance": accept,
                "claims": [[k[0], k[1], round(v, 4)] for k, v in claims.items()]},
        "test": test_rec,  # measured after the choice, for the record
        # with recovery: the sample and each recovered candidate's training record (mask_key -> RecoverStats)
        "recovery": None if rcfg is None else {"config": rcfg.to_json(), "images": int(len(ev.y)), "own": int(ev.own),
                                               "models": ev.stats},
        "seconds": round(time.perf_counter() - t_route, 1),
    }


def units_run(run_dir, cfg: Optional[UnitsConfig] = None, report_path=None, out_dir=None, log=print,
              routes: Optional[list[str]] = None, parts: Optional[list] = None) -> dict:
    """Choose MLP units per route of the steering report (and the global baseline); write units.json + its config.

    routes: only these route names (a part, to be merged later); parts: folders holding such parts' units.json,
    whose routes are taken as they are (they must together cover the report's routes once each)."""
    from steerprune.training.run import load_run, read_json, versions, write_json

    from .masks import ValData

    cfg = cfg or UnitsConfig()
    t0 = time.perf_counter()
    run = load_run(run_dir, need=("backbone", "policy"))
    report_path = Path(report_path) if report_path else run.path / "steering" / "report.json"
    rep = read_json(report_path)
    if not isinstance(rep.get("routes"), list) or not rep["routes"]:
        raise UserError(f"{report_path} lists no routes (expected the steering report schema)")
    out_dir = Path(out_dir) if out_dir else report_path.parent
    vit, bcfg = run.vit.eval(), run.backbone
    data = run.load_data()
    val = ValData(data.val.images, data.val.labels)
    train = ValData(data.train.images, data.train.labels)
    test = ValData(data.test.images, data.test.labels)
    depth, H = len(vit.blocks), vit.blocks[0].attn.num_heads
    full_mask = [[1] * H for _ in range(depth)]
    ev = UnitEval(vit, bcfg)
    names = [str(r["name"]) for r in rep["routes"]]
    if routes is not None and parts is not None:
        raise UserError("give either routes or parts, not both")
    if routes is not None:
        unknown = sorted(set(routes) - set(names))
        if unknown:
            raise UserError(f"routes {unknown} are not in {report_path}")
    todo = [r for r in rep["routes"] if routes is None or str(r["name"]) in routes]
    routes_out = _merge_parts(parts, names, report_path) if parts is not None else []
    if parts is not None:  # the choices were made with the parts' settings: record those, not this call's
        part_cfgs = [read_json(Path(x) / UNITS_FILE)["config"] for x in parts]
        if any(c != part_cfgs[0] for c in part_cfgs):
            raise UserError("the parts were made with different settings: merge parts of one configuration")
        cfg = UnitsConfig(**{**part_cfgs[0], "global_model": cfg.global_model})
    out_dir.mkdir(parents=True, exist_ok=True)
    for ri, r in enumerate([] if parts is not None else todo):
        routes_out.append(_route_units(ev, vit, bcfg, r, train, val, test, full_mask, cfg, data.hflip))
        write_json(out_dir / UNITS_FILE, {"run": str(run.path), "report": str(report_path), "config": asdict(cfg),
                                          "routes": routes_out, "partial": True})  # kept if the stage is cut off
        e = routes_out[-1]
        log(f"  units {e['name']}: {e['scheme']} cut {e['cut']:g}, FLOPs {e['flops_rel_heads_only']:.3f} -> "
            f"{e['flops_rel']:.3f}, val acc {e['val']['route_acc']:.3f} -> {e['val']['acc']:.3f} (ref "
            f"{e['val']['reference_acc']:.3f}), val claim {e['val']['claim_heads_only']:.3f} -> {e['val']['claim']:.3f}"
            + (f", expected cost {e['val']['acceptance']['cost']:.3f} ({e['val']['acceptance']['kind']})"
               if e["val"].get("acceptance") else "")
            + (f", {len(e['recovery']['models'])} candidates recovered" if e.get("recovery") else "") + "; "
            f"test {e['test']['acc_heads_only']:.3f} -> {e['test']['acc']:.3f} ({ri + 1}/{len(todo)}, "
            f"{time.perf_counter() - t0:.0f} s)")

    summary = {
        "routes": len(routes_out), "missing": [n for n in names if n not in {e["name"] for e in routes_out}], "routes_cut": sum(e["mlp_units"] is not None for e in routes_out),
        "mean_flops_rel_heads_only": float(np.mean([e["flops_rel_heads_only"] for e in routes_out])),
        "mean_flops_rel": float(np.mean([e["flops_rel"] for e in routes_out])),
        "mean_val_acc_heads_only": float(np.mean([e["val"]["route_acc"] for e in routes_out])),
        "mean_val_acc": float(np.mean([e["val"]["acc"] for e in routes_out])),
        "mean_test_acc_heads_only": float(np.mean([e["test"]["acc_heads_only"] for e in routes_out])),
        "mean_test_acc": float(np.mean([e["test"]["acc"] for e in routes_out])),
        "mean_test_full_acc": float(np.mean([e["test"]["full_acc"] for e in routes_out])),
    }
    out = {"run": str(run.path), "report": str(report_path), "config": asdict(cfg), "routes": routes_out,
           "summary": summary, "parts": [str(x) for x in parts] if parts is not None else None}
    if cfg.global_model and routes is None:  # the baseline is matched to every route's FLOPs: not in a part
        out["global"] = _global_model(run, ev, val, train, test, cfg, summary, rep, log)
    out["seconds"] = time.perf_counter() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / UNITS_CONFIG, {**asdict(cfg), "run": str(run.path), "report": str(report_path),
                                        "selection": "val", "importance_on": "train", "evaluation": "test",
                                        "versions": versions()})
    write_json(out_dir / UNITS_FILE, out)
    log(f"wrote {out_dir / UNITS_FILE}: {summary['routes_cut']}/{summary['routes']} routes cut, mean FLOPs "
        f"{summary['mean_flops_rel_heads_only']:.3f} -> {summary['mean_flops_rel']:.3f}, mean test acc "
        f"{summary['mean_test_acc_heads_only']:.4f} -> {summary['mean_test_acc']:.4f} ({out['seconds']:.0f} s)")
    return out


def _per_class_acc(ev: UnitEval, split, mask, units, classes: list[list[int]]) -> list[float]:
    pred = ev.preds(split.images, mask, units)
    return [float((pred[split.route(c)] == split.labels[split.route(c)]).mean()) for c in classes]


def _global_model(run, ev: UnitEval, val, train, test, cfg: UnitsConfig, summary: dict, rep: dict, log) -> dict:
    """One head mask for all classes (the unsteered policy's static mask over every val image, as the steering
    report aggregates it) and one unit set ranked on train images of every class; candidates scored on a seeded
    sample of `global_val` val images of every class. Reported three ways: chosen by the same eps rule, and at the
    FLOPs closest to the heads+MLP routes' mean and to the heads-only routes' mean (each on every test image)."""
    from steerprune.training.forward import run_model

    from .masks import aggregate

    gated = run.policy.cfg.gated_layers
    scfg = rep.get("config", {})
    f = run_model(run.model, val.images, run.backbone)
    mask = aggregate(f.masks, f.keep_logits, gated, scfg.get("tau", 0.5), scfg.get("aggregate", "vote")).tolist()
    ti = _sample(np.arange(len(train.labels)), cfg.global_images, [cfg.seed, 7])
    imp = unit_importance(run.vit, train.images[ti], train.labels[ti], run.backbone, mask, cfg.importance, cfg.batch_size)
    vi = _sample(np.arange(len(val.labels)), cfg.global_val, [cfg.seed, 8])
    base = ev.acc(val.images[vi], val.labels[vi], mask, None)
    cands = _candidates(ev, run.vit, imp, val.images[vi], val.labels[vi], mask, cfg, base)
    chosen = select_units(cands, base, cfg.eps)
    target = summary["mean_flops_rel"]
    matched = min(cands, key=lambda c: (abs(c.flops_rel - target), -c.val_acc))
    target_h = summary["mean_flops_rel_heads_only"]
    classes = [r["classes"] for r in rep["routes"]]

    done: dict[tuple, list[float]] = {}

    def _val_record(c: UnitCandidate) -> dict:  # val only: every test pass over all classes costs a full forward
        return {"scheme": c.scheme, "cut": c.cut, "flops_rel": c.flops_rel, "val_acc": c.val_acc}

    def record(c: UnitCandidate) -> dict:
        if (c.scheme, c.cut) not in done:
            done[(c.scheme, c.cut)] = _per_class_acc(ev, test, mask, c.units, classes)
        accs = done[(c.scheme, c.cut)]
        return {"scheme": c.scheme, "cut": c.cut, "flops_rel": c.flops_rel, "val_acc": c.val_acc,
                "mlp_units": c.units, "mlp_kept": _kept(c.units, run.vit), "test_route_acc": accs,
                "mean_test_acc": float(np.mean(accs))}

    out = {"mask": mask, "flops_rel_heads_only": cands[0].flops_rel, "val_acc_heads_only": base, "n_val": int(len(vi)),
           "chosen": record(chosen), "matched_heads_mlp": record(matched),
           "matched_heads_only": _val_record(min(cands, key=lambda c: (abs(c.flops_rel - target_h), -c.val_acc))),
           "candidates": _curve(cands)}
    log(f"  global: heads-only FLOPs {cands[0].flops_rel:.3f}; chosen {chosen.scheme} cut {chosen.cut:g} "
        f"(FLOPs {chosen.flops_rel:.3f}, test {out['chosen']['mean_test_acc']:.4f}); at the routes' FLOPs "
        f"{target:.3f}: {matched.scheme} cut {matched.cut:g} FLOPs {matched.flops_rel:.3f} test "
        f"{out['matched_heads_mlp']['mean_test_acc']:.4f}")
    return out


def read_units(path, run) -> dict[str, dict]:
    """{route name: {"mask", "mlp_units"}} from a units.json, checked against the run's backbone."""
    from steerprune.export.prune import check_mask, check_units
    from steerprune.training.run import read_json

    d = read_json(Path(path))
    if not isinstance(d, dict) or not isinstance(d.get("routes"), list):
        raise UserError(f"{path} has no 'routes' list (expected `steerprune units` output)")
    vit = run.vit
    out = {}
    for i, r in enumerate(d["routes"]):
        if not isinstance(r, dict) or not {"name", "mask", "mlp_units"} <= set(r):
            raise UserError(f"{path}: routes[{i}] needs name, mask and mlp_units")
        try:
            mask = check_mask(r["mask"], len(vit.blocks), vit.blocks[0].attn.num_heads)
            units = check_units(r["mlp_units"], vit)
        except UserError as e:
            raise UserError(f"{path}: route {r['name']!r}: {e}") from None
        out[str(r["name"])] = {"mask": mask, "mlp_units": units}
    return out


def apply_units(run, routes: list, units_path, log=print) -> Optional[str]:
    """Give each export route its `mlp_units` from a units.json (None: heads only); returns the source for the
    manifest. A route whose head mask differs from the one its units were chosen for is refused: the units' val
    accuracy was measured with that mask."""
    for r in routes:
        r["mlp_units"] = None
    if units_path is None:
        return None
    chosen = read_units(units_path, run)
    for r in routes:
        u = chosen.get(r["name"])
        if u is None:
            log(f"route {r['name']!r}: not in {units_path}, exported heads only")
            continue
        if [list(map(int, row)) for row in r["mask"]] != u["mask"]:
            raise UserError(f"route {r['name']!r}: {units_path} was chosen for a different head mask; rerun "
                            f"`steerprune units` on this steering report")
        r["mlp_units"] = u["mlp_units"]
    return f"units:{units_path}"

"""Route planning on the validation split: which latents, which alpha and k, and the resulting static masks.

`plan_routes` receives the run's model, SAEs, a `ValData` and, for the `importance` ranking, a sample of the train
split (`rank_data`); the test split never reaches it, so nothing it chooses (latents, k, alpha, masks, the controls'
thresholds) can depend on test images.
"""
from __future__ import annotations

import json
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

from steerprune.errors import UserError
from steerprune.training.forward import run_model

from .masks import (AGGREGATES, Candidate, MaskEval, ValData, aggregate, head_usage, match_usage, select_candidate,
                    threshold_candidates)
from .steer import (Steering, class_directions, encode_layers, head_importance, importance_weights, random_latents,
                    weighted_effects, rank_contrast, rank_effect, rank_usage, rank_zero_shot, route_direction, steer_fn,
                    top_k)

__all__ = ["STRATEGIES", "RANKINGS", "CHOICE_POOLS", "SteerConfig", "choice_pools", "RouteSpec", "RoutePlan", "make_routes", "load_groups", "plan_routes"]

STRATEGIES = ("per-class", "zero-shot", "global", "random")
RANKINGS = ("contrast", "effect", "importance")
CHOICE_POOLS = ("route", "group", "all")


@dataclass
class SteerConfig:
    strategy: str = "per-class"
    """per-class (label-based latents per route), zero-shot (label-free: decoder rows vs the classifier's class
    direction), global (one latent set and alpha for every route), random (random firing latents per route)."""
    rank: str = "effect"
    """Label-based ranking for per-class/groups: 'contrast' (fires more on the route's classes than on others),
    'effect' (on the route's val images, scaling it lowers the policy's keep logits the most) or 'importance' (effect
    with each head weighted by how little the route needs it, estimated on `rank_images` train images of the route).
    'global' ranks by effect unless 'contrast' asks for its usage correlation."""
    rank_images: int = 512
    """Train images per route (seeded sample) on which the importance ranking estimates how much each head matters."""
    layers: Optional[list[int]] = None
    """Gated layers to steer; default every gated layer with an SAE (the paper's setting is the last one alone)."""
    ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    """Latents per layer to try; chosen per route on val."""
    alphas: list[float] = field(default_factory=lambda: [0.0, 0.5, 2.0, 4.0, 8.0, 16.0])
    """Scales to try (> 1 amplifies, < 1 attenuates); chosen per route on val."""
    tau: float = 0.5
    """A head enters the route's static mask if kept in >= tau of the route's val images (or mean prob >= tau)."""
    aggregate: str = "vote"
    """'vote' (fraction of images keeping the head) or 'prob' (mean keep probability)."""
    eps: float = 0.0
    """Selection rule: route val accuracy may be at most eps below the unsteered static mask's."""
    choose: str = "route"
    """Who shares a (k, alpha) choice, each route keeping its own latents: route (each route chooses alone on its
    own val images) | group (the routes of one class group, e.g. a CIFAR-100 superclass, choose one (k, alpha) on
    their pooled val statistics: mean usage, mean accuracy against mean unsteered accuracy; needs groups) | all
    (every route one (k, alpha)). Pooling trades each route's fit for a choice made on more images. The global
    strategy always pools over all routes."""
    thresholds: list[float] = field(default_factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98,
                                                             0.99, 0.995, 0.999])
    """Keep thresholds the no-SAE control may raise to (combined with control_taus)."""
    control_taus: list[float] = field(default_factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    """Vote fractions the no-SAE control may raise to."""
    ref_ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    """k of precision@k / Jaccard@k between label-free and label-based latent sets."""
    zero_shot_pool: int = 16
    """Label-free ranking: 0 ranks latents by cosine to the class direction alone; N > 0 keeps the N most aligned
    latents and orders them by their effect on the policy's keep logits over the val images the model itself
    assigns to the route (its predictions: still no labels). On digits val, 16 (twice the largest k) raised the
    label-free share of the label-based usage cut from 59% to 79%."""
    compare_label_free: bool = True
    """With strategy per-class, also plan zero-shot routes and report how much of the usage cut they recover."""
    spotlight: list[str] = field(default_factory=lambda: ["bowl"])
    """Routes the report shows in detail (steering.spotlight), beside the paper's figures where it has them; names
    that are not routes of this report are skipped."""
    max_off_route: int = 2000
    """Off-route accuracy uses at most this many test images (seeded subsample) to bound the cost on big sets."""
    seed: int = 0

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise UserError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.choose not in CHOICE_POOLS:
            raise UserError(f"choose must be one of {', '.join(CHOICE_POOLS)}, got {self.choose!r}")
        if self.rank not in RANKINGS:
            raise UserError(f"rank must be one of {', '.join(RANKINGS)}, got {self.rank!r}")
        if self.aggregate not in AGGREGATES:
            raise UserError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {self.aggregate!r}")
        if not 0.0 < self.tau <= 1.0:
            raise UserError(f"tau must be in (0, 1], got {self.tau}")
        if self.rank_images < 1:
            raise UserError(f"rank_images must be >= 1, got {self.rank_images}")
        if self.max_off_route < 1:
            raise UserError(f"max_off_route must be >= 1, got {self.max_off_route}")
        if self.zero_shot_pool < 0:
            raise UserError(f"zero_shot_pool must be >= 0, got {self.zero_shot_pool}")
        if not self.ks or min(self.ks) < 1:
            raise UserError(f"ks must be positive integers, got {self.ks}")
        if not self.alphas or min(self.alphas) < 0:
            raise UserError(f"alphas must be >= 0, got {self.alphas}")
        if any(not 0.0 < t < 1.0 for t in self.thresholds) or any(not 0.0 < t <= 1.0 for t in self.control_taus):
            raise UserError("control thresholds must be in (0, 1) and control taus in (0, 1]")
        self.ks = sorted({int(k) for k in self.ks})
        self.alphas = sorted({float(a) for a in self.alphas if a != 1.0})


class RouteSpec(NamedTuple):
    """A route to plan: its name and the classes whose hint selects it (one class, or a group's)."""

    name: str
    classes: list[int]


class RoutePlan(NamedTuple):
    """Everything chosen on val for one route."""

    route: RouteSpec
    steering: Steering  # the chosen latents and alpha
    k: int
    mask: np.ndarray  # (depth, H) steered static mask
    baseline_mask: np.ndarray  # unsteered static mask (alpha = 1)
    random_steering: Steering
    random_mask: np.ndarray
    threshold_mask: np.ndarray
    threshold_setting: dict  # keep_threshold and tau of the matched no-SAE control
    val: dict  # val figures: n, baseline/steered acc and usage, candidates tried
    alternatives: dict  # choice rule (CHOICE_POOLS) -> the Candidate that rule picks for this route


# ---------------------------------------------------------------------------------------------- routes

def load_groups(path: str | Path, class_names: list[str]) -> dict[str, list[int]]:
    """A user's JSON mapping {group name: [class names or indices]}."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"groups file not found: {path}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{path} must be a JSON object mapping group names to lists of classes")
    groups = {}
    for name, members in raw.items():
        if not isinstance(members, list) or not members:
            raise UserError(f"group {name!r} must list at least one class")
        idx = []
        for m in members:
            if isinstance(m, bool) or not isinstance(m, (int, str)):
                raise UserError(f"group {name!r}: {m!r} is neither a class name nor an index")
            if isinstance(m, int):
                if not 0 <= m < len(class_names):
                    raise UserError(f"group {name!r}: class index {m} outside 0..{len(class_names) - 1}")
                idx.append(m)
            elif m in class_names:
                idx.append(class_names.index(m))
            else:
                raise UserError(f"group {name!r}: unknown class {m!r}")
        groups[str(name)] = sorted(set(idx))
    return groups


def make_routes(class_names: list[str], groups: Optional[dict[str, list[int]]]) -> list[RouteSpec]:
    """One route per class, or one per group when groups are given."""
    if groups:
        return [RouteSpec(name, list(classes)) for name, classes in groups.items()]
    return [RouteSpec(name, [c]) for c, name in enumerate(class_names)]


# ---------------------------------------------------------------------------------------------- planning

class _Chooser:
    """Latent sets per (route, k, sign) for one strategy, from val statistics only."""

    def __init__(self, run, val: ValData, cfg: SteerConfig, layers: list[int], strategy: str, base,
                 baselines: Optional[dict[str, np.ndarray]] = None, rank_data: Optional[ValData] = None):
        self.run, self.cfg, self.layers, self.strategy = run, cfg, layers, strategy
        self.baselines, self.rank_data = baselines, rank_data
        self._weights: dict = {}
        gated = run.policy.cfg.gated_layers
        self.stats = encode_layers(run.saes, base.policy_inputs, gated, layers)
        self.labels = val.labels
        self.val = val
        self.usage = base.masks[:, gated].mean(axis=(1, 2))  # (N,) per-image head usage
        self.predictions = base.logits.argmax(-1)  # (N,) the policy-gated model's own classes (label-free)
        self.directions = class_directions(run.vit)
        self.gated = gated
        self._effects: dict = {}
        self.W_dec = {l: run.saes[l].W_dec.detach().float().numpy() for l in layers}

    def scores(self, route: RouteSpec, layer: int, sign: float) -> np.ndarray:
        Z = self.stats.latents[layer]
        if self.strategy == "zero-shot":
            cos = rank_zero_shot(self.W_dec[layer], route_direction(self.directions, route.classes))
            if not self.cfg.zero_shot_pool:
                return cos
            pool = top_k(cos, self.cfg.zero_shot_pool)
            out = np.full(len(cos), -np.inf)
            out[pool] = rank_effect(self.effects(route, layer, predicted=True), sign)[pool]
            return out
        if self.strategy == "global":
            return rank_usage(Z, self.usage) if self.cfg.rank == "contrast" else rank_effect(self.effects(None, layer), sign)
        if self.cfg.rank == "effect":
            return rank_effect(self.effects(route, layer), sign)
        if self.cfg.rank == "importance":
            return rank_effect(self.effects(route, layer), sign, self.weights(route)[layer])
        return rank_contrast(Z, self.labels, route.classes)

    def effects(self, route: Optional[RouteSpec], layer: int, predicted: bool = False) -> np.ndarray:
        """(m, H) first-order effect of each latent on the keep logits over the route's val images (all if None);
        predicted: the images the model predicts as the route's classes instead of its labelled ones."""
        key = (None if route is None else tuple(route.classes), layer, predicted)
        if key not in self._effects:
            if route is None:
                idx = slice(None)
            elif predicted:
                idx = np.flatnonzero(np.isin(self.predictions, route.classes))
                idx = idx if len(idx) else slice(None)  # a class the model never predicts: every image
            else:
                idx = self.val.route(route.classes)
            self._effects[key] = weighted_effects(self.run.policy, self.gated.index(layer), self.run.saes[layer],
                                                  self.stats.inputs[layer][idx], self.stats.latents[layer][idx])
        return self._effects[key]

    def weights(self, route: RouteSpec) -> np.ndarray:
        """(depth, H) `importance_weights` of the route's heads, from its train images and its unsteered static mask."""
        if route.name not in self._weights:
            if self.baselines is None or route.name not in self.baselines:
                raise ValueError(f"the importance ranking needs route {route.name!r}'s unsteered static mask")
            mask = self.baselines[route.name]
            data = self.rank_data if self.rank_data is not None else self.val
            idx = data.route(route.classes)
            if len(idx) == 0:
                raise UserError(f"route {route.name!r} has no images to rank latents by head importance")
            rng = np.random.default_rng([self.cfg.seed, zlib.crc32(route.name.encode())])
            idx = np.sort(rng.choice(idx, size=min(self.cfg.rank_images, len(idx)), replace=False))
            imp = head_importance(self.run.model, data.images[idx], data.labels[idx], self.run.backbone, mask)
            self._weights[route.name] = importance_weights(imp, mask, self.gated)
        return self._weights[route.name]

    def latents(self, route: RouteSpec, k: int, alpha: float) -> dict[int, list[int]]:
        if self.strategy == "random":  # the same draw for every alpha of a (route, k): only alpha and k are chosen
            rng = np.random.default_rng([self.cfg.seed, zlib.crc32(route.name.encode()), k])
            return self.random(route, k, rng)
        sign = 1.0 if alpha > 1 else -1.0
        return {l: top_k(self.scores(route, l, sign), k) for l in self.layers}

    def random(self, route: RouteSpec, k: int, rng: np.random.Generator) -> dict[int, list[int]]:
        idx = self.val.route(route.classes)
        return {l: random_latents(self.stats.latents[l][idx], k, rng) for l in self.layers}


def _steered_mask(run, val: ValData, idx: np.ndarray, steering: Steering, cfg: SteerConfig) -> np.ndarray:
    gated = run.policy.cfg.gated_layers
    f = run_model(run.model, val.images[idx], run.backbone, policy_input_fn=steer_fn(run.saes, steering))
    return aggregate(f.masks, f.keep_logits, gated, cfg.tau, cfg.aggregate)


def choice_pools(routes: list[RouteSpec], choose: str, pools: Optional[dict[str, list[int]]] = None
                 ) -> list[list[str]]:
    """Route names that choose one (k, alpha) together. choose 'group': each pool is the routes whose classes all lie
    in one of `pools` ({group: class indices}); a route spanning groups, or in none, chooses alone."""
    if choose == "route":
        return [[r.name] for r in routes]
    if choose == "all":
        return [[r.name for r in routes]]
    if not pools:
        raise UserError("choose 'group' needs class groups (the dataset's own, e.g. CIFAR-100's, or --groups FILE)")
    out: dict[str, list[str]] = {}
    for r in routes:
        home = [g for g, members in pools.items() if set(r.classes) <= set(members)]
        out.setdefault(home[0] if len(home) == 1 else f"route:{r.name}", []).append(r.name)
    return list(out.values())


def _choose(cands: dict[str, list[Candidate]], base_acc: dict[str, float], pools: list[list[str]], eps: float
            ) -> dict[str, Candidate]:
    """Each pool's pick: alone, the route's own rule; pooled, one (k, alpha) with the lowest mean usage whose mean
    route val accuracy is >= the mean unsteered accuracy - eps (candidates are in the same (k, alpha) order)."""
    chosen = {}
    for names in pools:
        if len(names) == 1:
            chosen[names[0]] = select_candidate(cands[names[0]], base_acc[names[0]], eps)
            continue
        keys = [(c.k, c.alpha) for c in cands[names[0]]]
        pooled = [Candidate(k, a, {}, None, float(np.mean([cands[n][i].usage for n in names])),
                            float(np.mean([cands[n][i].val_acc for n in names])))
                  for i, (k, a) in enumerate(keys)]
        g = select_candidate(pooled, float(np.mean([base_acc[n] for n in names])), eps)
        chosen.update({n: cands[n][keys.index((g.k, g.alpha))] for n in names})
    return chosen


def plan_routes(run, val: ValData, routes: list[RouteSpec], cfg: SteerConfig, strategy: Optional[str] = None,
                log=print, shared: Optional[dict] = None, rank_data: Optional[ValData] = None,
                pools: Optional[dict[str, list[int]]] = None) -> list[RoutePlan]:
    """Choose latents, k and alpha per route (or once, for 'global') on val, and derive every static mask.

    rank_data: the train split (or any labelled images other than val) on which the `importance` ranking measures
    how much each head matters to a route; None measures it on val (then val both ranks and chooses).

    shared: a dict reused across calls on the same run and val split (e.g. label-based then label-free planning):
    it keeps the unsteered forward, the threshold control's forwards and the mask accuracies, which do not depend
    on the strategy. pools: {group: class indices} for cfg.choose 'group' (`choice_pools`)."""
    shared = {} if shared is None else shared
    strategy = strategy or cfg.strategy
    gated = run.policy.cfg.gated_layers
    layers = sorted(cfg.layers) if cfg.layers is not None else sorted(l for l in run.saes if l in gated)
    bad = [l for l in layers if l not in run.saes or l not in gated]
    if bad or not layers:
        raise UserError(f"cannot steer layers {bad or layers}: SAEs exist at {sorted(run.saes)}, gated layers are {gated}")
    if "base" not in shared:
        shared["base"] = run_model(run.model, val.images, run.backbone, keep_inputs=True)
        shared["evals"] = MaskEval(run.model, val.images, val.labels, run.backbone)
    base, evals = shared["base"], shared["evals"]
    route_idx = {r.name: val.route(r.classes) for r in routes}
    for r in routes:
        if len(route_idx[r.name]) == 0:
            raise UserError(f"route {r.name!r} has no validation images: cannot derive its mask")
    baseline = {r.name: aggregate(base.masks[route_idx[r.name]], base.keep_logits[route_idx[r.name]], gated, cfg.tau,
                                  cfg.aggregate) for r in routes}
    base_acc = {r.name: evals.acc(baseline[r.name], route_idx[r.name]) for r in routes}
    chooser = _Chooser(run, val, cfg, layers, strategy, base, baseline, rank_data)

    # every candidate (k, alpha) for every route, evaluated on the route's val images
    cands: dict[str, list[Candidate]] = {}
    t0 = time.perf_counter()
    for ri, r in enumerate(routes):
        if ri:  # big splits take minutes: say how far along it is
            log(f"  {strategy}: {ri}/{len(routes)} routes' candidates tried ({time.perf_counter() - t0:.0f} s)")
        idx = route_idx[r.name]
        cands[r.name] = [Candidate(0, 1.0, {}, baseline[r.name], head_usage(baseline[r.name], gated), base_acc[r.name])]
        for k in cfg.ks:
            for alpha in cfg.alphas:
                lat = chooser.latents(r, k, alpha)
                m = _steered_mask(run, val, idx, Steering(lat, alpha), cfg)
                cands[r.name].append(Candidate(k, alpha, lat, m, head_usage(m, gated), evals.acc(m, idx)))

    # what every choice rule would pick (the report compares them on test); the configured one is used
    rules = [c for c in CHOICE_POOLS if c != "group" or pools or cfg.choose == "group"]  # no groups: says so
    alternatives = {rule: _choose(cands, base_acc, choice_pools(routes, rule, pools), cfg.eps) for rule in rules}
    chosen = alternatives["all" if strategy == "global" else cfg.choose]

    if "decisions" not in shared:
        shared["decisions"] = threshold_candidates(run.model, val, run.backbone, cfg.thresholds)
    decisions = shared["decisions"]
    plans = []
    for ri, r in enumerate(routes):
        idx, c = route_idx[r.name], chosen[r.name]
        rng = np.random.default_rng([cfg.seed, ri])
        k_rand = c.k or cfg.ks[0]
        rand = Steering(chooser.random(r, k_rand, rng), c.alpha)
        rand_mask = _steered_mask(run, val, idx, rand, cfg) if c.alpha != 1.0 else baseline[r.name]
        thr_mask, thr_setting = match_usage(decisions, idx, gated, cfg.control_taus, cfg.aggregate, c.usage,
                                            lambda m: evals.acc(m, idx))
        plans.append(RoutePlan(
            route=r, steering=Steering(c.latents, c.alpha), k=c.k, mask=c.mask, baseline_mask=baseline[r.name],
            random_steering=rand, random_mask=rand_mask, threshold_mask=thr_mask, threshold_setting=thr_setting,
            val={"n": int(len(idx)), "baseline_acc": base_acc[r.name], "baseline_usage": head_usage(baseline[r.name], gated),
                 "acc": c.val_acc, "usage": c.usage, "random_acc": evals.acc(rand_mask, idx),
                 "random_usage": head_usage(rand_mask, gated), "threshold_acc": evals.acc(thr_mask, idx),
                 "threshold_usage": head_usage(thr_mask, gated),
                 "candidates": [[c2.k, c2.alpha, round(c2.usage, 4), round(c2.val_acc, 4)] for c2 in cands[r.name]]},
            alternatives={rule: picks[r.name] for rule, picks in alternatives.items()}))
        log(f"  {strategy} {r.name}: k={c.k} alpha={c.alpha:g} val usage {plans[-1].val['baseline_usage']:.3f} -> "
            f"{c.usage:.3f}, val acc {base_acc[r.name]:.3f} -> {c.val_acc:.3f}")
    return plans

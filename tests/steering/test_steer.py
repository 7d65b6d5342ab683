"""The steering operation on a real tiny run: identity at alpha = 1, first-order effect on the keep logits."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from steerprune.steering.steer import (Steering, class_directions, head_importance, importance_weights,  # noqa: E402
                                       rank_contrast, rank_effect, rank_zero_shot, random_latents, steer_fn,
                                       steer_input, top_k, weighted_effects)
from steerprune.training.run import load_run  # noqa: E402
from steerprune.training.forward import run_model  # noqa: E402


@pytest.fixture(scope="module")
def run(tiny_run):
    return load_run(tiny_run, need=("backbone", "policy", "sae"))


@pytest.fixture(scope="module")
def val(run):
    return run.load_data().val


@torch.no_grad()
def _dense(sae, x) -> torch.Tensor:
    return sae.dense_latents(x if torch.is_tensor(x) else torch.from_numpy(x))


def _all_layers_fn(run, latents, alpha):
    """Steering through steer_input at every SAE layer, with no alpha == 1 shortcut anywhere."""
    idx = {l: torch.as_tensor(v) for l, v in latents.items()}
    return lambda layer, cls: steer_input(run.saes[layer], cls, idx[layer], alpha) if layer in idx else cls


def test_alpha_one_reproduces_unsteered_decisions_exactly(run, val):
    base = run_model(run.model, val.images, run.backbone, keep_inputs=True)
    # the latents that fire most on these images, so the alpha = 1 path really adds (alpha - 1) * z != 0 terms' zeros
    latents = {}
    for l, sae in run.saes.items():
        j = run.policy.cfg.gated_layers.index(l)
        z = _dense(sae, base.policy_inputs[:, j]).numpy()
        latents[l] = top_k((z != 0).mean(0), 8)
        assert (z[:, latents[l]] != 0).any()
    same = run_model(run.model, val.images, run.backbone, policy_input_fn=_all_layers_fn(run, latents, 1.0))
    np.testing.assert_array_equal(same.keep_logits, base.keep_logits)
    np.testing.assert_array_equal(same.masks, base.masks)
    np.testing.assert_array_equal(same.logits, base.logits)
    assert steer_fn(run.saes, Steering(latents, 1.0)) is None
    # and a real alpha does change what the policy reads
    moved = run_model(run.model, val.images, run.backbone, policy_input_fn=_all_layers_fn(run, latents, 4.0))
    assert np.abs(moved.keep_logits - base.keep_logits).max() > 1e-3


def test_steering_leaves_the_residual_stream_alone(run, val):
    """Only the policy's input changes: with the policy's masks fixed, steering cannot change the logits."""
    from steerprune.training.tensors import to_tensor

    xt = to_tensor(val.images[:32], run.backbone)
    fixed = run.model(xt).masks
    latents = {l: list(range(16)) for l in run.saes}
    fn = steer_fn(run.saes, Steering(latents, 8.0))
    with torch.no_grad():
        a = run.model(xt, head_mask=fixed).logits
        # policy_input_fn is ignored when a mask is given: the stream is the same forward
        b = run.model(xt, head_mask=fixed, policy_input_fn=fn).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def _autograd_jacobians(policy, j: int, xs: np.ndarray) -> np.ndarray:
    """(n, H, D) Jacobian of gated layer j's keep logits w.r.t. its input, per image, by autograd (the reference)."""
    f = lambda x: policy.layer_logits(j, x[None])[0]  # noqa: E731 - (D,) -> (H,)
    return np.stack([torch.autograd.functional.jacobian(f, torch.from_numpy(x).float()).numpy() for x in xs])


def test_weighted_effects_are_the_z_weighted_first_order_change_of_the_keep_logits(run, val):
    base = run_model(run.model, val.images, run.backbone, keep_inputs=True)
    gated = run.policy.cfg.gated_layers
    for l, sae in run.saes.items():
        j = gated.index(l)
        x = torch.from_numpy(base.policy_inputs[:, j])  # (N, D)
        Z = _dense(sae, x).numpy()
        i = int((Z != 0).mean(0).argmax())  # the most frequently active latent
        on = Z[:, i] > 0
        assert on.sum() >= 5
        sub = np.flatnonzero(on)[:48]  # autograd per image is slow: a sample of the images it fires on
        eff = weighted_effects(run.policy, j, sae, base.policy_inputs[sub, j], Z[sub])  # (m, H)
        # closed form == mean over images of z_i * J(x) W_dec[i], J by autograd
        J = _autograd_jacobians(run.policy, j, base.policy_inputs[sub, j])  # (n, H, D)
        e = J @ sae.W_dec.detach()[i].numpy()  # (n, H)
        np.testing.assert_allclose(eff[i], (Z[sub, i, None] * e).mean(0), rtol=1e-4, atol=1e-6)
        # and it predicts what scaling the latent really does to the keep logits
        alpha = 1.1
        with torch.no_grad():
            before = run.policy.layer_logits(j, x[sub])
            after = run.policy.layer_logits(j, steer_input(sae, x[sub], torch.tensor([i]), alpha))
        actual = (after - before).numpy()  # (n, H)
        predicted = (alpha - 1) * Z[sub, i, None] * e
        r = np.corrcoef(actual.ravel(), predicted.ravel())[0, 1]
        assert r > 0.98, f"L{l}: correlation {r:.3f}"
        np.testing.assert_allclose(actual.mean(0), (alpha - 1) * eff[i], atol=0.05 * np.abs(eff[i]).max() * (alpha - 1)
                                   + 1e-6)
        # the ranking's sign: the top latent for amplification lowers the keep logits summed over heads
        eff_all = weighted_effects(run.policy, j, sae, base.policy_inputs[:, j], Z)
        best = top_k(rank_effect(eff_all, +1.0), 1)[0]
        with torch.no_grad():
            drop = run.policy.layer_logits(j, steer_input(sae, x, torch.tensor([best]), 1.5)) - run.policy.layer_logits(j, x)
        assert float(drop.sum(1).mean()) < 0


def test_effect_latents_cut_head_usage(run, val):
    base = run_model(run.model, val.images, run.backbone, keep_inputs=True)
    gated = run.policy.cfg.gated_layers
    latents = {}
    for l, sae in run.saes.items():
        j = gated.index(l)
        Z = _dense(sae, base.policy_inputs[:, j]).numpy()
        # ablate (alpha = 0) the latents whose presence raises the keep logits most
        latents[l] = top_k(rank_effect(weighted_effects(run.policy, j, sae, base.policy_inputs[:, j], Z), -1.0), 4)
    steered = run_model(run.model, val.images, run.backbone, policy_input_fn=steer_fn(run.saes, Steering(latents, 0.0)))
    assert steered.masks[:, gated].mean() < base.masks[:, gated].mean() - 0.02


def test_class_direction_is_the_logit_gradient_through_the_final_norm(run, val):
    """d logit_c / dh at the last residual points along gamma ⊙ w_c with the mean removed (up to the LN scale)."""
    D = class_directions(run.vit)
    assert np.abs(D.sum(1)).max() < 1e-4  # mean removed
    torch.manual_seed(0)
    h = torch.randn(4, run.vit.embed_dim, requires_grad=True)
    logits = run.vit.head(run.vit.norm(h))
    for c in range(3):
        g, = torch.autograd.grad(logits[:, c].sum(), h, retain_graph=True)
        cos = torch.nn.functional.cosine_similarity(g, torch.from_numpy(D[c])[None], dim=1)
        assert float(cos.min()) > 0.8


def test_rankings_on_known_inputs():
    Z = np.array([[1.0, 0, 0], [2.0, 0, 1], [0, 3.0, 0], [0, 1.0, 0]])
    labels = np.array([0, 0, 1, 1])
    assert top_k(rank_contrast(Z, labels, [0]), 2) == [0, 2]
    assert top_k(rank_contrast(Z, labels, [1]), 1) == [1]
    W = np.eye(3)
    assert top_k(rank_zero_shot(W, np.array([0.1, 0.0, 1.0])), 1) == [2]
    effects = np.array([[-1.0, -1.0], [1.0, 1.0], [0.0, 0.0]])  # amplifying latent 0 lowers both heads' logits
    assert top_k(rank_effect(effects, +1.0), 1) == [0]
    assert top_k(rank_effect(effects, -1.0), 1) == [1]  # attenuating latent 1 lowers them
    # weighted: latent 0 lowers head 0 (dispensable, weight 1) and raises head 1 (important, weight -1); latent 2
    # lowers both: unweighted 2 wins, weighted 0 wins
    effects = np.array([[-1.0, 0.5], [0.0, 0.0], [-1.0, -1.0]])
    assert top_k(rank_effect(effects, +1.0), 1) == [2]
    assert top_k(rank_effect(effects, +1.0, np.array([1.0, -1.0])), 1) == [0]
    np.testing.assert_allclose(rank_effect(effects, -1.0, np.ones(2)), rank_effect(effects, -1.0))
    rng = np.random.default_rng(0)
    assert set(random_latents(Z[:2], 2, rng)) == {0, 2}  # only latents that fire on these images


def test_label_free_ranking_reads_no_labels_and_stays_in_the_aligned_pool(run, val):
    from steerprune.steering.masks import ValData
    from steerprune.steering.plan import RouteSpec, SteerConfig, _Chooser

    base = run_model(run.model, val.images, run.backbone, keep_inputs=True)
    layers = sorted(run.saes)
    cfg = SteerConfig(strategy="zero-shot", zero_shot_pool=6)
    route = RouteSpec("3", [3])
    shuffled = np.random.default_rng(0).permutation(val.labels)  # labels that mean nothing
    picks = [_Chooser(run, ValData(val.images, y), cfg, layers, "zero-shot", base).latents(route, 3, 0.0)
             for y in (val.labels, shuffled)]
    assert picks[0] == picks[1]
    direction = class_directions(run.vit)[3]
    for l in layers:
        aligned = top_k(rank_zero_shot(run.saes[l].W_dec.detach().numpy(), direction), 6)
        assert len(picks[0][l]) == 3 and set(picks[0][l]) <= set(aligned)
    cosine_only = _Chooser(run, val, SteerConfig(strategy="zero-shot", zero_shot_pool=0), layers, "zero-shot", base)
    assert cosine_only.latents(route, 3, 0.0) == {l: top_k(rank_zero_shot(run.saes[l].W_dec.detach().numpy(), direction), 3)
                                                 for l in layers}


def test_mask_eval_on_a_subset_equals_the_full_set_rows(run, val):
    from steerprune.steering.masks import MaskEval

    mask = np.ones((run.model.depth, run.model.num_heads), np.int64)
    mask[-1, :4] = 0
    idx = np.flatnonzero(val.labels == 4)
    sub = MaskEval(run.model, val.images, val.labels, run.backbone)
    sub_preds = sub.preds(mask, idx)  # forwards only images[idx]
    assert not sub._preds and len(sub._subset_preds) == 1
    full = MaskEval(run.model, val.images, val.labels, run.backbone)
    np.testing.assert_array_equal(sub_preds, full.preds(mask)[idx])
    assert sub.acc(mask, idx) == full.acc(mask, idx) == float((full.preds(mask)[idx] == 4).mean())


def test_importance_weights_rank_kept_heads_and_favour_dropping_dropped_ones():
    gated = [1, 2]
    mask = np.array([[1, 1, 1], [1, 1, 0], [0, 1, 1]])
    imp = np.array([[9.0, 9.0, 9.0], [0.3, 0.1, 5.0], [5.0, 0.2, -0.4]])
    w = importance_weights(imp, mask, gated)
    np.testing.assert_array_equal(w[0], 1.0)  # ungated layer: never steered, weight unused
    assert w[1, 2] == 1.0 and w[2, 0] == 1.0  # already dropped: keeping them off is wanted
    kept = [w[1, 0], w[1, 1], w[2, 1], w[2, 2]]  # importances 0.3, 0.1, 0.2, -0.4 (median 0.15)
    assert np.argsort(kept).tolist() == [0, 2, 1, 3]  # the more a head matters, the lower its weight
    assert kept[0] < 0 < kept[1]


def test_head_importance_is_the_loss_rise_of_dropping_a_head(run, val):
    """−dL/dm from autograd equals a finite difference of the real loss along each tested head's gate."""
    from steerprune.training.tensors import to_tensor

    images, labels = val.images[:64], val.labels[:64]
    gated = run.policy.cfg.gated_layers
    mask = np.ones((run.model.depth, run.model.num_heads))
    mask[gated[0], 0] = 0.0
    imp = head_importance(run.model, images, labels, run.backbone, mask, batch_size=24)
    assert imp.shape == mask.shape and np.isfinite(imp).all() and np.abs(imp).max() > 1e-4

    x, y = to_tensor(images, run.backbone), torch.as_tensor(labels)

    @torch.no_grad()
    def loss(m):
        out = run.model(x, head_mask=torch.as_tensor(m, dtype=torch.float32))
        return float(torch.nn.functional.cross_entropy(out.logits.float(), y))

    d = 1e-2
    for l, h in [(gated[0], 0), (gated[0], 1), (gated[-1], 2)]:
        lo, hi = mask.copy(), mask.copy()
        lo[l, h] -= d
        hi[l, h] += d
        fd = -(loss(hi) - loss(lo)) / (2 * d)
        assert abs(fd - imp[l, h]) < 1e-3 + 0.05 * abs(fd), (l, h, fd, imp[l, h])


def test_importance_ranking_weighs_heads_from_the_rank_data(run, val):
    """The importance ranking measures heads on rank_data (the train split in the pipeline) and picks latents the
    unweighted effect ranking does not always pick."""
    from steerprune.steering.masks import ValData, aggregate
    from steerprune.steering.plan import RouteSpec, SteerConfig, _Chooser

    data = run.load_data()
    gated = run.policy.cfg.gated_layers
    base = run_model(run.model, val.images, run.backbone, keep_inputs=True)
    v = ValData(val.images, val.labels)
    routes = [RouteSpec(str(c), [c]) for c in range(3)]
    baselines = {r.name: aggregate(base.masks[v.route(r.classes)], base.keep_logits[v.route(r.classes)], gated)
                 for r in routes}
    train = ValData(data.train.images, data.train.labels)
    cfg = SteerConfig(rank="importance", rank_images=64)
    layers = sorted(run.saes)
    imp = _Chooser(run, v, cfg, layers, "per-class", base, baselines, train)
    eff = _Chooser(run, v, SteerConfig(rank="effect"), layers, "per-class", base)
    picks_imp = [imp.latents(r, 4, 0.0) for r in routes]
    picks_eff = [eff.latents(r, 4, 0.0) for r in routes]
    assert all(len(p[l]) == 4 for p in picks_imp for l in layers)
    assert picks_imp != picks_eff
    # the weights are those of the route's train sample: from val images instead they differ
    on_val = _Chooser(run, v, cfg, layers, "per-class", base, baselines, None)
    assert not np.allclose(imp.weights(routes[0]), on_val.weights(routes[0]))
    w = imp.weights(routes[0])
    np.testing.assert_array_equal(w[[l for l in range(run.model.depth) if l not in gated]], 1.0)
    with pytest.raises(ValueError, match="unsteered static mask"):
        _Chooser(run, v, cfg, layers, "per-class", base).latents(routes[0], 2, 0.0)

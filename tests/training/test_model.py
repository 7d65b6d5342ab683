"""Head gating: equivalence with timm, exact zeroing of dropped heads, straight-through gradients, usage loss."""
import numpy as np
import pytest
import torch

from steerprune.training.model import BackboneConfig, GatedViT, build_vit, gated_attention, head_flops
from steerprune.training.policy import HeadPolicy, PolicyConfig, gumbel_sigmoid, usage_loss


def small_vit(**kw):
    cfg = BackboneConfig("vit_tiny_patch16_224", dict(patch_size=4, embed_dim=48, depth=3, num_heads=6, qkv_bias=True, **kw),
                         num_classes=5, class_names=list("abcde"), img_size=16, in_chans=3, mean=[0.5] * 3, std=[0.25] * 3)
    torch.manual_seed(0)
    return cfg, build_vit(cfg).eval()


@pytest.mark.parametrize("fused", [True, False])
def test_all_ones_mask_equals_timm(fused):
    _, vit = small_vit()
    for blk in vit.blocks:
        blk.attn.fused_attn = fused
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        ref = vit(x)
        out = GatedViT(vit)(x, head_mask=torch.ones(3, 6)).logits
    assert out.shape == (4, 5)
    assert (out - ref).abs().max().item() <= 1e-6


def test_dropped_heads_contribute_exactly_zero():
    _, vit = small_vit()
    attn = vit.blocks[1].attn
    x = torch.randn(2, 17, 48)
    mask = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.float32)
    with torch.no_grad():
        before = gated_attention(attn, x, mask)
        hd, D = attn.head_dim, attn.attn_dim
        for s in range(3):  # scramble the q, k, v rows of dropped head 1: the output must not move
            attn.qkv.weight[s * D + hd:s * D + 2 * hd] = torch.randn(hd, 48)
        after = gated_attention(attn, x, mask)
        assert torch.equal(before, after)
        # an all-dropped layer adds exactly proj.bias (what the gated model computes)
        assert torch.equal(after[1], attn.proj.bias.expand(17, -1))
        # and scrambling a kept head does change the output
        attn.qkv.weight[2 * D:2 * D + hd] += 1.0
        assert not torch.allclose(gated_attention(attn, x, mask)[0], after[0])


def test_policy_masks_have_shape_and_ungated_layers_kept():
    _, vit = small_vit()
    policy = HeadPolicy(PolicyConfig(dim=48, num_heads=6, gated_layers=[1, 2]))
    out = GatedViT(vit, policy).eval()(torch.randn(3, 3, 16, 16))
    assert out.masks.shape == (3, 3, 6) and out.keep_logits.shape == (3, 2, 6) and out.policy_inputs.shape == (3, 2, 48)
    assert torch.all(out.masks[:, 0] == 1)
    # eval decisions are deterministic sigmoid(logit) > 0.5
    assert torch.equal(out.masks[:, 1:], (out.keep_logits > 0).float())


def test_straight_through_gradients_reach_every_policy_layer():
    _, vit = small_vit()
    policy = HeadPolicy(PolicyConfig(dim=48, num_heads=6, gated_layers=[1, 2], init_bias=0.0))
    model = GatedViT(vit, policy).train()
    out = model(torch.randn(8, 3, 16, 16))
    assert set(out.masks.unique().tolist()) <= {0.0, 1.0}  # hard masks in the forward pass
    (out.logits.pow(2).sum() + usage_loss(out.masks[:, 1:], policy.cfg)).backward()
    for seq in policy.layers:
        assert seq[1].weight.grad is not None and seq[1].weight.grad.abs().sum() > 0


def test_gumbel_sigmoid_hard_is_binary_with_soft_gradient():
    logits = torch.zeros(1000, requires_grad=True)
    y = gumbel_sigmoid(logits, temperature=1.0)
    assert set(y.unique().tolist()) == {0.0, 1.0}
    assert 0.4 < y.mean().item() < 0.6
    y.sum().backward()
    assert logits.grad.abs().sum() > 0


def test_gumbel_noise_scale_zero_gives_the_eval_decision_with_a_gradient():
    torch.manual_seed(0)
    logits = torch.randn(1000, requires_grad=True)
    y = gumbel_sigmoid(logits, temperature=5.0, noise_scale=0.0)
    assert torch.equal(y.detach(), (logits > 0).float())  # what eval's sigmoid(logit) > 0.5 keeps
    y.sum().backward()
    assert logits.grad.abs().min() > 0  # straight-through: every logit still gets the soft gradient
    noisy = gumbel_sigmoid(logits.detach(), temperature=5.0, noise_scale=1.0)
    assert 0.05 < (noisy != (logits > 0).float()).float().mean() < 0.5  # full noise flips a share of decisions


def test_usage_loss_moves_usage_toward_target():
    torch.manual_seed(0)
    _, vit = small_vit()
    vit.requires_grad_(False)
    policy = HeadPolicy(PolicyConfig(dim=48, num_heads=6, gated_layers=[1, 2], target_usage=0.3, init_bias=2.0))
    model = GatedViT(vit, policy)
    opt = torch.optim.Adam(policy.parameters(), lr=0.05)
    x = torch.randn(32, 3, 16, 16)

    def eval_usage():  # expected usage under the training (Gumbel) distribution: P(keep) = sigmoid(logit)
        with torch.no_grad():
            return torch.sigmoid(model.eval()(x).keep_logits).mean().item()

    start = eval_usage()
    for _ in range(60):
        model.train()
        loss = usage_loss(model(x).masks[:, 1:], policy.cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = eval_usage()
    assert start > 0.85
    assert abs(end - 0.3) < 0.1


def test_policy_config_validation():
    from steerprune.errors import UserError

    with pytest.raises(UserError):
        PolicyConfig(dim=8, num_heads=2, gated_layers=[])
    with pytest.raises(UserError):
        PolicyConfig(dim=8, num_heads=2, gated_layers=[1], target_usage=1.5)
    with pytest.raises(UserError):
        PolicyConfig(dim=8, num_heads=2, gated_layers=[1, 2], layer_targets=[0.5])


def test_head_flops_counts_removed_heads():
    _, vit = small_vit()
    full = head_flops(vit, [[1] * 6] * 3)
    assert full["rel"] == 1.0 and full["macs"] == full["full_macs"]
    half = head_flops(vit, [[1] * 6, [1, 1, 1, 0, 0, 0], [0] * 6])
    assert 0.5 < half["rel"] < 1.0
    assert head_flops(vit, [[0] * 6] * 3)["rel"] < half["rel"]


def test_backbone_config_roundtrip(tmp_path):
    cfg, _ = small_vit()
    cfg.save(tmp_path / "b.json")
    again = BackboneConfig.load(tmp_path / "b.json")
    assert again == cfg
    assert again.preprocessing()["color_mode"] == "RGB"


def test_gpu_preset_is_a_vit_s_class_model_on_32px():
    from steerprune.training.config import TrainConfig, backbone_config_for
    from steerprune.training.data import DataBundle, Split
    from steerprune.training.model import GatedViT, build_vit

    tcfg = TrainConfig.for_preset("cifar-gpu")
    assert tcfg.amp == "auto" and tcfg.batch_size == 256
    imgs = np.zeros((4, 32, 32, 3), np.uint8)
    split = Split(imgs, np.arange(4) % 2)
    bcfg = backbone_config_for(tcfg, DataBundle("x", ["a", "b"], split, split, split))
    vit = build_vit(bcfg)
    assert vit.embed_dim == 384 and len(vit.blocks) == 10 and vit.blocks[0].attn.num_heads == 6
    assert 15e6 < sum(p.numel() for p in vit.parameters()) < 20e6
    out = GatedViT(vit).eval()(torch.zeros(2, 3, 32, 32))
    assert out.logits.shape == (2, 2) and out.masks.shape == (2, 10, 6)

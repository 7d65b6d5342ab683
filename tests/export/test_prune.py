"""Physical head removal equals the gated model with the same mask, for masks of every shape."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from timm.layers import Attention  # noqa: E402

from steerprune.errors import UserError  # noqa: E402
from steerprune.export.prune import ProjBias, check_mask, kept_heads, mask_key, prune_vit  # noqa: E402
from steerprune.training.model import GatedViT, head_flops  # noqa: E402


def small_vit(**kw):
    torch.manual_seed(0)
    args = dict(img_size=8, patch_size=2, in_chans=1, num_classes=5, embed_dim=48, depth=4, num_heads=6,
                mlp_ratio=2.0, qkv_bias=True)
    args.update(kw)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **args).eval()


MASKS = {
    "all kept": [[1] * 6] * 4,
    "one kept": [[1] * 6, [0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 1], [1, 0, 0, 0, 0, 0]],
    "none in a layer": [[1] * 6, [1, 0, 1, 0, 1, 0], [0] * 6, [0, 1, 1, 0, 0, 0]],
    "different counts": [[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0], [0, 1, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0]],
    "all removed": [[0] * 6] * 4,
}


@pytest.mark.parametrize("vit_kw", [{}, {"qkv_bias": False, "qk_norm": True}], ids=["qkv_bias", "qk_norm"])
@pytest.mark.parametrize("name", list(MASKS))
def test_pruned_equals_gated(name, vit_kw):
    vit = small_vit(**vit_kw)
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    mask = MASKS[name]
    pruned = prune_vit(vit, mask)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        want = GatedViT(vit)(x, head_mask=torch.tensor(mask, dtype=torch.float32)).logits
        got = pruned(x)
    assert (got - want).abs().max().item() <= 1e-5
    # the source model is untouched, and every pruned layer is a new, smaller module
    assert all(torch.equal(before[k], v) for k, v in vit.state_dict().items())
    assert all(b.attn.num_heads == 6 for b in vit.blocks)
    for blk, row in zip(pruned.blocks, mask):
        k = sum(row)
        if k == 0:
            assert isinstance(blk.attn, ProjBias)
        else:
            assert type(blk.attn) is Attention and blk.attn.num_heads == k and blk.attn.head_dim == 8
            assert blk.attn.qkv.out_features == 3 * k * 8 and blk.attn.proj.in_features == k * 8
            assert blk.attn.scale == pytest.approx(8 ** -0.5)
    # parameters shrink by exactly the removed heads' qkv rows and proj columns (plus norm1 and q/k norms of emptied layers)
    removed = sum(6 - sum(r) for r in mask)
    per_head = 3 * 8 * 48 + (3 * 8 if vit_kw.get("qkv_bias", True) else 0) + 8 * 48
    emptied = sum(sum(r) == 0 for r in mask)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    qk_norm = 2 * 2 * 8 if vit_kw.get("qk_norm") else 0  # q_norm + k_norm weight and bias go with the last head
    assert n(vit) - n(pruned) == removed * per_head + emptied * (2 * 48 + qk_norm)


def test_head_removed_is_the_masked_head():
    """Removing head 2 must drop exactly head 2: its contribution differs from dropping head 3."""
    vit = small_vit()
    m2 = [[1] * 6] + [[1, 1, 0, 1, 1, 1]] * 3
    m3 = [[1] * 6] + [[1, 1, 1, 0, 1, 1]] * 3
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        a, b = prune_vit(vit, m2)(x), prune_vit(vit, m3)(x)
        ga = GatedViT(vit)(x, head_mask=torch.tensor(m2, dtype=torch.float32)).logits
    assert (a - b).abs().max().item() > 1e-3
    assert (a - ga).abs().max().item() <= 1e-5


def test_mask_helpers():
    m = MASKS["none in a layer"]
    assert mask_key(m) == mask_key([list(map(float, r)) for r in m])
    assert mask_key(m) != mask_key(MASKS["one kept"])
    assert kept_heads(m) == {"L0": [0, 1, 2, 3, 4, 5], "L1": [0, 2, 4], "L2": [], "L3": [1, 2]}
    assert head_flops(small_vit(), m)["rel"] < 1.0
    with pytest.raises(UserError, match="shape"):
        check_mask([[1] * 6] * 3, 4, 6)
    with pytest.raises(UserError, match="0 or 1"):
        check_mask([[1, 0.5, 1, 1, 1, 1]] * 4, 4, 6)

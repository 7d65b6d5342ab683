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


# ---------------------------------------------------------------------------------------------- MLP hidden units

from steerprune.export.prune import MaskedMlp, MlpBias, check_units, mask_mlp_units, mlp_kept  # noqa: E402

HIDDEN = 96  # small_vit: embed 48, mlp_ratio 2


def units_for(name: str) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    pick = lambda k: sorted(torch.randperm(HIDDEN, generator=g)[:k].tolist())  # noqa: E731
    return {
        "all kept": [list(range(HIDDEN))] * 4,
        "random subsets": [pick(90), pick(40), pick(7), pick(1)],
        "none in a layer": [pick(50), [], pick(96), pick(30)],
        "all removed": [[]] * 4,
    }[name]


UNIT_CASES = ["all kept", "random subsets", "none in a layer", "all removed"]


@pytest.mark.parametrize("units_name", UNIT_CASES)
@pytest.mark.parametrize("mask_name", ["all kept", "none in a layer", "different counts"])
def test_mlp_pruned_equals_masked(mask_name, units_name):
    vit = small_vit()
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    mask, units = MASKS[mask_name], units_for(units_name)
    pruned = prune_vit(vit, mask, mlp_keep=units)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        want = GatedViT(mask_mlp_units(vit, units))(x, head_mask=torch.tensor(mask, dtype=torch.float32)).logits
        got = pruned(x)
    assert (got - want).abs().max().item() <= 1e-5
    assert all(torch.equal(before[k], v) for k, v in vit.state_dict().items())
    for blk, keep in zip(pruned.blocks, units):
        if not keep:
            assert isinstance(blk.mlp, MlpBias) and isinstance(blk.norm2, torch.nn.Identity)
        else:
            assert type(blk.mlp) is timm.layers.Mlp
            assert blk.mlp.fc1.out_features == len(keep) and blk.mlp.fc2.in_features == len(keep)
    # parameters shrink by exactly the removed heads and units (fc1 row + bias, fc2 column; norm2 of emptied blocks)
    removed_units = sum(HIDDEN - len(k) for k in units)
    heads_only = prune_vit(vit, mask)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(heads_only) - n(pruned) == removed_units * (48 + 1 + 48) + sum(not k for k in units) * 2 * 48


def test_mlp_unit_removed_is_the_masked_unit():
    """Removing unit 5 must drop exactly unit 5: the masked reference moves, and the pruned model moves with it."""
    vit = small_vit()
    heads = MASKS["all kept"]
    without5 = [[u for u in range(HIDDEN) if u != 5]] * 4
    without6 = [[u for u in range(HIDDEN) if u != 6]] * 4
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        full = vit(x)
        a, b = prune_vit(vit, heads, without5)(x), prune_vit(vit, heads, without6)(x)
        ref = GatedViT(mask_mlp_units(vit, without5))(x).logits
    assert (a - b).abs().max().item() > 1e-4 and (a - full).abs().max().item() > 1e-4
    assert (a - ref).abs().max().item() <= 1e-5
    # keeping every unit is no pruning at all: same model, same key, same FLOPs
    all_units = [list(range(HIDDEN))] * 4
    assert check_units(all_units, vit) is None
    assert mask_key(heads, check_units(all_units, vit)) == mask_key(heads)
    assert mask_key(heads, without5) != mask_key(heads) != mask_key(heads, without6)
    assert mlp_kept(vit, without5) == {f"L{i}": 95 for i in range(4)}


def test_check_units_errors():
    vit = small_vit()
    with pytest.raises(UserError, match="4 lists"):
        check_units([[0, 1]] * 3, vit)
    with pytest.raises(UserError, match=r"0\.\.95"):
        check_units([[0, 96]] * 4, vit)
    with pytest.raises(UserError, match="integer"):
        check_units([[0.5]] * 4, vit)
    glu = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, in_chans=1,
                            num_classes=5, embed_dim=48, depth=2, num_heads=6, mlp_layer=timm.layers.SwiGLUPacked)
    with pytest.raises(UserError, match="plain Mlp"):
        check_units([[0]] * 2, glu)


def test_masked_mlp_is_a_real_mask():
    vit = small_vit()
    mlp = vit.blocks[1].mlp
    x = torch.randn(2, 17, 48)
    with torch.no_grad():
        assert torch.allclose(MaskedMlp(mlp, range(HIDDEN))(x), mlp(x))
        assert torch.allclose(MaskedMlp(mlp, [])(x), mlp.fc2.bias.expand(2, 17, 48))


def _hand_macs(mask, units) -> int:
    """small_vit by hand: 17 tokens (16 patches + CLS), D 48, head_dim 8, hidden 96, 5 classes, 1 channel."""
    N, D, hd = 17, 48, 8
    embed = 16 * 1 * 2 * 2 * D
    head = D * 5
    per_head = N * D * 3 * hd + 2 * N * N * hd + N * hd * D
    per_unit = N * (D + D)
    return embed + head + sum(sum(r) * per_head + len(u) * per_unit for r, u in zip(mask, units))


@pytest.mark.parametrize("units_name", UNIT_CASES)
def test_flops_with_mlp_units(units_name):
    from torch.utils.flop_counter import FlopCounterMode

    from steerprune.export.prune import manual_attention

    vit = small_vit()
    mask, units = MASKS["different counts"], units_for(units_name)
    f = head_flops(vit, mask, units)
    assert f["macs"] == _hand_macs(mask, units)
    assert f["full_macs"] == _hand_macs(MASKS["all kept"], units_for("all kept"))
    assert f["rel"] == pytest.approx(f["macs"] / f["full_macs"])
    assert head_flops(vit, mask, None) == head_flops(vit, mask, units_for("all kept"))
    # and against PyTorch's own count of the pruned model's matmuls and convolutions (2 FLOPs per MAC)
    pruned = manual_attention(prune_vit(vit, mask, units))
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        pruned(torch.randn(1, 1, 8, 8))
    assert fc.get_total_flops() == 2 * f["macs"]


def test_onnx_parity_with_mlp_units(tmp_path):
    pytest.importorskip("onnxruntime")
    from steerprune.export.onnx_export import MaskedLogits, check_onnx, export_onnx

    vit = small_vit()
    mask, units = MASKS["none in a layer"], units_for("none in a layer")
    ref = MaskedLogits(GatedViT(mask_mlp_units(vit, units)), mask).eval()
    path = export_onnx(prune_vit(vit, mask, units), tmp_path / "m.onnx", in_chans=1, img_size=8)
    parity = check_onnx(path, ref, in_chans=1, img_size=8)
    assert parity.ok, parity.max_abs
    # the check can fail: the heads-only reference differs from the MLP-pruned graph
    wrong = check_onnx(path, MaskedLogits(GatedViT(vit), mask).eval(), in_chans=1, img_size=8)
    assert not wrong.ok

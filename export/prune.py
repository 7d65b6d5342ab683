"""Physical head (and MLP hidden unit) removal: a new, smaller timm ViT per head mask and MLP unit choice.

A masked head (AdaViT) still costs its qkv rows, its attention and its proj columns. Here every attention layer is
replaced by a new timm `Attention` that holds only the kept heads: `qkv` rows are laid out (3, heads, head_dim), so
head h of q/k/v lives at rows `s * attn_dim + h * head_dim + i`; `proj` keeps the matching input columns. `head_dim`
and the softmax scale are unchanged, so the pruned model computes exactly what `GatedViT(vit)(x, head_mask=mask)`
computes. A layer with no kept head has no attention compute left: it adds `proj.bias` (what the gated model adds
after zeroing every head), and its `norm1` goes too because nothing reads it.

MLP hidden units go the same way: a block keeping units `keep` gets a new timm `Mlp` of hidden size len(keep) with
those rows of `fc1` (weight and bias) and those columns of `fc2`, so it computes exactly what the full MLP computes
with the other hidden activations zeroed (`MaskedMlp`). A block keeping no unit adds `fc2.bias` (`MlpBias`) and its
`norm2` goes. `mlp_keep` is one list of kept unit indices per block (None: every unit of every block).
"""
from __future__ import annotations

import copy
import hashlib
from typing import Optional, Sequence

import torch
import torch.nn as nn

from steerprune.errors import UserError

__all__ = ["ProjBias", "MlpBias", "MaskedMlp", "check_mask", "check_units", "mask_key", "kept_heads", "mlp_kept",
           "prune_attention", "prune_mlp", "prune_vit", "mask_mlp_units", "manual_attention", "count_params"]


class ProjBias(nn.Module):
    """What an attention layer with every head removed still adds: its `proj.bias`, broadcast to (B, N, D)."""

    def __init__(self, bias: torch.Tensor | None, dim: int):
        super().__init__()
        # A bias-free proj adds zeros; keep a zero vector so the graph is the same either way.
        self.bias = nn.Parameter(bias.detach().clone() if bias is not None else torch.zeros(dim), requires_grad=False)

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        # (B, N, D); same signature as timm Attention so timm's Block can call it unchanged
        return self.bias.to(x.dtype).expand_as(x)


class MlpBias(ProjBias):
    """What an MLP with every hidden unit removed still adds: its `fc2.bias`, broadcast to (B, N, D)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, N, D)
        return self.bias.to(x.dtype).expand_as(x)


class MaskedMlp(nn.Module):
    """A timm `Mlp` with its hidden activations multiplied by a fixed 0/1 unit mask: units zeroed but still computed
    (the reference physical removal must equal, and the masked-not-removed peer)."""

    def __init__(self, mlp: nn.Module, keep: Sequence[int]):
        super().__init__()
        self.mlp = mlp
        unit_mask = torch.zeros(mlp.fc1.out_features, dtype=mlp.fc1.weight.dtype, device=mlp.fc1.weight.device)
        unit_mask[list(keep)] = 1.0
        self.register_buffer("unit_mask", unit_mask)  # (hidden,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mlp
        h = m.drop1(m.act(m.fc1(x))) * self.unit_mask  # (B, N, hidden)
        return m.drop2(m.fc2(m.norm(h)))


def _check_mlp(mlp: nn.Module, i: int) -> None:
    from timm.layers import Mlp

    if type(mlp) is not Mlp or not isinstance(mlp.fc1, nn.Linear):
        raise UserError(f"block {i}: MLP unit pruning needs timm's plain Mlp with Linear layers, got {type(mlp).__name__}")
    if not isinstance(mlp.norm, nn.Identity):
        raise UserError(f"block {i}: an MLP with a hidden norm mixes units and cannot be pruned per unit")


def check_units(mlp_keep, vit: nn.Module) -> Optional[list[list[int]]]:
    """One sorted list of kept hidden-unit indices per block, or None when every unit is kept (or mlp_keep is None);
    UserError saying what is wrong otherwise."""
    if mlp_keep is None:
        return None
    depth = len(vit.blocks)
    try:
        rows = [sorted({int(u) for u in row}) for row in mlp_keep]
        ints = all(float(u) == int(u) for row in mlp_keep for u in row)
    except (TypeError, ValueError):
        raise UserError(f"MLP units must be {depth} lists of kept unit indices, got {str(mlp_keep)[:80]}") from None
    if len(rows) != depth or not ints:
        raise UserError(f"MLP units must be {depth} lists of integer unit indices (one per block), got {len(rows)}")
    for i, (blk, row) in enumerate(zip(vit.blocks, rows)):
        _check_mlp(blk.mlp, i)
        hidden = blk.mlp.fc1.out_features
        if row and not (0 <= row[0] and row[-1] < hidden):
            raise UserError(f"block {i}: MLP unit indices must be in 0..{hidden - 1}")
    if all(len(row) == blk.mlp.fc1.out_features for blk, row in zip(vit.blocks, rows)):
        return None
    return rows


def check_mask(mask, depth: int, num_heads: int) -> list[list[int]]:
    """A depth x H 0/1 mask as a list of int lists, or UserError saying what is wrong with it."""
    try:
        rows = [[int(v) for v in row] for row in mask]
        ok_values = all(float(v) in (0.0, 1.0) for row in mask for v in row)
    except (TypeError, ValueError):
        raise UserError(f"a head mask must be a {depth} x {num_heads} list of 0/1, got {str(mask)[:80]}") from None
    if len(rows) != depth or any(len(r) != num_heads for r in rows):
        shape = f"{len(rows)} x {sorted({len(r) for r in rows})}"
        raise UserError(f"head mask has shape {shape}, the model needs {depth} x {num_heads}")
    if not ok_values:
        raise UserError("head mask values must be 0 or 1")
    return rows


def mask_key(mask: Sequence[Sequence[int]], mlp_keep: Optional[Sequence[Sequence[int]]] = None) -> str:
    """Stable hash of a mask and MLP units (`check_units` form; None = all): routes with identical masks and units
    share one model (and one file name). A heads-only model keeps the key it had before MLP pruning existed."""
    bits = "-".join("".join(str(int(v)) for v in row) for row in mask)
    if mlp_keep is not None:
        bits += "|" + "/".join(",".join(str(int(u)) for u in row) for row in mlp_keep)
    return hashlib.sha256(bits.encode()).hexdigest()[:12]


def mlp_kept(vit: nn.Module, mlp_keep: Optional[Sequence[Sequence[int]]]) -> dict[str, int]:
    """{"L0": 384, "L1": 97, ...}: hidden units kept per block."""
    return {f"L{i}": (blk.mlp.fc1.out_features if mlp_keep is None else len(mlp_keep[i]))
            for i, blk in enumerate(vit.blocks)}


def kept_heads(mask: Sequence[Sequence[int]]) -> dict[str, list[int]]:
    """{"L3": [2, 5], ...}: the kept head indices of every layer."""
    return {f"L{i}": [h for h, v in enumerate(row) if int(v)] for i, row in enumerate(mask)}


def prune_attention(attn: nn.Module, keep: Sequence[int]) -> nn.Module:
    """A new timm `Attention` holding only heads `keep` of `attn` (or `ProjBias` when none is kept)."""
    from timm.layers import Attention

    dim = attn.qkv.in_features
    if not keep:
        return ProjBias(attn.proj.bias, attn.proj.out_features)
    hd, H = attn.head_dim, attn.num_heads
    qk_norm = not isinstance(attn.q_norm, nn.Identity)
    norm_layer = type(attn.q_norm) if qk_norm else None
    new = Attention(dim, num_heads=len(keep), attn_head_dim=hd, dim_out=attn.proj.out_features,
                    qkv_bias=attn.qkv.bias is not None, qk_norm=qk_norm, proj_bias=attn.proj.bias is not None,
                    attn_drop=attn.attn_drop.p, proj_drop=attn.proj_drop.p, norm_layer=norm_layer,
                    device=attn.qkv.weight.device, dtype=attn.qkv.weight.dtype)
    heads = torch.tensor(list(keep), device=attn.qkv.weight.device)
    cols = (heads[:, None] * hd + torch.arange(hd, device=heads.device)).reshape(-1)  # (k*hd,) within one of q/k/v
    rows = torch.cat([s * H * hd + cols for s in range(3)])  # (3*k*hd,) q rows, then k rows, then v rows
    with torch.no_grad():
        new.qkv.weight.copy_(attn.qkv.weight[rows])
        if attn.qkv.bias is not None:
            new.qkv.bias.copy_(attn.qkv.bias[rows])
        new.proj.weight.copy_(attn.proj.weight[:, cols])
        if attn.proj.bias is not None:
            new.proj.bias.copy_(attn.proj.bias)
        if qk_norm:  # q/k norms act per head_dim and are shared by all heads
            new.q_norm.load_state_dict(attn.q_norm.state_dict())
            new.k_norm.load_state_dict(attn.k_norm.state_dict())
    new.scale = attn.scale  # same head_dim, so this is a no-op unless a checkpoint changed it
    new.fused_attn = attn.fused_attn
    return new


def prune_mlp(mlp: nn.Module, keep: Sequence[int]) -> nn.Module:
    """A new timm `Mlp` holding only hidden units `keep` of `mlp` (or `MlpBias` when none is kept)."""
    from timm.layers import Mlp

    _check_mlp(mlp, 0)
    if not keep:
        return MlpBias(mlp.fc2.bias, mlp.fc2.out_features)
    w = mlp.fc1.weight
    new = Mlp(mlp.fc1.in_features, hidden_features=len(keep), out_features=mlp.fc2.out_features,
              bias=(mlp.fc1.bias is not None, mlp.fc2.bias is not None), drop=(mlp.drop1.p, mlp.drop2.p),
              device=w.device, dtype=w.dtype)
    new.act = copy.deepcopy(mlp.act)  # keeps e.g. GELU(approximate="tanh")
    units = torch.tensor(list(keep), device=w.device)
    with torch.no_grad():
        new.fc1.weight.copy_(w[units])  # (k, D) rows of the kept units
        if mlp.fc1.bias is not None:
            new.fc1.bias.copy_(mlp.fc1.bias[units])
        new.fc2.weight.copy_(mlp.fc2.weight[:, units])  # (D, k) their columns
        if mlp.fc2.bias is not None:
            new.fc2.bias.copy_(mlp.fc2.bias)
    return new


def prune_vit(vit: nn.Module, mask: Sequence[Sequence[int]], mlp_keep=None) -> nn.Module:
    """A deep copy of `vit` with mask (depth x H, 1 = keep) and MLP units `mlp_keep` (one list of kept unit indices
    per block; None keeps all) physically applied; `vit` itself is untouched."""
    from steerprune.training.model import check_supported

    check_supported(vit)
    mask = check_mask(mask, len(vit.blocks), vit.blocks[0].attn.num_heads)
    units = check_units(mlp_keep, vit)
    out = copy.deepcopy(vit).eval()
    for i, (blk, row) in enumerate(zip(out.blocks, mask)):
        keep = [h for h, v in enumerate(row) if v]
        if len(keep) < blk.attn.num_heads:  # else nothing removed: keep the original module
            blk.attn = prune_attention(blk.attn, keep)
            if not keep:
                blk.norm1 = nn.Identity()  # ProjBias only reads the shape
        if units is not None and len(units[i]) < blk.mlp.fc1.out_features:
            blk.mlp = prune_mlp(blk.mlp, units[i])
            if not units[i]:
                blk.norm2 = nn.Identity()  # MlpBias only reads the shape
    return out


def mask_mlp_units(vit: nn.Module, mlp_keep) -> nn.Module:
    """A deep copy of `vit` whose MLPs zero the hidden units not in `mlp_keep` (`MaskedMlp`); None: a plain copy."""
    units = check_units(mlp_keep, vit)
    out = copy.deepcopy(vit).eval()
    if units is not None:
        for blk, keep in zip(out.blocks, units):
            blk.mlp = MaskedMlp(blk.mlp, keep)
    return out


def manual_attention(model: nn.Module) -> nn.Module:
    """Switch every timm Attention in `model` to the explicit softmax path (what the ONNX export traces)."""
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    return model


def count_params(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))

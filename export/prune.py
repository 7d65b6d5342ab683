"""Physical head removal: a new, smaller timm ViT per head mask.

A masked head (AdaViT) still costs its qkv rows, its attention and its proj columns. Here every attention layer is
replaced by a new timm `Attention` that holds only the kept heads: `qkv` rows are laid out (3, heads, head_dim), so
head h of q/k/v lives at rows `s * attn_dim + h * head_dim + i`; `proj` keeps the matching input columns. `head_dim`
and the softmax scale are unchanged, so the pruned model computes exactly what `GatedViT(vit)(x, head_mask=mask)`
computes. A layer with no kept head has no attention compute left: it adds `proj.bias` (what the gated model adds
after zeroing every head), and its `norm1` goes too because nothing reads it.
"""
from __future__ import annotations

import copy
import hashlib
from typing import Sequence

import torch
import torch.nn as nn

from steerprune.errors import UserError

__all__ = ["ProjBias", "check_mask", "mask_key", "kept_heads", "prune_attention", "prune_vit", "manual_attention",
           "count_params"]


class ProjBias(nn.Module):
    """What an attention layer with every head removed still adds: its `proj.bias`, broadcast to (B, N, D)."""

    def __init__(self, bias: torch.Tensor | None, dim: int):
        super().__init__()
        # A bias-free proj adds zeros; keep a zero vector so the graph is the same either way.
        self.bias = nn.Parameter(bias.detach().clone() if bias is not None else torch.zeros(dim), requires_grad=False)

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        # (B, N, D); same signature as timm Attention so timm's Block can call it unchanged
        return self.bias.to(x.dtype).expand_as(x)


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


def mask_key(mask: Sequence[Sequence[int]]) -> str:
    """Stable hash of a mask: routes with identical masks share one model (and one file name)."""
    bits = "-".join("".join(str(int(v)) for v in row) for row in mask)
    return hashlib.sha256(bits.encode()).hexdigest()[:12]


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


def prune_vit(vit: nn.Module, mask: Sequence[Sequence[int]]) -> nn.Module:
    """A deep copy of `vit` with mask (depth x H, 1 = keep) physically applied; `vit` itself is untouched."""
    from steerprune.training.model import check_supported

    check_supported(vit)
    mask = check_mask(mask, len(vit.blocks), vit.blocks[0].attn.num_heads)
    out = copy.deepcopy(vit).eval()
    for blk, row in zip(out.blocks, mask):
        keep = [h for h, v in enumerate(row) if v]
        if len(keep) == blk.attn.num_heads:
            continue  # nothing removed: keep the original module
        blk.attn = prune_attention(blk.attn, keep)
        if not keep:
            blk.norm1 = nn.Identity()  # ProjBias only reads the shape
    return out


def manual_attention(model: nn.Module) -> nn.Module:
    """Switch every timm Attention in `model` to the explicit softmax path (what the ONNX export traces)."""
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    return model


def count_params(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))

"""The timm ViT backbone and its head-gated forward.

`GatedViT` runs a timm `VisionTransformer` block by block so that each attention layer can multiply every
head's output by a per-image keep mask (B, H) before `proj`. A dropped head contributes exactly zero, which
is what physical head removal at export reproduces; `proj.bias` is still added.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from steerprune.errors import UserError

__all__ = [
    "PRESETS", "BackboneConfig", "GatedOutput", "GatedViT", "build_vit", "gated_attention",
    "check_supported", "load_checkpoint_into", "head_flops",
]

# digits and cifar train on 2 CPU cores; cifar-gpu is for a GPU. 6 heads everywhere so masks read like the paper's h0..h5.
PRESETS: dict[str, dict] = {
    "digits": dict(model_name="vit_tiny_patch16_224", img_size=8, model_kwargs=dict(
        patch_size=2, embed_dim=96, depth=4, num_heads=6, mlp_ratio=2.0, qkv_bias=True)),
    "cifar": dict(model_name="vit_tiny_patch16_224", img_size=32, model_kwargs=dict(
        patch_size=4, embed_dim=192, depth=6, num_heads=6, mlp_ratio=2.0, qkv_bias=True)),
    # meant for a GPU: a ViT-S-class model (384 wide, 6 heads of 64, 10 blocks) on 32 px images, 4 px patches
    "cifar-gpu": dict(model_name="vit_small_patch16_224", img_size=32, model_kwargs=dict(
        patch_size=4, embed_dim=384, depth=10, num_heads=6, mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.1)),
}


@dataclass
class BackboneConfig:
    """Everything needed to rebuild the backbone and feed it images (saved as backbone.json)."""

    model_name: str
    """timm model name, created with pretrained=False."""
    model_kwargs: dict
    """Extra kwargs for timm.create_model (patch_size, embed_dim, depth, num_heads, ...)."""
    num_classes: int
    class_names: list[str]
    img_size: int
    in_chans: int
    mean: list[float]
    """Per-channel mean of the train split in [0, 1] units."""
    std: list[float]
    groups: dict[str, list[int]] = field(default_factory=dict)
    """Named class groups (e.g. CIFAR-100 coarse classes)."""
    data_spec: str = ""

    def __post_init__(self):
        if self.num_classes != len(self.class_names):
            raise UserError(f"{self.num_classes} classes but {len(self.class_names)} class names")
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise UserError(f"mean/std must have {self.in_chans} entries")

    def timm_kwargs(self) -> dict:
        return dict(self.model_kwargs, img_size=self.img_size, in_chans=self.in_chans, num_classes=self.num_classes)

    def preprocessing(self) -> dict:
        """The input spec a server needs to reproduce training's preprocessing without torch."""
        return {"img_size": self.img_size, "channels": self.in_chans, "color_mode": "L" if self.in_chans == 1 else "RGB",
                "mean": self.mean, "std": self.std, "layout": "NCHW", "dtype": "float32", "scale": 1 / 255,
                "resize": "bilinear"}

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(dict(asdict(self), preprocessing=self.preprocessing()), indent=2))

    @classmethod
    def load(cls, path: Path) -> "BackboneConfig":
        d = json.loads(Path(path).read_text())
        d.pop("preprocessing", None)
        return cls(**d)


def build_vit(cfg: BackboneConfig, device=None, dtype=None) -> nn.Module:
    import timm

    try:
        model = timm.create_model(cfg.model_name, pretrained=False, **cfg.timm_kwargs())
    except (RuntimeError, TypeError, ValueError, AssertionError) as e:
        raise UserError(f"cannot build timm model '{cfg.model_name}' with {cfg.timm_kwargs()}: {e}") from None
    check_supported(model)
    return model.to(device=device, dtype=dtype)


def check_supported(model: nn.Module) -> None:
    """Head gating and removal need plain pre-norm blocks with timm's standard `Attention`."""
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise UserError(f"{type(model).__name__} is not a timm VisionTransformer")
    if model.cls_token is None or model.global_pool != "token":
        raise UserError("the head policy reads the CLS token: the ViT needs class_token=True and global_pool='token'")
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block or type(blk.attn) is not Attention:
            raise UserError(f"block {i} is {type(blk).__name__}/{type(blk.attn).__name__}: only timm Block + Attention are supported")
        if blk.attn.gate is not None or not isinstance(blk.attn.norm, nn.Identity):
            raise UserError(f"block {i}: gated or scale-normed attention mixes heads and cannot be pruned per head")


def load_checkpoint_into(model: nn.Module, path: str | Path, log=print) -> None:
    """Initialise from a user checkpoint, as timm loads pretrained weights.

    Reads safetensors, or a torch file with weights_only=True, holding a bare state dict or one under
    `state_dict` / `model` (EMA weights first where present; DDP/compile prefixes removed): timm's
    `load_state_dict`. `pos_embed` and `patch_embed` are resampled to the model's size (timm's
    `checkpoint_filter_fn`). A classifier for another label set (e.g. ImageNet's 1000 classes) is left out and the
    model's freshly initialised one kept, as timm does for `num_classes`; one log line says so."""
    from timm.models import load_state_dict
    from timm.models.vision_transformer import checkpoint_filter_fn

    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        state = load_state_dict(str(path), use_ema=True, device="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt or unsafe files all end here
        raise UserError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None
    for key in ("model_state_dict",):  # a common non-timm layout
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} does not hold a state dict of tensors")
    try:
        state = checkpoint_filter_fn(state, model)  # resamples pos_embed / patch_embed like timm's own loader
    except Exception as e:  # noqa: BLE001 - e.g. a checkpoint of another architecture
        raise UserError(f"checkpoint {path.name} does not fit {type(model).__name__}: {str(e).splitlines()[0]}") from None
    head = model.pretrained_cfg.get("classifier", "head") if hasattr(model, "pretrained_cfg") else "head"
    head_w, dropped = state.get(f"{head}.weight"), set()
    if head_w is not None and head_w.shape[0] != model.num_classes:
        dropped = {f"{head}.weight", f"{head}.bias"}
        for k in dropped:
            state.pop(k, None)
        log(f"checkpoint {path.name} has {head_w.shape[0]} classes but the data has {model.num_classes}: loaded "
            f"everything but the classifier '{head}', which is re-initialised for {model.num_classes} classes")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches raise even when not strict
        raise UserError(f"checkpoint {path.name} does not fit {type(model).__name__}: "
                        f"{str(e).splitlines()[-1].strip()}") from None
    missing = [k for k in missing if k not in dropped]  # the re-initialised classifier
    if missing or unexpected:
        raise UserError(f"checkpoint {path.name} does not fit {type(model).__name__}: "
                        f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
                        f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}")


def gated_attention(attn: nn.Module, x: torch.Tensor, head_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """timm `Attention.forward` with each head's output scaled by head_mask (B, H) before `proj`."""
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, H, N, hd)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.fused_attn:
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        a = (q * attn.scale) @ k.transpose(-2, -1)  # (B, H, N, N)
        o = attn.attn_drop(a.softmax(dim=-1)) @ v
    if head_mask is not None:
        o = o * head_mask[:, :, None, None].to(o.dtype)
    o = o.transpose(1, 2).reshape(B, N, attn.attn_dim)
    return attn.proj_drop(attn.proj(attn.norm(o)))


class GatedOutput(NamedTuple):
    logits: torch.Tensor  # (B, num_classes)
    masks: torch.Tensor  # (B, depth, H) keep masks actually applied (1 for ungated layers)
    keep_logits: Optional[torch.Tensor]  # (B, G, H) policy logits at the gated layers, None if masks were given
    policy_inputs: Optional[torch.Tensor]  # (B, G, D) CLS residual each gated layer's policy read


# (layer index, CLS residual (B, D)) -> what the policy reads instead. Used for SAE splicing and steering.
PolicyInputFn = Callable[[int, torch.Tensor], torch.Tensor]


class GatedViT(nn.Module):
    """A timm ViT whose attention heads are gated by a head policy, or by a given (static) mask."""

    def __init__(self, vit: nn.Module, policy: Optional[nn.Module] = None):
        super().__init__()
        check_supported(vit)
        self.vit = vit
        self.policy = policy
        if policy is not None and (policy.cfg.num_heads != self.num_heads or max(policy.cfg.gated_layers) >= self.depth):
            raise UserError("policy does not match the backbone (heads or layers)")

    @property
    def depth(self) -> int:
        return len(self.vit.blocks)

    @property
    def num_heads(self) -> int:
        return self.vit.blocks[0].attn.num_heads

    def forward(
        self,
        x: torch.Tensor,
        head_mask: Optional[torch.Tensor] = None,
        policy_input_fn: Optional[PolicyInputFn] = None,
        keep_threshold: float = 0.5,
    ) -> GatedOutput:
        """head_mask (depth, H) or (B, depth, H) overrides the policy; otherwise the policy decides per image:
        Gumbel-sigmoid with straight-through in training, `sigmoid(logit) > keep_threshold` in eval."""
        vit = self.vit
        B = x.shape[0]
        ones = x.new_ones(B, self.num_heads)
        if head_mask is not None and head_mask.dim() == 2:
            head_mask = head_mask.unsqueeze(0).expand(B, -1, -1)
        h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))  # (B, N, D)
        masks, keep_logits, inputs = [], [], []
        gated = {} if self.policy is None else {l: j for j, l in enumerate(self.policy.cfg.gated_layers)}
        for i, blk in enumerate(vit.blocks):
            if head_mask is not None:
                m = head_mask[:, i]
            elif i in gated:
                cls = h[:, 0]  # (B, D) the residual entering block i
                inputs.append(cls)
                read = policy_input_fn(i, cls) if policy_input_fn is not None else cls
                logit = self.policy.layer_logits(gated[i], read)  # (B, H)
                keep_logits.append(logit)
                m = self.policy.decide(logit, keep_threshold)
            else:
                m = ones
            masks.append(m)
            h = h + blk.drop_path1(blk.ls1(gated_attention(blk.attn, blk.norm1(h), m)))
            h = h + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(h))))
        logits = vit.forward_head(vit.norm(h))
        return GatedOutput(
            logits, torch.stack(masks, 1),
            torch.stack(keep_logits, 1) if keep_logits else None,
            torch.stack(inputs, 1) if inputs else None,
        )


def head_flops(vit: nn.Module, mask, mlp_keep=None) -> dict:
    """Analytic multiply-accumulate count of `vit` with `mask` (depth x H, 0/1) physically applied, and MLP hidden
    units `mlp_keep` (one list of kept unit indices per block; None keeps every unit).

    Counts patch embedding, qkv, attention (QK^T and AV), proj, MLP and head; norms and softmax are ignored.
    """
    pe = vit.patch_embed
    D = vit.embed_dim
    N = pe.num_patches + vit.num_prefix_tokens
    embed = pe.num_patches * pe.proj.in_channels * pe.proj.kernel_size[0] * pe.proj.kernel_size[1] * D
    head = D * vit.num_classes if vit.num_classes else 0
    total = full = embed + head
    for i, (blk, row) in enumerate(zip(vit.blocks, mask)):
        attn = blk.attn
        hd = attn.head_dim
        per_head = N * D * 3 * hd + 2 * N * N * hd + N * hd * D  # qkv rows, QK^T + AV, proj columns
        per_unit = N * (blk.mlp.fc1.in_features + blk.mlp.fc2.out_features)  # its fc1 row and fc2 column
        hidden = blk.mlp.fc1.out_features
        kept = hidden if mlp_keep is None else len(mlp_keep[i])
        total += int(sum(row)) * per_head + kept * per_unit
        full += attn.num_heads * per_head + hidden * per_unit
    return {"macs": int(total), "full_macs": int(full), "rel": total / full}

"""The three training stages: backbone, head policy, SAE; and the evaluations `metrics.json` reports."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from steerprune.errors import UserError

from .data import DataBundle, Split
from .metrics import accuracy, binomial_ci, dead_fraction, fvu, head_usage_summary, l0
from .model import PRESETS, BackboneConfig, GatedViT, PolicyInputFn, build_vit, load_checkpoint_into
from .policy import HeadPolicy, PolicyConfig, usage_loss
from .sae import SAEConfig, TopKSAE

__all__ = [
    "TrainConfig", "Forward", "to_tensor", "augment", "run_model", "train_backbone", "train_policy",
    "collect_policy_inputs", "train_sae", "evaluate_backbone", "evaluate_policy", "evaluate_sae",
    "backbone_config_for",
]


@dataclass
class TrainConfig:
    preset: str = "digits"
    """Model/schedule preset: 'digits', 'cifar', or 'custom' (then --model names any timm ViT/DeiT)."""
    model_name: Optional[str] = None
    """timm model name overriding the preset's (pretrained=False)."""
    model_kwargs: dict = field(default_factory=dict)
    """Extra timm kwargs overriding the preset's."""
    img_size: Optional[int] = None
    checkpoint: Optional[str] = None
    """User checkpoint to initialise the backbone from."""
    seed: int = 0
    val_fraction: float = 0.1
    batch_size: int = 64
    epochs: int = 60
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 3
    label_smoothing: float = 0.1
    crop_pad: int = 1
    """Random-crop padding in pixels (training augmentation)."""
    amp: str = "none"
    """'bf16' runs forward passes under CPU/GPU bf16 autocast; 'none' is fp32."""
    policy_epochs: int = 30
    policy_lr: float = 3e-3
    """Learning rate of the policy's gates (cosine to 0 over the policy epochs)."""
    finetune_backbone: bool = False
    """Train the backbone jointly with the policy instead of freezing it (AdaViT trains jointly;
    on digits the frozen backbone lost 6 points at usage 0.5, the jointly tuned one 1-2)."""
    finetune_lr: Optional[float] = None
    """Backbone learning rate during joint tuning (cosine to 0 over the policy epochs); None: lr / 10."""
    target_usage: float = 0.5
    policy_noise_end: float = 1.0
    """Gumbel noise scale at the end of policy training, annealed linearly from 1 over the policy epochs. 1 keeps
    AdaViT's sampling throughout; 0 ends on the deterministic masks that eval uses (the noise is a train/eval gap)."""
    distill_weight: float = 0.0
    """Weight of a KL term pulling the gated model's class distribution toward the full backbone's as it was before
    policy training (a frozen teacher, as DynamicViT distils); 0 is AdaViT's loss (cross-entropy + usage terms)."""
    layer_targets: Optional[list[float]] = None
    temperature: float = 5.0
    usage_weight: float = 2.0
    layer_weight: float = 1.0
    """Weight of the per-layer usage term relative to the global one (0: the policy spreads the budget freely)."""
    gated_layers: Optional[list[int]] = None
    """Default: every block but the first (AdaViT)."""
    sae_layers: Optional[list[int]] = None
    """Gated layers that get an SAE. Default: all of them (the paper's setting is the last one alone)."""
    sae_expansion: int = 4
    sae_k: int = 16
    sae_steps: int = 3000
    sae_lr: float = 1e-3
    sae_batch_size: int = 256
    sae_aug_passes: int = 8
    """Augmented passes over train when collecting CLS vectors (one vector per image is few)."""

    def __post_init__(self):
        if self.amp not in ("none", "bf16"):
            raise UserError(f"amp must be 'none' or 'bf16', got {self.amp!r}")
        if not 0.0 <= self.policy_noise_end <= 1.0:
            raise UserError(f"policy_noise_end must be in [0, 1], got {self.policy_noise_end}")
        if self.finetune_lr is not None and self.finetune_lr <= 0:
            raise UserError(f"finetune_lr must be > 0, got {self.finetune_lr}")
        if self.policy_lr <= 0:
            raise UserError(f"policy_lr must be > 0, got {self.policy_lr}")
        if self.distill_weight < 0:
            raise UserError(f"distill_weight must be >= 0, got {self.distill_weight}")
        for name in ("batch_size", "epochs", "policy_epochs", "sae_steps", "sae_batch_size", "sae_aug_passes"):
            if getattr(self, name) < 0 or (name.endswith("size") and getattr(self, name) == 0):
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")

    @classmethod
    def for_preset(cls, preset: str, **overrides) -> "TrainConfig":
        if preset == "cifar":
            # 20 epochs left the backbone at 0.749 test with val still rising; 24 is ~13 min more on 2 cores.
            # Distillation from the untuned backbone, same 24-epoch backbone: policy val accuracy after 3 epochs
            # 0.717 without, 0.725 with (test 0.718 vs 0.720). Joint tuning at 3e-4 rather than lr/10: val accuracy
            # 0.726 vs 0.725 at usage 0.533 vs 0.538, val NLL 0.798 vs 0.822 (test 0.734 vs 0.720).
            base = dict(batch_size=128, epochs=24, lr=1e-3, warmup_epochs=2, crop_pad=4, amp="bf16",
                        finetune_backbone=True, policy_epochs=3, policy_lr=2e-3, finetune_lr=3e-4, distill_weight=1.0,
                        sae_aug_passes=1, sae_steps=4000, sae_expansion=4, sae_k=16)
        elif preset == "digits":
            # ~14 validation images per class at 0.1 made steering choices noisy; 0.2 gives ~29
            base = dict(epochs=150, finetune_backbone=True, policy_epochs=40, val_fraction=0.2)
        elif preset == "custom":
            base = {}
        else:
            raise UserError(f"unknown preset '{preset}': use digits, cifar or custom")
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(preset=preset, **base)


def backbone_config_for(tcfg: TrainConfig, data: DataBundle) -> BackboneConfig:
    preset = PRESETS.get(tcfg.preset, {"model_name": None, "img_size": None, "model_kwargs": {}})
    name = tcfg.model_name or preset["model_name"]
    if not name:
        raise UserError("preset 'custom' needs --model (a timm ViT/DeiT name)")
    img_size = tcfg.img_size or preset["img_size"] or data.image_shape[0]
    mean, std = data.channel_stats()
    return BackboneConfig(
        model_name=name, model_kwargs={**preset["model_kwargs"], **tcfg.model_kwargs} if not tcfg.model_name else dict(tcfg.model_kwargs),
        num_classes=data.num_classes, class_names=data.class_names, img_size=img_size, in_chans=data.image_shape[2],
        mean=mean, std=std, groups=data.groups, data_spec=data.spec,
    )


# ---------------------------------------------------------------------------------------------- tensors

def to_tensor(images: np.ndarray, cfg: BackboneConfig) -> torch.Tensor:
    """uint8 (N, H, W, C) -> normalised float32 (N, C, S, S) at the model's size (bilinear, as the server does)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-1] != cfg.img_size or x.shape[-2] != cfg.img_size:
        x = F.interpolate(x, size=(cfg.img_size, cfg.img_size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(cfg.mean).view(1, -1, 1, 1)
    std = torch.tensor(cfg.std).view(1, -1, 1, 1)
    return (x - mean) / std


def augment(x: torch.Tensor, pad: int, hflip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random crop with reflect padding and optional horizontal flip, per image."""
    B, _, H, W = x.shape
    if pad > 0:
        xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        dy = torch.randint(0, 2 * pad + 1, (B,), generator=gen)
        dx = torch.randint(0, 2 * pad + 1, (B,), generator=gen)
        x = torch.stack([xp[i, :, dy[i]:dy[i] + H, dx[i]:dx[i] + W] for i in range(B)])
    if hflip:
        flip = torch.rand(B, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


def _autocast(amp: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=(amp == "bf16"))


def _batches(n: int, batch_size: int, gen: Optional[torch.Generator] = None):
    order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    for i in range(0, n, batch_size):
        yield order[i:i + batch_size]


def _progress(iterable, desc: str, total: Optional[int] = None):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True, disable=None)


class Forward(NamedTuple):
    logits: np.ndarray  # (N, C)
    masks: np.ndarray  # (N, depth, H) applied keep masks
    keep_logits: Optional[np.ndarray]  # (N, G, H)
    policy_inputs: Optional[np.ndarray]  # (N, G, D)


@torch.no_grad()
def run_model(
    model: GatedViT, images: np.ndarray, cfg: BackboneConfig, head_mask: Optional[torch.Tensor] = None,
    policy_input_fn: Optional[PolicyInputFn] = None, keep_threshold: float = 0.5, batch_size: int = 256,
    keep_inputs: bool = False,
) -> Forward:
    """Deterministic (eval) forward over uint8 images, collected as numpy."""
    model.eval()
    outs = {"logits": [], "masks": [], "keep_logits": [], "policy_inputs": []}
    for idx in _batches(len(images), batch_size):
        o = model(to_tensor(images[idx.numpy()], cfg), head_mask=head_mask, policy_input_fn=policy_input_fn,
                  keep_threshold=keep_threshold)
        outs["logits"].append(o.logits.float())
        outs["masks"].append(o.masks.float())
        if o.keep_logits is not None:
            outs["keep_logits"].append(o.keep_logits.float())
            if keep_inputs:
                outs["policy_inputs"].append(o.policy_inputs.float())
    cat = {k: torch.cat(v).numpy() if v else None for k, v in outs.items()}
    return Forward(**cat)


# ---------------------------------------------------------------------------------------------- backbone

def _cosine_lr(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_backbone(run_dir: Path, data: DataBundle, tcfg: TrainConfig, bcfg: BackboneConfig, resume: bool = False,
                   log=print) -> nn.Module:
    torch.manual_seed(tcfg.seed)
    vit = build_vit(bcfg)
    if tcfg.checkpoint:
        load_checkpoint_into(vit, tcfg.checkpoint)
    ckpt = run_dir / "checkpoints" / "backbone_last.pt"
    opt = torch.optim.AdamW(vit.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    start_epoch = 0
    if resume and ckpt.exists():
        try:
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            vit.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
        except Exception as e:  # noqa: BLE001
            raise UserError(f"cannot resume from {ckpt}: {str(e).splitlines()[0]}") from None
        start_epoch = int(state["epoch"])
        log(f"resuming backbone from epoch {start_epoch}")
    x_train = to_tensor(data.train.images, bcfg)
    y_train = torch.from_numpy(data.train.labels)
    steps_per_epoch = math.ceil(len(y_train) / tcfg.batch_size)
    total, warmup = tcfg.epochs * steps_per_epoch, tcfg.warmup_epochs * steps_per_epoch
    gen = torch.Generator().manual_seed(tcfg.seed * 1000 + start_epoch)
    for epoch in range(start_epoch, tcfg.epochs):
        vit.train()
        t0, seen, loss_sum, correct = time.time(), 0, 0.0, 0
        bar = _progress(_batches(len(y_train), tcfg.batch_size, gen), f"backbone {epoch + 1}/{tcfg.epochs}", steps_per_epoch)
        for j, idx in enumerate(bar):
            for g in opt.param_groups:
                g["lr"] = _cosine_lr(epoch * steps_per_epoch + j, total, warmup, tcfg.lr)
            xb = augment(x_train[idx], tcfg.crop_pad, data.hflip, gen)
            with _autocast(tcfg.amp):
                logits = vit(xb)
            loss = F.cross_entropy(logits.float(), y_train[idx], label_smoothing=tcfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(vit.parameters(), 1.0)
            opt.step()
            seen += len(idx)
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(-1) == y_train[idx]).sum())
        val_acc = evaluate_backbone(vit, data.val, bcfg, tcfg.amp)
        log(f"backbone epoch {epoch + 1}/{tcfg.epochs}: loss {loss_sum / seen:.3f} train acc {correct / seen:.3f} "
            f"val acc {val_acc:.3f} ({time.time() - t0:.0f} s)")
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": vit.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1}, ckpt)
    return vit.eval()


@torch.no_grad()
def evaluate_backbone(vit: nn.Module, split: Split, bcfg: BackboneConfig, amp: str = "none") -> float:
    vit.eval()
    preds = []
    for idx in _batches(len(split), 256):
        with _autocast(amp):
            preds.append(vit(to_tensor(split.images[idx.numpy()], bcfg)).float().argmax(-1))
    return accuracy(torch.cat(preds).numpy(), split.labels)


# ---------------------------------------------------------------------------------------------- policy

def make_policy(tcfg: TrainConfig, vit: nn.Module) -> HeadPolicy:
    depth = len(vit.blocks)
    gated = tcfg.gated_layers if tcfg.gated_layers is not None else list(range(1, depth))
    if any(l >= depth for l in gated):
        raise UserError(f"gated layers {gated} outside the backbone's {depth} blocks")
    pcfg = PolicyConfig(dim=vit.embed_dim, num_heads=vit.blocks[0].attn.num_heads, gated_layers=gated,
                        temperature=tcfg.temperature, target_usage=tcfg.target_usage, layer_targets=tcfg.layer_targets,
                        usage_weight=tcfg.usage_weight, layer_weight=tcfg.layer_weight)
    return HeadPolicy(pcfg)


def train_policy(vit: nn.Module, data: DataBundle, tcfg: TrainConfig, bcfg: BackboneConfig, log=print) -> GatedViT:
    torch.manual_seed(tcfg.seed + 1)
    policy = make_policy(tcfg, vit)
    teacher = None
    if tcfg.distill_weight > 0:
        teacher = build_vit(bcfg).eval().requires_grad_(False)
        teacher.load_state_dict(vit.state_dict())  # a frozen copy of the backbone before any joint tuning
    model = GatedViT(vit, policy)
    params = [{"params": policy.parameters(), "lr": tcfg.policy_lr}]
    if tcfg.finetune_backbone:
        params.append({"params": vit.parameters(), "lr": tcfg.lr / 10 if tcfg.finetune_lr is None else tcfg.finetune_lr})
    else:
        vit.requires_grad_(False)
    opt = torch.optim.AdamW(params, weight_decay=0.0)
    x_train = to_tensor(data.train.images, bcfg)
    y_train = torch.from_numpy(data.train.labels)
    gen = torch.Generator().manual_seed(tcfg.seed + 1)
    gated = policy.cfg.gated_layers
    steps_per_epoch = math.ceil(len(y_train) / tcfg.batch_size)
    total = max(1, tcfg.policy_epochs * steps_per_epoch)
    base_lrs = [g["lr"] for g in opt.param_groups]
    for epoch in range(tcfg.policy_epochs):
        model.train()
        if not tcfg.finetune_backbone:
            vit.eval()  # frozen: no dropout / drop-path in the backbone
        t0, usage_sum, correct, seen = time.time(), 0.0, 0, 0
        bar = _progress(_batches(len(y_train), tcfg.batch_size, gen), f"policy {epoch + 1}/{tcfg.policy_epochs}", steps_per_epoch)
        for j, idx in enumerate(bar):
            step = epoch * steps_per_epoch + j
            for g, base in zip(opt.param_groups, base_lrs):
                g["lr"] = _cosine_lr(step, total, 0, base)
            policy.noise_scale = 1.0 + (tcfg.policy_noise_end - 1.0) * step / total
            xb = augment(x_train[idx], tcfg.crop_pad, data.hflip, gen)
            with _autocast(tcfg.amp):
                out = model(xb)
            m = out.masks[:, gated].float()  # (B, G, H)
            loss = F.cross_entropy(out.logits.float(), y_train[idx]) + usage_loss(m, policy.cfg)
            if teacher is not None:
                with torch.no_grad(), _autocast(tcfg.amp):
                    target = teacher(xb).float().softmax(-1)  # (B, C)
                loss = loss + tcfg.distill_weight * F.kl_div(out.logits.float().log_softmax(-1), target,
                                                             reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            usage_sum += float(m.detach().mean()) * len(idx)
            correct += int((out.logits.argmax(-1) == y_train[idx]).sum())
            seen += len(idx)
        val = run_model(model, data.val.images, bcfg)
        val_acc = accuracy(val.logits.argmax(-1), data.val.labels)
        log(f"policy epoch {epoch + 1}/{tcfg.policy_epochs}: train usage {usage_sum / seen:.3f} acc {correct / seen:.3f}; "
            f"val acc {val_acc:.3f} usage {val.masks[:, gated].mean():.3f} ({time.time() - t0:.0f} s)")
    vit.requires_grad_(True)
    policy.noise_scale = 1.0
    return model.eval()


def evaluate_policy(model: GatedViT, split: Split, bcfg: BackboneConfig) -> dict:
    """Test accuracy and head usage (overall, per layer x head, per class) of the policy, next to the full model."""
    gated = model.policy.cfg.gated_layers
    dyn = run_model(model, split.images, bcfg)
    full = run_model(model, split.images, bcfg, head_mask=torch.ones(model.depth, model.num_heads))
    pred = dyn.logits.argmax(-1)
    out = {"test_acc": accuracy(pred, split.labels), "full_test_acc": accuracy(full.logits.argmax(-1), split.labels),
           **head_usage_summary(dyn.masks, gated), "per_class": {}}
    for c, name in enumerate(bcfg.class_names):
        sel = split.labels == c
        if not sel.any():
            continue
        n, k = int(sel.sum()), int((pred[sel] == c).sum())
        lo, hi = binomial_ci(k, n)
        out["per_class"][name] = {"n": n, "acc": k / n, "acc_ci95": [lo, hi],
                                  "full_acc": accuracy(full.logits[sel].argmax(-1), split.labels[sel]),
                                  "head_usage": float(dyn.masks[sel][:, gated].mean())}
    return out


# ---------------------------------------------------------------------------------------------- SAE

@torch.no_grad()
def collect_policy_inputs(model: GatedViT, split: Split, bcfg: BackboneConfig, passes: int, pad: int, hflip: bool,
                          seed: int) -> torch.Tensor:
    """CLS residuals (N * passes, G, D) that the (eval, deterministic) policy reads; passes after the first augment."""
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    x_all = to_tensor(split.images, bcfg)
    chunks = []
    for p in range(passes):
        for idx in _batches(len(x_all), 512):
            xb = x_all[idx] if p == 0 else augment(x_all[idx], pad, hflip, gen)
            chunks.append(model(xb).policy_inputs.float())
    return torch.cat(chunks)


def train_sae(inputs: torch.Tensor, cfg: SAEConfig, steps: int, lr: float, batch_size: int, seed: int,
              log=print) -> TopKSAE:
    """Train one TopK SAE on vectors (N, D) with Adam; decoder rows stay unit-norm."""
    torch.manual_seed(seed)
    sae = TopKSAE(cfg)
    with torch.no_grad():
        sae.b_pre.copy_(inputs.mean(0))
        # data-aware init: encoder rows start as random data directions, which keeps early latents alive
        centred = inputs - inputs.mean(0)
        pick = centred[torch.randint(0, len(inputs), (cfg.num_latents,))]
        pick = pick / pick.norm(dim=1, keepdim=True).clamp_min(1e-8)
        sae.W_dec.copy_(0.5 * pick + 0.5 * sae.W_dec)
        sae.set_decoder_norm_to_unit_norm()
        sae.encoder.weight.copy_(sae.W_dec)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    sae.train()
    bar = _progress(range(steps), f"SAE L{cfg.layer}")
    for step in bar:
        idx = torch.randint(0, len(inputs), (batch_size,), generator=gen)
        out = sae(inputs[idx])
        loss = out.fvu + cfg.aux_coef * out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_parallel_grad()
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (steps - step) / (0.2 * steps))  # linear decay over the last 20%
        opt.step()
        sae.set_decoder_norm_to_unit_norm()
    return sae.eval()


@torch.no_grad()
def evaluate_sae(model: GatedViT, sae: TopKSAE, split: Split, bcfg: BackboneConfig,
                 train_inputs: Optional[torch.Tensor] = None, base: Optional[Forward] = None) -> dict:
    """FVU and L0 on the split's CLS vectors; dead fraction over the SAE's training vectors (a latent is dead if it
    never fires on its training distribution) and, separately, on the split; and the splice check: how often the
    policy's head decisions and the class predictions stay the same when the policy reads the SAE reconstruction.
    `base` is the unspliced `run_model(..., keep_inputs=True)` of the split, shared when evaluating several SAEs."""
    layer = sae.cfg.layer
    j = model.policy.cfg.gated_layers.index(layer)
    if base is None:
        base = run_model(model, split.images, bcfg, keep_inputs=True)
    x = torch.from_numpy(base.policy_inputs[:, j])
    out = sae(x)

    def splice(i: int, cls: torch.Tensor) -> torch.Tensor:
        return sae(cls).recon if i == layer else cls

    spliced = run_model(model, split.images, bcfg, policy_input_fn=splice)
    gated = model.policy.cfg.gated_layers
    return {
        "layer": layer, "fvu": fvu(x, out.recon), "l0": l0(out.latents),
        "dead_fraction": dead_fraction(sae.dense_latents(train_inputs)) if train_inputs is not None else None,
        "dead_fraction_eval_split": dead_fraction(out.latents), "eval_vectors": len(x),
        "num_latents": sae.cfg.num_latents, "k": sae.cfg.k,
        "splice_head_agreement": float((spliced.masks[:, gated] == base.masks[:, gated]).mean()),
        "splice_layer_agreement": float((spliced.masks[:, layer] == base.masks[:, layer]).mean()),
        "splice_pred_agreement": float((spliced.logits.argmax(-1) == base.logits.argmax(-1)).mean()),
        "splice_acc": accuracy(spliced.logits.argmax(-1), split.labels),
    }

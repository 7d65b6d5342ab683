"""The three training loops: backbone (supervised), head policy (AdaViT-style, optionally tuning the backbone
jointly), TopK SAE (on the CLS residuals the policy reads). Every loop streams uint8 batches from the split and
converts each batch on the device when it is used."""
from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.scheduler import CosineLRScheduler

from steerprune.errors import UserError

from .config import TrainConfig
from .data import DataBundle, Split
from .device import autocast, resolve_device
from .evaluate import evaluate_backbone
from .forward import run_model
from .metrics import accuracy
from .model import BackboneConfig, GatedViT, build_vit, load_checkpoint_into
from .policy import HeadPolicy, PolicyConfig, usage_loss
from .sae import SAEConfig, TopKSAE
from .tensors import augment, image_batches, progress, rand_augment

__all__ = ["cosine_schedule", "init_backbone", "train_backbone", "make_policy", "train_policy",
           "collect_policy_inputs", "train_sae"]


def cosine_schedule(opt: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0) -> CosineLRScheduler:
    """timm's per-step cosine to 0 after a linear warmup from 0; call `.step_update(step)` before each step."""
    return CosineLRScheduler(opt, t_initial=max(1, total_steps - warmup_steps), lr_min=0.0, warmup_t=warmup_steps,
                             warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)


# ---------------------------------------------------------------------------------------------- backbone

def init_backbone(bcfg: BackboneConfig, tcfg: TrainConfig, log=print) -> nn.Module:
    """A fresh backbone, initialised from tcfg.checkpoint when one is given (seeded by tcfg.seed)."""
    torch.manual_seed(tcfg.seed)
    vit = build_vit(bcfg)
    if tcfg.checkpoint:
        load_checkpoint_into(vit, tcfg.checkpoint, log=log)
    return vit


def train_backbone(run_dir: Path, data: DataBundle, tcfg: TrainConfig, bcfg: BackboneConfig, resume: bool = False,
                   log=print, vit: Optional[nn.Module] = None, device="cpu") -> nn.Module:
    """Supervised training (AdamW, warmup + cosine, label smoothing, crop/flip; optionally RandAugment, Mixup/CutMix);
    a checkpoint after every epoch in RUN/checkpoints (CPU tensors, so a run resumes on any device)."""
    device = resolve_device(device)
    vit = (vit if vit is not None else init_backbone(bcfg, tcfg, log)).to(device)
    ckpt = run_dir / "checkpoints" / "backbone_last.pt"
    opt = torch.optim.AdamW(vit.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    start_epoch = 0
    if resume and ckpt.exists():
        try:
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            vit.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])  # moves the moments to the parameters' device
        except Exception as e:  # noqa: BLE001
            raise UserError(f"cannot resume from {ckpt}: {str(e).splitlines()[0]}") from None
        start_epoch = int(state["epoch"])
        log(f"resuming backbone from epoch {start_epoch}")
    images, y_train = data.train.images, torch.from_numpy(data.train.labels)
    steps_per_epoch = math.ceil(len(y_train) / tcfg.batch_size)
    sched = cosine_schedule(opt, tcfg.epochs * steps_per_epoch, tcfg.warmup_epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(tcfg.seed * 1000 + start_epoch)
    # on the stored images, before any resize to the model's size
    ra = rand_augment(tcfg.randaugment, images.shape[1], bcfg.mean) if tcfg.randaugment else None
    mix = None
    if tcfg.mixup > 0 or tcfg.cutmix > 0:
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        soft_ce = SoftTargetCrossEntropy()
        mix = Mixup(mixup_alpha=tcfg.mixup, cutmix_alpha=tcfg.cutmix, label_smoothing=tcfg.label_smoothing,
                    num_classes=bcfg.num_classes)
    for epoch in range(start_epoch, tcfg.epochs):
        vit.train()
        # timm's RandAugment and Mixup draw from Python's and NumPy's global generators: seeded per epoch, so a
        # resumed run draws what an uninterrupted one would
        random.seed(tcfg.seed * 1000 + epoch)
        np.random.seed(tcfg.seed * 1000 + epoch)
        t0, seen, loss_sum, correct = time.time(), 0, 0.0, 0
        bar = progress(image_batches(images, bcfg, tcfg.batch_size, gen, device, transform=ra),
                       f"backbone {epoch + 1}/{tcfg.epochs}", steps_per_epoch)
        for j, (idx, x) in enumerate(bar):
            sched.step_update(epoch * steps_per_epoch + j)
            yb = y_train[idx].to(device)
            xb = augment(x, tcfg.crop_pad, data.hflip, gen)
            mixed = mix is not None and len(yb) >= 2
            if mixed:
                n = len(yb) - len(yb) % 2  # timm's Mixup pairs images: an odd last one is left out
                xb, target = mix(xb[:n], yb[:n])
                yb = yb[:n]
            with autocast(tcfg.amp, device):
                logits = vit(xb)
            if mixed:
                loss = soft_ce(logits.float(), target)
            else:
                loss = F.cross_entropy(logits.float(), yb, label_smoothing=tcfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(vit.parameters(), 1.0)
            opt.step()
            seen += len(yb)
            loss_sum += float(loss.detach()) * len(yb)
            correct += int((logits.argmax(-1) == yb).sum())  # against the unmixed labels
        val_acc = evaluate_backbone(vit, data.val, bcfg, tcfg.amp)
        log(f"backbone epoch {epoch + 1}/{tcfg.epochs}: loss {loss_sum / seen:.3f} train acc {correct / seen:.3f} "
            f"val acc {val_acc:.3f} ({time.time() - t0:.0f} s)")
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": {k: v.cpu() for k, v in vit.state_dict().items()}, "optimizer": opt.state_dict(),
                    "epoch": epoch + 1}, ckpt)
    return vit.eval()


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


def train_policy(vit: nn.Module, data: DataBundle, tcfg: TrainConfig, bcfg: BackboneConfig, log=print,
                 device="cpu") -> GatedViT:
    """Gumbel-sigmoid head gates trained for accuracy at the target usage (noise annealed to policy_noise_end),
    with an optional KL to the untuned backbone; the backbone is tuned jointly when tcfg.finetune_backbone."""
    device = resolve_device(device)
    torch.manual_seed(tcfg.seed + 1)
    policy = make_policy(tcfg, vit)
    teacher = None
    if tcfg.distill_weight > 0:
        teacher = build_vit(bcfg).eval().requires_grad_(False)
        teacher.load_state_dict(vit.state_dict())  # a frozen copy of the backbone before any joint tuning
        teacher.to(device)
    model = GatedViT(vit, policy).to(device)
    params = [{"params": policy.parameters(), "lr": tcfg.policy_lr}]
    if tcfg.finetune_backbone:
        params.append({"params": vit.parameters(), "lr": tcfg.lr / 10 if tcfg.finetune_lr is None else tcfg.finetune_lr})
    else:
        vit.requires_grad_(False)
    opt = torch.optim.AdamW(params, weight_decay=0.0)
    images, y_train = data.train.images, torch.from_numpy(data.train.labels)
    gen = torch.Generator().manual_seed(tcfg.seed + 1)
    gated = policy.cfg.gated_layers
    steps_per_epoch = math.ceil(len(y_train) / tcfg.batch_size)
    total = max(1, tcfg.policy_epochs * steps_per_epoch)
    sched = cosine_schedule(opt, total)
    for epoch in range(tcfg.policy_epochs):
        model.train()
        if not tcfg.finetune_backbone:
            vit.eval()  # frozen: no dropout / drop-path in the backbone
        t0, usage_sum, correct, seen = time.time(), 0.0, 0, 0
        bar = progress(image_batches(images, bcfg, tcfg.batch_size, gen, device),
                       f"policy {epoch + 1}/{tcfg.policy_epochs}", steps_per_epoch)
        for j, (idx, x) in enumerate(bar):
            step = epoch * steps_per_epoch + j
            sched.step_update(step)
            policy.noise_scale = 1.0 + (tcfg.policy_noise_end - 1.0) * step / total
            yb = y_train[idx].to(device)
            xb = augment(x, tcfg.crop_pad, data.hflip, gen)
            with autocast(tcfg.amp, device):
                out = model(xb)
            m = out.masks[:, gated].float()  # (B, G, H)
            loss = F.cross_entropy(out.logits.float(), yb) + usage_loss(m, policy.cfg)
            if teacher is not None:
                with torch.no_grad(), autocast(tcfg.amp, device):
                    target = teacher(xb).float().softmax(-1)  # (B, C)
                loss = loss + tcfg.distill_weight * F.kl_div(out.logits.float().log_softmax(-1), target,
                                                             reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            usage_sum += float(m.detach().mean()) * len(idx)
            correct += int((out.logits.argmax(-1) == yb).sum())
            seen += len(idx)
        val = run_model(model, data.val.images, bcfg)
        val_acc = accuracy(val.logits.argmax(-1), data.val.labels)
        log(f"policy epoch {epoch + 1}/{tcfg.policy_epochs}: train usage {usage_sum / seen:.3f} acc {correct / seen:.3f}; "
            f"val acc {val_acc:.3f} usage {val.masks[:, gated].mean():.3f} ({time.time() - t0:.0f} s)")
    vit.requires_grad_(True)
    policy.noise_scale = 1.0
    return model.eval()


# ---------------------------------------------------------------------------------------------- SAE

@torch.no_grad()
def collect_policy_inputs(model: GatedViT, split: Split, bcfg: BackboneConfig, passes: int, pad: int, hflip: bool,
                          seed: int, batch_size: int = 512) -> torch.Tensor:
    """CLS residuals (N * passes, G, D) on the CPU that the (eval, deterministic) policy reads; passes after the
    first augment. Images are streamed batch by batch; only the (much smaller) residuals are kept."""
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    device = next(model.parameters()).device
    chunks = []
    for p in range(passes):
        for _, x in image_batches(split.images, bcfg, batch_size, device=device):
            xb = x if p == 0 else augment(x, pad, hflip, gen)
            chunks.append(model(xb).policy_inputs.float().cpu())
    return torch.cat(chunks)


def train_sae(inputs: torch.Tensor, cfg: SAEConfig, steps: int, lr: float, batch_size: int, seed: int,
              log=print, device="cpu") -> TopKSAE:
    """Train one TopK SAE on vectors (N, D) with Adam; decoder rows stay unit-norm. `inputs` stay on the CPU;
    each batch is moved to the device."""
    device = resolve_device(device)
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
    sae.to(device)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    sae.train()
    for step in progress(range(steps), f"SAE L{cfg.layer}"):
        idx = torch.randint(0, len(inputs), (batch_size,), generator=gen)
        out = sae(inputs[idx].to(device))
        loss = out.fvu + cfg.aux_coef * out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_parallel_grad()
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (steps - step) / (0.2 * steps))  # linear decay over the last 20%
        opt.step()
        sae.set_decoder_norm_to_unit_norm()
    return sae.eval()

"""What `metrics.json` reports about each stage: backbone accuracy, the policy's accuracy and head usage (overall,
per layer x head, per class, beside the full model), and each SAE's reconstruction, sparsity and splice check."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .data import Split
from .device import autocast
from .forward import Forward, run_model
from .metrics import accuracy, binomial_ci, dead_fraction, fvu, head_usage_summary, l0
from .model import BackboneConfig, GatedViT
from .sae import TopKSAE
from .tensors import image_batches

__all__ = ["evaluate_backbone", "evaluate_policy", "evaluate_sae"]


@torch.no_grad()
def evaluate_backbone(vit: nn.Module, split: Split, bcfg: BackboneConfig, amp: str = "none") -> float:
    """Top-1 accuracy of the plain (ungated) backbone on the split, on the backbone's device."""
    vit.eval()
    device = next(vit.parameters()).device
    preds = []
    for _, x in image_batches(split.images, bcfg, 256, device=device):
        with autocast(amp, device):
            preds.append(vit(x).float().argmax(-1).cpu())
    return accuracy(torch.cat(preds).numpy(), split.labels)


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


@torch.no_grad()
def evaluate_sae(model: GatedViT, sae: TopKSAE, split: Split, bcfg: BackboneConfig,
                 train_inputs: Optional[torch.Tensor] = None, base: Optional[Forward] = None) -> dict:
    """FVU and L0 on the split's CLS vectors; dead fraction over the SAE's training vectors (a latent is dead if it
    never fires on its training distribution) and, separately, on the split; and the splice check: how often the
    policy's head decisions and the class predictions stay the same when the policy reads the SAE reconstruction.
    `base` is the unspliced `run_model(..., keep_inputs=True)` of the split, shared when evaluating several SAEs.
    The SAE runs on the model's device; the statistics are taken on the CPU."""
    layer = sae.cfg.layer
    j = model.policy.cfg.gated_layers.index(layer)
    device = next(model.parameters()).device
    sae = sae.to(device).eval()
    if base is None:
        base = run_model(model, split.images, bcfg, keep_inputs=True)
    x = torch.from_numpy(base.policy_inputs[:, j])
    out = sae(x.to(device))
    recon, latents = out.recon.float().cpu(), out.latents.float().cpu()

    def splice(i: int, cls: torch.Tensor) -> torch.Tensor:
        return sae(cls).recon if i == layer else cls

    spliced = run_model(model, split.images, bcfg, policy_input_fn=splice)
    gated = model.policy.cfg.gated_layers
    dead = None
    if train_inputs is not None:
        fired = torch.zeros(sae.cfg.num_latents, dtype=torch.bool)
        for i in range(0, len(train_inputs), 4096):  # in chunks: the dense (N, latents) matrix is never whole
            fired |= (sae.dense_latents(train_inputs[i:i + 4096].to(device)) != 0).any(0).cpu()
        dead = float((~fired).float().mean())  # = dead_fraction over all training vectors
    return {
        "layer": layer, "fvu": fvu(x, recon), "l0": l0(latents),
        "dead_fraction": dead,
        "dead_fraction_eval_split": dead_fraction(latents), "eval_vectors": len(x),
        "num_latents": sae.cfg.num_latents, "k": sae.cfg.k,
        "splice_head_agreement": float((spliced.masks[:, gated] == base.masks[:, gated]).mean()),
        "splice_layer_agreement": float((spliced.masks[:, layer] == base.masks[:, layer]).mean()),
        "splice_pred_agreement": float((spliced.logits.argmax(-1) == base.logits.argmax(-1)).mean()),
        "splice_acc": accuracy(spliced.logits.argmax(-1), split.labels),
    }

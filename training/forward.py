"""`run_model`: the deterministic (eval) forward of a gated ViT over uint8 images, collected as numpy. Steering and
export read every model output through it."""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch

from .model import BackboneConfig, GatedViT, PolicyInputFn
from .tensors import image_batches

__all__ = ["Forward", "run_model"]


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
    """Deterministic (eval) forward over uint8 images (N, H, W, C), batch by batch on the model's device."""
    model.eval()
    device = next(model.parameters()).device
    if head_mask is not None:
        head_mask = head_mask.to(device)
    outs = {"logits": [], "masks": [], "keep_logits": [], "policy_inputs": []}
    for _, x in image_batches(images, cfg, batch_size, device=device):
        o = model(x, head_mask=head_mask, policy_input_fn=policy_input_fn, keep_threshold=keep_threshold)
        outs["logits"].append(o.logits.float().cpu())
        outs["masks"].append(o.masks.float().cpu())
        if o.keep_logits is not None:
            outs["keep_logits"].append(o.keep_logits.float().cpu())
            if keep_inputs:
                outs["policy_inputs"].append(o.policy_inputs.float().cpu())
    cat = {k: torch.cat(v).numpy() if v else None for k, v in outs.items()}
    return Forward(**cat)

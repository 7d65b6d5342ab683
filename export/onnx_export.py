"""ONNX export of (pruned) timm ViTs and the masked-not-removed peer, with checker and ONNX Runtime parity.

The TorchScript exporter (`dynamo=False`, opset 17) is used: it writes one self-contained .onnx file, takes about a
second for a small ViT (the dynamo exporter took ~4x longer here) and exports timm's manual attention path cleanly
with a dynamic batch axis. Tracing uses batch 2 so no size-1 dimension gets baked into a Reshape.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn as nn

from .manifest import INPUT_NAME, OUTPUT_NAME, max_abs_diff
from .runtime import ort_session
from .prune import manual_attention

__all__ = ["OPSET", "PARITY_BATCHES", "PARITY_TOL", "MaskedLogits", "export_onnx", "check_onnx", "Parity",
           "torch_logits"]

OPSET = 17
PARITY_BATCHES = (1, 3, 8)
PARITY_TOL = 1e-4


class MaskedLogits(nn.Module):
    """The AdaViT-style peer: the gated model with a constant head mask, heads zeroed but still computed."""

    def __init__(self, gated: nn.Module, mask: Sequence[Sequence[int]]):
        super().__init__()
        self.gated = gated
        self.register_buffer("mask", torch.tensor(mask, dtype=torch.float32))  # (depth, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gated(x, head_mask=self.mask).logits


def export_onnx(model: nn.Module, path: Path, in_chans: int, img_size: int, opset: int = OPSET) -> Path:
    """Export `model` (images -> logits) to a single .onnx file with a dynamic batch axis."""
    model = manual_attention(model).eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = torch.randn(2, in_chans, img_size, img_size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings about python bools in timm's forward: constant here
        torch.onnx.export(model, (x,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, opset_version=opset,
                          do_constant_folding=True, dynamo=False)
    return path


@torch.no_grad()
def torch_logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    out = model(torch.from_numpy(x))
    return (out.logits if hasattr(out, "logits") else out).float().numpy()


class Parity(NamedTuple):
    max_abs: dict[str, float]  # batch size (as str, JSON key) -> max |ORT - torch| logit difference
    ok: bool


def check_onnx(path: Path, reference: nn.Module, in_chans: int, img_size: int, batches: Sequence[int] = PARITY_BATCHES,
               tol: float = PARITY_TOL, seed: int = 0) -> Parity:
    """`onnx.checker` (full_check) and ONNX Runtime vs `reference` (PyTorch) logits at each batch size."""
    import onnx

    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    sess = ort_session(path, threads=1)
    gen = np.random.default_rng(seed)
    diffs = {}
    for b in batches:
        x = gen.standard_normal((b, in_chans, img_size, img_size)).astype(np.float32)
        got = sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
        diffs[str(b)] = max_abs_diff(got, torch_logits(reference, x))
    return Parity(diffs, all(d <= tol for d in diffs.values()))

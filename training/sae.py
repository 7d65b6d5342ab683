"""TopK sparse autoencoder (Gao et al. 2024) on the CLS residual the head policy reads.

encode: z = TopK(ReLU(W_enc (x − b_pre) + b_enc)); decode: x̂ = W_dec z + b_pre, with unit-norm decoder rows.
An auxiliary loss (AuxK) asks the top `aux_k` dead latents to reconstruct the residual error, reviving them.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn as nn

from steerprune.errors import UserError

__all__ = ["SAEConfig", "TopKSAE", "EncoderOutput", "SAEOutput"]


@dataclass
class SAEConfig:
    d_in: int
    """Width of the residual (the ViT's embed_dim)."""
    layer: int
    """Block index whose input CLS residual this SAE encodes."""
    expansion: int = 4
    """Dictionary size as a multiple of d_in (few samples here: keep it small)."""
    k: int = 16
    """Active latents per input."""
    aux_k: Optional[int] = None
    """Dead latents used by the auxiliary loss; default d_in // 2."""
    aux_coef: float = 1.0
    """Weight of the auxiliary loss. Gao et al. use 1/32 with billions of tokens; with ~10^4 CLS vectors a strong
    AuxK is what keeps latents alive (digits: 21% dead at 1/32, 3% at 1, same FVU)."""
    dead_after: int = 1000
    """A latent that has not fired for this many training inputs counts as dead for the auxiliary loss."""

    def __post_init__(self):
        if self.d_in <= 0 or self.expansion <= 0:
            raise UserError("SAE d_in and expansion must be positive")
        if not 0 < self.k <= self.num_latents:
            raise UserError(f"SAE k must be in 1..{self.num_latents}, got {self.k}")
        if self.aux_k is None:
            self.aux_k = max(1, self.d_in // 2)

    @property
    def num_latents(self) -> int:
        return self.d_in * self.expansion


class EncoderOutput(NamedTuple):
    top_acts: torch.Tensor  # (B, k) non-negative activations of the chosen latents
    top_indices: torch.Tensor  # (B, k)
    pre_acts: torch.Tensor  # (B, m) ReLU pre-activations of every latent


class SAEOutput(NamedTuple):
    recon: torch.Tensor  # (B, d)
    latents: torch.Tensor  # (B, m) dense, exactly k (or fewer, if ReLU zeroes some) non-zeros per row
    fvu: torch.Tensor  # scalar
    aux_loss: torch.Tensor  # scalar (0 when no latent is dead)


class TopKSAE(nn.Module):
    def __init__(self, cfg: SAEConfig, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.cfg = cfg
        m, d = cfg.num_latents, cfg.d_in
        self.encoder = nn.Linear(d, m, **dd)
        self.W_dec = nn.Parameter(self.encoder.weight.data.clone())  # (m, d): tied init, then trained apart
        self.b_pre = nn.Parameter(torch.zeros(d, **dd))
        nn.init.zeros_(self.encoder.bias)
        self.set_decoder_norm_to_unit_norm()
        self.register_buffer("steps_since_fired", torch.zeros(m, dtype=torch.long, device=device))

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        self.W_dec.data /= self.W_dec.data.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Keep decoder rows on the unit sphere: drop the gradient component along each row."""
        if self.W_dec.grad is not None:
            parallel = (self.W_dec.grad * self.W_dec.data).sum(1, keepdim=True)
            self.W_dec.grad -= parallel * self.W_dec.data

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.encoder(x - self.b_pre))  # (B, m)

    def encode(self, x: torch.Tensor) -> EncoderOutput:
        pre = self.pre_acts(x)
        top_acts, top_indices = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return EncoderOutput(top_acts, top_indices, pre)

    def dense_latents(self, x: torch.Tensor) -> torch.Tensor:
        enc = self.encode(x)
        return torch.zeros_like(enc.pre_acts).scatter_(-1, enc.top_indices, enc.top_acts)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Dense latents (B, m) -> reconstruction (B, d)."""
        return z @ self.W_dec + self.b_pre

    def forward(self, x: torch.Tensor) -> SAEOutput:
        enc = self.encode(x)
        z = torch.zeros_like(enc.pre_acts).scatter_(-1, enc.top_indices, enc.top_acts)  # (B, m)
        recon = self.decode(z)
        err = x - recon
        total_var = ((x - x.mean(0, keepdim=True)) ** 2).sum().clamp_min(1e-12)
        fvu = (err ** 2).sum() / total_var
        aux = x.new_zeros(())
        if self.training:
            with torch.no_grad():
                fired = (z != 0).any(0)
                self.steps_since_fired += x.shape[0]
                self.steps_since_fired[fired] = 0
            dead = self.steps_since_fired > self.cfg.dead_after
            n_dead = int(dead.sum())
            if n_dead:
                k_aux = min(self.cfg.aux_k, n_dead)
                dead_pre = enc.pre_acts.masked_fill(~dead, 0.0)  # only dead latents compete
                acts, idx = dead_pre.topk(k_aux, dim=-1, sorted=False)
                aux_recon = torch.zeros_like(dead_pre).scatter_(-1, idx, acts) @ self.W_dec
                e = err.detach()
                aux = ((e - aux_recon) ** 2).sum() / ((e - e.mean(0, keepdim=True)) ** 2).sum().clamp_min(1e-12)
        return SAEOutput(recon, z, fvu, aux)

    def save_config(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self.cfg), indent=2))

    @staticmethod
    def load_config(path: Path) -> SAEConfig:
        return SAEConfig(**json.loads(Path(path).read_text()))

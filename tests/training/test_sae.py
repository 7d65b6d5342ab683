"""TopK SAE: exactly k active latents, unit-norm decoder, FVU falls with training, AuxK revives latents."""
import torch

from steerprune.training.metrics import binomial_ci, dead_fraction, fvu, l0
from steerprune.training.sae import SAEConfig, TopKSAE
from steerprune.training.loops import train_sae


def sparse_data(n=4000, d=32, atoms=96, active=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.nn.functional.normalize(torch.randn(atoms, d, generator=g), dim=1)
    idx = torch.stack([torch.randperm(atoms, generator=g)[:active] for _ in range(n)])
    coef = torch.rand(n, active, generator=g) * 3 + 0.5
    return (coef[..., None] * dictionary[idx]).sum(1) + 1.0  # (n, d), with an offset the pre-bias must learn


def test_topk_gives_exactly_k_active_latents():
    sae = TopKSAE(SAEConfig(d_in=32, layer=1, expansion=4, k=7))
    x = sparse_data(200)
    z = sae.dense_latents(x)
    assert z.shape == (200, 128)
    assert torch.all((z != 0).sum(-1) <= 7) and (z != 0).sum(-1).float().mean() > 6.5
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(128), atol=1e-5)


def test_fvu_falls_and_decoder_stays_unit_norm():
    x = sparse_data()
    cfg = SAEConfig(d_in=32, layer=1, expansion=4, k=8)
    untrained = TopKSAE(cfg)
    with torch.no_grad():
        untrained.b_pre.copy_(x.mean(0))
        before = fvu(x, untrained(x).recon)
    sae = train_sae(x, cfg, steps=600, lr=2e-3, batch_size=256, seed=0, log=None)
    with torch.no_grad():
        out = sae(x)
    after = fvu(x, out.recon)
    assert after < 0.5 * before and after < 0.2
    assert abs(float(out.fvu) - after) < 1e-5
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(128), atol=1e-4)
    assert l0(out.latents) <= 8.0
    assert dead_fraction(out.latents) < 0.5


def test_config_validation_and_roundtrip(tmp_path):
    import pytest

    from steerprune.errors import UserError

    with pytest.raises(UserError):
        SAEConfig(d_in=8, layer=0, expansion=2, k=17)
    sae = TopKSAE(SAEConfig(d_in=8, layer=2, k=3))
    sae.save_config(tmp_path / "s.json")
    assert TopKSAE.load_config(tmp_path / "s.json") == sae.cfg


def test_binomial_ci_contains_estimate():
    lo, hi = binomial_ci(30, 36)
    assert lo < 30 / 36 < hi and hi - lo > 0.15
    assert binomial_ci(0, 10)[0] == 0.0
